"""The baselines from the command line: `methods`, multi-concept and YAML runs, export/import, and bad input
(exit 2, one line on stderr, nothing written)."""
import shutil

import pytest
import torch

from conftest import make_photos
from test_bad_input import assert_no_train_output, check_error, run_cli, train_args


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "disc.safetensors"


@pytest.fixture(scope="module")
def ti_concept(tmp_path_factory, _tiny_master):
    import copy

    from personalize import train

    root = tmp_path_factory.mktemp("ti")
    return train(copy.deepcopy(_tiny_master), make_photos(root / "photos", n=2), token="<disc>", superclass="ball",
                 out=root / "ti.safetensors", method="textual-inversion",
                 settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0}, progress=False)


def test_methods_lists_every_method_with_its_defaults(capsys, monkeypatch):
    from personalize import cli
    from personalize.methods import get

    monkeypatch.setattr(cli.out_console, "width", 1000)  # one table row per line
    code, out, err = run_cli(capsys, ["methods"])
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    expected = {"textual-inversion": ("num_vectors=1", "steps=3000", "lr=0.002"),
                "dreambooth": ("steps=800", "prior_loss_weight=1.0", "identifier=sks", "lr=5e-06"),
                "dreambooth-lora": ("rank=4", "prior_loss_weight=0.0", "lr=0.0001"),
                "custom-diffusion": ("steps=250", "lr=4e-05", "init_words=ktn+pll+ucd"),
                "perfusion": ("lr_value=0.03",), "residuals": ()}
    for name, defaults in expected.items():
        assert name in rows, f"{name} not listed"
        assert get(name).description in rows[name]
        for default in defaults:
            assert default in rows[name], (name, default)


def test_multi_concept_run_from_repeated_flags_and_from_yaml(capsys, photos, tmp_path):
    other = make_photos(tmp_path / "other", n=2)
    args = ["train", "--method", "custom-diffusion", "--base", "tiny", "--images", photos, "--token", "<disc>",
            "--superclass", "ball",
            "--images", other, "--token", "<blob>", "--superclass", "cup", "--prior-loss-weight", "0",
            "--steps", "1", "--batch-size", "2", "--checkpoint-every", "0", "--device", "cpu"]
    code, _, err = run_cli(capsys, [*args, "--out", tmp_path / "flags.safetensors"])
    assert code == 0, err
    config = tmp_path / "two.yaml"
    config.write_text(f"base: tiny\nconcepts:\n  - {{images: {photos}, token: <disc>, superclass: ball}}\n"
                      f"  - {{images: {other}, token: <blob>, superclass: cup}}\nprior_loss_weight: 0\n")
    code, _, err = run_cli(capsys, ["train", "--method", "custom-diffusion", "--config", config, "--steps", "1",
                                    "--batch-size", "2", "--checkpoint-every", "0", "--device", "cpu",
                                    "--out", tmp_path / "yaml.safetensors"])
    assert code == 0, err
    from personalize import load_concept

    a, b = load_concept(tmp_path / "flags.safetensors"), load_concept(tmp_path / "yaml.safetensors")
    assert a.header["tokens"] == b.header["tokens"] == ["<disc>", "<blob>"]
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    code, out, _ = run_cli(capsys, ["inspect", tmp_path / "flags.safetensors"])
    assert "<blob> (cup)" in " ".join(out.split())


def test_export_then_import_from_the_command_line(capsys, ti_concept, tmp_path):
    code, out, err = run_cli(capsys, ["export", ti_concept, "--format", "a1111", "--out", tmp_path / "a1111"])
    assert code == 0, err
    pt = tmp_path / "a1111" / "<disc>.pt"
    assert pt.is_file() and (tmp_path / "a1111" / "export.json").is_file()
    back = tmp_path / "back.safetensors"
    code, _, err = run_cli(capsys, ["import", pt, "--method", "textual-inversion", "--base", "tiny",
                                    "--superclass", "ball", "--out", back])
    check_error(code, err, "pickle", "--allow-pickle")
    assert not back.exists()
    code, _, err = run_cli(capsys, ["import", pt, "--method", "textual-inversion", "--base", "tiny",
                                    "--superclass", "ball", "--out", back, "--allow-pickle"])
    assert code == 0, err
    from personalize import load_concept

    assert torch.equal(load_concept(back).tensors["embedding"], load_concept(ti_concept).tensors["embedding"])


