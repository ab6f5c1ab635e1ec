"""The Perfusion paper's protocol on top of the raw scores.

- ``normalized_text_similarity``: CLIP text score of the concept images divided by the same score for
  images generated with the superclass word in place of the concept.
- ``class_balanced_mean``: mean per concept class, then mean over classes.
- ``harmonic_mean`` and ``best_h``: per class, the inference setting (e.g. beta, tau, lock) with the best
  harmonic mean of image and (normalised) text similarity.
- ``shape_preserving``: whether a prompt only changes the scene (the Perfusion paper's image similarity uses
  those prompts only): no style, medium, outfit, pose or viewpoint word anywhere, and no colour or material word
  on the concept itself ("A pink {}." is not; "{} and an orange sofa." is).
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


# Words of a prompt that ask for more than a new scene wherever they stand: an art style or medium, a material
# process, a colour change, a shape, a costume or outfit, an expression or pose, a viewpoint. CustomConcept101's
# prompt files list scene changes and object insertions first, then such changes (e.g. barn.txt: "{} in snowy
# ice." ... "cat sitting in front of the {}." then "{} oil painting ghibli inspired.", "A futuristic {}.", "Top
# view of the {}."); their files do not label the lines, so the split is by these words
# (tests/test_benchmark_cc101.py checks it on published lines).
_CHANGES = re.compile(r"\b(" + "|".join((
    r"paint\w*", r"watercolou?r", r"styles?", r"illustration", r"render\w*", r"3d", r"mosaic", r"cartoon",
    r"anime", r"avatar", r"sketch\w*", r"drawing", r"impressionis\w*", r"pointillis\w*", r"cubis\w*",
    r"graffiti", r"stencil", r"inspired", r"art", r"artist", r"aesthetic", r"steampunk", r"print",
    r"holograph\w*", r"sculpture", r"statue", r"carved", r"made", r"crafted", r"formed", r"crochet",
    r"colou?rs?", r"colou?red", r"shaped", r"surreal", r"close[- ]up", r"top view", r"long shot", r"wet", r"dried",
    r"toy", r"outfit", r"costume", r"dressed", r"wearing", r"character", r"impersonating",
    r"crystal-clear")) + r")\b", re.IGNORECASE)

# Colour and material words: a change of the concept only when they apply to the concept slot ("A pink {}.",
# "A blue velvet {} is lying on the sofa.", "{} in rainbow colors."); in the scene they keep the prompt shape
# preserving ("{} and an orange sofa.", "{} hanging on a golden coat rack.", "A {} on a wooden table ...").
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "magenta", "cyan", "turquoise",
           "teal", "brown", "black", "white", "grey", "gray", "beige", "navy", "maroon", "crimson", "scarlet",
           "golden", "silver", "bronze", "copper", "colorful", "colourful", "multicolored", "multicoloured",
           "rainbow", "pastel", "neon")
MATERIALS = ("wooden", "wood", "metal", "metallic", "marble", "gold", "brass", "iron", "steel", "chrome",
             "plastic", "paper", "cardboard", "origami", "clay", "ceramic", "porcelain", "stone", "glass",
             "crystal", "jade", "emerald", "diamond", "amber", "knitted", "wool", "woolen", "woollen", "velvet",
             "leather", "denim", "silk", "fabric", "rubber", "concrete", "ice", "chocolate", "transparent",
             "translucent", "lego")
# Other looks that change the concept on its slot ("A futuristic {}.") but not in the scene ("A {} floating in a
# futuristic neon-lit room.", "A {} and lego bricks lying on a rug.").
OTHER_LOOKS = ("futuristic",)
# Expressions and poses: on the slot ("a sleeping {}.", "A {0} sleeping on ...") but not in the scene ("{} next to
# a sleeping puppy ...").
POSES = ("sleeping", "screaming", "sad", "barking", "crying", "yawning")
_LOOKS = frozenset(COLOURS + MATERIALS + OTHER_LOOKS + POSES)
_SLOT = re.compile(r"\{\d*\}")
# Words that end the phrase in front of a slot: what stands before them does not describe the concept.
_PHRASE_END = frozenset((
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "or", "to", "from", "by", "for", "near", "beside",
    "behind", "under", "over", "into", "onto", "next", "like", "as", "is", "are", "was", "its", "this", "that",
    "his", "her", "their", "our", "my", "your", "some", "inside", "outside", "between", "through", "across",
    "against", "around", "above", "below", "atop", "among", "towards", "toward", "than"))
_INTENSITY = r"(?:a|an|pure|solid|bright|light|dark|pale|deep|shiny|matte)"
_LOOK = r"(?:" + "|".join(sorted(_LOOKS, key=len, reverse=True)) + r")"
# "{} in red.", "{} in red colour", "{}, all in gold", "a {} of pure gold." (the look ends the phrase)
_AFTER = re.compile(r"^\s*,?\s*(?:is\s+|all\s+)?(?:in|of)\s+(?:" + _INTENSITY + r"\s+)*" + _LOOK
                    + r"(?:\s+(?:and|&)\s+" + _LOOK + r")?(?:\s+(?:colou?rs?|tones?|shades?|hues?|finish))?"
                    + r"\s*(?:[.,;:!?]|$)", re.IGNORECASE)
_AFTER_POSE = re.compile(r"^\s*(?:is\s+)?(?:" + "|".join(POSES) + r")\b", re.IGNORECASE)


def _concept_look(template: str) -> bool:
    """Whether a colour, material or pose word applies to a concept slot: in the words right before it (back to a
    phrase-ending word, punctuation or another word in -ing, at most three words), as "in <colour>" right after it
    or as a pose right after it ("{0} sleeping")."""
    for slot in _SLOT.finditer(template):
        phrase = re.split(r"[.,;:!?()\"]", template[: slot.start()].lower())[-1]
        before = re.split(r"[^\w'-]+", phrase)
        words = [w for w in before if w][-3:]
        for word in reversed(words):
            if word in _LOOKS or any(part in _LOOKS for part in word.split("-")):
                return True
            if word in _PHRASE_END or word.endswith("ing"):
                break
        after = template[slot.end():]
        if _AFTER.match(after) or _AFTER_POSE.match(after):
            return True
    return False


def shape_preserving(template: str) -> bool:
    """True when ``template`` (a prompt with its concept slot ``{}``/``{0}``/``{1}``) only places the concept in
    a scene, i.e. asks for no change of style, material, colour, shape, outfit, pose or viewpoint.

    A change word (``_CHANGES``: painting, style, made, coloured, outfit, close-up, ...) anywhere makes it
    False. A colour, material or pose word (``COLOURS``, ``MATERIALS``, ``OTHER_LOOKS``, ``POSES``) makes it False
    only when it applies to a concept slot ("A pink {}.", "A blue velvet {}", "{} in rainbow colors.", "a sleeping
    {}."); in the scene it does not ("{} and an orange sofa.", "A {} on a wooden table", "{} next to a sleeping
    puppy"). Without a slot (the subject filled in) only the change words count.
    """
    if _CHANGES.search(_SLOT.sub(" ", template)):
        return False
    return not _concept_look(template)
