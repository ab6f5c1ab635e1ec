"""The Perfusion paper's protocol on top of the raw scores.

- ``normalized_text_similarity``: CLIP text score of the concept images divided by the same score for
  images generated with the superclass word in place of the concept.
- ``class_balanced_mean``: mean per concept class, then mean over classes.
- ``harmonic_mean`` and ``best_h``: per class, the inference setting (e.g. beta, tau, lock) with the best
  harmonic mean of image and (normalised) text similarity.
- ``shape_preserving``: whether a prompt only changes the scene (the Perfusion paper's image similarity uses
  those prompts only).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Hashable, Iterable, Mapping, Optional

import numpy as np

from ..errors import BadInputError


def normalized_text_similarity(concept_score: float, superclass_score: float) -> float:
    if superclass_score <= 0:
        raise BadInputError(f"superclass text score must be positive to normalise by it, got {superclass_score}")
    return float(concept_score) / float(superclass_score)


def harmonic_mean(a: float, b: float) -> float:
    a, b = float(a), float(b)
    if a <= 0 or b <= 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def class_balanced_mean(scores: Mapping[str, float], classes: Mapping[str, str]) -> float:
    """Mean over classes of the mean over each class's concepts. ``classes``: concept -> class."""
    if not scores:
        raise BadInputError("class_balanced_mean: no scores")
    per: dict[str, list[float]] = defaultdict(list)
    for concept, value in scores.items():
        if concept not in classes:
            raise BadInputError(f"class_balanced_mean: no class given for concept {concept!r}")
        per[classes[concept]].append(float(value))
    return float(np.mean([np.mean(v) for v in per.values()]))


def best_h(rows: Iterable[Mapping], image_key: str = "image", text_key: str = "text",
           class_key: str = "class", setting_key: str = "setting") -> dict:
    """Best harmonic mean per class over inference settings.

    ``rows``: one dict per (concept, setting) with class, setting, image and text scores. Scores of the
    same (class, setting) are averaged first (per-class balancing), then each class keeps the setting
    with the highest H. Returns {"per_class": {cls: {"setting", "image", "text", "h"}}, "image", "text",
    "h"} where the last three are means over classes of the chosen settings.
    """
    acc: dict[Hashable, dict[Hashable, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[r[class_key]][r[setting_key]].append((float(r[image_key]), float(r[text_key])))
    if not acc:
        raise BadInputError("best_h: no rows")
    per_class = {}
    for cls, settings in acc.items():
        best: Optional[dict] = None
        for setting, vals in settings.items():
            img = float(np.mean([v[0] for v in vals]))
            txt = float(np.mean([v[1] for v in vals]))
            h = harmonic_mean(img, txt)
            if best is None or h > best["h"]:
                best = {"setting": setting, "image": img, "text": txt, "h": h}
        per_class[cls] = best
    return {
        "per_class": per_class,
        "image": float(np.mean([b["image"] for b in per_class.values()])),
        "text": float(np.mean([b["text"] for b in per_class.values()])),
        "h": float(np.mean([b["h"] for b in per_class.values()])),
    }


# Words of a prompt that ask for more than a new scene: an art style or medium, a material, colour or shape, a
# costume or outfit, an expression or pose, a viewpoint. CustomConcept101's prompt files list scene changes and
# object insertions first, then such changes (e.g. barn.txt: "{} in snowy ice." ... "cat sitting in front of
# the {}." then "{} oil painting ghibli inspired.", "A futuristic {}.", "Top view of the {}."); their files do
# not label the lines, so the split is by these words (tests/test_benchmark_ci.py checks it on published lines).
_CHANGES = re.compile(r"\b(" + "|".join((
    r"paint\w*", r"watercolou?r", r"styles?", r"illustration", r"render\w*", r"3d", r"mosaic", r"cartoon",
    r"anime", r"avatar", r"sketch\w*", r"drawing", r"impressionis\w*", r"pointillis\w*", r"cubis\w*",
    r"graffiti", r"stencil", r"inspired", r"art", r"artist", r"sculpture", r"statue", r"carved", r"made",
    r"crochet", r"lego", r"colou?red", r"shaped", r"futuristic", r"surreal", r"close[- ]up", r"top view",
    r"long shot", r"wet", r"toy", r"outfit", r"costume", r"dressed", r"wearing", r"character", r"impersonating",
    r"screaming", r"sleeping", r"sad", r"crystal-clear", r"glass")) + r")\b", re.IGNORECASE)


def shape_preserving(template: str) -> bool:
    """True when ``template`` (a prompt with its concept slot ``{}``/``{0}``/``{1}`` or the subject filled in)
    only places the concept in a scene, i.e. asks for no change of style, material, colour, shape, outfit,
    pose or viewpoint."""
    return _CHANGES.search(re.sub(r"\{\d*\}", " ", template)) is None
