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
            "--out", out, "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--device", "cpu", *extra]


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
def test_superclass_of_several_tokens(capsys, photos, out):
    code, _, err = run_cli(capsys, train_args(photos, out, superclass="teddybear"))
    line = check_error(code, err, "teddybear", "one token", "try")
    assert "'teddy'" in line or "'bear'" in line, line
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
@pytest.fixture
def residuals(tmp_path, trained_residuals) -> Path:
    path = tmp_path / "concepts" / "res.safetensors"
    path.parent.mkdir(exist_ok=True)
    shutil.copyfile(trained_residuals, path)
    return path


def test_lag_on_a_concept_without_residuals(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder, "--lag"))
    check_error(code, err, "--lag", "disc.safetensors", "perfusion", "--method residuals")
    assert_no_images(folder)


def test_valid_lag_generation(capsys, residuals, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(residuals, folder, "--lag"))
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 1


def test_export_a_concept_without_residuals(capsys, concept, tmp_path):
    code, _, err = run_cli(capsys, ["export", concept, "--format", "diffusers-lora", "--out", tmp_path / "lora"])
    check_error(code, err, "disc.safetensors", "perfusion", "residuals")
    assert not (tmp_path / "lora").exists()


def test_export_unknown_format(capsys, residuals, tmp_path):
    code, _, err = run_cli(capsys, ["export", residuals, "--format", "kohya", "--out", tmp_path / "lora"])
    check_error(code, err, "'kohya'", "diffusers-lora")
    assert not (tmp_path / "lora").exists()


def test_export_out_is_a_file(capsys, residuals, tmp_path):
    target = tmp_path / "lora"
    target.write_text("notes")
    code, _, err = run_cli(capsys, ["export", residuals, "--out", target])
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
