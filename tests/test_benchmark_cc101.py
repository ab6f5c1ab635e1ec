"""CustomConcept101 in the benchmark: composition pairs, the protocol's sample count, error bars, both views.

One CC101-shaped folder (2 single concepts, 1 composition pair whose second concept is only in the pair),
random CLIP/DINO weights, the `tiny` base, 1-step trainings, 1 image per prompt, 2 prompts.
"""
from __future__ import annotations


import numpy as np
import pytest

from conftest import make_photos, write_cc101_json
from personalize.benchmark.db import BenchmarkDB
from personalize.benchmark.plan import build_plan
from personalize.benchmark.report import summarize, write_report
from personalize.benchmark.runner import run_benchmark
from personalize.benchmark.spec import parse_spec
from personalize.errors import BadInputError
from personalize.evaluation.bootstrap import mean_ci
from personalize.evaluation.protocol import shape_preserving

FAST = {"steps": 1, "batch_size": 1, "checkpoint_every": 0}
PAIR = "pet_cat1+furniture_chair1"


def make_cc101(root):
    (root / "prompts").mkdir(parents=True)
    for i, d in enumerate(("scene_barn", "pet_cat1", "furniture_chair1")):
        make_photos(root / "benchmark_dataset" / d, n=2 + i % 2, size=40 + 8 * i)
    (root / "prompts" / "barn.txt").write_text("{} in snowy ice.\na watercolor painting of the {}.\n{} at night\n")
    (root / "prompts" / "cat.txt").write_text("a {} sleeping \n")
    (root / "prompts" / "chair.txt").write_text("a {} in a room\n")
    (root / "prompts" / "pet_furniture.txt").write_text("A {0} sleeping on a purple {1}.\n{1} next to {0}\n")
    cat = ("<new1>", "cat", "pet_cat1", "prompts/cat.txt")
    write_cc101_json(root, [("<new1>", "barn", "scene_barn", "prompts/barn.txt"), cat],
                     [(cat, ("<new2>", "chair", "furniture_chair1", "prompts/chair.txt"), "prompts/pet_furniture.txt")])
    return root


def spec_data(root, clip, dino, segmenter="unused", **changes):
    """Perfusion trains with its default zero-shot masks (``masks: auto``) from ``segmenter``, a tiny random CLIPSeg."""
    return {"name": "cc101-unit", "base": "tiny", "device": "cpu",
            "evaluator": {"backend": "clip", "clip_weights": str(clip), "dino_weights": str(dino)},
            "concepts": [{"cc101": str(root), "limit": 1, "compositions": True}],
            "max_prompts": 2, "seeds": [0], "samples_per_prompt": 1, "sampler": {"steps": 2, "guidance": 4.0},
            "leakage_prompts": ["a photo of a beach"],
            "methods": [{"method": "perfusion", "train": {**FAST, "segmenter": str(segmenter)}},
                        {"method": "residuals", "train": FAST},
                        {"method": "custom-diffusion", "train": {**FAST, "prior_loss_weight": 0.0}}],
            **changes}


@pytest.fixture(scope="module")
def run(tmp_path_factory, clip_weights_file, dino_weights_file, tiny_segmenter):
    root = make_cc101(tmp_path_factory.mktemp("cc") / "cc101")
    spec = parse_spec(spec_data(root, clip_weights_file, dino_weights_file, tiny_segmenter), root=root.parent)
    out = root.parent / "out"
    summary = run_benchmark(spec, out, progress=False)
    db = BenchmarkDB(out / "benchmark.sqlite", create=False)
    rows = db.rows()
    db.close()
    return spec, out, summary, rows


def test_samples_per_prompt_defaults_to_the_cc101_protocol(tmp_path):
    root = make_cc101(tmp_path / "cc101")
    data = spec_data(root, "c", "d")
    data.pop("samples_per_prompt")
    assert parse_spec(data, root=tmp_path).samples_per_prompt == 5  # 20 prompts x 5 = 100 per concept
    toy = {"base": "toy", "evaluator": {"backend": "toyworld"}, "concepts": [{"toyworld": ["split_triangle"]}],
           "methods": [{"method": "perfusion"}]}
    assert parse_spec(toy, root=tmp_path).samples_per_prompt == 1


