"""The report's tables with error bars: the two protocol views, per-concept scores, head-to-head differences
between methods and the composition table.

Every interval is a 95 % percentile bootstrap (:mod:`personalize.evaluation.bootstrap`, 2,000 replicates) over
the score rows' per-image values (``result["samples"]``): one concept's score resamples its images; an
average over concepts resamples the concepts, then the images within each (stratified). H, a function of two
means, has no per-image values and no interval.
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional

from ...evaluation.bootstrap import can_pair, diff_ci, mean_ci, significant
from ...evaluation.protocol import class_balanced_mean
from .summary import (_best_indices, _concept_class, _group, _is_base, _mean, _result, _samples, _table,
                      setting_label)

CC101_VIEW = ("clip_text", "clip_image", "dino_image")
PERFUSION_VIEW = ("clip_image_sp", "clip_text_norm", "h_sp")
HEAD_TO_HEAD_KEYS = ("clip_text", "clip_image", "dino_image", "clip_image_sp", "clip_text_norm", "alignment",
                     "fidelity")
H2H_TEXT = ("Row method minus column method at each one's setting with the highest mean H (the first without H), "
            "over the concepts both scored; images paired by prompt and seed where both have the same ones. "
            "[brackets]: 95 % stratified bootstrap interval of the difference; * marks a significant difference "
            "(the interval excludes 0).")
VIEWS_TEXT = ("CC101 view: all prompts, mean over concepts: CLIP-T with the token removed (2.5 × the cosine, "
              "clipped at 0), all-pairs CLIP-I and DINO-I. Perfusion view (the Perfusion paper's protocol): "
              "CLIP-I over the images of shape-preserving prompts only (prompts that change the scene; none with "
              "a style, medium, outfit, pose or viewpoint word, nor a colour or material word on the concept "
              "itself: 'A pink {}.' is left out, '{} and an orange sofa.' is kept); CLIP-T norm: each image's "
              "CLIP-T over the base's mean CLIP-T on the same prompt with the superclass word in place of the "
              "concept, averaged over all prompts (a prompt whose base mean is 0 is left out); H: per concept, "
              "the harmonic mean of the two. Each Perfusion-view column is class-balanced: the mean over each "
              "concept class's concepts, then the mean over classes; [brackets]: bootstrap over classes, then "
              "over the images pooled within each class. Best H (CLIP backend): per class, the setting with the "
              "best harmonic mean of CLIP-I and CLIP-T norm, both on shape-preserving prompts.")
COMPOSITION_TEXT = ("Composition pairs (CustomConcept101's dataset_multiconcept.json), scored per concept: CLIP-I "
                    "and DINO-I of the pair's images against that concept's own photos; CLIP-T of the composed "
                    "prompt with both tokens removed (the same for both concepts of a pair). 'all' rows: mean over "
                    "every (pair, concept), interval over pairs/concepts and images.")


def ci_of(groups: Optional[list[list[float]]]) -> Optional[tuple[float, float]]:
    """The report's interval of a mean over ``groups`` (concepts): images only for one, stratified for more."""
    if not groups:
        return None
    return mean_ci(groups, over_groups=len(groups) > 1)


def view_table(results: Optional[dict], keys: tuple[str, ...]) -> Optional[dict]:
    """The results table's columns ``keys`` (a protocol's view; a column without numbers shows "–"), None when
    it has none of them."""
    if not results or not any(k in results["keys"] for k in keys):
        return None
    return _table(results["head"], list(keys), results["rows"])


def _class_groups(rows: list[dict], key: str) -> Optional[list[list[float]]]:
    """Per concept class, the per-image values of ``key`` of its concepts pooled; None if a row lacks them."""
    samples = _samples(rows, key)
    if samples is None:
        return None
    pooled: dict[str, list[float]] = {}
    for r, values in zip(rows, samples):
        pooled.setdefault(_concept_class(r), []).extend(values)
    return list(pooled.values())


def perfusion_view_table(scores: list[dict], keys: tuple[str, ...] = PERFUSION_VIEW) -> Optional[dict]:
    """The Perfusion view, classes balanced as the paper does: per (method, setting), each of ``keys`` is the
    mean over each concept class's concepts, then the mean over classes
    (:func:`personalize.evaluation.protocol.class_balanced_mean`), so a class with many concepts counts as much
    as a class with one. Interval: bootstrap over classes, then over the images pooled within each class (none
    for H, which has no per-image values). A column without numbers shows "–"; None when no score row has any
    of ``keys``."""
    if not any(_result(r, k) is not None for r in scores for k in keys):
        return None
    rows = []
    for (method, setting), group in _group(scores, lambda r: (r.get("method"), setting_label(r))).items():
        values, ci = {}, {}
        for k in keys:
            have = [r for r in group if _result(r, k) is not None]
            if not have:
                values[k] = None
                continue
            values[k] = class_balanced_mean({i: _result(r, k) for i, r in enumerate(have)},
                                            {i: _concept_class(r) for i, r in enumerate(have)})
            groups = _class_groups(have, k)
            if groups:
                ci[k] = mean_ci(groups, over_groups=len(groups) > 1)
        classes = {_concept_class(r) for r in group}
        rows.append({"method": method, "setting": setting, "reference": _is_base(method),
                     "cells": [method, setting, f"{len({r.get('concept') for r in group})} / {len(classes)}"],
                     "ci": {k: v for k, v in ci.items() if v is not None}, "values": values})
    return _table(["method", "setting", "concepts / classes"], list(keys), rows)


