"""The Perfusion paper's claims, measured in the toy world.

One place that trains a toy concept, samples fixed prompt sets with fixed seeds and scores them, so the
claim tests (tests/test_toyworld_claims.py), the claims benchmark (benchmarks/toyworld_claims.py) and the
demo all measure the same thing:

- ``RECON``: the concept alone ("a photo of a <tok>"), for fidelity;
- ``CONTEXT``: the concept in new contexts (another background, position, size, a second object),
  for alignment (and fidelity) under editing; ``context_prompts(name)`` swaps a background that shares a
  colour with the concept for one that contrasts with it;
- ``NO_CONCEPT``: prompts that never mention it, for leakage against the same seeds without the concept.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .datasets.toyworld.concepts import get_concept, render_concept_examples
from .datasets.toyworld.measure import score_folder

TOKEN = "<tok>"
RECON = ("a photo of a {}",)
CONTEXT = (
    "a {} on the left, on a green background",
    "a large {} on the right, on a purple background",
    "a small {} at the top, on a blue background",
    "a {} at the bottom and a small white circle at the top, on a red background",
    "a {} on the left and a green triangle on the right, on a white background",
    "a small {} in the center, on a yellow background",
)
def context_prompts(name: str) -> tuple[str, ...]:
    """``CONTEXT`` for concept ``name``: a background that shares a colour with the concept (a green-and-yellow
    triangle "on a green background") becomes the first of the concept's own contrasting backgrounds that
    the prompt does not use yet, so that no prompt asks for an object the measurers cannot see whole."""
    import re

    from .datasets.toyworld.measure import FG_THRESHOLD
    from .datasets.toyworld.world import COLORS

    spec = get_concept(name)
    clash = {bg for bg, rgb in COLORS.items()
             if any(sum((a - b) ** 2 for a, b in zip(rgb, c)) ** 0.5 < FG_THRESHOLD for c in spec.colors)}
    out = []
    for template in CONTEXT:
        m = re.search(r"on a (\w+) background", template)
        if m and m.group(1) in clash:
            used = set(re.findall(r"\b(\w+)\b", template))
            bg = next(b for b in spec.backgrounds if b not in used and b not in clash)
            template = template[:m.start(1)] + bg + template[m.end(1):]
        out.append(template)
    return tuple(out)


NO_CONCEPT = (
    "a small red circle on the left and a large blue square on the right, on a yellow background",
    "a large green heart at the top, on a purple background",
    "a white triangle on the right, on a blue background",
    "a small yellow star at the bottom, on a green background",
)
SAMPLING = {"steps": 25, "guidance": 4.0}


def train_toy_concept(pipe, name: str, out: str | Path, *, method: str = "perfusion", steps: int = 150,
                      batch_size: int = 8, seed: int = 0, progress: bool = False, token: str = TOKEN,
                      masks: str = "default", **method_settings) -> Path:
    """Render ``name``'s example images beside ``out`` and train a ``method`` concept on them
    (``method_settings``: that method's Config fields, e.g. ``lock="trained"`` for Perfusion; a concept that is
    not mirror-symmetric trains without horizontal flips).

    ``masks``: ``"exact"`` weights the loss with the renderer's exact masks of the concept (rendered into
    ``OUT.masks/``); ``"default"`` does so where the method's default is ``auto`` (Perfusion: the toy world is
    its own zero-shot segmenter, with no segmenter error) and trains unmasked otherwise; or ``"none"``.
    Every other setting is the method's own default recipe (Perfusion's clips gradients at 1.0 because its
    mask-weighted loss collapses without it; see its ``recipe``)."""
    from . import methods as registry
    from .training import TrainConfig, train

    out = Path(out)
    photos = out.with_name(out.stem + ".photos")
    if masks == "default":
        default = registry.get(method).train_defaults.get("masks", TrainConfig.masks)
        masks = "exact" if default == "auto" else "none"
    mask_dir = out.with_name(out.stem + ".masks") if masks == "exact" else None
    render_concept_examples(name, photos, masks_dir=mask_dir)
    spec = get_concept(name)
    settings = {"steps": steps, "batch_size": batch_size, "seed": seed, "checkpoint_every": 0,
                **({} if spec.mirror_symmetric else {"flip_p": 0.0}),
                **method_settings}
    return train(pipe, photos, token=token, superclass=spec.superclass, out=out, method=method,
                 masks=mask_dir if mask_dir is not None else masks, settings=settings, progress=progress)


def sample(pipe, templates, folder: str | Path, word: str = TOKEN, seeds: int = 4) -> Path:
    """Each template filled with ``word``, ``seeds`` images each (seeds 0..seeds-1), into a fresh ``folder``."""
    from .generation import generate, write_images

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for template in templates:
        prompt = template.format(word) if "{}" in template else template
        images = generate(pipe, prompt, num_images=seeds, seed=0, **SAMPLING)
        write_images(images, prompt, folder, 0)
    return folder


def superclass_baseline(pipe, name: str, work: str | Path, seeds: int = 8) -> dict:
    """Fidelity of the base alone on "a photo of a <superclass>": what the concept must beat."""
    sc = get_concept(name).superclass
    folder = sample(pipe, RECON, Path(work) / "superclass", word=sc, seeds=seeds)
    return _summary(score_folder(folder, concept=name, placeholder=sc))


def no_concept_reference(pipe, work: str | Path, seeds: int = 4) -> Path:
    """``NO_CONCEPT`` prompts sampled without any concept attached (the leakage reference)."""
    return sample(pipe, NO_CONCEPT, Path(work) / "reference", seeds=seeds)


def measure_concept(pipe, concept, name: str, work: str | Path, *, reference: Optional[Path] = None,
                    seeds: int = 4, recon_seeds: int = 8, **knobs) -> dict:
    """Attach ``concept`` (with inference ``knobs``, e.g. beta) and score the three prompt sets.

    Returns {"fidelity": recon fidelity, "context_alignment", "context_fidelity", "leakage" (None without
    ``reference``), "no_concept_alignment"}.
    """
    from .compose import attach

    work = Path(work)
    with attach(pipe, concept, **knobs):
        recon = score_folder(sample(pipe, RECON, work / "recon", seeds=recon_seeds), concept=name,
                             placeholder=TOKEN)
        context = score_folder(sample(pipe, context_prompts(name), work / "context", seeds=seeds), concept=name,
                               placeholder=TOKEN)
        other = score_folder(sample(pipe, NO_CONCEPT, work / "no_concept", seeds=seeds), reference=reference)
    return {"fidelity": recon["fidelity"], "context_alignment": context["alignment"],
            "context_fidelity": context["fidelity"], "leakage": other["leakage"],
            "no_concept_alignment": other["alignment"]}


# ---------------------------------------------------------------------------------------------- deciding the claims
# Claims 2-4 are decided on several concepts and training seeds with paired 95 % intervals (images matched by
# prompt and sampling seed; concepts resampled: evaluation/bootstrap.py), never on one run.
CLAIM_CONCEPTS = ("split_triangle", "dotted_square", "striped_heart", "checkered_circle")
CLAIM_SEEDS = (0, 1, 2, 3)
BETA_GRID = (0.6, 0.7, 0.8, 0.9, 1.0)


def per_image(pipe, concept, name: str, templates, key: str, work: str | Path, *, seeds: int = 4,
              reference: Optional[Path] = None, **knobs) -> dict[str, float]:
    """``{image stem: key}`` over ``templates`` sampled with ``concept`` attached (None: the base alone) with
    inference ``knobs``: "alignment" / "fidelity" (prompts with the token) or "leakage" (against
    ``reference``). Stems ("<prompt>_<seed>") are the same for every concept, so images pair by stem."""
    import contextlib

    from .compose import attach

    with attach(pipe, concept, **knobs) if concept is not None else contextlib.nullcontext():
        folder = sample(pipe, templates, Path(work), seeds=seeds)
    scores = score_folder(folder, concept=name, placeholder=TOKEN, reference=reference)["per_image"]
    return {stem: e[key] if e.get(key) is not None else 0.0 for stem, e in scores.items() if key in e}


def paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict:
    """Mean of a - b over runs (``{run: {stem: value}}``, runs named "<concept>/<seed>") with the paired 95 %
    interval: each run's images matched to the same run's images of ``b`` by stem, concepts resampled (a
    concept's training seeds and images are not independent of it)."""
    from .evaluation.bootstrap import mean_ci

    by_concept: dict[str, list[float]] = {}
    for run in sorted(a):
        common = sorted(a[run].keys() & b[run].keys())
        by_concept.setdefault(run.split("/")[0], []).extend(a[run][s] - b[run][s] for s in common)
    groups = list(by_concept.values())
    mean = sum(sum(g) / len(g) for g in groups) / len(groups)
    ci = mean_ci(groups, over_groups=len(groups) > 1)
    return {"diff": mean, "ci": list(ci) if ci else None, "concepts": len(groups), "images": sum(map(len, groups))}


def excludes_zero(result: dict, sign: int) -> bool:
    """The interval lies wholly on the ``sign`` side of 0."""
    return result["ci"] is not None and (result["ci"][0] > 0 if sign > 0 else result["ci"][1] < 0)


def _summary(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "per_image"}


__all__ = ["BETA_GRID", "CLAIM_CONCEPTS", "CLAIM_SEEDS", "CONTEXT", "NO_CONCEPT", "RECON", "TOKEN", "excludes_zero",
           "paired", "per_image", "context_prompts", "measure_concept", "no_concept_reference", "sample",
           "superclass_baseline", "train_toy_concept"]
