"""Every bad input: exit code 2, one line on stderr naming the problem and the fix, and no output left behind."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_photos

REPO = Path(__file__).resolve().parents[1]
TOKEN = "<disc>"  # the token of conftest's trained_concept


# --------------------------------------------------------------------------- helpers
def run_cli(capsys, args) -> tuple[int, str, str]:
    """Run ``personalize ARGS`` in this process; returns (exit code, stdout, stderr)."""
    from personalize.cli import main

    capsys.readouterr()  # drop anything earlier
    code, crash = 0, ""
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # an uncaught error: a real process would print a traceback and exit 1
        code, crash = 1, f"Traceback (uncaught): {type(exc).__name__}: {exc}\n"
    out, err = capsys.readouterr()
    return code, out, err + crash


def error_line(err: str) -> str:
    """The 'error: ...' line of stderr (whatever else is there)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line on stderr, got:\n{err}"
    return lines[0]


def assert_one_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr should be exactly one line, got {len(lines)}:\n{err}"
    assert "Traceback" not in err


def check_error(code: int, err: str, *words) -> str:
    """Exit code 2, exactly one line on stderr, containing each of ``words``.

    A word given as a tuple means any one of its alternatives.
    """
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    line = error_line(err)
    assert_one_line(err)
    lowered = line.lower()
    for word in words:
        options = word if isinstance(word, tuple) else (word,)
        assert any(o.lower() in lowered for o in options), f"{options} not in: {line}"
    return line


def train_args(images, out, *extra, superclass="ball", token=TOKEN, base="tiny"):
    return ["train", "--base", base, "--images", images, "--superclass", superclass, "--token", token,
            "--out", out, "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--device", "cpu",
            "--masks", "none", *extra]