@pytest.mark.parametrize("change, message", [
    ({"compose": ["perfusion+nope"]}, "method labels of the spec"),
    ({"compose": ["perfusion"]}, "write perfusion+perfusion"),
    ({"compose": "perfusion+perfusion"}, "compose must be a list"),
    ({"concepts": [{"cc101": "x", "compositions": "yes"}]}, "compositions must be true"),
])
def test_bad_composition_specs_are_one_line(tmp_path, change, message):
    with pytest.raises(BadInputError) as info:
        parse_spec(spec_data(tmp_path, "c", "d", **change), root=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_plan_composes_every_method_that_composes(tmp_path):
    root = make_cc101(tmp_path / "cc101")
    units = {u.key: u for u in build_plan(parse_spec(spec_data(root, "c", "d"), root=tmp_path))}
    recipes = sorted(u.method for u in units.values() if u.kind == "score" and u.concept == PAIR)
    assert recipes == ["base", "custom-diffusion(joint)", "perfusion+perfusion", "perfusion+residuals",
                       "residuals+residuals"]
    joint = units[f"train/custom-diffusion/{PAIR}"]
    assert [c["token"] for c in joint.payload["concepts"]] == ["<new1>", "<new2>"]
    assert "train/perfusion/furniture_chair1" in units  # a pair member that is not benchmarked alone
    gen = units[f"generate/perfusion+residuals/{PAIR}/default/p1_s0"]
    # each member as its method trained: Perfusion's <new1> in place of "cat", Residuals' <new2> before "chair"
    assert gen.prompt == "<new2> chair next to <new1>" and gen.purpose == "composition"
    assert units[f"generate/residuals+residuals/{PAIR}/default/p1_s0"].prompt == "<new2> chair next to <new1> cat"
    assert gen.deps == ["train/perfusion/pet_cat1", "train/residuals/furniture_chair1"]
    assert [(m["token"], m["knobs"]) for m in gen.payload["members"]] == [("<new1>", {}), ("<new2>", {"lag": True})]
    assert units[f"generate/base/{PAIR}/default/p1_s0"].prompt == "chair next to cat"
    only = spec_data(root, "c", "d", compose=["perfusion+residuals"])
    assert {u.method for u in build_plan(parse_spec(only, root=tmp_path)) if u.concept == PAIR} == {
        "base", "perfusion+residuals"}


def test_run_scores_each_concept_of_a_pair_against_its_own_photos(run, clip_weights_file, dino_weights_file):
    from personalize.evaluation import ClipEncoder, DinoEncoder, list_images

    spec, out, summary, rows = run
    assert summary.counts["done"] == summary.counts["total"], summary.failures
    by_key = {r["key"]: r for r in rows}
    res = by_key[f"score/perfusion+residuals/{PAIR}/default"]["result"]
    gens = [by_key[f"generate/perfusion+residuals/{PAIR}/default/p{i}_s0"] for i in range(2)]
    images = [out / g["outputs"][0] for g in gens]
    clip, dino = ClipEncoder(weights=clip_weights_file), DinoEncoder(weights=dino_weights_file)
    root = spec.resolve(spec.sources[0]["cc101"])
    for name in ("pet_cat1", "furniture_chair1"):
        refs = list_images(root / "benchmark_dataset" / name)
        expect = (clip.encode_images(images) @ clip.encode_images(refs).T).mean(axis=1)
        assert res["clip_image"][name] == pytest.approx(float(expect.mean()), abs=1e-5)
        assert res["samples"]["clip_image"][name] == pytest.approx(expect.tolist(), abs=1e-5)
        d = (dino.encode_images(images) @ dino.encode_images(refs).T).mean()
        assert res["dino_image"][name] == pytest.approx(float(d), abs=1e-5)
    texts = clip.encode_texts(["A cat sleeping on a purple chair.", "chair next to cat"])  # both tokens removed
    feats = clip.encode_images(images)
    expect = [2.5 * max(float(feats[i] @ texts[i]), 0.0) for i in range(2)]
    assert res["samples"]["clip_text"] == pytest.approx(expect, abs=1e-5)
    assert res["composition"] == ["pet_cat1", "furniture_chair1"]
    barn = by_key["score/perfusion/scene_barn/default"]["result"]  # prompt 1 is a style change
    assert barn["clip_image_sp"] == pytest.approx(barn["samples"]["clip_image"][0])
    # the base's CLIP-T per prompt, from its images and superclass prompts; each image normalised by its prompt's
    base_gens = [by_key[f"generate/base/scene_barn/default/p{i}_s0"] for i in range(2)]
    feats = clip.encode_images([out / g["outputs"][0] for g in base_gens])
    texts = clip.encode_texts([g["prompt"] for g in base_gens])
    base_text = [2.5 * max(float(feats[i] @ texts[i]), 0.0) for i in range(2)]
    assert by_key["score/base/scene_barn/default"]["result"]["clip_text_by_prompt"] == pytest.approx(
        {"0": base_text[0], "1": base_text[1]}, abs=1e-5)
    ratios = [v / b if b > 0 else None for v, b in zip(barn["samples"]["clip_text"], base_text)]
    kept = [r for r in ratios if r is not None]  # random CLIP weights may put a text on the clipped side of zero
    if kept:
        assert barn["samples"]["clip_text_norm"] == pytest.approx(kept, abs=1e-4)
        assert barn["clip_text_norm"] == pytest.approx(np.mean(kept), abs=1e-4)
    else:
        assert barn["clip_text_norm"] is None and "clip_text_norm" not in barn["samples"]
    assert barn.get("clip_text_norm_skipped", []) == [i for i, r in enumerate(ratios) if r is None]
    if ratios[0] is not None:  # prompt 0 ("photo of a {}.") is the only shape-preserving one
        assert barn["clip_text_norm_sp"] == pytest.approx(ratios[0], abs=1e-4)
    else:
        assert barn["clip_text_norm_sp"] is None


def test_report_has_intervals_views_head_to_head_and_compositions(run, tmp_path):
    spec, out, _, rows = run
    s = summarize(rows)
    comp = s["compositions"]
    methods = {r["cells"][0] for r in comp["rows"]}
    assert methods == {"base", "custom-diffusion(joint)", "perfusion+perfusion", "perfusion+residuals",
                       "residuals+residuals"}
    score = {r["key"]: r for r in rows}[f"score/perfusion+residuals/{PAIR}/default"]["result"]
    mine = [r for r in comp["rows"] if r["cells"][0] == "perfusion+residuals"]
    all_row = next(r for r in mine if r["cells"][1] == "all")
    groups = [score["samples"]["clip_image"][c] for c in ("pet_cat1", "furniture_chair1")]
    assert all_row["values"]["clip_image"] == pytest.approx(np.mean([np.mean(g) for g in groups]))
    assert all_row["ci"]["clip_image"] == pytest.approx(mean_ci(groups, over_groups=True))
    cat = next(r for r in mine if r["cells"][2] == "pet_cat1")
    assert cat["ci"]["dino_image"] == pytest.approx(mean_ci([score["samples"]["dino_image"]["pet_cat1"]]))
    lo, hi = cat["ci"]["clip_text"]
    assert lo <= cat["values"]["clip_text"] <= hi
    # single concepts: the composition rows stay out of the results; one concept -> images-only interval
    results = {(r["method"], r["setting"]): r for r in s["results"]["rows"]}
    assert not any("+" in m for m, _ in results)
    barn = {r["key"]: r for r in rows}["score/residuals/scene_barn/default"]["result"]["samples"]
    assert results[("residuals", "default")]["ci"]["clip_image"] == pytest.approx(mean_ci([barn["clip_image"]]))
    assert s["perfusion_view"]["keys"] == ["clip_image_sp", "clip_text_norm", "h_sp"]
    assert s["cc101_view"]["keys"] == ["clip_text", "clip_image", "dino_image"]
    h2h = s["head_to_head"]
    assert len(h2h["rows"]) == 3  # perfusion, residuals, custom-diffusion: every pair once
    assert all(set(r["sig"]) == set(r["ci"]) for r in h2h["rows"])
    index, md = write_report(rows, out, tmp_path / "report")
    page = index.read_text()
    for text in ("Compositions", "Head to head", "Perfusion view", "CC101 view", "perfusion+residuals", "Per concept",
                 "Composition images"):
        assert text in page
    images, composition_images = page.split("Composition images")
    assert "perfusion+residuals</th>" not in images and "perfusion+residuals</th>" in composition_images
    assert "## Compositions" in md.read_text() and "[" in md.read_text()


def test_shape_preserving_prompts_on_published_cc101_lines():
    """barn.txt and luggage.txt of CustomConcept101: scene changes and insertions first, then the rest."""
    barn_scene = ["photo of a {}.", "{} in snowy ice.", "{} in the fall season with leaves all around.",
                  "cat sitting in front of {} in snowy ice.", "squirrel in front of the {}."]
    barn_other = ["{} oil painting ghibli inspired.", "Georgia O'Keeffe style {} painting.",
                  "a watercolor painting of the {}.", "A futuristic {}.", "A surreal landscape, {}.",
                  "A close up shot of the {}.", "Top view of the {}."]
    luggage_other = ["A wet {} in water.", "A graffiti stencil art of the {}.", "A digital rendering of {}.",
                     "A purple colored {}.", "A cube shaped {}."]
    assert all(shape_preserving(p) for p in barn_scene)
    assert not any(shape_preserving(p) for p in barn_other + luggage_other)
    assert shape_preserving("A {0} lounging on a {1} on a sunny beach.")
    assert not shape_preserving("A watercolor painting of a {0} perched on a {1}.")


# Lines of CustomConcept101's prompt files (adobe-research/custom-diffusion, customconcept101/prompts/<file>),
# verbatim, trailing spaces included. A colour or material word on the concept makes a line not shape preserving;
# one in the scene does not.
PUBLISHED_LINES = [
    # in the scene: shape preserving
    ("sofa.txt", "{} and an orange sofa.", True),
    ("table.txt", "{} and an orange sofa.", True),
    ("jacket.txt", "{} hanging on a golden coat rack.", True),
    ("transport.txt", "{} on a highway, with a golden retriever sitting in the driver's seat.", True),
    ("jewelry.txt", "A {} on a blue velvet rug. ", True),
    ("jewelry.txt", "A {} lying in a red jewelry box.", True),
    ("jewelry.txt", "A {} on display behind a glass in a jewelry shop. ", True),
    ("flower.txt", "{} in a violet vase on a table.", True),
    ("cup.txt", "{} on a tree log, with a dense, green forest in the background.", True),
    ("cup.txt", "A {} on a wooden table, with a small butterfly perched on the rim.", True),
    ("cup.txt", "Coffee table with {} and a blueberry muffin on it. ", True),
    ("cup.txt", "A {} floating in a futuristic neon-lit room.", True),
    ("luggage.txt", "{} on the glass table of a high-rise penthouse overlooking a stunning city skyline.", True),
    ("shoes.txt", "{} on the glass floor of a skyscraper overlooking the bustling city.", True),
    ("castle.txt", "The {} in the autumn season with colorful foliage.", True),
    ("dish.txt", "An orange drink on the side of the {}.", True),
    ("toy.txt", "A {} and lego bricks lying on a rug. ", True),
    ("headphone.txt", "{} next to a sleeping puppy in a sunlit living room.", True),
    ("lamp.txt", "A {} on a wooden desk in a bustling city office. ", True),
    ("things.txt", "{} on a rustic wooden bench in a cherry blossom garden.", True),
    # on the concept (or a style, process or pose change): not shape preserving
    ("sofa.txt", "A pink {}.", False),
    ("table.txt", "A pink {}.", False),
    ("sofa.txt", "An orange {}.", False),
    ("sofa.txt", "A red color {}.", False),
    ("table.txt", "a red color {}.", False),
    ("jacket.txt", "A blue velvet {} is lying on the sofa.", False),
    ("flower.txt", "a sky blue color {}.", False),
    ("flower.txt", "{} with violet color petals.", False),
    ("flower.txt", "a beige colored {}.", False),
    ("sculpture.txt", "{} in rainbow colors.", False),
    ("cup.txt", "A transparent {} filled with steaming hot cocoa.", False),
    ("things.txt", "The {}, made of gold, shimmering under the soft light.", False),
    ("toy.txt", "{} made of black stone.", False),
    ("shoes.txt", "Gold colored {}. ", False),
    ("luggage.txt", "A purple colored {} lying on a sofa.", False),
    ("jewelry.txt", "{} crafted from smooth, polished amber.", False),
    ("dish.txt", "A {} formed from chocolate.", False),
    ("castle.txt", "The {}, steampunk aesthetic, adorned with gears and metallic accents.", False),
    ("things.txt", "A holograph of {} in mid-air. ", False),
    ("dog.txt", "a sleeping {}.", False),
]


@pytest.mark.parametrize("source, line, expected", PUBLISHED_LINES, ids=[f"{f}:{p.strip()}" for f, p, _ in
                                                                          PUBLISHED_LINES])
def test_colour_and_material_count_only_on_the_concept(source, line, expected):
    assert shape_preserving(line) is expected


@pytest.mark.parametrize("line, expected", [
    ("{} in red colour.", False), ("a red {}", False), ("a {} made of gold", False), ("A golden {}.", False),
    ("a {} of pure gold.", False), ("A {0} sleeping on a purple {1}.", False),
    ("{} on a red background.", True), ("{} in front of a blue house.", True),
    ("{} on top of a green grass.", True), ("A {0} next to a golden {1} in a red room.", False),
    ("A {0} next to a {1} in a red room.", True)])
def test_colour_and_material_rule_on_made_up_lines(line, expected):
    assert shape_preserving(line) is expected
