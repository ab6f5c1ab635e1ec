"""The report's numbers: the tables (results, difference from the base, Best-H, cost), which cell of each
column is best, counts and provenance.

A score column's label and direction come from the evaluator registry (:mod:`personalize.evaluation.registry`,
where each backend registers its metrics once); cost columns are the report's own.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ...evaluation import registry
from ...evaluation.bootstrap import LEVEL
from ...evaluation.protocol import best_h
from ..plan import BASE

NOT_METRICS = {"n_images"}  # counts in a score row's result, not scores
CI_TEXT = (f"{LEVEL:.0%} bootstrap confidence interval (several concepts: the concepts resampled, each with its "
           "mean, as a sample of the concepts one cares about; one concept: its prompts resampled, or its images "
           "where the rows have no image ids; scaled for few concepts or prompts to t quantiles; 2,000 "
           "replicates; shown where the score rows keep per-image values; see docs/STATISTICS.md).")
VS_BASE_TEXT = ("Method minus the base alone (the superclass word instead of the concept), mean over the same "
                f"concepts, with the {LEVEL:.0%} bootstrap interval of the difference (images paired by their ids: "
                "same prompt, seed and sample; unpaired where the rows have no ids). * marks a metric whose "
                "interval excludes 0, 'better' or 'worse' in that metric's direction (↑ higher is better, "
                "↓ lower); significant: the metrics that are.")


# -------------------------------------------------------------------------------------------------------- metrics


def _fmt_score(v: float) -> str:
    return f"{v:.3f}"


def _fmt_seconds(v: float) -> str:
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s" if v < 100 else f"{v:.0f} s"


def _fmt_bytes(v: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def _fmt_count(v: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if v >= size:
            return f"{v / size:.3g} {unit}"
    return f"{v:.0f}"


def _fmt_mib(v: float) -> str:
    return f"{v / 2 ** 20:,.0f} MiB"


def _fmt_any(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: Optional[bool]  # None: no direction, never highlighted
    fmt: Callable[[float], str]

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓"}.get(self.higher_is_better, "")
        return self.label + arrow


COST_METRICS: dict[str, MetricInfo] = {
    "train_seconds": MetricInfo("train time", False, _fmt_seconds),
    "file_bytes": MetricInfo("file size", False, _fmt_bytes),
    "trainable_params": MetricInfo("trainable params", False, _fmt_count),
    "seconds_per_image": MetricInfo("time / image", False, _fmt_seconds),
    "peak_memory": MetricInfo("peak memory", False, _fmt_mib),
}
COST_KEYS = tuple(COST_METRICS)


def metric_info(key: str) -> MetricInfo:
    """A column's label, direction and format: a score's from the evaluator registry (its backend's metric
    spec), a cost column's from ``COST_METRICS``; any other key has no direction and is never highlighted."""
    spec = registry.metric(key)
    if spec is not None:
        return MetricInfo(spec.label, spec.higher_is_better, _fmt_score)
    return COST_METRICS.get(key) or MetricInfo(key, None, _fmt_any)


def plot_axes() -> list[tuple[str, str]]:
    """(x, y) of the Pareto plots, each drawn when the results have both: every backend's, in registry order."""
    return [pair for backend in registry.backends() for pair in backend.plots]


def best_h_pairs() -> list[tuple[str, str]]:
    """(image, text) keys for Best-H, one per backend in registry order; the first pair present wins."""
    return [backend.best_h for backend in registry.backends() if backend.best_h]


def format_value(key: str, value: Optional[float]) -> str:
    return "–" if value is None else metric_info(key).fmt(value)


def _fmt_diff(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:+.4f}"


def format_cell(key: str, row: dict) -> str:
    """A table cell: the value, then its confidence interval when the row has one."""
    fmt = _fmt_diff if row.get("diff") else (lambda v: format_value(key, v))  # differences: signed, finer
    text = fmt(row["values"].get(key))
    ci = (row.get("ci") or {}).get(key)
    text = text if ci is None else f"{text} [{fmt(ci[0])}, {fmt(ci[1])}]"
    if not (row.get("sig") or {}).get(key):
        return text
    verdict = (row.get("verdict") or {}).get(key)
    return text + " *" + (f" {verdict}" if verdict in ("better", "worse") else "")


def verdict(key: str, ci: Optional[tuple[float, float]]) -> Optional[str]:
    """A difference's verdict from its interval and the metric's direction: "better" or "worse" when the
    interval excludes 0 (for a lower-is-better metric such as leakage, below 0 is better), "n.s." when it
    holds 0; "higher"/"lower" for a metric without a direction; None without an interval."""
    if ci is None:
        return None
    lo, hi = ci
    if lo <= 0 <= hi:
        return "n.s."
    up, direction = lo > 0, metric_info(key).higher_is_better
    if direction is None:
        return "higher" if up else "lower"
    return "better" if up == direction else "worse"