def assert_no_train_output(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert not out.with_name(out.name + ".ckpt").exists(), "OUT.ckpt was created"
    assert not out.with_name(out.name + ".previews").exists(), "OUT.previews was created"
    if out.parent.exists():
        left = sorted(p.name for p in out.parent.iterdir())
        assert left == [], f"files left in the --out folder: {left}"


def gen_args(concept, out, *extra, base="tiny"):
    return ["generate", "--base", base, "--concept", concept, "--prompt", f"a {TOKEN} on a table", "--out", out,
            "--num-images", "1", "--steps", "1", "--device", "cpu", *extra]


def assert_no_images(folder: Path) -> None:
    if folder.exists():
        left = sorted(p.name for p in folder.rglob("*"))
        assert not any(n.endswith(".png") for n in left), f"PNGs written: {left}"
        assert not any(n.endswith(".tmp") for n in left), f"temp files left: {left}"


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out" / "disc.safetensors"


@pytest.fixture
def concept(tmp_path, trained_concept) -> Path:
    """A private copy of the trained concept file (tests may damage it)."""
    path = tmp_path / "concepts" / "disc.safetensors"
    path.parent.mkdir()
    shutil.copyfile(trained_concept, path)
    return path


def _data_start(path: Path) -> int:
    """Offset of the first tensor byte in a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


# --------------------------------------------------------------------------- controls: the same commands work
def test_valid_train_arguments_succeed(capsys, photos, out):
    """The arguments the failing cases vary really are fine otherwise."""
    code, stdout, err = run_cli(capsys, train_args(photos, out))
    assert code == 0, err
    assert out.is_file()
    assert "error" not in err.lower()


def test_valid_concept_generates_and_inspects(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 1
    code, stdout, err = run_cli(capsys, ["inspect", concept])
    assert code == 0, err
    assert TOKEN in stdout


# --------------------------------------------------------------------------- the image folder
def test_missing_image_folder(capsys, tmp_path, out):
    code, _, err = run_cli(capsys, train_args(tmp_path / "no-such-photos", out))
    check_error(code, err, "no-such-photos", "does not exist", "--images")
    assert_no_train_output(out)


@pytest.mark.parametrize("junk", [[], ["notes.txt", ".DS_Store"]], ids=["empty", "only-non-images"])
def test_empty_image_folder(capsys, tmp_path, out, junk):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in junk:
        (folder / name).write_text("not a photo")
    code, _, err = run_cli(capsys, train_args(folder, out))
    check_error(code, err, "no images", ("add", "put"), "photos")
    assert_no_train_output(out)


def test_image_folder_is_a_file(capsys, tmp_path, out):
    f = tmp_path / "photo.png"
    f.write_bytes(b"x")
    code, _, err = run_cli(capsys, train_args(f, out))
    check_error(code, err, "not a folder", "--images")
    assert_no_train_output(out)


def _cut_jpeg(path: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(48, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_image_in_folder(capsys, tmp_path, out, kind):
    folder = make_photos(tmp_path / "photos")
    bad = folder / "broken.jpg"
    if kind == "garbage":
        bad.write_bytes(b"this is not a JPEG at all, just text with a .jpg name")
    else:
        _cut_jpeg(bad)
    code, _, err = run_cli(capsys, train_args(folder, out))
    check_error(code, err, "broken.jpg", "not a readable image", ("remove", "re-save"))
    assert_no_train_output(out)


# --------------------------------------------------------------------------- words
def test_empty_superclass(capsys, photos, out):
    """A class phrase of several tokens is accepted (tests/test_class_phrases.py); an empty one is not."""
    code, _, err = run_cli(capsys, train_args(photos, out, superclass="  "))
    check_error(code, err, "superclass", "empty", "penguin plushie")
    assert_no_train_output(out)


@pytest.mark.parametrize("token", ["dog", "Dog", "sks"])
def test_token_already_in_vocabulary(capsys, photos, out, token):
    code, _, err = run_cli(capsys, train_args(photos, out, token=token))
    check_error(code, err, f"'{token}'", "already in the vocabulary", ("pick a new", "such as"))
    assert_no_train_output(out)


def test_token_with_spaces(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, token="my teddy"))
    check_error(code, err, "my teddy", "without spaces")
    assert_no_train_output(out)


# --------------------------------------------------------------------------- options
def test_resume_without_checkpoint(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--resume"))
    check_error(code, err, "--resume", "no checkpoint", "disc.safetensors.ckpt", "without --resume")
    assert_no_train_output(out)


def test_unknown_method_did_you_mean(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "perfusin"))
    check_error(code, err, "unknown method", "'perfusin'", "did you mean 'perfusion'")
    assert_no_train_output(out)


def test_unknown_method_lists_known(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "dreambooth-xl"))
    check_error(code, err, "unknown method", "'dreambooth-xl'", "known methods", "perfusion")
    assert_no_train_output(out)


def test_unknown_set_key(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--set", "bogus_knob=3"))
    check_error(code, err, "unknown setting", "bogus_knob", "known", "lock", "steps")
    assert_no_train_output(out)


def test_set_without_equals(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--set", "lock"))
    check_error(code, err, "--set 'lock'", "KEY=VALUE")
    assert_no_train_output(out)


def test_out_is_an_existing_folder(capsys, photos, tmp_path):
    out = tmp_path / "out" / "disc.safetensors"
    out.mkdir(parents=True)  # a folder where the concept file should go
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "disc.safetensors", ("folder", "directory"))
    assert out.is_dir() and list(out.iterdir()) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["disc.safetensors"], "temp files left behind"
    assert not out.with_name(out.name + ".ckpt").exists()


def test_out_without_safetensors_suffix(capsys, photos, tmp_path):
    out = tmp_path / "out" / "disc.pt"
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "disc.pt", ".safetensors")
    assert_no_train_output(out)


# --------------------------------------------------------------------------- concept files: another base
@pytest.fixture
def other_base(tmp_path, tiny) -> Path:
    """The tiny base with one text-encoder weight changed, saved as a diffusers folder."""
    params = [p for name, p in tiny.text_encoder.named_parameters() if name.endswith("layers.0.mlp.fc1.weight")]
    assert len(params) == 1
    with torch.no_grad():
        params[0][0, 0] += 0.5
    folder = tmp_path / "other-base"
    tiny.save_pretrained(folder)
    return folder


def test_generate_refuses_concept_from_another_base(capsys, concept, other_base, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder, base=other_base))
    assert code == 2, err
    line = error_line(err)
    assert "disc.safetensors" in line
    assert "text-encoder weights" in line  # says what differs ...
    assert "architecture" not in line and "tokenizer" not in line  # ... and only what differs
    assert "re-train" in line or "base it was trained on" in line  # and what to do
    assert_no_images(folder)
    assert_one_line(err)


def test_generate_accepts_concept_on_a_saved_copy_of_its_base(capsys, concept, tiny, tmp_path):
    """Control for the test above: an unchanged copy of tiny, saved to a folder, is the same base."""
    copy_dir = tmp_path / "tiny-copy"
    tiny.save_pretrained(copy_dir)
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder, base=copy_dir))
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 1


# --------------------------------------------------------------------------- concept files: damaged
def _truncate(path: Path, how: str) -> None:
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "last-byte": len(data) - 1, "header": 5}[how]
    path.write_bytes(data[:keep])


def _tamper(path: Path, how: str) -> None:
    if how == "flip-data-byte":
        data = bytearray(path.read_bytes())
        start = _data_start(path)
        assert start < len(data)
        data[start + 2] ^= 0x10
        path.write_bytes(bytes(data))
        return
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if how == "edited-values":
        tensors["embedding"] = tensors["embedding"] + 0.25
    elif how == "edited-header":
        header = json.loads(metadata["personalize"])
        header["superclass"] = "cat"
        metadata = dict(metadata, personalize=json.dumps(header, sort_keys=True, separators=(",", ":")))
    save_file(tensors, str(path), metadata=metadata)  # the old checksum is kept


TRUNCATIONS = ["half", "last-byte", "header"]
TAMPERINGS = ["flip-data-byte", "edited-values", "edited-header"]


@pytest.mark.parametrize("how", TRUNCATIONS)
def test_generate_truncated_concept(capsys, concept, tmp_path, how):
    _truncate(concept, how)
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    check_error(code, err, "disc.safetensors", "truncated", ("re-train", "re-copy"))
    assert_no_images(folder)


@pytest.mark.parametrize("how", TRUNCATIONS)
def test_inspect_truncated_concept(capsys, concept, how):
    _truncate(concept, how)
    code, stdout, err = run_cli(capsys, ["inspect", concept])
    check_error(code, err, "disc.safetensors", "truncated", ("re-train", "re-copy"))
    assert TOKEN not in stdout


@pytest.mark.parametrize("how", TAMPERINGS)
def test_generate_tampered_concept(capsys, concept, tmp_path, how):
    _tamper(concept, how)
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    check_error(code, err, "disc.safetensors", ("checksum", "modified"), ("re-train", "re-copy"))
    assert_no_images(folder)


@pytest.mark.parametrize("how", TAMPERINGS)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_inspect_tampered_concept(capsys, concept, how, as_json):
    _tamper(concept, how)
    code, stdout, err = run_cli(capsys, ["inspect", concept] + (["--json"] if as_json else []))
    check_error(code, err, "disc.safetensors", ("checksum", "modified"), ("re-train", "re-copy"))
    assert TOKEN not in stdout


def test_generate_missing_concept_file(capsys, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(tmp_path / "nope.safetensors", folder))
    check_error(code, err, "nope.safetensors", "does not exist")
    assert_no_images(folder)


def test_generate_out_is_an_existing_file(capsys, concept, tmp_path):
    target = tmp_path / "samples"
    target.write_text("my notes")  # a file where the image folder should go
    code, _, err = run_cli(capsys, gen_args(concept, target))
    check_error(code, err, "samples", ("folder", "directory", "file"))
    assert target.read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concepts", "samples"], "stray files written"


def test_not_a_concept_file(capsys, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    code, _, err = run_cli(capsys, ["inspect", path])
    check_error(code, err, "lora.safetensors", "not a personalize concept")


# --------------------------------------------------------------------------- a real process, real stderr
def _cli_process(args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "personalize.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)


def test_process_missing_image_folder_prints_one_line(tmp_path, out):
    proc = _cli_process(train_args(tmp_path / "no-such-photos", out))
    check_error(proc.returncode, proc.stderr, "no-such-photos", "does not exist", "--images")
    assert proc.stdout.strip() == ""
    assert_no_train_output(out)


def test_process_hub_base_offline_prints_one_line(tmp_path, out):
    photos = make_photos(tmp_path / "photos")
    proc = _cli_process(train_args(photos, out, base="someone/some-model"))
    check_error(proc.returncode, proc.stderr, "someone/some-model", "offline", "local folder")
    assert_no_train_output(out)


# --------------------------------------------------------------------------- residuals: LAG, export, settings
def test_lag_on_a_concept_without_residuals(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder, "--lag"))
    check_error(code, err, "--lag", "disc.safetensors", "perfusion", "--method residuals")
    assert_no_images(folder)


def test_valid_lag_generation(capsys, residuals_copy, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(residuals_copy, folder, "--lag"))
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 1


def test_export_a_concept_without_residuals(capsys, concept, tmp_path):
    code, _, err = run_cli(capsys, ["export", concept, "--format", "diffusers-lora", "--out", tmp_path / "lora"])
    check_error(code, err, "disc.safetensors", "perfusion", "residuals")
    assert not (tmp_path / "lora").exists()


def test_export_unknown_format(capsys, residuals_copy, tmp_path):
    code, _, err = run_cli(capsys, ["export", residuals_copy, "--format", "kohya", "--out", tmp_path / "lora"])
    check_error(code, err, "'kohya'", "diffusers-lora")
    assert not (tmp_path / "lora").exists()


def test_export_out_is_a_file(capsys, residuals_copy, tmp_path):
    target = tmp_path / "lora"
    target.write_text("notes")
    code, _, err = run_cli(capsys, ["export", residuals_copy, "--out", target])
    check_error(code, err, "lora", ("file", "folder"))
    assert target.read_text() == "notes"


@pytest.mark.parametrize("extra, words", [
    (["--rank-fraction", "0"], ["rank_fraction"]),
    (["--set", "init_token=teddybear"], ["init_token", "teddybear", "single"]),
], ids=["rank-fraction-0", "multi-token-init"])
def test_bad_residuals_settings(capsys, photos, out, extra, words):
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "residuals", *extra))
    check_error(code, err, *words)
    assert_no_train_output(out)


def test_residuals_setting_on_perfusion(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, "--train-token"))
    check_error(code, err, "unknown setting", "train_token")
    assert_no_train_output(out)


# --------------------------------------------------------------------------- usage errors, numbers: one table
# Every command line below is wrong in one way. Each must end with exit code 2, one line on stderr (no
# Traceback, no usage block), before any model loads, and leave nothing under OUTDIR. Placeholders: {photos},
# {out} (a concept file under OUTDIR), {outdir}, {concept} (a trained Perfusion concept, only where needed).
def _train(*extra, flags=True):
    """Train arguments; ``flags=False`` leaves out --steps/--batch-size (flags win over --set)."""
    return ["train", "--base", "tiny", "--images", "{photos}", "--superclass", "ball", "--token", TOKEN,
            "--out", "{out}", *(["--steps", "1", "--batch-size", "1"] if flags else []), "--checkpoint-every", "0",
            "--device", "cpu", "--masks", "none", *extra]


def _generate(*extra, concept="{concept}"):
    return ["generate", "--base", "tiny", "--concept", concept, "--prompt", f"a {TOKEN} on a table",
            "--out", "{outdir}", "--num-images", "1", "--steps", "1", "--device", "cpu", *extra]


USAGE = {
    # train: options typer parses
    "train-steps-word": (_train("--steps", "ten"), ["--steps", "integer"]),
    "train-batch-fraction": (_train("--batch-size", "2.5"), ["--batch-size"]),
    "train-unknown-option": (_train("--learning-rate", "1"), ["no such option", "--learning-rate"]),
    "train-missing-out": (["train", "--images", "{photos}", "--token", TOKEN, "--superclass", "ball"],
                          ["missing option", "--out"]),
    "train-option-without-value": (_train("--steps"), ["--steps", "requires an argument"]),
    # train: numeric options checked before work starts
    "train-steps-negative": (_train("--steps", "-1"), ["--steps", ">= 1", "-1"]),
    "train-steps-zero": (_train("--steps", "0"), ["--steps", ">= 1"]),
    "train-batch-zero": (_train("--batch-size", "0"), ["--batch-size", ">= 1"]),
    "train-seed-negative": (_train("--seed", "-3"), ["--seed", "between 0 and"]),
    "train-seed-too-big": (_train("--seed", str(2**64)), ["--seed", "between 0 and"]),
    "train-checkpoint-every-negative": (_train("--checkpoint-every", "-5"), ["--checkpoint-every", ">= 0"]),
    "train-preview-every-negative": (_train("--preview-every", "-1"), ["--preview-every", ">= 0"]),
    "train-rank-fraction-nan": (_train("--method", "residuals", "--rank-fraction", "nan"),
                                ["'rank_fraction'", "finite"]),
    "train-prior-weight-negative": (_train("--method", "dreambooth", "--prior-loss-weight", "-1"),
                                    ["'prior_loss_weight'", ">= 0"]),
    "train-num-class-images-negative": (_train("--method", "dreambooth", "--num-class-images", "-3"),
                                        ["'num_class_images'", ">= 0"]),
    "train-num-vectors-zero": (_train("--method", "textual-inversion", "--num-vectors", "0"),
                               ["'num_vectors'", ">= 1"]),
    # --set KEY=VALUE: coerced to the field's type, finite, in range
    "set-steps-word": (_train("--set", "steps=abc", flags=False), ["'steps'", "whole number", "'abc'"]),
    "set-steps-negative": (_train("--set", "steps=-10", flags=False), ["'steps'", ">= 1"]),
    "set-batch-fraction": (_train("--set", "batch_size=2.5", flags=False), ["'batch_size'", "whole number"]),
    "set-seed-list": (_train("--set", "seed=[1,2]"), ["'seed'", "whole number"]),
    "set-lr-nan": (_train("--set", "lr_value=NaN"), ["'lr_value'", "finite", "nan"]),
    "set-lr-infinity": (_train("--set", "lr_value=Infinity"), ["'lr_value'", "finite", "inf"]),
    "set-lr-negative": (_train("--set", "lr_value=-0.01"), ["'lr_value'", "> 0"]),
    "set-lr-zero": (_train("--set", "lr_embedding=0"), ["'lr_embedding'", "> 0"]),
    "set-lr-word": (_train("--set", "lr_embedding=fast"), ["'lr_embedding'", "number", "'fast'"]),
    "set-beta-train-nan": (_train("--set", "beta_train=nan"), ["'beta_train'", "finite"]),
    "set-tau-train-zero": (_train("--set", "tau_train=0"), ["'tau_train'", "> 0"]),
    "set-ema-above-one": (_train("--set", "ema=1.5"), ["'ema'", "between 0 and 1"]),
    "set-flip-p-negative": (_train("--set", "flip_p=-0.5"), ["'flip_p'", "between 0 and 1"]),
    "set-max-grad-norm-negative": (_train("--set", "max_grad_norm=-1"), ["'max_grad_norm'", ">= 0"]),
    "set-bool-word": (_train("--set", "gradient_checkpointing=maybe"), ["'gradient_checkpointing'", "true or false"]),
    "set-text-as-list": (_train("--set", "lock=[1]"), ["'lock'", "text"]),
    "set-residuals-lr-negative": (_train("--method", "residuals", "--set", "lr=-1e-3"), ["residuals", "'lr'", "> 0"]),
    "set-ti-weight-decay-nan": (_train("--method", "textual-inversion", "--set", "weight_decay=NaN"),
                                ["'weight_decay'", ">= 0"]),
    "set-dreambooth-lr-text-encoder-inf": (_train("--method", "dreambooth", "--set", "lr_text_encoder=-Infinity"),
                                           ["'lr_text_encoder'", "> 0"]),
    "set-lora-rank-negative": (_train("--method", "dreambooth-lora", "--set", "rank=-2"), ["'rank'", ">= 0"]),
    "set-cd-class-guidance-negative": (_train("--method", "custom-diffusion", "--set", "class_guidance=-7"),
                                       ["'class_guidance'", ">= 0"]),
    "set-cd-class-steps-zero": (_train("--method", "custom-diffusion", "--set", "class_steps=0"),
                                ["'class_steps'", ">= 1"]),
    # generate
    "generate-num-images-zero": (_generate("--num-images", "0"), ["--num-images"]),
    "generate-num-images-negative": (_generate("--num-images", "-2"), ["--num-images"]),
    "generate-num-images-word": (_generate("--num-images", "four"), ["--num-images", "integer"]),
    "generate-steps-zero": (_generate("--steps", "0"), ["--steps"]),
    "generate-guidance-nan": (_generate("--guidance", "nan"), ["--guidance", "finite", "nan"]),
    "generate-guidance-inf": (_generate("--guidance", "inf"), ["--guidance", "finite"]),
    "generate-guidance-negative": (_generate("--guidance", "-1"), ["--guidance", ">= 0"]),
    "generate-beta-nan": (_generate("--beta", "nan"), ["--beta", "finite"]),
    "generate-tau-zero": (_generate("--tau", "0"), ["--tau", "> 0"]),
    "generate-seed-negative": (_generate("--seed", "-1"), ["--seed", "between 0 and"]),
    "generate-knob-beta-nan": (_generate(concept="{concept}:beta=NaN"), ["beta", "finite"]),
    "generate-knob-tau-word": (_generate(concept="{concept}:tau=abc"), ["tau", "number", "'abc'"]),
    "generate-missing-prompt": (["generate", "--concept", "{concept}", "--out", "{outdir}"],
                                ["missing option", "--prompt"]),
    "generate-missing-out": (["generate", "--concept", "{concept}", "--prompt", "a photo"],
                             ["missing option", "--out"]),
    "generate-unknown-option": (_generate("--negative-prompt", "x"), ["no such option", "--negative-prompt"]),
    # export, import, inspect, evaluate, covariance, demo, methods
    "export-missing-out": (["export", "{concept}"], ["missing option", "--out"]),
    "export-missing-file": (["export", "--out", "{outdir}"], ["missing argument"]),
    "export-unknown-option": (["export", "{concept}", "--out", "{outdir}", "--kind", "x"], ["no such option"]),
    "import-missing-method": (["import", "{photos}", "--out", "{out}", "--superclass", "ball"],
                              ["missing option", "--method"]),
    "inspect-missing-file": (["inspect"], ["missing argument"]),
    "evaluate-missing-reference": (["evaluate", "--samples", "{photos}"], ["missing option", "--reference"]),
    "covariance-unknown-option": (["covariance", "--corpus", "x"], ["no such option", "--corpus"]),
    "demo-steps-word": (["demo", "--out", "{outdir}", "--steps", "many"], ["--steps"]),
    "methods-unknown-option": (["methods", "--yaml"], ["no such option", "--yaml"]),
    # the command itself
    "no-command": ([], ["no command given"]),
    "unknown-command": (["trian"], ["no such command", "trian"]),
    # benchmark and toyworld
    "benchmark-no-command": (["benchmark"], ["no command given", "benchmark"]),
    "benchmark-validate-missing-spec": (["benchmark", "validate"], ["missing argument"]),
    "benchmark-run-unknown-option": (["benchmark", "run", "spec.yaml", "--workers", "2"], ["no such option"]),
    "benchmark-report-missing-out": (["benchmark", "report", "x.sqlite"], ["missing option", "--out"]),
    "toyworld-no-command": (["toyworld"], ["no command given", "toyworld"]),
    "toyworld-render-n-zero": (["toyworld", "render", "striped_star", "--out", "{outdir}", "--n", "0"], ["--n"]),
    "toyworld-render-missing-name": (["toyworld", "render", "--out", "{outdir}"], ["missing argument"]),
    "toyworld-score-missing-samples": (["toyworld", "score"], ["missing option", "--samples"]),
    "toyworld-train-base-unknown-option": (["toyworld", "train-base", "--out", "{outdir}", "--bogus"],
                                           ["no such option", "--bogus", "train-base --help"]),
    "toyworld-train-base-steps-word": (["toyworld", "train-base", "--out", "{outdir}", "--steps", "ten"],
                                       ["--steps", "integer"]),
    "toyworld-train-base-attn-levels": (["toyworld", "train-base", "--out", "{outdir}", "--unet-attn", "1"],
                                        ["--unet-attn", "--unet-channels"]),
    "toyworld-train-base-prediction-type": (["toyworld", "train-base", "--out", "{outdir}", "--prediction-type", "x"],
                                            ["--prediction-type", "v_prediction", "'x'"]),
    "toyworld-evaluate-base-unknown-option": (["toyworld", "evaluate-base", "--bogus"],
                                              ["no such option", "evaluate-base --help"]),
}


@pytest.fixture
def cli_paths(request, tmp_path, photos):
    """The placeholder values; {concept} only for the cases that name it (it costs a trained concept)."""
    paths = {"photos": photos, "outdir": tmp_path / "out", "out": tmp_path / "out" / "disc.safetensors"}
    if any("{concept}" in str(a) for a in USAGE[request.node.callspec.id][0]):
        paths["concept"] = request.getfixturevalue("concept")
    return paths


@pytest.mark.parametrize("case", list(USAGE), ids=list(USAGE))
def test_usage_error_is_one_line_exit_2(capsys, monkeypatch, tmp_path, cli_paths, case):
    import personalize.base
    import personalize.training.loop

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for module in (personalize.base, personalize.training.loop):
        monkeypatch.setattr(module, "load_base", no_model)
    monkeypatch.chdir(tmp_path)
    args, words = USAGE[case]
    code, _, err = run_cli(capsys, [a.format(**cli_paths) if isinstance(a, str) else a for a in args])
    check_error(code, err, *words)
    assert not cli_paths["outdir"].exists(), f"{cli_paths['outdir']} was written"


def test_no_command_prints_the_help_on_stdout(capsys):
    code, stdout, err = run_cli(capsys, [])
    check_error(code, err, "no command given")
    assert "Usage" in stdout and "train" in stdout and "generate" in stdout


def test_help_still_exits_0(capsys):
    code, stdout, err = run_cli(capsys, ["train", "--help"])
    assert code == 0, err
    assert "--steps" in stdout and "error" not in err


def test_process_usage_error_prints_one_line(tmp_path):
    """A real process: typer's bundled click errors become one line, exit 2, no rich traceback box."""
    proc = _cli_process(["generate", "--concept", "x.safetensors", "--prompt", "p", "--out", tmp_path / "g",
                         "--num-images", "0"])
    check_error(proc.returncode, proc.stderr, "--num-images")
    assert not (tmp_path / "g").exists()


# --------------------------------------------------------------------------- --config: the same checks
@pytest.mark.parametrize("yaml_text, words", [
    ("steps: abc\n", ["'steps'", "whole number"]),
    ("lr_value: .nan\n", ["'lr_value'", "finite"]),
    ("batch_size: -4\n", ["'batch_size'", ">= 1"]),
    ("perfusion:\n  lr_embedding: .inf\n", ["'lr_embedding'", "finite"]),
], ids=["steps-word", "lr-nan", "batch-negative", "nested-lr-inf"])
def test_bad_config_values(capsys, photos, out, tmp_path, yaml_text, words):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml_text)
    args = [a.format(photos=photos, out=out) for a in _train("--config", str(config), flags=False)]
    code, _, err = run_cli(capsys, args)
    check_error(code, err, *words)
    assert_no_train_output(out)


