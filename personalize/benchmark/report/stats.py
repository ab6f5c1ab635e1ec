"""The report's tables with error bars: the two protocol views, per-concept scores, head-to-head differences
between methods and the composition table.

Every interval is a 95 % bootstrap (:mod:`personalize.evaluation.bootstrap`, 2,000 replicates, the scheme and
its calibration in ``docs/STATISTICS.md``) over the score rows' per-image values (``result["samples"]``): an
average over concepts resamples the concepts (each with its observed mean); one concept resamples its prompts
(read from the images' ids, ``result["sample_ids"]``; without ids, its images). Differences pair images by id
(same concept, prompt, seed and sample), never by position; rows without ids are compared unpaired. H, a
function of two means, has no per-image values and no interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Optional

from ...evaluation.bootstrap import diff_ci, mean_ci, pair_by_ids, significant
from ...evaluation.protocol import class_balanced_mean
from .summary import (_best_indices, _concept_class, _group, _is_base, _mean, _result, _samples, _table,
                      setting_label, verdicts)

CC101_VIEW = ("clip_text", "clip_image", "dino_image")
PERFUSION_VIEW = ("clip_image_sp", "clip_text_norm", "h_sp")
HEAD_TO_HEAD_KEYS = ("clip_text", "clip_image", "dino_image", "clip_image_sp", "clip_text_norm", "alignment",
                     "fidelity")
H2H_TEXT = ("Row method minus column method at each one's setting with the highest mean H (the first without H), "
            "over the concepts both scored; images paired by their ids (same prompt, seed and sample) where both "
            "rows have them, else unpaired. [brackets]: 95 % bootstrap interval of the difference (concepts "
            "resampled; one concept: its prompts); * marks a significant difference (the interval excludes 0), "
            "with 'better' or 'worse' for the row method in the metric's direction.")
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


def prompt_of(sample_id: str) -> str:
    """The prompt part of an image id ("p3_s1_0": prompt 3, seed 1, sample 0 -> "p3"): images of one prompt share
    its effect, so one concept's interval resamples prompts, not images."""
    return str(sample_id).split("_", 1)[0]


def sample_ids(row: dict, key: str, concept: Optional[str] = None) -> Optional[list[str]]:
    """The ids of the row's per-image values of ``key`` (``result["sample_ids"]``, parallel to
    ``result["samples"]``; a composition row's are per member ``concept``); None without them or when they do
    not line up with the values."""
    result = row.get("result") or {}
    ids = (result.get("sample_ids") or {}).get(key)
    values = (result.get("samples") or {}).get(key)
    if concept is not None:
        ids = ids.get(concept) if isinstance(ids, dict) else None
        values = values.get(concept) if isinstance(values, dict) else None
    if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values):
        return None
    return [str(i) for i in ids]


def _prompts(ids: Optional[list[str]]) -> Optional[list[str]]:
    return None if ids is None else [prompt_of(i) for i in ids]


def clusters_of(rows: list[dict], key: str) -> list[Optional[list[str]]]:
    """Per row, the prompt of each of its per-image values of ``key`` (None for a row without ids)."""
    return [_prompts(sample_ids(r, key)) for r in rows]


def ci_of(groups: Optional[list[list[float]]],
          clusters: Optional[list[Optional[list[str]]]] = None) -> Optional[tuple[float, float]]:
    """The report's interval of a mean over ``groups`` (concepts): the concepts resampled for more than one;
    one concept's prompts (``clusters``: each image's) or, without them, its images."""
    if not groups:
        return None
    return mean_ci(groups, over_groups=len(groups) > 1, clusters=clusters)


@dataclass
class Matched:
    """Two sides' per-concept values of one key, ready for ``diff_ci``: ``paired`` when every concept's images
    were matched by id (``a`` and ``b`` then hold only the images both have, in the same order)."""
    a: list[list[float]]
    b: list[list[float]]
    paired: bool
    clusters_a: list[Optional[list[str]]]
    clusters_b: list[Optional[list[str]]]

    @property
    def value(self) -> float:
        """Mean over concepts of the difference of the concepts' means."""
        return sum(sum(x) / len(x) - sum(y) / len(y) for x, y in zip(self.a, self.b)) / len(self.a)

    def ci(self) -> Optional[tuple[float, float]]:
        return diff_ci(self.a, self.b, over_groups=len(self.a) > 1, paired=self.paired,
                       clusters=self.clusters_a, clusters_b=self.clusters_b)


def match_samples(rows_a: list[dict], rows_b: list[dict], key: str) -> Optional[Matched]:
    """The per-image values of ``key`` of two lists of rows, row i of each of the same concept: images paired by
    their ids (an inner join per concept) when every row has ids and every concept has images in common;
    otherwise unpaired (an old database has no ids, and images are never paired by count or position). None
    when a row has no per-image values."""
    sa, sb = _samples(rows_a, key), _samples(rows_b, key)
    if sa is None or sb is None:
        return None
    joins = [pair_by_ids(x, sample_ids(ra, key), y, sample_ids(rb, key))
             for x, y, ra, rb in zip(sa, sb, rows_a, rows_b)]
    if all(j is not None for j in joins):
        clusters = [[prompt_of(i) for i in ids] for _, _, ids in joins]
        return Matched([x for x, _, _ in joins], [y for _, y, _ in joins], True, clusters, clusters)
    return Matched(sa, sb, False, clusters_of(rows_a, key), clusters_of(rows_b, key))


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
        ci = {k: ci_of(s, clusters_of(group, k)) for k in keys if (s := _samples(group, k)) is not None}
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
            matched = match_samples([ra[c] for c in common], [rb[c] for c in common], k)
            if matched is None:
                continue
            values[k], ci[k] = matched.value, matched.ci()
            if ci[k] is not None:  # one image on each side: no interval, so no verdict either
                sig[k] = significant(ci[k])
        if not values:
            continue
        label = f"{a} ({setting_label(ra[common[0]])}) − {b} ({setting_label(rb[common[0]])})"
        n_sig = sum(bool(v) for v in sig.values())
        rows.append({"method": a, "cells": [label, str(len(common)), f"{n_sig} of {len(sig)}"], "reference": False,
                     "values": values, "ci": {k: v for k, v in ci.items() if v is not None}, "sig": sig,
                     "verdict": verdicts({k: v for k, v in ci.items() if v is not None}), "diff": True})
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
            ci = {k: ci_of([s], [_prompts(sample_ids(r, k, c))]) for k in keys
                  if (s := _member_samples(r, k, c)) is not None}
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


__all__ = ["CC101_VIEW", "COMPOSITION_TEXT", "H2H_TEXT", "Matched", "PERFUSION_VIEW", "VIEWS_TEXT", "ci_of",
           "clusters_of", "composition_table", "head_to_head_table", "match_samples", "per_concept_table",
           "perfusion_view_table", "prompt_of", "sample_ids", "view_table"]
