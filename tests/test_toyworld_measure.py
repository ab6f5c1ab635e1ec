"""Toy-world measurers: caption parser, per-attribute accuracy on fresh renders, alignment/fidelity/leakage."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from personalize.datasets.toyworld import concepts, measure, world
from personalize.datasets.toyworld.captions import parse_prompt


@pytest.mark.parametrize("prompt,placeholder,superclass,bg,objs", [
    ("a small red star on the left and a large blue circle on the right, on a yellow background", None, None,
     "yellow", [("star", "red", "small", "left", False), ("circle", "blue", "large", "right", False)]),
    ("a photo of a <tok>", None, "star", None, [("star", None, None, None, True)]),
    ("a <tok> on the left, on a green background", None, "heart", "green", [("heart", None, None, "left", True)]),
    ("A sks square at the top.", "sks", None, None, [("square", None, None, "top", True)]),
    ("a large <my-thing> in the centre and a small white triangle at the bottom", None, "circle", None,
     [("circle", None, "large", "center", True), ("triangle", "white", "small", "bottom", False)]),
    ("a photo of a purple heart", None, None, None, [("heart", "purple", None, None, False)]),
])
def test_parse_prompt(prompt, placeholder, superclass, bg, objs):
    p = parse_prompt(prompt, placeholder=placeholder, superclass=superclass)
    assert p.background == bg
    assert [(o.shape, o.color, o.size, o.position, o.concept) for o in p.objects] == objs


def test_concept_colour_is_not_a_stated_attribute():
    p = parse_prompt("a blue <tok> on the left, on a red background", superclass="star")
    assert p.objects[0].stated() == {"shape": "star", "position": "left"}
    assert p.n_stated() == 3 and p.mentions_concept


def test_measurer_accuracy_on_fresh_renders():
    """>= 0.98 per attribute on renders the measurer has never seen (both splits, 1 and 2 objects)."""
    rng = random.Random(20240)
    hits = {a: [] for a in measure.ATTRIBUTES}
    for _ in range(250):
        scene = world.sample_scene(rng, held_out=None)
        res = measure.score_image(world.render_scene(scene), world.caption(scene))
        for a, v in res["checks"].items():
            hits[a].extend(v)
    for a, v in hits.items():
        assert len(v) >= 100, a
        assert np.mean(v) >= 0.98, (a, np.mean(v))


def test_detect_scene_reports_each_attribute():
    scene = world.Scene("green", (world.SceneObject("triangle", "purple", "small", "top"),
                                  world.SceneObject("square", "white", "large", "bottom")))
    det = measure.detect_scene(world.render_scene(scene))
    assert det.background == "green"
    got = sorted((o.shape, o.color, o.size, o.position) for o in det.objects)
    assert got == [("square", "white", "large", "bottom"), ("triangle", "purple", "small", "top")]


def test_wrong_prompts_score_low():
    rng = random.Random(7)
    scene = world.sample_scene(rng, n_objects=1)
    o = scene.objects[0]
    img = world.render_scene(scene)
    assert measure.score_image(img, world.caption(scene))["alignment"] == 1.0
    other = lambda seq, v: next(x for x in seq if x != v and x != scene.background)  # noqa: E731
    wrong = world.Scene(other(world.COLORS, scene.background), (world.SceneObject(
        other(world.SHAPES, o.shape), other(world.COLORS, o.color), other(world.SIZES, o.size),
        other(world.POSITIONS, o.position)),))
    res = measure.score_image(img, world.caption(wrong))
    assert res["alignment"] == 0.0


def _write(folder, images, prompts):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, im in images.items():
        im.save(folder / f"{stem}.png")
    (folder / "prompts.json").write_text(json.dumps(prompts))


def test_score_folder_alignment_fidelity_leakage(tmp_path):
    name = "striped_star"
    rng = random.Random(11)
    gen, ref, prompts = {}, {}, {}
    for i, s in enumerate(concepts.concept_scenes(name, 4, seed=3)):
        pos = s.objects[0].position
        gen[f"c{i}"] = world.render_scene(s)
        prompts[f"c{i}"] = f"a <tok> {world.POSITION_PHRASES[pos]}, on a {s.background} background"
        flat = world.Scene(s.background, (world.SceneObject("star", "yellow", "large", pos, s.objects[0].extent,
                                                            s.objects[0].center),))
        ref[f"c{i}"] = world.render_scene(flat)
    for i in range(4):
        s = world.sample_scene(rng)
        gen[f"p{i}"] = ref[f"p{i}"] = world.render_scene(s)
        prompts[f"p{i}"] = world.caption(s)
    _write(tmp_path / "gen", gen, prompts)
    _write(tmp_path / "ref", ref, prompts)
    res = measure.score_folder(tmp_path / "gen", concept=name, reference=tmp_path / "ref")
    assert res["n_images"] == 8
    assert res["alignment"] == 1.0
    assert res["fidelity"] > 0.9
    assert res["leakage"] == 0.0
    assert set(res["per_attribute"]) == set(measure.ATTRIBUTES)

    # the flat superclass objects (no concept appearance) have low fidelity but the same alignment
    flat = measure.score_folder(tmp_path / "ref", prompts=prompts, concept=name)
    assert flat["alignment"] == 1.0 and flat["fidelity"] < 0.4

    # leakage: a changed image for a concept-free prompt is reported
    changed = dict(gen)
    changed["p0"] = Image.fromarray(255 - np.asarray(gen["p0"]))
    _write(tmp_path / "gen2", changed, prompts)
    leak = measure.score_folder(tmp_path / "gen2", concept=name, reference=tmp_path / "ref")
    assert leak["leakage"] > 0.05


def test_fidelity_separates_concepts_from_each_other():
    """Each concept's own renders score higher fidelity than the other same-shape concepts' renders."""
    circles = [c["name"] for c in concepts.list_concepts() if c["superclass"] == "circle"]
    assert len(circles) >= 2
    for name in circles:
        own = [measure.score_image(world.render_scene(s), "a <tok>", concept=name)["fidelity"]
               for s in concepts.concept_scenes(name, 3)]
        for other in circles:
            if other == name:
                continue
            theirs = [measure.score_image(world.render_scene(s), "a <tok>", concept=name)["fidelity"]
                      for s in concepts.concept_scenes(other, 3)]
            assert min(own) > max(theirs) + 0.2, (name, other)
