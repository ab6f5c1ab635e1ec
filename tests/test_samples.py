"""One reader for a samples folder (``prompts.json`` + PNGs): what it lists, and its one-line errors."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from personalize.errors import BadInputError
from personalize.samples import prompt_table, read_samples


def _folder(tmp_path, prompts, pngs):
    folder = tmp_path / "samples"
    folder.mkdir()
    for stem in pngs:
        Image.new("RGB", (32, 32), (10, 200, 10)).save(folder / f"{stem}.png")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


def test_lists_the_pngs_the_table_names_sorted_by_stem(tmp_path):
    folder = _folder(tmp_path, {"b_0": "a red circle", "a_1": "a green square", "gone": "missing"},
                     ["a_1", "b_0", "stray"])
    assert read_samples(folder) == [(folder / "a_1.png", "a green square"), (folder / "b_0.png", "a red circle")]
    assert read_samples(folder, {"stray": "x"}) == [(folder / "stray.png", "x")]
    (tmp_path / "other.json").write_text(json.dumps({"b_0": "y"}))
    assert read_samples(folder, tmp_path / "other.json") == [(folder / "b_0.png", "y")]


@pytest.mark.parametrize("case, words", [
    ("no-folder", ["--samples '", "is not a folder"]),
    ("no-json", ["--samples '", "has no prompts.json", "personalize generate"]),
    ("list", ["is a list", "map image stems to prompts"]),
    ("no-images", ["none of the 1 images prompts.json names is there"]),
])
def test_errors_are_one_line(tmp_path, case, words):
    folder = _folder(tmp_path, ["x"] if case == "list" else {"a": "p"}, [])
    if case == "no-folder":
        folder = tmp_path / "nope"
    if case == "no-json":
        (folder / "prompts.json").unlink()
    with pytest.raises(BadInputError) as info:
        read_samples(folder, flag="--samples", need_images=True)
    assert len(str(info.value).splitlines()) == 1 and all(w in str(info.value) for w in words), str(info.value)


def test_the_toy_world_measurer_and_grid_read_through_it(tmp_path):
    from personalize.toybase.evaluate import save_grid
    from personalize.datasets.toyworld.measure import load_prompts, score_folder

    folder = _folder(tmp_path, {"b": "a green square", "a": "a red circle", "gone": "a blue star"}, ["a", "b"])
    assert score_folder(folder)["n_images"] == 2 and load_prompts(folder) == prompt_table(folder)
    grid = save_grid(folder, tmp_path / "grid.png", cols=2, scale=1, with_truth=False)
    with Image.open(grid) as im:
        assert im.size == (2 * 34, 34)
    (folder / "prompts.json").unlink()
    with pytest.raises(BadInputError, match="has no prompts.json"):
        score_folder(folder)
