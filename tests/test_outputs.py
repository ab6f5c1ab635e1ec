"""Outputs and what feeds them: unwritable or existing --out, stale temps, images that must not be opened, prompts,
progress bars on stderr, the base alone. Refusals keep test_bad_input's promise: exit 2, one line, nothing written."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import make_photos
from test_bad_input import BENCH, TOKEN, _cli_process, assert_no_train_output, check_error, gen_args, run_cli, \
    train_args
from test_bad_input import concept  # noqa: F401  (the fixture: a private copy of the trained concept)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model loads: the refusal must come before any work."""
    import personalize.base
    import personalize.training.loop

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad output was refused")

    for module in (personalize.base, personalize.training.loop):
        monkeypatch.setattr(module, "load_base", refuse)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- an --out that cannot be written
def _read_only_folder(tmp_path: Path) -> Path:
    """A folder no new file can be made in: chmod 555 (as a user), or sysfs (root writes anywhere else)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/sys/kernel").is_dir() and not os.access("/sys/kernel", os.W_OK):
        return Path("/sys/kernel")
    try:
        import tempfile

        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no read-only folder to test with (root, and /sys is writable)")


OUT_VERBS = {  # each command with its --out as {out} (a concept file, or a folder); the inputs need not exist
    "train": (lambda p: train_args(p["photos"], "{out}/disc.safetensors")),
    "generate": (lambda p: ["generate", "--base", "tiny", "--prompt", "a ball", "--out", "{out}/gen", "--device",
                                "cpu"]),
    "export": (lambda p: ["export", p["tmp"] / "x.safetensors", "--out", "{out}/lora"]),
    "import": (lambda p: ["import", p["tmp"] / "e.safetensors", "--method", "textual-inversion", "--base", "tiny",
                          "--superclass", "ball", "--out", "{out}/cat.safetensors"]),
    "demo": (lambda p: ["demo", "--out", "{out}/demo"]),
    "benchmark-run": (lambda p: ["benchmark", "run", p["spec"], "--out", "{out}/runs"]),
    "benchmark-report": (lambda p: ["benchmark", "report", p["tmp"] / "b.sqlite", "--out", "{out}/report"]),
    "toyworld-render": (lambda p: ["toyworld", "render", "striped_star", "--out", "{out}/photos"]),
}


@pytest.mark.parametrize("where", ["under-a-file", "read-only-folder"])
@pytest.mark.parametrize("verb", list(OUT_VERBS))
def test_unwritable_out_is_refused_before_any_work(capsys, no_model, tmp_path, verb, where):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(BENCH))
    paths = {"photos": make_photos(tmp_path / "photos"), "tmp": tmp_path, "spec": spec}
    if where == "under-a-file":
        blocker = tmp_path / "notes.txt"
        blocker.write_text("my notes")
        base, words = blocker, ["notes.txt", "is a file"]
    else:
        base, words = _read_only_folder(tmp_path), ["cannot be written"]
    before = tree(tmp_path)
    args = [a.format(out=base) if isinstance(a, str) else a for a in OUT_VERBS[verb](paths)]
    code, _, err = run_cli(capsys, args)
    check_error(code, err, "--out", *words)
    assert tree(tmp_path) == before, "something was written"
    if where == "under-a-file":
        assert blocker.read_text() == "my notes"


# --------------------------------------------------------------------------- an existing --out: --overwrite
def test_train_refuses_an_existing_concept_file(capsys, no_model, photos, tmp_path):
    out = tmp_path / "out" / "disc.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier concept")
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "disc.safetensors", "already exists", "--overwrite")
    assert out.read_bytes() == b"an earlier concept"
    assert sorted(p.name for p in out.parent.iterdir()) == ["disc.safetensors"]


def test_train_resume_is_not_an_overwrite(capsys, photos, tmp_path):
    """--resume may meet its own finished file: it is not refused as existing (here: no checkpoint to resume)."""
    out = tmp_path / "out" / "disc.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier concept")
    code, _, err = run_cli(capsys, train_args(photos, out, "--resume"))
    line = check_error(code, err, "--resume", "no checkpoint")
    assert "already exists" not in line


def test_train_overwrite_replaces_the_file(capsys, photos, tmp_path):
    out = tmp_path / "out" / "disc.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier concept")
    code, stdout, err = run_cli(capsys, train_args(photos, out, "--overwrite"))
    assert code == 0, err
    assert out.read_bytes() != b"an earlier concept" and out.stat().st_size > 100


def test_import_refuses_an_existing_concept_file(capsys, no_model, tmp_path):
    out = tmp_path / "cat.safetensors"
    out.write_bytes(b"mine")
    code, _, err = run_cli(capsys, ["import", tmp_path / "embeds.safetensors", "--method", "textual-inversion",
                                    "--base", "tiny", "--superclass", "ball", "--out", out])
    check_error(code, err, "cat.safetensors", "already exists", "--overwrite")
    assert out.read_bytes() == b"mine"


def test_export_refuses_a_folder_that_is_not_empty(capsys, concept, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, ["export", concept, "--out", folder])
    check_error(code, err, "lora", "already exists", "--overwrite")
    assert tree(folder) == ["keep.txt"]


def test_generate_refuses_to_replace_its_pngs_unless_overwrite(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    assert code == 0, err
    (png,) = folder.glob("*.png")
    png.write_bytes(b"my edit")
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    check_error(code, err, png.name, "already exists", "--overwrite")
    assert png.read_bytes() == b"my edit"
    code, _, err = run_cli(capsys, gen_args(concept, folder, "--seed", "1"))  # other seeds: other files, fine
    assert code == 0, err
    code, _, err = run_cli(capsys, gen_args(concept, folder, "--overwrite"))
    assert code == 0, err
    assert png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [], "temp files left"


# --------------------------------------------------------------------------- stale temps of killed writes
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_writes_remove_stale_temps_of_their_target_only(tmp_path):
    from personalize.paths import _owner, atomic_dir, atomic_path

    host = _owner().partition("@")[2]
    target = tmp_path / "disc.safetensors"
    dead = tmp_path / f".disc.safetensors.{_dead_pid()}@{host}.abc123.tmp"
    live = tmp_path / f".disc.safetensors.{os.getpid()}@{host}.def456.tmp"  # a write still going on
    old_style = tmp_path / ".disc.safetensors.k2j4h6g8.tmp"  # mkstemp's name before temps named their writer
    fresh_old_style = tmp_path / ".disc.safetensors.a1b2c3d4.tmp"
    other_target = tmp_path / f".other.png.{_dead_pid()}@{host}.xyz789.tmp"
    for p in (dead, live, old_style, fresh_old_style, other_target):
        p.write_bytes(b"partial")
    os.utime(old_style, (1_000_000_000, 1_000_000_000))  # untouched for years
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and fresh_old_style.exists() and other_target.exists()
    killed_dir = tmp_path / f".photos.{_dead_pid()}@{host}.q1w2e3.tmp"
    killed_dir.mkdir()
    (killed_dir / "0.png").write_bytes(b"half")
    with atomic_dir(tmp_path / "photos") as tmp:
        (tmp / "1.png").write_bytes(b"whole")
    assert not killed_dir.exists() and tree(tmp_path / "photos") == ["1.png"]


def test_generate_cleans_a_stale_temp_of_its_png(capsys, concept, tmp_path):
    from personalize.generation import image_paths
    from personalize.paths import _owner

    folder = tmp_path / "gen"
    folder.mkdir()
    (png,) = image_paths(f"a {TOKEN} on a table", folder, 0, 1)
    stale = folder / f".{png.name}.{_dead_pid()}@{_owner().partition('@')[2]}.zzz999.tmp"
    stale.write_bytes(b"half a png")
    code, _, err = run_cli(capsys, gen_args(concept, folder))
    assert code == 0, err
    assert png.is_file() and not stale.exists()


# --------------------------------------------------------------------------- images that must not be opened
def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file whose header claims WIDTHxHEIGHT pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [65535, 15000], ids=["over-2x-the-limit", "just-over-the-limit"])
def test_train_refuses_a_decompression_bomb(capsys, tmp_path, side):
    folder = make_photos(tmp_path / "photos")
    _png_claiming(folder / "huge.png", side, side)
    out = tmp_path / "out" / "disc.safetensors"
    code, _, err = run_cli(capsys, train_args(folder, out))
    check_error(code, err, "huge.png", f"{side * side:,} pixels", "downscale")
    assert_no_train_output(out)


def _samples_folder(tmp_path: Path, prompts, bad_png: bytes | None = None) -> Path:
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / "a_0.png")
    if bad_png is not None:
        (folder / "b_0.png").write_bytes(bad_png)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


def _score_args(command: str, folder: Path, tmp_path: Path) -> list:
    if command == "evaluate":
        return ["evaluate", "--samples", folder, "--reference", make_photos(tmp_path / "ref", n=2)]
    return ["toyworld", "score", "--samples", folder]


@pytest.mark.parametrize("command", ["evaluate", "toyworld-score"])
def test_prompts_json_that_is_a_list_is_one_line(capsys, tmp_path, command):
    folder = _samples_folder(tmp_path, ["a green square"])
    code, _, err = run_cli(capsys, _score_args(command, folder, tmp_path))
    check_error(code, err, "prompts.json", "is a list", "map image stems to prompts")


def test_toyworld_score_refuses_a_garbage_png(capsys, tmp_path):
    folder = _samples_folder(tmp_path, {"a_0": "a green square", "b_0": "a red circle"}, b"not a png at all")
    code, _, err = run_cli(capsys, _score_args("toyworld-score", folder, tmp_path))
    check_error(code, err, "b_0.png", "not a readable image")


def test_evaluate_refuses_a_garbage_png(capsys, tmp_path, clip_weights_file, dino_weights_file):
    folder = _samples_folder(tmp_path, {"a_0": "a green square", "b_0": "a red circle"}, b"not a png at all")
    args = _score_args("evaluate", folder, tmp_path) + ["--clip-weights", clip_weights_file,
                                                        "--dino-weights", dino_weights_file, "--device", "cpu"]
    code, _, err = run_cli(capsys, args)
    check_error(code, err, "b_0.png", "not a readable image")


def test_training_and_scoring_orient_an_exif_rotated_photo_alike(tmp_path):
    """One loader: a photo stored sideways with EXIF orientation 6 is upright for both the trainer and the scores."""
    from personalize.evaluation import load_image
    from personalize.images import load_images

    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste(Image.new("RGB", (20, 20), (0, 0, 255)), (20, 0))  # red left half, blue right half
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    scored = load_image(path)
    assert scored.size == (20, 40)  # upright: the stored left (red) half on top
    top, bottom = scored.getpixel((10, 5)), scored.getpixel((10, 35))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    trained = load_images([path], 20)[0]  # (3, 20, 20) in [-1, 1]: the centre square of the upright photo
    assert trained[0, 2, 10] > 0.5 and trained[2, 2, 10] < -0.5  # red on top
    assert trained[2, 17, 10] > 0.5 and trained[0, 17, 10] < -0.5  # blue below


# --------------------------------------------------------------------------- a pickle's warnings
def test_plain_pickle_import_prints_only_our_line(tmp_path):
    """torch's weights-only reader warns (2 lines) about a plain pickle before we refuse it: silenced."""
    import pickle

    file = tmp_path / "plain.bin"
    file.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    out = tmp_path / "out" / "cat.safetensors"
    proc = _cli_process(["import", file, "--method", "textual-inversion", "--base", "tiny", "--superclass", "ball",
                         "--out", out, "--allow-pickle"])
    check_error(proc.returncode, proc.stderr, "plain.bin", "weights-only")
    assert not out.parent.exists()


