"""The Perfusion paper's view on synthetic score rows (no models): per-prompt text normalisation, class-balanced
means and Best H on shape-preserving prompts."""
from __future__ import annotations

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from personalize.benchmark import scoring
from personalize.benchmark.plan import ConceptEntry
from personalize.benchmark.report import summarize
from personalize.evaluation.bootstrap import mean_ci

# prompt index -> (template, CLIP-T of the base's two images, CLIP-T of the method's two images)
PROMPTS = {0: ("{} on a sunny beach.", [0.5, 0.7], [0.3, 0.6]),  # shape preserving
           1: ("A pink {}.", [0.4, 0.4], [0.2, 0.5]),  # a colour change of the concept
           2: ("{} in times square.", [0.0, 0.0], [0.1, 0.1])}  # every base image clipped: left out
CLIP_I = {0: [0.8, 0.6], 1: [0.2, 0.2], 2: [0.7, 0.5]}  # the method's per-image CLIP-I


@pytest.fixture
def fake_scores(monkeypatch, tmp_path):
    """``score_concept`` looked up from the tables above by image name (``<who>_p<i>_<k>.png``)."""
    def score_concept(clip, dino, paths, prompts, reference, token=None, workers=None):
        who = [p.name.split("_") for p in paths]
        text = [PROMPTS[int(i[1:])][1 if w == "base" else 2][int(k[0])] for w, i, k in who]
        image = [CLIP_I[int(i[1:])][int(k[0])] for _, i, k in who]
        if isinstance(reference, dict):  # a composition: the same values against each member's photos
            return {"clip_text": sum(text) / len(text), "n_images": len(paths),
                    "clip_image": {n: sum(image) / len(image) for n in reference},
                    "samples": {"clip_text": text, "clip_image": {n: image for n in reference}}}
        return {"clip_text": sum(text) / len(text), "clip_image": sum(image) / len(image),
                "dino_image": sum(image) / len(image), "n_images": len(paths),
                "samples": {"clip_text": text, "clip_image": image, "dino_image": image}}

    class Leak:
        def __init__(self, dino):
            pass

        def update(self, a, b, workers=None):
            return []

        def compute(self):
            return 1.0

    monkeypatch.setattr(scoring, "score_concept", score_concept)
    monkeypatch.setattr(scoring, "list_images", lambda folder: ["photo.png"])
    monkeypatch.setattr(scoring, "LeakageScore", Leak)
    return SimpleNamespace(root=tmp_path, device="cpu", encoders=lambda: (None, None), photos=lambda concept: tmp_path)


def _gens(who: str) -> list[dict]:
    return [{"prompt_index": i, "prompt": t, "seed": 0, "outputs": [f"{who}_p{i}_{k}.png" for k in (0, 1)]}
            for i, (t, _, _) in PROMPTS.items()]


def test_text_is_normalised_prompt_by_prompt(fake_scores):
    concept = ConceptEntry(name="barn", superclass="barn", concept_class="scene", token="<new1>",
                           templates=tuple(t for t, _, _ in PROMPTS.values()), source="cc101")
    base = scoring._clip_base(fake_scores, concept, _gens("base"))
    base = json.loads(json.dumps(base))  # as the database hands it back: prompt indices become strings
    assert base["clip_text_by_prompt"] == pytest.approx({"0": 0.6, "1": 0.4, "2": 0.0})
    out = scoring._clip_method(fake_scores, concept, _gens("m"), [], [], base)
    # by hand: each image over its own prompt's base mean; prompt 2 (base mean 0) left out
    ratios = [0.3 / 0.6, 0.6 / 0.6, 0.2 / 0.4, 0.5 / 0.4]
    assert out["samples"]["clip_text_norm"] == pytest.approx(ratios)
    assert out["clip_text_norm"] == pytest.approx(0.8125)
    assert out["clip_text_norm"] != pytest.approx(out["clip_text"] / base["clip_text"])  # one constant per concept
    assert out["clip_text_norm_skipped"] == [2]
    # shape preserving: prompt 0 (prompt 2 is too but has no base score); "A pink {}." is not
    assert out["clip_text_norm_sp"] == pytest.approx(0.75) and out["samples"]["clip_text_norm_sp"] == [0.5, 1.0]
    assert out["clip_image_sp"] == pytest.approx((0.8 + 0.6 + 0.7 + 0.5) / 4)
    sp, norm = out["clip_image_sp"], out["clip_text_norm"]
    assert out["h_sp"] == pytest.approx(2 * sp * norm / (sp + norm))


def test_without_per_prompt_base_means_there_is_no_normalised_score(fake_scores):
    concept = ConceptEntry(name="barn", superclass="barn", concept_class="scene", token="<new1>",
                           templates=tuple(t for t, _, _ in PROMPTS.values()), source="cc101")
    out = scoring._clip_method(fake_scores, concept, _gens("m"), [], [], {"clip_text": 0.5})  # an older base row
    assert out["clip_text_norm"] is None and out["clip_text_norm_sp"] is None
    assert "clip_text_norm" not in out["samples"] and "h_sp" not in out


