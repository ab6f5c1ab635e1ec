"""CustomConcept101 reader on a small fixture folder in the real layout."""
import json
import shutil

import pytest

from personalize.datasets.customconcept101 import load_customconcept101, read_prompt_file
from personalize.errors import BadInputError


def test_reads_records(cc101):
    data = load_customconcept101(cc101)
    assert [c.name for c in data.concepts] == ["scene_barn", "pet_cat1"]
    barn = data.concept("scene_barn")
    assert barn.category == "scene" and barn.token == "<new1>" and barn.class_word == "barn"
    assert barn.subject == "<new1> barn"
    assert len(barn.images) == 3 and all(p.suffix in {".png", ".jpg"} for p in barn.images)
    assert barn.prompts == ["<new1> barn in snowy ice.", "photo of a <new1> barn at night", "<new1> barn with a river"]
    assert barn.superclass_prompts[0] == "barn in snowy ice."
    assert data.concept("pet_cat1").prompts == ["a <new1> cat sleeping"]
    assert set(data.by_category()) == {"scene", "pet"}
    (comp,) = data.compositions
    assert comp.concepts[1].token == "<new2>"
    assert comp.prompts == ["<new1> cat sitting on <new2> chair", "<new2> chair next to <new1> cat"]
    with pytest.raises(BadInputError, match="no concept named"):
        data.concept("nope")


def test_read_prompt_file_no_final_newline(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a {}  \nb {}")
    assert read_prompt_file(p) == ["a {}", "b {}"]


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_root(tmp_path):
    with pytest.raises(BadInputError) as exc:
        load_customconcept101(tmp_path / "absent")
    assert str(tmp_path / "absent") in _one_line(exc)


@pytest.mark.parametrize("sub", ["prompts", "benchmark_dataset"])
def test_missing_top_folder(cc101, sub):
    shutil.rmtree(cc101 / sub)
    with pytest.raises(BadInputError) as exc:
        load_customconcept101(cc101)
    assert f"missing folder {cc101.resolve() / sub}" in _one_line(exc)


def test_missing_json(cc101):
    (cc101 / "dataset_multiconcept.json").unlink()
    with pytest.raises(BadInputError) as exc:
        load_customconcept101(cc101)
    assert "dataset_multiconcept.json not found" in _one_line(exc)
    assert len(load_customconcept101(cc101, multiconcept=False).concepts) == 2


def test_missing_concept_folder_and_images(cc101):
    shutil.rmtree(cc101 / "benchmark_dataset" / "pet_cat1")
    with pytest.raises(BadInputError) as exc:
        load_customconcept101(cc101)
    msg = _one_line(exc)
    assert "pet_cat1" in msg and "dataset.json entry 1" in msg
    (cc101 / "benchmark_dataset" / "pet_cat1").mkdir()
    with pytest.raises(BadInputError, match="no .jpg/.png images"):
        load_customconcept101(cc101)


def test_missing_prompt_file_and_bad_entries(cc101):
    (cc101 / "prompts" / "pet_furniture.txt").unlink()
    with pytest.raises(BadInputError) as exc:
        load_customconcept101(cc101)
    assert "pet_furniture.txt" in _one_line(exc)
    json.dump([{"instance_prompt": "photo of a barn"}], open(cc101 / "dataset.json", "w"))
    with pytest.raises(BadInputError, match="lacks 'class_prompt'"):
        load_customconcept101(cc101, multiconcept=False)
    (cc101 / "dataset.json").write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_customconcept101(cc101, multiconcept=False)