def per_concept_table(scores: list[dict], keys: list[str]) -> Optional[dict]:
    rows = []
    for (method, setting, concept), group in _group(
            scores, lambda r: (r.get("method"), setting_label(r), r.get("concept"))).items():
        ci = {k: mean_ci(s) for k in keys if (s := _samples(group, k)) is not None}
        rows.append({"method": method, "cells": [method, setting, str(concept)], "reference": _is_base(method),
                     "ci": {k: v for k, v in ci.items() if v is not None},
                     "values": {k: _mean(_result(r, k) for r in group) for k in keys}})
    if not rows:
        return None
    table = _table(["method", "setting", "concept"], keys, rows)
    table["best"] = {k: [] for k in keys}  # many concepts: nothing highlighted
    return table


def _chosen_setting(group: list[dict]) -> list[dict]:
    """A method's rows at its setting with the highest mean H (the first setting without H)."""
    by_setting = _group(group, lambda r: (setting_label(r),))
    def h(rows):
        value = _mean(_result(r, "h") for r in rows)
        return float("-inf") if value is None else value
    return max(by_setting.values(), key=h)


def head_to_head_table(scores: list[dict]) -> Optional[dict]:
    methods = {m: _chosen_setting(g) for (m,), g in _group(scores, lambda r: (r.get("method"),)).items()
               if not _is_base(m)}
    present = {k for rows in methods.values() for r in rows for k in ((r.get("result") or {}).get("samples") or {})}
    keys = [k for k in HEAD_TO_HEAD_KEYS if k in present]
    rows = []
    for a, b in combinations(methods, 2):
        ra = {r.get("concept"): r for r in methods[a]}
        rb = {r.get("concept"): r for r in methods[b]}
        common = [c for c in ra if c in rb]
        if not common:
            continue
        values, ci, sig = {}, {}, {}
        for k in keys:
            sa, sb = _samples([ra[c] for c in common], k), _samples([rb[c] for c in common], k)
            if sa is None or sb is None:
                continue
            paired = can_pair(sa, sb)
            values[k] = sum(sum(x) / len(x) - sum(y) / len(y) for x, y in zip(sa, sb)) / len(sa)
            ci[k] = diff_ci(sa, sb, over_groups=len(common) > 1, paired=paired)
            if ci[k] is not None:  # one image on each side: no interval, so no verdict either
                sig[k] = significant(ci[k])
        if not values:
            continue
        label = f"{a} ({setting_label(ra[common[0]])}) − {b} ({setting_label(rb[common[0]])})"
        n_sig = sum(bool(v) for v in sig.values())
        rows.append({"method": a, "cells": [label, str(len(common)), f"{n_sig} of {len(sig)}"], "reference": False,
                     "values": values, "ci": {k: v for k, v in ci.items() if v is not None}, "sig": sig,
                     "diff": True})
    if not rows:
        return None
    table = _table(["difference", "concepts", "significant"], keys, rows)
    table["best"] = {k: [] for k in keys}
    return table


def _member_samples(row: dict, key: str, concept: str) -> Optional[list[float]]:
    value = ((row.get("result") or {}).get("samples") or {}).get(key)
    value = value.get(concept) if isinstance(value, dict) else value
    return [float(v) for v in value] if isinstance(value, list) and value else None


def _member_value(row: dict, key: str, concept: str) -> Optional[float]:
    value = (row.get("result") or {}).get(key)
    value = value.get(concept) if isinstance(value, dict) else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


COMPOSITION_KEYS = ("clip_text", "clip_text_norm", "clip_image", "dino_image")


def composition_table(rows: list[dict]) -> Optional[dict]:
    """One row per (method, pair, concept) and an 'all' row per method (mean over its (pair, concept)s)."""
    comp = [r for r in rows if r.get("kind") == "score" and r.get("status") == "done"
            and (r.get("result") or {}).get("composition")]
    if not comp:
        return None
    keys = [k for k in COMPOSITION_KEYS if any(_member_value(r, k, c) is not None for r in comp
                                               for c in r["result"]["composition"])]
    out = []
    for (method,), group in _group(comp, lambda r: (r.get("method"),)).items():
        members = [(r, c) for r in group for c in r["result"]["composition"]]
        detail = []
        for r, c in members:
            ci = {k: mean_ci([s]) for k in keys if (s := _member_samples(r, k, c)) is not None}
            detail.append({"method": method, "cells": [method, str(r.get("concept")), c],
                           "reference": _is_base(method), "ci": {k: v for k, v in ci.items() if v is not None},
                           "values": {k: _member_value(r, k, c) for k in keys}})
        ci_all = {}
        for k in keys:
            groups = [_member_samples(r, k, c) for r, c in members]
            if all(g is not None for g in groups):
                ci_all[k] = ci_of(groups)
        out.append({"method": method, "cells": [method, "all", f"{len(members)} concepts in {len(group)} pairs"],
                    "reference": _is_base(method), "ci": {k: v for k, v in ci_all.items() if v is not None},
                    "values": {k: _mean(_member_value(r, k, c) for r, c in members) for k in keys}})
        out.extend(detail)
    table = _table(["method", "pair", "concept"], keys, out)
    ranked = [{**r, "reference": r["reference"] or r["cells"][1] != "all"} for r in out]  # only 'all' rows compete
    table["best"] = {k: _best_indices(ranked, k) for k in keys}
    return table


__all__ = ["CC101_VIEW", "COMPOSITION_TEXT", "H2H_TEXT", "PERFUSION_VIEW", "VIEWS_TEXT", "ci_of",
           "composition_table", "head_to_head_table", "per_concept_table", "perfusion_view_table", "view_table"]