def test_set_values_of_the_right_type_still_work(capsys, photos, out):
    """Control: YAML/JSON spellings of the right type are coerced, not refused (2.0 steps, 'on', 1 for 1.0)."""
    code, _, err = run_cli(capsys, train_args(photos, out, "--set", "steps=1.0", "--set", "lr_value=1",
                                              "--set", "gradient_checkpointing=off"))
    assert code == 0, err
    assert out.is_file()


# --------------------------------------------------------------------------- tokens are file names: one rule
BAD_TOKENS = {
    "traversal": ("../../../escaped", "path separator"),
    "slash": ("<a/b>", "path separator"),
    "backslash": ("<a\\b>", "path separator"),
    "dot-dot": ("<a..b>", "'..'"),
    "tab": ("<a\tb>", "whitespace"),
    "newline": ("<a\nb>", "whitespace"),
    "nul": ("<a\x00b>", "control"),
    "zero-width": ("<a\u200bb>", "control"),
    "too-long": ("<" + "x" * 70 + ">", "characters long"),
}


def assert_nothing_escaped(root: Path) -> None:
    """No file named like the traversal token's target anywhere above or inside the test's folder."""
    found = [p for p in root.parent.parent.rglob("escaped*")] if root.parent.parent.exists() else []
    assert not found, f"files written outside the output folder: {found}"


