"""Score rows: one method x concept x setting (or the base alone for a concept) from its generated images.

CLIP backend (CustomConcept101's numbers plus the Perfusion protocol):
``clip_text`` (2.5 x clipped cosine, token removed), ``clip_image`` and ``dino_image`` (all-pairs means
against the concept's photos), ``clip_text_norm`` (CLIP-T over the base's CLIP-T on the same prompts
with the superclass word), ``leakage_dino`` (DINO cosine of same-seed leakage-prompt images with and
without the concept; 1 = no leakage) and ``h`` (harmonic mean of CLIP-I and normalised CLIP-T).

Toy-world backend (ground truth): ``alignment``, ``fidelity``, ``alignment_norm``, ``leakage`` (mean
pixel difference on leakage prompts, lower is better) and ``h`` (harmonic mean of fidelity and alignment).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..evaluation import LeakageScore, harmonic_mean, list_images, normalized_text_similarity, score_concept
from .plan import BASE, concept_from_payload


def _images(worker, rows: list[dict]) -> tuple[list[Path], list[str]]:
    paths, prompts = [], []
    for r in rows:
        for rel in r["outputs"]:
            paths.append(worker.root / rel)
            prompts.append(r["prompt"])
    return paths, prompts


def _pairs(worker, rows: list[dict], reference_rows: list[dict]) -> tuple[list[Path], list[Path]]:
    """Leakage images with the concept and the base's images of the same prompt and seed."""
    ref = {(r["prompt_index"], r["seed"]): r for r in reference_rows}
    with_c, without = [], []
    for r in rows:
        other = ref[(r["prompt_index"], r["seed"])]
        for a, b in zip(r["outputs"], other["outputs"]):
            with_c.append(worker.root / a)
            without.append(worker.root / b)
    return with_c, without


@dataclass(frozen=True)
class Scorer:
    """A backend's benchmark scorer (registered in :mod:`personalize.evaluation.registry`)."""

    base: Callable  # (worker, concept, gens) -> result of the base's score row
    method: Callable  # (worker, concept, gens, leaks, base_leaks, base_result) -> result of a method's score row


def score_row(worker, row: dict) -> dict:
    from ..evaluation.registry import get

    concept = concept_from_payload(row["payload"])
    scorer = get(worker.spec.evaluator["backend"]).load("scorer")
    db = worker.db
    if row["method"] == BASE:
        gens = db.rows_by_key(db.dependencies(row["key"]))
        return scorer.base(worker, concept, gens)
    p = row["payload"]
    gens, leaks, base_leaks = (db.rows_by_key(p[k]) for k in ("generated", "leakage", "base_leakage"))
    base = db.result(p["base_score"]) or {}
    return scorer.method(worker, concept, gens, leaks, base_leaks, base)


# ----------------------------------------------------------------------------- CLIP / DINO
def _clip_base(worker, concept, gens: list[dict]) -> dict:
    clip, dino = worker.encoders()
    paths, prompts = _images(worker, gens)
    return score_concept(clip, dino, paths, prompts, reference=list_images(worker.photos(concept)), token=None)


def _clip_method(worker, concept, gens, leaks, base_leaks, base: dict) -> dict:
    clip, dino = worker.encoders()
    paths, prompts = _images(worker, gens)
    out = score_concept(clip, dino, paths, prompts, reference=list_images(worker.photos(concept)),
                        token=concept.token)
    base_text = base.get("clip_text") or 0.0
    out["clip_text_norm"] = normalized_text_similarity(out["clip_text"], base_text) if base_text > 0 else None
    leak = LeakageScore(dino)
    leak.update(*_pairs(worker, leaks, base_leaks))
    out["leakage_dino"] = leak.compute()
    text = out["clip_text_norm"] if out["clip_text_norm"] is not None else out["clip_text"]
    out["h"] = harmonic_mean(out["clip_image"], text)
    return out


# ----------------------------------------------------------------------------- toy world
def _stems(rows: list[dict]) -> tuple[Path, dict[str, str]]:
    folder = Path(rows[0]["outputs"][0]).parent
    return folder, {Path(rel).stem: r["prompt"] for r in rows for rel in r["outputs"]}


def _toy_base(worker, concept, gens: list[dict]) -> dict:
    from ..datasets.toyworld.measure import score_folder

    folder, prompts = _stems(gens)
    res = score_folder(worker.root / folder, prompts=prompts, concept=concept.name, placeholder=concept.superclass)
    return {"alignment": res["alignment"], "fidelity": res["fidelity"], "n_images": res["n_images"],
            "samples": _per_image(res)}


def _per_image(res: dict) -> dict[str, list[float]]:
    """Per-image values of the means (for the report's bootstrap confidence intervals)."""
    images = res["per_image"].values()
    return {"alignment": [e["alignment"] for e in images if e.get("alignment") is not None],
            "fidelity": [e["fidelity"] or 0.0 for e in images if "fidelity" in e]}


def _toy_method(worker, concept, gens, leaks, base_leaks, base: dict) -> dict:
    from ..datasets.toyworld.measure import score_folder

    folder, prompts = _stems(gens)
    res = score_folder(worker.root / folder, prompts=prompts, concept=concept.name, placeholder=concept.token)
    leak_folder, leak_prompts = _stems(leaks)
    ref_folder, _ = _stems(base_leaks)
    other = score_folder(worker.root / leak_folder, prompts=leak_prompts, reference=worker.root / ref_folder)
    base_align = base.get("alignment") or 0.0
    return {"alignment": res["alignment"], "fidelity": res["fidelity"],
            "alignment_norm": res["alignment"] / base_align if base_align > 0 and res["alignment"] is not None else None,
            "leakage": other["leakage"], "no_concept_alignment": other["alignment"],
            "h": harmonic_mean(res["fidelity"] or 0.0, res["alignment"] or 0.0), "n_images": res["n_images"],
            "samples": _per_image(res)}


CLIP_SCORER = Scorer(_clip_base, _clip_method)
TOY_SCORER = Scorer(_toy_base, _toy_method)

__all__ = ["CLIP_SCORER", "Scorer", "TOY_SCORER", "score_row"]
