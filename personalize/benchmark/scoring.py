"""Score rows: one method x concept x setting (or the base alone for a concept) from its generated images.

CLIP backend (CustomConcept101's numbers plus the Perfusion protocol):
``clip_text`` (2.5 x clipped cosine, token removed), ``clip_image`` and ``dino_image`` (all-pairs means
against the concept's photos), ``clip_text_norm`` (the mean over images of each image's CLIP-T over the base's
mean CLIP-T on the same prompt with the superclass word: the base row keeps ``clip_text_by_prompt``,
{str(prompt_index): mean}; a prompt whose base mean is 0, every image clipped, is left out and listed in
``clip_text_norm_skipped``), ``leakage_dino`` (DINO cosine of same-seed leakage-prompt images with and
without the concept; 1 = no leakage) and ``h`` (harmonic mean of CLIP-I and normalised CLIP-T); the
Perfusion view's ``clip_image_sp`` / ``dino_image_sp`` / ``clip_text_norm_sp`` (shape-preserving prompts only)
and ``h_sp`` (harmonic mean of ``clip_image_sp`` and ``clip_text_norm``). ``samples`` keeps each score's
per-image values for the report's bootstrap intervals. Composition rows: see :func:`score_composition`.

Toy-world backend (ground truth): ``alignment``, ``fidelity``, ``alignment_norm``, ``leakage`` (mean
pixel difference on leakage prompts, lower is better) and ``h`` (harmonic mean of fidelity and alignment).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..evaluation import LeakageScore, harmonic_mean, list_images, normalized_text_similarity, score_concept
from ..evaluation.decode import default_workers
from ..evaluation.protocol import shape_preserving
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


def _stems_of(rows: list[dict]) -> list[str]:
    """The images' ids, e.g. "p3_s1_0" (prompt 3, seed 1, sample 0): the same for a method and the base."""
    return [Path(rel).stem for r in rows for rel in r["outputs"]]


def _label(out: dict, ids: list[str], keys) -> None:
    """``sample_ids[key]``: the id of each of ``samples[key]``'s values, so that the report pairs a method's
    images with the base's (or another method's) by prompt, seed and sample, not by position."""
    out.setdefault("sample_ids", {}).update({k: list(ids) for k in keys if k in out["samples"]})


@dataclass(frozen=True)
class Scorer:
    """A backend's benchmark scorer (registered in :mod:`personalize.evaluation.registry`)."""

    base: Callable  # (worker, concept, gens) -> result of the base's score row
    method: Callable  # (worker, concept, gens, leaks, base_leaks, base_result) -> result of a method's score row


def score_row(worker, row: dict) -> dict:
    from ..evaluation.registry import get

    if "composition" in row["payload"]:
        return score_composition(worker, row)
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
def _shape_preserving(out: dict, concept, gens: list[dict]) -> dict:
    """The Perfusion view's image scores: ``clip_image_sp`` / ``dino_image_sp`` over the images of
    shape-preserving prompts only (:func:`personalize.evaluation.protocol.shape_preserving`)."""
    keep = [shape_preserving(concept.templates[r["prompt_index"]]) for r in gens for _ in r["outputs"]]
    for key in ("clip_image", "dino_image"):
        values = [v for v, k in zip(out["samples"][key], keep) if k]
        out[f"{key}_sp"] = sum(values) / len(values) if values else None
        out["samples"][f"{key}_sp"] = values
        out["sample_ids"][f"{key}_sp"] = [i for i, k in zip(out["sample_ids"][key], keep) if k]
    return out


def _prompt_indices(rows: list[dict]) -> list[int]:
    """Each image's prompt index, in the order of :func:`_images`."""
    return [r["prompt_index"] for r in rows for _ in r["outputs"]]


def _text_by_prompt(out: dict, rows: list[dict]) -> dict[str, float]:
    """The mean CLIP-T of each prompt's images, keyed by ``str(prompt_index)`` (the result is stored as JSON)."""
    groups: dict[str, list[float]] = {}
    for index, value in zip(_prompt_indices(rows), out["samples"]["clip_text"]):
        groups.setdefault(str(index), []).append(float(value))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def _clip_base(worker, concept, gens: list[dict]) -> dict:
    clip, dino = worker.encoders()
    paths, prompts = _images(worker, gens)
    out = score_concept(clip, dino, paths, prompts, reference=list_images(worker.photos(concept)), token=None,
                       workers=default_workers(worker.device))
    _label(out, _stems_of(gens), ("clip_text", "clip_image", "dino_image"))
    out["clip_text_by_prompt"] = _text_by_prompt(out, gens)
    return _shape_preserving(out, concept, gens)