# --------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("prompt", ["", "   "], ids=["empty", "blank"])
def test_generate_refuses_an_empty_prompt(capsys, no_model, tmp_path, prompt):
    folder = tmp_path / "gen"
    code, _, err = run_cli(capsys, ["generate", "--prompt", prompt, "--out", folder, "--device", "cpu"])
    check_error(code, err, "--prompt", "empty")
    assert not folder.exists()


LONG = " ".join(["a very small red ball"] * 16)  # 80 CLIP tokens


@pytest.mark.parametrize("where", ["token-past-the-cut", "no-concept"])
def test_generate_refuses_a_prompt_over_77_tokens(capsys, concept, tmp_path, where):
    folder = tmp_path / "gen"
    if where == "no-concept":
        args = ["generate", "--base", "tiny", "--prompt", LONG, "--out", folder, "--num-images", "1", "--steps", "1",
                "--device", "cpu"]
    else:
        args = gen_args(concept, folder)
        args[args.index("--prompt") + 1] = f"{LONG} with a {TOKEN}"
    code, _, err = run_cli(capsys, args)
    line = check_error(code, err, "--prompt", "tokens", "75", "shorten")
    assert (TOKEN in line) == (where == "token-past-the-cut"), line
    assert not folder.exists()


def test_generate_warns_when_the_prompt_leaves_out_the_concept(capsys, concept, tmp_path):
    folder = tmp_path / "gen"
    args = gen_args(concept, folder)
    args[args.index("--prompt") + 1] = "a ball on a table"
    code, stdout, err = run_cli(capsys, args)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and TOKEN in warnings[0] and "error" not in err, err
    assert len(list(folder.glob("*.png"))) == 1