def verdicts(ci: dict[str, Optional[tuple[float, float]]]) -> dict[str, str]:
    return {k: v for k, c in ci.items() if (v := verdict(k, c)) is not None}


def _verdict_text(verdict_of: dict[str, str]) -> str:
    """The "significant" cell: the metrics that are, grouped by verdict ("better: fidelity; worse: DINO-I")."""
    parts = [f"{word}: {', '.join(metric_info(k).label for k, v in verdict_of.items() if v == word)}"
             for word in ("better", "worse", "higher", "lower") if word in verdict_of.values()]
    return "; ".join(parts) or "none"


# -------------------------------------------------------------------------------------------------------- helpers


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _mean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _result(row: dict, key: str) -> Optional[float]:
    return _number((row.get("result") or {}).get(key))


def setting_label(row: dict) -> str:
    """The row's ``setting_label``, else one made from its ``setting`` dict ("default" when empty)."""
    if row.get("setting_label"):
        return str(row["setting_label"])
    setting = row.get("setting") or {}
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def _concept_class(row: dict) -> str:
    return str(row.get("concept_class") or row.get("concept") or "?")


def _is_base(method: str) -> bool:
    return method == BASE


def _group(rows: Iterable[dict], key: Callable[[dict], tuple]) -> dict[tuple, list[dict]]:
    """Rows grouped by ``key`` in order of first appearance, the base method's groups first."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return dict(sorted(groups.items(), key=lambda kv: not _is_base(kv[0][0])))


def _metric_keys(rows: Iterable[dict]) -> list[str]:
    """Result keys with at least one number: registry order first, then unknown keys alphabetically.

    Registry order: the metrics of the evaluator backend that reports most of the keys first (in the order it
    registered them), then the other backends' metrics, then the cost keys."""
    present = {k for r in rows for k, v in (r.get("result") or {}).items()
               if _number(v) is not None and k not in NOT_METRICS}
    backends = sorted(registry.backends(), key=lambda b: -sum(m.name in present for m in b.metrics))
    order = dict.fromkeys([m.name for b in backends for m in b.metrics] + list(COST_KEYS))
    known = [k for k in order if k in present]
    return known + sorted(present - set(known))