def _normalised_text(out: dict, base: dict, rows: list[dict], keep: Optional[list[bool]] = None) -> None:
    """``clip_text_norm`` and its per-image values: each image's CLIP-T over the base's mean CLIP-T on the same
    prompt (``base["clip_text_by_prompt"]``), then their mean. Images of a prompt whose base mean is 0 (or that
    the base did not score) are left out; their prompt indices go to ``clip_text_norm_skipped``. ``keep``: per
    image, whether its prompt is shape preserving; gives ``clip_text_norm_sp`` over those images. None when no
    image is left (e.g. a base row scored before it kept its per-prompt means)."""
    by_prompt = base.get("clip_text_by_prompt") or {}
    ids = out.get("sample_ids", {}).get("clip_text")
    ratios: list[Optional[float]] = []
    for index, value in zip(_prompt_indices(rows), out["samples"]["clip_text"]):
        reference = by_prompt.get(str(index)) or 0.0
        ratios.append(normalized_text_similarity(value, reference) if reference > 0 else None)
    skipped = sorted({i for i, r in zip(_prompt_indices(rows), ratios) if r is None})
    if skipped:
        out["clip_text_norm_skipped"] = skipped
    subsets = [("clip_text_norm", [True] * len(ratios))]
    if keep is not None:
        subsets.append(("clip_text_norm_sp", keep))
    for key, mask in subsets:
        values = [r for r, k in zip(ratios, mask) if k and r is not None]
        out[key] = sum(values) / len(values) if values else None
        if values:
            out["samples"][key] = values
            if ids is not None:
                out["sample_ids"][key] = [i for i, r, k in zip(ids, ratios, mask) if k and r is not None]


def _class_texts(concept, gens: list[dict]) -> list[str]:
    """CLIP-T's text of each image: its template with the superclass word, i.e. the prompt with the token
    removed ("photo of a <new1> barn" -> "photo of a barn") or, where the token stood in place of the class
    word, the class word back ("photo of a <new1>" -> "photo of a barn")."""
    texts = concept.superclass_prompts()
    return [texts[r["prompt_index"]] for r in gens for _ in r["outputs"]]


def _clip_method(worker, concept, gens, leaks, base_leaks, base: dict) -> dict:
    clip, dino = worker.encoders()
    paths, _ = _images(worker, gens)
    out = score_concept(clip, dino, paths, _class_texts(concept, gens), reference=list_images(worker.photos(concept)),
                        token=None, workers=default_workers(worker.device))
    _label(out, _stems_of(gens), ("clip_text", "clip_image", "dino_image"))
    _normalised_text(out, base, gens, keep=[shape_preserving(concept.templates[i]) for i in _prompt_indices(gens)])
    leak = LeakageScore(dino)
    out["samples"]["leakage_dino"] = [float(v) for v in leak.update(*_pairs(worker, leaks, base_leaks),
                                                                     workers=default_workers(worker.device))]
    out["leakage_dino"] = leak.compute()
    _label(out, _stems_of(leaks), ("leakage_dino",))
    text = out["clip_text_norm"] if out["clip_text_norm"] is not None else out["clip_text"]
    out["h"] = harmonic_mean(out["clip_image"], text)
    _shape_preserving(out, concept, gens)
    if out["clip_image_sp"] is not None and out["clip_text_norm"] is not None:
        out["h_sp"] = harmonic_mean(out["clip_image_sp"], out["clip_text_norm"])
    return out


# ----------------------------------------------------------------------------- compositions (CLIP / DINO)
def score_composition(worker, row: dict) -> dict:
    """A composition pair's images: CLIP-T of the composed prompt with each member's superclass word for its
    concept (both tokens removed); CLIP-I and DINO-I per member concept against its own photos
    (``{"clip_image": {concept: value}}``); the base row keeps its per-prompt CLIP-T means, a recipe's
    ``clip_text_norm`` divides by them prompt by prompt."""
    from .plan import ConceptEntry

    info = row["payload"]["composition"]
    members = [ConceptEntry(**{**c, "templates": tuple(c["templates"])}) for c in info["concepts"]]
    db = worker.db
    gens = db.rows_by_key(row["payload"]["generated"])
    clip, dino = worker.encoders()
    paths, _ = _images(worker, gens)
    refs = {c.name: list_images(worker.photos(c)) for c in members}
    a, b = members  # each member's superclass in its slot: the composed prompt without its tokens (see _class_texts)
    texts = [info["templates"][r["prompt_index"]].replace("{0}", a.superclass).replace("{1}", b.superclass)
             for r in gens for _ in r["outputs"]]
    out = score_concept(clip, dino, paths, texts, reference=refs, token=None, workers=default_workers(worker.device))
    out["composition"] = list(info["names"])
    if row["method"] == BASE:
        out["clip_text_by_prompt"] = _text_by_prompt(out, gens)
    else:
        _normalised_text(out, db.result(row["payload"]["base_score"]) or {}, gens)
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
            **_per_image(res)}


def _per_image(res: dict, base_alignment: float = 0.0) -> dict[str, dict[str, list]]:
    """``samples``: per-image values of the means (for the report's bootstrap confidence intervals), and their
    ``sample_ids`` (the images' stems); with the base's alignment, ``alignment_norm`` too (each image's
    alignment over the base's mean)."""
    images = res["per_image"].items()
    aligned = [(stem, e["alignment"]) for stem, e in images if e.get("alignment") is not None]
    scored = [(stem, e["fidelity"] or 0.0) for stem, e in images if "fidelity" in e]
    samples = {"alignment": [v for _, v in aligned], "fidelity": [v for _, v in scored]}
    ids = {"alignment": [k for k, _ in aligned], "fidelity": [k for k, _ in scored]}
    if base_alignment > 0 and aligned:
        samples["alignment_norm"] = [v / base_alignment for _, v in aligned]
        ids["alignment_norm"] = list(ids["alignment"])
    return {"samples": samples, "sample_ids": ids}


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
            **_per_image(res, base_align)}


CLIP_SCORER = Scorer(_clip_base, _clip_method)
TOY_SCORER = Scorer(_toy_base, _toy_method)

__all__ = ["CLIP_SCORER", "Scorer", "TOY_SCORER", "score_row"]