# --------------------------------------------------------------------------- the base alone; progress on stderr
def test_generate_without_a_concept_renders_the_base_with_a_progress_bar_on_stderr(capsys, tmp_path):
    folder = tmp_path / "gen"
    code, stdout, err = run_cli(capsys, ["generate", "--base", "tiny", "--prompt", "a ball on a table", "--out",
                                         folder, "--num-images", "1", "--steps", "2", "--device", "cpu"])
    assert code == 0, err
    assert len(list(folder.glob("*.png"))) == 1
    assert "2/2" in err and "warning" not in err  # the per-step bar, on stderr
    assert "2/2" not in stdout and "wrote 1 image" in stdout


def test_concept_knobs_without_a_concept_are_refused(capsys, no_model, tmp_path):
    code, _, err = run_cli(capsys, ["generate", "--prompt", "a ball", "--out", tmp_path / "gen", "--beta", "0.7"])
    check_error(code, err, "--beta", "no --concept")
    assert not (tmp_path / "gen").exists()


def test_training_progress_goes_to_stderr(capsys, photos, tmp_path):
    out = tmp_path / "out" / "disc.safetensors"
    code, stdout, err = run_cli(capsys, train_args(photos, out))
    assert code == 0, err
    assert "training perfusion" in err and "loss" in err
    assert "training perfusion" not in stdout and "wrote concept" in stdout