@pytest.mark.parametrize("token, words", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
def test_train_refuses_a_bad_token(capsys, photos, out, token, words):
    code, _, err = run_cli(capsys, train_args(photos, out, token=token))
    check_error(code, err, "not a valid token", words, "1-64 characters")
    assert_no_train_output(out)


def test_train_refuses_a_traversal_token_from_config(capsys, photos, tmp_path, out):
    config = tmp_path / "concepts.yaml"
    config.write_text(f"concepts:\n  - {{images: {photos}, token: '<cat>', superclass: ball}}\n"
                      f"  - {{images: {photos}, token: '../../../escaped', superclass: ball}}\n")
    args = ["train", "--method", "custom-diffusion", "--base", "tiny", "--out", out, "--config", config,
            "--steps", "1", "--device", "cpu"]
    code, _, err = run_cli(capsys, args)
    check_error(code, err, "'../../../escaped'", "not a valid token")
    assert_no_train_output(out)
    assert_nothing_escaped(tmp_path)


def _embeds_file(path: Path, dim: int, name: str = "<cat>") -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.randn(1, dim, generator=torch.Generator().manual_seed(0))}, str(path))
    return path


@pytest.fixture
def text_dim(_tiny_master) -> int:
    return _tiny_master.text_encoder.get_input_embeddings().weight.shape[1]


