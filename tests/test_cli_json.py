"""Script-friendly output (issue 25 item 9): ``--json`` on train, generate, export, import and methods prints one
JSON object on stdout whose values are those of the files written (progress stays on stderr; errors are still one
stderr line and exit 2), and output into a pipe is not wrapped at 80 columns."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_capture import run
from conftest import make_photos

REPO = Path(__file__).resolve().parents[1]
CONCEPT_KEYS = {"concept", "bytes", "method", "tokens", "superclasses", "base", "steps", "seed", "batch_size",
                "resolution"}


def _json(code: int, out: str, err: str):
    assert code == 0, err
    return json.loads(out)  # the whole of stdout is one JSON value


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``train --json`` of a 2-step textual inversion on tiny: (its JSON, the concept path, the photos)."""
    root = tmp_path_factory.mktemp("json")
    photos = make_photos(root / "photos")
    out = root / "disc.safetensors"
    data = _json(*run(["train", "--method", "textual-inversion", "--base", "tiny", "--images", photos,
                       "--superclass", "ball", "--token", "<disc>", "--out", out, "--steps", "2", "--batch-size", "2",
                       "--checkpoint-every", "1", "--json"]))
    return data, out, photos


def test_train_json_is_the_concept_written(trained):
    from personalize import load_concept

    data, out, _ = trained
    assert set(data) == CONCEPT_KEYS | {"pipeline", "checkpoint", "previews"}
    header = load_concept(out).header
    prov = header["provenance"]
    assert data["concept"] == str(out) and data["bytes"] == out.stat().st_size
    assert (data["method"], data["tokens"], data["superclasses"]) == (header["method"], [header["token"]],
                                                                      [header["superclass"]])
    assert (data["method"], data["tokens"], data["superclasses"]) == ("textual-inversion", ["<disc>"], ["ball"])
    assert [data[k] for k in ("base", "steps", "seed", "batch_size", "resolution")] == \
        [prov[k] for k in ("base", "steps", "seed", "batch_size", "resolution")] == ["tiny", 2, 0, 2, prov["resolution"]]
    assert data["pipeline"] is None  # DreamBooth only
    for key, suffix in (("checkpoint", ".ckpt"), ("previews", ".previews")):
        folder = out.with_name(out.name + suffix)
        assert data[key] == (str(folder) if folder.exists() else None)
    assert data["checkpoint"] is not None and any(Path(data["checkpoint"]).iterdir())  # --checkpoint-every 1


def test_generate_json_lists_the_images_with_prompts_and_seeds(trained, tmp_path):
    from PIL import Image

    from personalize.prompts import read_prompts

    _, concept, _ = trained
    out = tmp_path / "samples"
    prompt = "a <disc> on a beach"
    data = _json(*run(["generate", "--base", "tiny", "--concept", concept,
                       "--prompt", prompt, "--out", out, "--num-images", "2", "--steps", "2", "--seed", "7",
                       "--json"]))
    assert set(data) == {"out", "prompts_json", "base", "concepts", "prompt", "steps", "guidance", "resolution",
                         "images"}
    assert (data["out"], data["base"], data["prompt"], data["steps"]) == (str(out), "tiny", prompt, 2)
    assert data["concepts"] == [{"file": str(concept), "knobs": {}}]
    written = read_prompts(Path(data["prompts_json"]))
    assert [im["seed"] for im in data["images"]] == [7, 8]
    for im in data["images"]:
        path = Path(im["path"])
        assert path.parent == out and path.stem.endswith(f"_{im['seed']}") and written[path.stem] == im["prompt"]
        assert Image.open(path).size == (data["resolution"], data["resolution"])
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(im["path"]).name for im in data["images"])


def test_export_and_import_json(trained, tmp_path):
    from personalize import load_concept

    _, concept, _ = trained
    folder = tmp_path / "exported"
    data = _json(*run(["export", concept, "--format", "diffusers", "--out", folder, "--json"]))
    info = json.loads((folder / "export.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("out", "files", "export_json")} == \
        {k: v for k, v in info.items() if k != "files"}
    assert data["out"] == str(folder) and data["export_json"] == str(folder / "export.json")
    assert data["files"] == [str(folder / name) for name in info["files"]] and all(Path(f).is_file() for f in data["files"])
    assert (data["format"], data["method"], data["token"]) == ("diffusers", "textual-inversion", "<disc>")

    imported = tmp_path / "imported.safetensors"
    data = _json(*run(["import", data["files"][0], "--method", "textual-inversion", "--superclass", "ball",
                       "--base", "tiny", "--out", imported, "--json"]))
    assert set(data) == CONCEPT_KEYS
    header = load_concept(imported).header
    assert data["concept"] == str(imported) and data["bytes"] == imported.stat().st_size
    assert (data["method"], data["tokens"], data["superclasses"], data["base"]) == \
        (header["method"], [header["token"]], [header["superclass"]], header["provenance"]["base"])
    assert (data["tokens"], data["base"], data["steps"]) == (["<disc>"], "tiny", None)


def test_methods_json_is_the_registry():
    import dataclasses

    from personalize import methods as registry
    from personalize.training.config import TrainConfig

    data = _json(*run(["methods", "--json"]))
    assert list(data) == ["methods"] and [m["name"] for m in data["methods"]] == registry.names()
    for entry in data["methods"]:
        card = registry.card(entry["name"])
        assert set(entry) == {"name", "description", "recipe", "sites", "train_defaults", "settings", "knobs"}
        assert (entry["description"], entry["recipe"], entry["sites"], entry["knobs"]) == \
            (card.description, card.recipe, list(card.sites), card.knobs)
        settings = {s["name"]: s for s in entry["settings"]}
        for f in dataclasses.fields(card.Config):
            assert settings[f.name]["default"] == f.default and settings[f.name]["scope"] == "method"
            assert settings[f.name]["flag"] == ("--" + f.name.replace("_", "-") if f.metadata.get("flag") else None)
        for f in dataclasses.fields(TrainConfig):
            assert settings[f.name]["default"] == card.train_defaults.get(f.name, f.default)
        assert _json(*run(["methods", entry["name"], "--json"])) == entry


def test_json_errors_are_still_one_line(tmp_path):
    code, out, err = run(["export", tmp_path / "missing.safetensors", "--out", tmp_path / "x", "--json"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_piped_output_is_not_wrapped_at_80_columns():
    from personalize import methods as registry

    long = [registry.card(n).description for n in registry.names() if len(registry.card(n).description) > 80]
    assert long  # the test needs a line longer than rich's default 80 columns
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("COLUMNS", None)
    proc = subprocess.run([sys.executable, "-m", "personalize", "methods"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for description in long:
        assert any(description in line for line in proc.stdout.splitlines()), description