def test_composition_text_is_normalised_prompt_by_prompt(fake_scores):
    members = [asdict(ConceptEntry(name=n, superclass=n, concept_class="c", token=t, templates=("{}",),
                                   source="cc101")) for n, t in (("cat", "<new1>"), ("chair", "<new2>"))]
    info = {"names": ["cat", "chair"], "concepts": members, "templates": [t for t, _, _ in PROMPTS.values()]}
    gens = {"gb": _gens("base"), "gm": _gens("m")}
    results = {}
    fake_scores.db = SimpleNamespace(rows_by_key=lambda keys: gens[keys], result=lambda key: results[key])
    base = scoring.score_composition(fake_scores, {"method": "base", "payload": {"composition": info,
                                                                                   "generated": "gb"}})
    results["sb"] = json.loads(json.dumps(base))
    out = scoring.score_composition(fake_scores, {"method": "perfusion+perfusion", "payload": {
        "composition": info, "generated": "gm", "base_score": "sb"}})
    assert out["samples"]["clip_text_norm"] == pytest.approx([0.3 / 0.6, 0.6 / 0.6, 0.2 / 0.4, 0.5 / 0.4])
    assert out["clip_text_norm"] == pytest.approx(0.8125) and out["clip_text_norm_skipped"] == [2]


# ------------------------------------------------------------------------------------------ report


def _score(method: str, concept: str, cls: str, setting: str = "default", **result) -> dict:
    samples = {k: v for k, v in result.items() if isinstance(v, list)}
    values = {k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in result.items()}
    return {"status": "done", "kind": "score", "method": method, "concept": concept, "concept_class": cls,
            "setting": {}, "setting_label": setting, "result": {**values, "samples": samples}}


def test_the_perfusion_view_balances_classes():
    """3 dogs and 1 barn: the class-balanced mean weighs the barn as much as the three dogs together."""
    dogs = {"dog1": [0.9, 0.9], "dog2": [0.8, 0.8], "dog3": [0.7, 0.7]}
    rows = [_score("perfusion", c, "dog", clip_image_sp=v, clip_text_norm=[1.0, 1.2], h_sp=0.9)
            for c, v in dogs.items()]
    rows.append(_score("perfusion", "barn", "barn", clip_image_sp=[0.2, 0.4], clip_text_norm=[0.5, 0.7], h_sp=0.3))
    rows.append(_score("base", "barn", "barn", clip_image_sp=[0.1, 0.1]))
    summary = summarize(rows)
    view = {r["method"]: r for r in summary["perfusion_view"]["rows"]}
    mine = view["perfusion"]["values"]
    # independently: mean per class, then over classes
    assert mine["clip_image_sp"] == pytest.approx(((0.9 + 0.8 + 0.7) / 3 + 0.3) / 2)
    assert mine["clip_text_norm"] == pytest.approx((1.1 + 0.6) / 2)
    assert mine["h_sp"] == pytest.approx((0.9 + 0.3) / 2)
    concept_mean = (0.9 + 0.8 + 0.7 + 0.3) / 4
    assert mine["clip_image_sp"] != pytest.approx(concept_mean)
    results = {r["method"]: r["values"] for r in summary["results"]["rows"]}
    assert results["perfusion"]["clip_image_sp"] == pytest.approx(concept_mean)  # the results table: per concept
    # interval: classes resampled, then the images pooled within each class
    groups = [[0.9, 0.9, 0.8, 0.8, 0.7, 0.7], [0.2, 0.4]]
    assert view["perfusion"]["ci"]["clip_image_sp"] == pytest.approx(mean_ci(groups, over_groups=True))
    assert "h_sp" not in view["perfusion"]["ci"]
    assert view["perfusion"]["cells"] == ["perfusion", "default", "4 / 2"]
    assert view["base"]["reference"] and view["base"]["values"]["clip_text_norm"] is None
    assert summary["perfusion_view"]["keys"] == ["clip_image_sp", "clip_text_norm", "h_sp"]


def test_best_h_picks_the_setting_that_wins_on_shape_preserving_prompts():
    """Setting 'all' wins on every prompt but loses on the shape-preserving ones; Best H picks 'sp'."""
    rows = []
    for c in ("dog1", "dog2"):
        rows.append(_score("perfusion", c, "dog", "all", clip_image=0.9, clip_text_norm=0.9,
                           clip_image_sp=0.3, clip_text_norm_sp=0.4))
        rows.append(_score("perfusion", c, "dog", "sp", clip_image=0.5, clip_text_norm=0.5,
                           clip_image_sp=0.6, clip_text_norm_sp=0.7))
    rows.append(_score("perfusion", "barn", "barn", "all", clip_image=0.8, clip_text_norm=0.8,
                       clip_image_sp=0.7, clip_text_norm_sp=0.8))
    rows.append(_score("perfusion", "barn", "barn", "sp", clip_image=0.4, clip_text_norm=0.4,
                       clip_image_sp=0.5, clip_text_norm_sp=0.5))
    table = summarize(rows)["best_h"]
    assert table["keys"] == ["clip_image_sp", "clip_text_norm_sp", "h"]
    row = table["rows"][0]
    assert row["per_class"] == {"dog": "sp", "barn": "all"}
    h_dog, h_barn = 2 * 0.6 * 0.7 / 1.3, 2 * 0.7 * 0.8 / 1.5
    assert row["values"] == pytest.approx({"clip_image_sp": (0.6 + 0.7) / 2, "clip_text_norm_sp": (0.7 + 0.8) / 2,
                                           "h": (h_dog + h_barn) / 2})