def _import_args(file, out, *extra):
    return ["import", file, "--method", "textual-inversion", "--superclass", "ball", "--base", "tiny",
            "--out", out, *extra]


@pytest.mark.parametrize("token, words", list(BAD_TOKENS.values())[:5], ids=list(BAD_TOKENS)[:5])
def test_import_refuses_a_bad_token_before_reading(capsys, monkeypatch, tmp_path, token, words):
    import personalize.interop

    monkeypatch.setattr(personalize.interop, "read_state", lambda *a, **k: pytest.fail("the file was read"))
    out = tmp_path / "out" / "cat.safetensors"
    code, _, err = run_cli(capsys, _import_args(tmp_path / "embeds.safetensors", out, "--token", token))
    check_error(code, err, "--token", "not a valid token", words)
    assert not out.parent.exists()


def test_import_refuses_a_traversal_token_named_in_the_file(capsys, tmp_path, text_dim):
    file = _embeds_file(tmp_path / "in" / "learned_embeds.safetensors", text_dim, name="../../../escaped")
    out = tmp_path / "out" / "cat.safetensors"
    code, _, err = run_cli(capsys, _import_args(file, out))
    check_error(code, err, "learned_embeds.safetensors", "not a valid token", "--token")
    assert not out.parent.exists()
    assert_nothing_escaped(tmp_path)