@pytest.mark.parametrize("extra, words", [
    (["--method", "textual-inversion", "--num-vectors", "0"], ["num_vectors", ">= 1"]),
    (["--method", "dreambooth-lora", "--rank", "0"], ["rank", ">= 1"]),
    (["--method", "dreambooth", "--class-images", "/no/such/classes"], ["/no/such/classes", "does not exist"]),
    (["--method", "dreambooth-lora", "--set", "identifier=teddybear"], ["teddybear", "single-token"]),
    (["--method", "custom-diffusion", "--set", "init_words="], ["init_words", "one per concept"]),
], ids=["ti-vectors", "lora-rank", "class-folder", "identifier", "init-words"])
def test_bad_baseline_settings(capsys, photos, out, extra, words):
    code, _, err = run_cli(capsys, train_args(photos, out, *extra))
    check_error(code, err, *words)
    assert_no_train_output(out)


def test_several_concepts_need_a_multi_concept_method(capsys, photos, tmp_path, out):
    other = make_photos(tmp_path / "other", n=2)
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "dreambooth-lora", "--images", other,
                                              "--token", "<b>"))
    check_error(code, err, "dreambooth-lora", "one concept per run", "custom-diffusion")
    assert_no_train_output(out)
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "custom-diffusion", "--images", other))
    check_error(code, err, "2 image folders", "1 tokens", "one --token")
    assert_no_train_output(out)


def test_train_without_images(capsys, out):
    code, _, err = run_cli(capsys, ["train", "--base", "tiny", "--token", "<a>", "--superclass", "ball", "--out", out])
    check_error(code, err, "missing", "--images")


@pytest.mark.parametrize("args, words", [
    (["--format", "kohya"], ["textual-inversion", "diffusers, a1111", "'kohya'"]),
    (["--format", "diffusers", "--out", "OUT"], ["file", "folder"]),
], ids=["wrong-format", "out-is-a-file"])
def test_bad_export(capsys, ti_concept, tmp_path, args, words):
    (tmp_path / "OUT").write_text("a file")
    args = [str(tmp_path / "OUT") if a == "OUT" else a for a in args]
    code, _, err = run_cli(capsys, ["export", ti_concept, *(args if "--out" in args else [*args, "--out", tmp_path / "e"])])
    check_error(code, err, *words)


@pytest.mark.parametrize("make, args, words", [
    (lambda p: torch.save({"a": torch.ones(1)}, p / "x.bin"), ["x.bin", "--method", "textual-inversion"],
     ["x.bin", "pickle", "--allow-pickle"]),
    (lambda p: __import__("safetensors.torch").torch.save_file({"a": torch.ones(1, 32), "b": torch.ones(1, 32)},
                                                               str(p / "two.safetensors")),
     ["two.safetensors", "--method", "textual-inversion"], ["not a textual-inversion file", "2 tensors"]),
    (lambda p: (p / "junk.safetensors").write_bytes(b"junk"), ["junk.safetensors", "--method", "dreambooth-lora"],
     ["junk.safetensors", "not a readable safetensors"]),
    (lambda p: __import__("safetensors.torch").torch.save_file({"unet.x.weight": torch.ones(1)}, str(p / "l.safetensors")),
     ["l.safetensors", "--method", "dreambooth-lora"], ["unet.x.weight", "LoRA weights are"]),
    (lambda p: __import__("safetensors.torch").torch.save_file({"a": torch.ones(1)}, str(p / "cd.safetensors")),
     ["cd.safetensors", "--method", "custom-diffusion"], ["--embeddings"]),
    (lambda p: __import__("safetensors.torch").torch.save_file({"a": torch.ones(1)}, str(p / "p.safetensors")),
     ["p.safetensors", "--method", "perfusion"], ["perfusion has no import format", "textual-inversion"]),
    (lambda p: __import__("safetensors.torch").torch.save_file({"<t>": torch.ones(1, 32)}, str(p / "t.safetensors")),
     ["t.safetensors", "--method", "textual-inversion", "--superclass", "cup"],
     ["textual-inversion concepts have one superclass", "--superclass once"]),
], ids=["pickle", "not-ti", "junk", "not-lora", "cd-no-embeddings", "perfusion", "two-superclasses"])
def test_bad_import(capsys, tmp_path, make, args, words):
    make(tmp_path)
    out = tmp_path / "out" / "c.safetensors"
    code, _, err = run_cli(capsys, ["import", tmp_path / args[0], *args[1:], "--base", "tiny", "--superclass", "ball",
                                    "--out", out])
    check_error(code, err, *words)
    assert not out.exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