def _of_kind(rows: Iterable[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


# --------------------------------------------------------------------------------------------------------- tables


def _table(head: list[str], keys: list[str], rows: list[dict]) -> dict:
    """A table: leading text columns ``head``, metric columns ``keys``; ``best`` is filled in here."""
    table = {"head": head, "keys": keys, "rows": rows}
    table["best"] = {k: _best_indices(rows, k) for k in keys}
    return table


def _best_indices(rows: list[dict], key: str) -> list[int]:
    """Indices of the non-reference rows holding the best value of ``key`` (all of them on a tie)."""
    direction = metric_info(key).higher_is_better
    cands = [(i, r["values"].get(key)) for i, r in enumerate(rows) if not r["reference"]]
    cands = [(i, v) for i, v in cands if v is not None]
    if direction is None or not cands:
        return []
    best = (max if direction else min)(v for _, v in cands)
    return [i for i, v in cands if v == best]


def _samples(group: list[dict], key: str) -> Optional[list[list[float]]]:
    """Per-concept lists of per-image values of ``key`` (score rows' ``samples``), None if any row lacks them."""
    out = []
    for r in group:
        values = ((r.get("result") or {}).get("samples") or {}).get(key)
        if not isinstance(values, list) or not values:
            return None
        out.append([float(v) for v in values])
    return out


def _results_table(scores: list[dict]) -> dict:
    from .stats import ci_of, clusters_of

    keys = _metric_keys(scores)
    rows = []
    for (method, setting), group in _group(scores, lambda r: (r.get("method"), setting_label(r))).items():
        concepts = {r.get("concept") for r in group}
        ci = {k: ci_of(s, clusters_of(group, k)) for k in keys if (s := _samples(group, k)) is not None}
        rows.append({"method": method, "setting": setting, "cells": [method, setting, str(len(concepts))],
                     "reference": _is_base(method), "ci": {k: v for k, v in ci.items() if v is not None},
                     "values": {k: _mean(_result(r, k) for r in group) for k in keys}})
    return _table(["method", "setting", "concepts"], keys, rows)


def _vs_base_table(scores: list[dict]) -> Optional[dict]:
    """Per (method, setting): the difference from the base alone on the same concepts, with its bootstrap
    interval (images matched by id, :func:`stats.match_samples`) and a verdict per key: "better"/"worse" (the
    interval excludes 0, read in the metric's direction) or "n.s." ("verdict"; "sig": excludes 0)."""
    from .stats import match_samples

    base = {r.get("concept"): r for r in scores if _is_base(r.get("method"))}
    rows = []
    keys = [k for k in ("fidelity", "alignment", "clip_image", "dino_image") if _samples(list(base.values()), k)]
    if not base or not keys:
        return None
    for (method, setting), group in _group(scores, lambda r: (r.get("method"), setting_label(r))).items():
        paired = [r for r in group if r.get("concept") in base]
        if _is_base(method) or not paired:
            continue
        values, ci = {}, {}
        for k in keys:
            matched = match_samples(paired, [base[r.get("concept")] for r in paired], k)
            if matched is not None:
                values[k], ci[k] = matched.value, matched.ci()
        if not ci or any(v is None for v in ci.values()):
            continue
        verdict_of = verdicts(ci)
        rows.append({"method": method, "setting": setting, "reference": False, "ci": ci, "values": values,
                     "sig": {k: v != "n.s." for k, v in verdict_of.items()}, "verdict": verdict_of,
                     "cells": [method, setting, str(len(paired)), _verdict_text(verdict_of)], "diff": True})
    if not rows:
        return None
    table = _table(["method", "setting", "concepts", "significant"], keys, rows)
    table["best"] = {k: [] for k in keys}  # differences, not scores: nothing highlighted
    return table


def _best_h_keys(scores: list[dict]) -> Optional[tuple[str, str]]:
    keys = set(_metric_keys(scores))
    return next((pair for pair in best_h_pairs() if set(pair) <= keys), None)


def _best_h_table(scores: list[dict]) -> Optional[dict]:
    pair = _best_h_keys(scores)
    if pair is None:
        return None
    image_key, text_key = pair
    rows = []
    for (method,), group in _group(scores, lambda r: (r.get("method"),)).items():
        items = [{"class": _concept_class(r), "setting": setting_label(r),
                  "image": _result(r, image_key), "text": _result(r, text_key)} for r in group]
        items = [i for i in items if i["image"] is not None and i["text"] is not None]
        if _is_base(method) or not items:
            continue
        res = best_h(items)
        chosen = {cls: b["setting"] for cls, b in res["per_class"].items()}
        rows.append({"method": method, "per_class": chosen, "reference": False,
                     "cells": [method, _describe_choice(chosen)],
                     "values": {image_key: res["image"], text_key: res["text"], "h": res["h"]}})
    return _table(["method", "best setting per class"], [image_key, text_key, "h"], rows) if rows else None


def _describe_choice(chosen: dict[str, str]) -> str:
    if len(set(chosen.values())) == 1:
        return next(iter(chosen.values()))
    return "; ".join(f"{cls}: {setting}" for cls, setting in chosen.items())


def _cost_values(group: list[dict]) -> dict[str, Optional[float]]:
    train, gen = _of_kind(group, "train"), _of_kind(group, "generate")
    timed = [r for r in gen if _number(r.get("seconds")) is not None and r.get("outputs")]
    n_images = sum(len(r["outputs"]) for r in timed)
    memory = [_number(r.get("peak_memory")) for r in group]
    memory = [m for m in memory if m is not None]
    return {
        "train_seconds": _mean(_number(r.get("seconds")) for r in train),
        "file_bytes": _mean(_result(r, "file_bytes") for r in train),
        "trainable_params": _mean(_result(r, "trainable_params") for r in train),
        "seconds_per_image": sum(float(r["seconds"]) for r in timed) / n_images if n_images else None,
        "peak_memory": max(memory) if memory else None,
    }


def _cost_table(done: list[dict]) -> Optional[dict]:
    work = [r for r in done if r.get("kind") in ("train", "generate")]
    rows = [{"method": method, "cells": [method], "reference": _is_base(method), "values": _cost_values(group)}
            for (method,), group in _group(work, lambda r: (r.get("method"),)).items()]
    keys = [k for k in COST_KEYS if any(r["values"][k] is not None for r in rows)]
    return _table(["method"], keys, rows) if rows else None


PROMPTING_TEXT = {"word": "token in place of the class word", "modifier": "token before the class word"}


def _protocol_table(scores: list[dict]) -> Optional[dict]:
    """How each method's numbers were made (its score rows' ``payload["protocol"]``): its prompting, the
    concept's subject in the prompts (one concept's, as an example), the step kept."""
    rows = []
    for (method,), group in _group(scores, lambda r: (r.get("method"),)).items():
        proto = next(((r.get("payload") or {}).get("protocol") for r in group
                      if (r.get("payload") or {}).get("protocol")), None)
        if _is_base(method) or proto is None:
            continue
        rows.append({"method": method, "reference": False, "values": {},
                     "cells": [method, PROMPTING_TEXT.get(proto["prompting"], str(proto["prompting"])),
                               f"{proto['subject']} ({group[0].get('concept')})", proto["selection"],
                               _sampler_text(proto.get("sampler"))]})
    return _table(["method", "prompting", "subject, e.g.", "training step kept", "sampler"], [], rows) \
        if rows else None


def _sampler_text(sampler: Optional[dict]) -> str:
    """"ddim, 50 steps, guidance 6.0" (a database written before schedulers were recorded: "–")."""
    if not sampler:
        return "–"
    return f"{sampler.get('scheduler', 'ddim')}, {sampler.get('steps')} steps, guidance {sampler.get('guidance')}"


def _comparability(scores: list[dict]) -> Optional[dict]:
    """The spec's comparability block (the published table its numbers stand beside), None without one."""
    return next(((r.get("payload") or {}).get("protocol", {}).get("comparability") for r in scores
                 if ((r.get("payload") or {}).get("protocol") or {}).get("comparability")), None)


def comparability_text(block: Optional[dict]) -> str:
    if not block:
        return ("Comparability: none declared; these numbers are not claimed to match a published table's "
                "protocol (a spec's comparability: checks that).")
    return (f"Comparable with: {block['table']} (checked: base {block['base']}, {block['images_per_prompt']} "
            f"images per prompt, {block['prompts']} prompts, {block['sampler'].get('scheduler', 'sampler')} "
            f"{block['sampler']['steps']} steps at guidance "
            f"{block['sampler']['guidance']}).")


# -------------------------------------------------------------------------------------------------------- summary


def _counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(str(r.get("status")) for r in rows)
    return {s: counts.get(s, 0) for s in ("done", "failed", "pending", "running")} | {
        s: n for s, n in counts.items() if s not in ("done", "failed", "pending", "running")}


def _short(value) -> str:
    if isinstance(value, dict):
        return "/".join(str(v)[:8] for v in value.values())
    return str(value)


def _provenance(rows: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for field in ("git_sha", "base_fingerprint", "device", "host"):
        values = [_short((r.get("provenance") or {}).get(field)) for r in rows
                  if (r.get("provenance") or {}).get(field) is not None]
        out[field] = list(dict.fromkeys(v[:10] if field == "git_sha" else v for v in values))
    return out


def summarize(rows: list[dict]) -> dict:
    """The numbers the report shows.

    Returns {"counts": {status: n}, "provenance": {field: [distinct values]}, "results", "best_h", "cost",
    "failed": [failed rows]}. Each table is {"head", "keys", "rows", "best"}: a row has "cells" (text),
    "values" ({key: float or None}) and "reference" (the base model); "best" maps each key to the indices
    of its best rows. "results": one row per (method, setting), means over score rows (i.e. concepts).
    "perfusion_view": one row per (method, setting), the Perfusion paper's columns class-balanced (mean per
    concept class, then over classes; :func:`.stats.perfusion_view_table`). "best_h": one row per method
    (``best_h`` of the protocol, classes balanced, on the first registered backend's Best-H pair present: for
    CLIP, CLIP-I and normalised CLIP-T on shape-preserving prompts), or None without the needed keys. "cost":
    one row per method from its train and generate rows, or None without them.
    """
    from .stats import (CC101_VIEW, composition_table, head_to_head_table, per_concept_table,
                        perfusion_view_table, view_table)

    done = [r for r in rows if r.get("status") == "done"]
    scores = [r for r in _of_kind(done, "score") if not (r.get("result") or {}).get("composition")]
    results = _results_table(scores) if scores else None
    perfusion = perfusion_view_table(scores) if scores else None
    return {
        "counts": _counts(rows),
        "provenance": _provenance(done or rows),
        "results": results,
        "cc101_view": view_table(results, CC101_VIEW) if perfusion else None,
        "perfusion_view": perfusion,
        "per_concept": per_concept_table(scores, results["keys"]) if results else None,
        "head_to_head": head_to_head_table(scores),
        "compositions": composition_table(done),
        "vs_base": _vs_base_table(scores),
        "protocol": _protocol_table(scores),
        "comparability": _comparability(scores),
        "best_h": _best_h_table(scores),
        "cost": _cost_table(done),
        "failed": [r for r in rows if r.get("status") == "failed"],
    }


def _first_line(text, width: int = 160) -> str:
    line = str(text or "").strip().splitlines()[:1]
    line = line[0] if line else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _provenance_text(summary: dict, date: str) -> str:
    prov = summary["provenance"]
    parts = [f"{name} {', '.join(prov[field])}" for name, field in
             (("git", "git_sha"), ("base", "base_fingerprint"), ("device", "device"), ("host", "host"))
             if prov[field]]
    return " · ".join(parts + [f"generated {date}"])


def _counts_text(counts: dict[str, int]) -> str:
    return " · ".join(f"{n} {status}" for status, n in counts.items())