def test_import_refuses_a_traversal_name_in_an_a1111_pickle(capsys, tmp_path, text_dim):
    file = tmp_path / "in" / "evil.pt"
    file.parent.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, text_dim)}, "name": "../../../escaped"}, file)
    out = tmp_path / "out" / "cat.safetensors"
    code, _, err = run_cli(capsys, _import_args(file, out, "--allow-pickle"))
    check_error(code, err, "evil.pt", "not a valid token")
    assert not out.parent.exists()


@pytest.fixture
def ti_concept(capsys, tmp_path, text_dim) -> Path:
    """A textual-inversion concept imported from a diffusers embeds file (fast: no training)."""
    out = tmp_path / "concepts" / "cat.safetensors"
    code, _, err = run_cli(capsys, _import_args(_embeds_file(tmp_path / "in" / "embeds.safetensors", text_dim),
                                                out))
    assert code == 0, err
    return out


def _forge_token(path: Path, token: str) -> None:
    """Rewrite a concept file's header token and re-seal it with a valid checksum (a forged file)."""
    from personalize.concept import Concept, save_concept
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["personalize"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["token"] = token
    save_concept(path, Concept(header, tensors))


def test_export_a1111_writes_the_token_file_inside_out(capsys, ti_concept, tmp_path):
    """Control: a valid token names the A1111 file, inside --out."""
    folder = tmp_path / "a1111"
    code, _, err = run_cli(capsys, ["export", ti_concept, "--format", "a1111", "--out", folder])
    assert code == 0, err
    assert (folder / "<cat>.pt").is_file()


@pytest.mark.parametrize("argv", [
    ["export", "{file}", "--format", "a1111", "--out", "{out}"],
    ["export", "{file}", "--format", "diffusers", "--out", "{out}"],
    ["inspect", "{file}"],
    ["generate", "--concept", "{file}", "--prompt", "a photo", "--out", "{out}", "--device", "cpu"],
], ids=["export-a1111", "export-diffusers", "inspect", "generate"])
def test_forged_header_token_is_refused_on_load(capsys, ti_concept, tmp_path, argv):
    _forge_token(ti_concept, "../../../escaped")
    out = tmp_path / "deep" / "er" / "out"
    code, stdout, err = run_cli(capsys, [a.format(file=ti_concept, out=out) for a in argv])
    check_error(code, err, "cat.safetensors", "not a valid token", "path separator")
    assert not out.exists()
    assert_nothing_escaped(out)
    assert "escaped" not in stdout


def test_export_cannot_write_outside_out_even_past_the_header_check(capsys, monkeypatch, ti_concept, tmp_path):
    """Defence in depth: if a bad token slipped past every entry check, the writer still refuses the path."""
    import personalize.concept

    _forge_token(ti_concept, "../../../escaped")
    monkeypatch.setattr(personalize.concept, "token_problem", lambda token: None)
    out = tmp_path / "a" / "b" / "out"
    code, _, err = run_cli(capsys, ["export", ti_concept, "--format", "a1111", "--out", out])
    check_error(code, err, "leaves the output folder", "escaped")
    assert_nothing_escaped(out)
    assert not any(p.is_file() for p in tmp_path.rglob("*.pt")), "a .pt file was written"


def test_custom_diffusion_export_checks_every_token_file_before_writing(tmp_path):
    """Its per-token files are checked before the (large) weights file is written: nothing partial is left."""
    from personalize.concept import Concept
    from personalize.errors import BadInputError
    from personalize.methods.custom_diffusion import CustomDiffusion

    concept = Concept({"method": "custom-diffusion", "token": "<a>", "tokens": ["<a>", "../../escaped"],
                       "superclass": "cat"}, {})
    folder = tmp_path / "x" / "out"
    with pytest.raises(BadInputError, match="leaves the output folder"):
        CustomDiffusion.export(concept, "diffusers", folder, pipe=None)  # refused before the pipe is touched
    assert not folder.exists()
    assert_nothing_escaped(folder)


def test_rename_knob_refuses_a_traversal_token(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(f"{concept}:token=../../x", folder))
    check_error(code, err, "token=", "not a valid token")
    assert not folder.exists()


# --------------------------------------------------------------------------- benchmark specs and exit codes
BENCH = {"name": "unit", "base": "toy", "device": "cpu", "evaluator": {"backend": "toyworld"},
         "concepts": [{"toyworld": ["split_triangle"]}], "prompts": ["a {} on the left"], "seeds": [0],
         "sampler": {"steps": 2, "guidance": 4.0}, "methods": [{"method": "perfusion", "train": {"steps": 2}}]}


@pytest.mark.parametrize("change, words", [
    ({"sampler": {"steps": 2, "guidance": "strong"}}, ["sampler.guidance", "number"]),
    ({"sampler": {"steps": 2, "guidance": float("nan")}}, ["sampler.guidance", "finite"]),
    ({"methods": [{"method": "perfusion", "sweep": {"beta": [0.6, float("nan")]}}]}, ["sweep.beta", "finite"]),
    ({"methods": [{"method": "perfusion", "sweep": {"tau": [0]}}]}, ["sweep.tau", "> 0"]),
    ({"methods": [{"method": "perfusion", "train": {"lr_value": -1}}]}, ["'lr_value'", "> 0"]),
    ({"methods": [{"method": "residuals", "train": {"steps": "many"}}]}, ["'steps'", "whole number"]),
    ({"evaluator": {"backend": "clip"}, "concepts": [{"folder": "photos", "superclass": "ball",
                                                      "name": "../../escaped"}]}, ["name", "file name"]),
    ({"evaluator": {"backend": "clip"}, "concepts": [{"folder": "photos", "superclass": "ball",
                                                      "token": "../escaped"}]}, ["token", "not a valid token"]),
], ids=["guidance-word", "guidance-nan", "sweep-beta-nan", "sweep-tau-zero", "train-lr-negative",
        "train-steps-word", "concept-name-traversal", "concept-token-traversal"])
@pytest.mark.parametrize("verb", ["validate", "run"])
def test_bad_benchmark_spec_is_one_line(capsys, monkeypatch, tmp_path, change, words, verb):
    import yaml

    make_photos(tmp_path / "photos", n=2)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**BENCH, **change}))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    code, _, err = run_cli(capsys, ["benchmark", verb, spec] + (["--out", out] if verb == "run" else []))
    check_error(code, err, *words)
    assert not out.exists()
    assert_nothing_escaped(tmp_path / "x")


def test_benchmark_run_with_failed_rows_exits_1(capsys, monkeypatch, tmp_path):
    """Failed rows are not a usage error: exit 1 (documented in --help), the failures listed on stdout."""
    import yaml

    import personalize.benchmark.runner as runner

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(BENCH))
    db = tmp_path / "out" / "benchmark.sqlite"
    summary = runner.RunSummary(db=db, counts={"done": 3, "total": 4, "failed": 1, "pending": 0}, ran=4,
                                failures=[("train/perfusion/split_triangle", "RuntimeError: out of memory\n...")])
    monkeypatch.setattr(runner, "run_benchmark", lambda *a, **k: summary)
    code, stdout, err = run_cli(capsys, ["benchmark", "run", spec, "--out", tmp_path / "out"])
    assert code == 1, (stdout, err)
    assert "1 failed" in stdout and "out of memory" in stdout
    assert "Traceback" not in err
    code, stdout, _ = run_cli(capsys, ["benchmark", "run", "--help"])
    assert code == 0 and "Exit code" in stdout