def test_class_images_bar_has_no_loss_column():
    from rich.progress import TextColumn

    from personalize.training import _Progress

    for with_loss in (True, False):
        bar = _Progress(True, 3, 0, "class images", with_loss=with_loss)
        try:
            texts = [c.text_format for c in bar.progress.columns if isinstance(c, TextColumn)]
            assert any("loss" in t for t in texts) == with_loss, texts
            assert bar.progress.console.stderr
        finally:
            bar.close()


# --------------------------------------------------------------------------- help, the report, resumed rows
@pytest.mark.parametrize("command", [["methods"], ["benchmark"], ["benchmark", "validate"], ["benchmark", "run"],
                                     ["benchmark", "status"], ["benchmark", "report"], ["toyworld", "concepts"],
                                     ["toyworld", "render"], ["toyworld", "score"], ["toyworld", "train-base"],
                                     ["toyworld", "evaluate-base"], ["generate"]], ids=" ".join)
def test_help_has_examples(capsys, command):
    code, stdout, err = run_cli(capsys, [*command, "--help"])
    assert code == 0, err
    assert "Examples" in stdout and "personalize " + command[0] in stdout.split("Examples", 1)[1]


def test_report_enlarges_small_images_with_nearest_neighbour(tmp_path):
    import base64
    import io

    from personalize.benchmark.report import THUMB_PX, _html_figure

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "toy.png")
    html = _html_figure({"method": "m", "prompt": "p", "setting": None, "path": "toy.png"}, tmp_path, "p")
    assert 'class="px"' in html
    data = html.split("base64,", 1)[1].split('"', 1)[0]
    thumb = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
    factor = thumb.width // 32
    assert factor >= 2 and thumb.size == (32 * factor, 32 * factor) and 32 * factor <= 2 * THUMB_PX
    # every block is one source pixel, exactly: no blur
    assert (np.asarray(thumb)[::factor, ::factor] == pixels).all()
    assert len({tuple(c) for c in np.asarray(thumb).reshape(-1, 3)}) <= 32 * 32  # no blended colours


def test_a_resumed_benchmark_train_row_records_its_params_and_time(tmp_path, monkeypatch):
    """Killed after the last checkpoint: the resume runs no step, yet the row has its parameters and earlier time."""
    import personalize.benchmark.work as work
    from personalize.benchmark.runner import plan_into
    from personalize.benchmark.spec import parse_spec

    spec = parse_spec({**BENCH, "methods": [{"method": "perfusion", "train": {"steps": 2, "batch_size": 1,
                                                                              "checkpoint_every": 1, "masks": "none"}}]}, root=tmp_path)
    db = plan_into(spec, tmp_path / "out")
    (row,) = [r for r in db.rows() if r["kind"] == "train"]
    worker = work.Worker(spec, tmp_path / "out", "cpu", db)
    monkeypatch.setattr(work.shutil, "rmtree", lambda *a, **k: None)  # "killed" before the checkpoint is removed
    first = worker.train(row)
    monkeypatch.undo()
    assert "earlier_seconds" not in first and first["trainable_params"] > 0
    resumed = worker.train(row)
    assert resumed["trainable_params"] == first["trainable_params"]
    assert resumed["earlier_seconds"] > 0
    db.close()


def test_the_runner_adds_a_resumed_rows_earlier_time(monkeypatch):
    from types import SimpleNamespace

    from personalize.benchmark import runner

    finished = {}
    db = SimpleNamespace(worker="w1", finish=lambda key, result, seconds, *rest: finished.update(seconds=seconds),
                         fail=lambda key, error: pytest.fail(error))
    worker = SimpleNamespace(base_fingerprint="f", run=lambda row: {"trainable_params": 3, "earlier_seconds": 41.5})
    runner._execute(db, worker, {"key": "train/x"}, "cpu")
    assert finished["seconds"] >= 41.5
