"""The benchmark report: tables, image grids and Pareto plots from the runner's rows, as HTML and Markdown.

The input is a list of plain dicts, one per unit of work (the runner converts its SQLite rows); paths in
rows are relative to the benchmark folder ``root``. Only rows with status "done" enter the numbers.

- ``summarize(rows)``: the numbers the tables show (results per method and setting, Best-H per method, cost
  per method) and which cell of each column is the best.
- ``pareto_front(points)``: indices of the non-dominated points (higher is better on both axes).
- ``write_report(rows, root, out)``: ``out/index.html`` (self-contained) and ``out/report.md`` (+ plots).

The base model (method "base") is shown as a reference row but never competes for "best".
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import os
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..evaluation.bootstrap import LEVEL, diff_ci, mean_ci
from ..evaluation.protocol import best_h
from ..paths import atomic_path
from .plan import BASE, LEAKAGE_CONCEPT

NOT_METRICS = {"n_images"}  # counts in a score row's result, not scores
CI_TEXT = (f"{LEVEL:.0%} bootstrap confidence interval (images resampled within each concept, "
           "2,000 replicates; shown where the score rows keep per-image values).")
VS_BASE_TEXT = ("Method minus the base alone (the superclass word instead of the concept), mean over the same "
                f"concepts, with the {LEVEL:.0%} bootstrap interval of the difference; significant: every "
                "interval excludes 0.")
VS_BASE_NOTE = f'<p class="note">{VS_BASE_TEXT}</p>'
THUMB_PX = 160
MAX_PROMPTS = 2


# ----------------------------------------------------------------------------------------------- metrics


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


METRICS: dict[str, MetricInfo] = {
    "clip_text": MetricInfo("CLIP-T", True, _fmt_score),
    "clip_text_norm": MetricInfo("CLIP-T norm", True, _fmt_score),
    "clip_image": MetricInfo("CLIP-I", True, _fmt_score),
    "dino_image": MetricInfo("DINO-I", True, _fmt_score),
    "alignment": MetricInfo("alignment", True, _fmt_score),
    "fidelity": MetricInfo("fidelity", True, _fmt_score),
    "alignment_norm": MetricInfo("alignment / base", True, _fmt_score),
    "no_concept_alignment": MetricInfo("alignment w/o concept", True, _fmt_score),
    "h": MetricInfo("H", True, _fmt_score),
    "leakage_dino": MetricInfo("no-leak DINO", True, _fmt_score),
    "leakage": MetricInfo("leakage", False, _fmt_score),
    "train_seconds": MetricInfo("train time", False, _fmt_seconds),
    "file_bytes": MetricInfo("file size", False, _fmt_bytes),
    "trainable_params": MetricInfo("trainable params", False, _fmt_count),
    "seconds_per_image": MetricInfo("time / image", False, _fmt_seconds),
    "peak_memory": MetricInfo("peak memory", False, _fmt_mib),
}
COST_KEYS = ("train_seconds", "file_bytes", "trainable_params", "seconds_per_image", "peak_memory")
# (x, y) of the Pareto plots, each drawn when the results have both.
PLOT_AXES = (("clip_text", "clip_image"), ("clip_text", "dino_image"), ("alignment", "fidelity"))
# (image, text) keys for Best-H, first pair present wins.
BEST_H_KEYS = (("clip_image", "clip_text_norm"), ("fidelity", "alignment"))


def metric_info(key: str) -> MetricInfo:
    return METRICS.get(key) or MetricInfo(key, None, _fmt_any)


def format_value(key: str, value: Optional[float]) -> str:
    return "–" if value is None else metric_info(key).fmt(value)


def format_cell(key: str, row: dict) -> str:
    """A table cell: the value, then its confidence interval when the row has one."""
    text = format_value(key, row["values"].get(key))
    ci = (row.get("ci") or {}).get(key)
    return text if ci is None else f"{text} [{format_value(key, ci[0])}, {format_value(key, ci[1])}]"


# ----------------------------------------------------------------------------------------------- helpers


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
    """Result keys with at least one number: registry order first, then unknown keys alphabetically."""
    present = {k for r in rows for k, v in (r.get("result") or {}).items()
               if _number(v) is not None and k not in NOT_METRICS}
    known = [k for k in METRICS if k in present]
    return known + sorted(present - set(METRICS))


def _of_kind(rows: Iterable[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


# ----------------------------------------------------------------------------------------------- tables


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
    keys = _metric_keys(scores)
    rows = []
    for (method, setting), group in _group(scores, lambda r: (r.get("method"), setting_label(r))).items():
        concepts = {r.get("concept") for r in group}
        ci = {k: mean_ci(s) for k in keys if (s := _samples(group, k)) is not None}
        rows.append({"method": method, "setting": setting, "cells": [method, setting, str(len(concepts))],
                     "reference": _is_base(method), "ci": {k: v for k, v in ci.items() if v is not None},
                     "values": {k: _mean(_result(r, k) for r in group) for k in keys}})
    return _table(["method", "setting", "concepts"], keys, rows)


def _vs_base_table(scores: list[dict]) -> Optional[dict]:
    """Per (method, setting): the difference from the base alone on the same concepts, with its bootstrap
    interval; "significant" when the interval excludes 0 for every key."""
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
            mine, ref = _samples(paired, k), _samples([base[r.get("concept")] for r in paired], k)
            if mine is None or ref is None:
                continue
            values[k] = sum(sum(m) / len(m) - sum(b) / len(b) for m, b in zip(mine, ref)) / len(mine)
            ci[k] = diff_ci(mine, ref)
        if not ci or any(v is None for v in ci.values()):
            continue
        sig = all(lo > 0 or hi < 0 for lo, hi in ci.values())
        rows.append({"method": method, "setting": setting, "reference": False, "ci": ci, "values": values,
                     "cells": [method, setting, str(len(paired)), "yes" if sig else "no"]})
    if not rows:
        return None
    table = _table(["method", "setting", "concepts", "significant"], keys, rows)
    table["best"] = {k: [] for k in keys}  # differences, not scores: nothing highlighted
    return table


def _best_h_keys(scores: list[dict]) -> Optional[tuple[str, str]]:
    keys = set(_metric_keys(scores))
    return next((pair for pair in BEST_H_KEYS if set(pair) <= keys), None)


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


# ----------------------------------------------------------------------------------------------- summary


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
    "best_h": one row per method (``best_h`` of the protocol, classes balanced), or None without the
    needed keys. "cost": one row per method from its train and generate rows, or None without them.
    """
    done = [r for r in rows if r.get("status") == "done"]
    scores = _of_kind(done, "score")
    return {
        "counts": _counts(rows),
        "provenance": _provenance(done or rows),
        "results": _results_table(scores) if scores else None,
        "vs_base": _vs_base_table(scores),
        "best_h": _best_h_table(scores),
        "cost": _cost_table(done),
        "failed": [r for r in rows if r.get("status") == "failed"],
    }


# ----------------------------------------------------------------------------------------------- pareto


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (higher is better on both axes), sorted by x.

    ``q`` dominates ``p`` when it is at least as good on both axes and better on one; equal points do not
    dominate each other, so duplicates on the front are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = float("-inf")  # highest y among points with a strictly greater x
    start = 0
    while start < len(order):
        x = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == x:
            end += 1
        top = points[order[start]][1]  # the group of equal x is sorted by y, highest first
        front += [i for i in order[start:end] if points[i][1] == top and top > best_y]
        best_y = max(best_y, top)
        start = end
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


@dataclass
class Plot:
    name: str
    title: str
    png: bytes


def _method_styles(methods: list[str]) -> dict[str, tuple[str, str]]:
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "h"]
    others = [m for m in dict.fromkeys(methods) if not _is_base(m)]
    styles = {m: (colours[i % len(colours)], markers[i % len(markers)]) for i, m in enumerate(others)}
    styles[BASE] = ("#7f7f7f", "*")
    return styles


def _plot_points(results: dict, x_key: str, y_key: str) -> list[dict]:
    return [{"method": r["method"], "setting": r["setting"], "x": r["values"][x_key], "y": r["values"][y_key]}
            for r in results["rows"]
            if r["values"].get(x_key) is not None and r["values"].get(y_key) is not None]


def _draw_method(ax, method: str, points: list[dict], style: tuple[str, str]) -> None:
    """One method's points (dominated ones faded), its Pareto front as a line, and setting labels."""
    colour, marker = style
    on_front = pareto_front([(p["x"], p["y"]) for p in points])
    front = [points[i] for i in on_front]
    dominated = [p for i, p in enumerate(points) if i not in on_front]
    for pts, alpha, label in ((front, 1.0, method), (dominated, 0.35, None)):
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], c=colour, marker=marker, alpha=alpha,
                   s=90 if marker == "*" else 46, label=label, zorder=3, edgecolors="white", linewidths=0.6)
    if len(front) > 1:
        ax.plot([p["x"] for p in front], [p["y"] for p in front], c=colour, lw=1.4, alpha=0.7, zorder=2)
    for p in points if len(points) > 1 else []:
        ax.annotate(p["setting"], (p["x"], p["y"]), xytext=(4, 3), textcoords="offset points",
                    fontsize=6.5, color="#555555", alpha=0.85)


def _pareto_png(points: list[dict], x_key: str, y_key: str, styles: dict) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.4), dpi=110, layout="constrained")
    ax = fig.subplots()
    for method in dict.fromkeys(p["method"] for p in points):
        _draw_method(ax, method, [p for p in points if p["method"] == method], styles[method])
    ax.set_xlabel(metric_info(x_key).header)
    ax.set_ylabel(metric_info(y_key).header)
    ax.set_title(f"{metric_info(y_key).label} vs {metric_info(x_key).label}: Pareto front per method "
                 "(faded: dominated)", fontsize=9.5)
    ax.margins(0.1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def make_plots(results: Optional[dict]) -> list[Plot]:
    """One Pareto plot per pair of ``PLOT_AXES`` the results have."""
    if not results:
        return []
    styles = _method_styles([r["method"] for r in results["rows"]])
    plots = []
    for x_key, y_key in PLOT_AXES:
        points = _plot_points(results, x_key, y_key)
        if points:
            title = f"{metric_info(y_key).label} vs {metric_info(x_key).label}"
            plots.append(Plot(f"pareto_{x_key}_{y_key}.png", title, _pareto_png(points, x_key, y_key, styles)))
    return plots


# ----------------------------------------------------------------------------------------------- grid


def _pick_prompts(rows: list[dict], limit: int = MAX_PROMPTS) -> list[tuple[str, int]]:
    """(purpose, prompt_index) to show: the first prompt of each purpose (concept first), then the rest."""
    keys = sorted({(str(r.get("purpose") or "concept"), int(r.get("prompt_index") or 0)) for r in rows},
                  key=lambda k: (k[0] != "concept", k[1]))
    firsts = [k for i, k in enumerate(keys) if all(k[0] != prev[0] for prev in keys[:i])]
    chosen = (firsts + [k for k in keys if k not in firsts])[:limit]
    return sorted(chosen, key=keys.index)


def _gen_key(row: dict, setting: Optional[str]) -> tuple:
    return (row.get("method"), setting, row.get("concept"), str(row.get("purpose") or "concept"),
            int(row.get("prompt_index") or 0), row.get("seed"))


def _grid_setting(method: str, cls: str, available: list[str], choice: dict) -> str:
    preferred = choice.get(method, {}).get(cls)
    return preferred if preferred in available else available[0]


def image_grid(done: list[dict], choice: Optional[dict] = None, limit: int = MAX_PROMPTS) -> dict:
    """What the image grid shows: {"methods": [...], "rows": [{"concept", "concept_class", "purpose",
    "prompt", "seed", "cells": [{"method", "setting", "prompt", "path"}]}]}; the base cell comes first.

    Per concept, up to ``limit`` prompts (the first concept prompt, the first leakage prompt, ...) at the
    first seed; per method its Best-H setting for the concept's class (``choice``: method -> class ->
    setting) or else its first setting. ``path`` is None when there is no such image.
    """
    choice = choice or {}
    gens = _of_kind(done, "generate")
    index = {_gen_key(r, None if _is_base(r.get("method")) else setting_label(r)): r for r in gens}
    mine = [r for r in gens if not _is_base(r.get("method"))]
    methods = list(dict.fromkeys(r.get("method") for r in mine))
    grid_rows = []
    for concept in dict.fromkeys(r.get("concept") for r in mine):
        rows = [r for r in mine if r.get("concept") == concept]
        cls = _concept_class(rows[0])
        settings = {m: _grid_setting(m, cls, list(dict.fromkeys(setting_label(r) for r in rows
                                                               if r.get("method") == m)), choice)
                    for m in dict.fromkeys(r.get("method") for r in rows)}
        for purpose, prompt_index in _pick_prompts(rows, limit):
            same = [r for r in rows if str(r.get("purpose") or "concept") == purpose
                    and int(r.get("prompt_index") or 0) == prompt_index]
            seed = min((r.get("seed") for r in same), key=lambda s: (s is None, s or 0))
            probe = {"concept": concept, "purpose": purpose, "prompt_index": prompt_index, "seed": seed}
            cells = [_grid_cell(index, {**probe, "method": BASE}, None)]
            cells += [_grid_cell(index, {**probe, "method": m}, settings.get(m)) for m in methods]
            prompt = next((c["prompt"] for c in cells[1:] if c["prompt"]), "")
            grid_rows.append({"concept": concept, "concept_class": cls, "purpose": purpose, "prompt": prompt,
                              "seed": seed, "cells": cells})
    return {"methods": [BASE] + methods, "rows": grid_rows}


def _grid_cell(index: dict, probe: dict, setting: Optional[str]) -> dict:
    row = index.get(_gen_key(probe, setting))
    if row is None and _is_base(probe["method"]) and probe["purpose"] == "leakage":
        row = index.get(_gen_key({**probe, "concept": LEAKAGE_CONCEPT}, setting))  # shared by every concept
    outputs = (row or {}).get("outputs") or []
    return {"method": probe["method"], "setting": setting, "prompt": str((row or {}).get("prompt") or ""),
            "path": str(outputs[0]) if outputs else None}


def _thumbnail(path: Path) -> Optional[tuple[str, bool]]:
    """The image at ``path`` as a thumbnail PNG data URI, and whether it was enlarged; None if it cannot be read.

    A large image is shrunk (smoothly) to 2x the cell; a small one (the toy world's 32 px) is enlarged by a whole
    factor with nearest-neighbour, so its pixels stay sharp squares (the page also shows it ``pixelated``)."""
    from PIL import Image

    from ..errors import PersonalizeError
    from ..images import open_rgb

    try:
        im = open_rgb(path)
    except PersonalizeError:
        return None
    factor = (THUMB_PX * 2) // max(im.size)
    if factor >= 2:
        im = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
    else:
        im.thumbnail((THUMB_PX * 2, THUMB_PX * 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue()), factor >= 2


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ----------------------------------------------------------------------------------------------- html

CSS = """
body{margin:0;background:#f4f5f7;color:#1c2128;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
 "Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:28px 32px 56px}
h1{font-size:26px;margin:0 0 6px}
h2{font-size:18px;margin:0 0 10px}
h3{font-size:14px;margin:16px 0 8px;color:#39424e}
.meta{color:#5b6470;font-size:13px;margin:2px 0}
.counts b{color:#1c2128}
.counts .bad{color:#b3261e}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:18px 22px;margin:18px 0;
 box-shadow:0 1px 2px rgba(0,0,0,.03)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:6px 12px;border-bottom:1px solid #eceef1;text-align:left;white-space:nowrap}
thead th{background:#f0f2f5;font-weight:600;border-bottom:2px solid #d4d8de;font-size:13px}
td.num,th.num{text-align:right}
tbody tr:nth-child(even) td{background:#fafbfc}
tbody tr td.best{font-weight:700;background:#d3f0da;color:#0d4a1f}
tr.ref td{color:#6b7380;font-style:italic}
.note{color:#6b7380;font-size:12.5px;margin:8px 0 0}
table.grid th,table.grid td{vertical-align:top;white-space:normal;border-bottom:1px solid #eceef1}
table.grid thead th{text-align:center}
table.grid th.rowhead{width:190px;font-weight:400;font-size:12.5px;background:#fafbfc}
.rowhead b{display:block;font-size:13.5px}
.tag{display:inline-block;font-size:11px;border-radius:9px;padding:0 7px;margin:3px 0;background:#e7ecf3}
.tag.leakage{background:#fbe9d0}
figure{margin:0 auto;width:160px}
figure img,.missing{width:160px;height:160px;display:block;border-radius:4px;object-fit:contain;
 background:#eee}
figure img.px{image-rendering:crisp-edges;image-rendering:pixelated}
.missing{display:flex;align-items:center;justify-content:center;text-align:center;color:#8a8f98;
 font-size:12px;background:repeating-linear-gradient(45deg,#f3f4f6 0 8px,#e8eaee 8px 16px)}
figcaption{font-size:11.5px;color:#4b5563;margin-top:4px;text-align:center;word-wrap:break-word}
figcaption i{color:#6b7380}
.plots{display:flex;flex-wrap:wrap;gap:18px}
.plots figure{width:auto;flex:1 1 480px;max-width:600px}
.plots img{width:100%;height:auto;background:#fff}
.err{color:#b3261e;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap}
"""


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table: dict) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in table["head"])
    head += "".join(f'<th class="num">{_esc(metric_info(k).header)}</th>' for k in table["keys"])
    body = []
    for i, row in enumerate(table["rows"]):
        cells = "".join(f"<td>{_esc(c)}</td>" for c in row["cells"])
        for k in table["keys"]:
            best = " best" if i in table["best"][k] else ""
            cells += (f'<td class="num{best}" data-key="{_esc(k)}">'
                      f"{_esc(format_cell(k, row))}</td>")
        attrs = ' class="ref"' if row["reference"] else ""
        body.append(f"<tr{attrs}>{cells}</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _html_section(title: str, body: str) -> str:
    return f"<section><h2>{_esc(title)}</h2>{body}</section>"


def _html_tables(summary: dict) -> str:
    note = ('<p class="note">Means over concepts; [brackets]: ' + CI_TEXT + ' Best value per column highlighted '
            '(↑ higher is better, ↓ lower); the base model (<i>base</i>) is a reference and is not ranked.</p>')
    if summary["results"] is None:
        results = "<p>No score rows yet: nothing to compare.</p>"
    else:
        results = _html_table(summary["results"]) + note
    parts = [_html_section("Results per method and setting", results)]
    if summary.get("vs_base"):
        parts.append(_html_section("Difference from the base alone", _html_table(summary["vs_base"]) + VS_BASE_NOTE))
    if summary["best_h"]:
        parts.append(_html_section("Best H per method", _html_table(summary["best_h"]) + (
            '<p class="note">Per class, the setting with the best harmonic mean H of image and text '
            "similarity; then the mean over classes.</p>")))
    if summary["cost"]:
        parts.append(_html_section("Cost per method", _html_table(summary["cost"]) + (
            '<p class="note">Train time, file size and parameters: mean over concepts. Time per image: '
            "over all generated images. Peak memory: the highest of the method's runs.</p>")))
    return "".join(parts)


def _html_figure(cell: dict, root: Path, row_prompt: str) -> str:
    thumb = _thumbnail(root / cell["path"]) if cell["path"] else None
    alt = f"{cell['method']}: {cell['prompt']}"
    if thumb:
        uri, enlarged = thumb
        pixelated = ' class="px"' if enlarged else ""
        image = f'<img{pixelated} src="{uri}" alt="{_esc(alt)}" title="{_esc(cell["path"])}">'
    else:
        missing = "image missing" if cell["path"] else "not generated"
        image = f'<div class="missing">{missing}</div>'
    caption = [f"<i>{_esc(cell['setting'])}</i>"] if cell["setting"] else []
    if cell["prompt"] and cell["prompt"] != row_prompt:
        caption.append(_esc(cell["prompt"]))
    return f"<figure>{image}<figcaption>{'<br>'.join(caption)}</figcaption></figure>"


def _html_grid(grid: dict, root: Path) -> str:
    if not grid["rows"]:
        return _html_section("Images", "<p>No generated images yet.</p>")
    head = "<th></th>" + "".join(f"<th>{_esc('base (no concept)' if _is_base(m) else m)}</th>"
                                 for m in grid["methods"])
    body = []
    for row in grid["rows"]:
        label = (f'<th class="rowhead"><b>{_esc(row["concept"])}</b>{_esc(row["concept_class"])}<br>'
                 f'<span class="tag {_esc(row["purpose"])}">{_esc(row["purpose"])} prompt</span><br>'
                 f'{_esc(row["prompt"])}<br>seed {_esc(row["seed"])}</th>')
        cells = "".join(f"<td>{_html_figure(c, root, row['prompt'])}</td>" for c in row["cells"])
        body.append(f"<tr>{label}{cells}</tr>")
    note = ('<p class="note">Same prompt and seed across methods; each method at its Best-H setting for the '
            "concept's class (else its first setting).</p>")
    table = (f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table></div>")
    return _html_section("Images", table + note)


def _html_plots(plots: list[Plot]) -> str:
    if not plots:
        return ""
    figs = "".join(f'<figure><img src="{_data_uri(p.png)}" alt="{_esc(p.title)}"></figure>' for p in plots)
    return _html_section("Pareto plots", f'<div class="plots">{figs}</div>')


def _html_failed(failed: list[dict], limit: int = 20) -> str:
    if not failed:
        return ""
    items = "".join(f"<tr><td>{_esc(r.get('key'))}</td><td>{_esc(r.get('kind'))}</td>"
                    f"<td>{_esc(r.get('method'))}</td><td>{_esc(r.get('concept'))}</td>"
                    f'<td class="err">{_esc(_first_line(r.get("error")))}</td></tr>' for r in failed[:limit])
    more = f'<p class="note">… and {len(failed) - limit} more.</p>' if len(failed) > limit else ""
    head = "<tr><th>key</th><th>kind</th><th>method</th><th>concept</th><th>error</th></tr>"
    return _html_section("Failed units",
                         f'<div class="scroll"><table><thead>{head}</thead><tbody>{items}</tbody></table></div>'
                         + more)


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


def _render_html(title: str, summary: dict, grid: dict, plots: list[Plot], root: Path, date: str) -> str:
    counts = " · ".join(f'<span class="{"bad" if s == "failed" and n else ""}"><b>{n}</b> {_esc(s)}</span>'
                        for s, n in summary["counts"].items())
    header = (f"<h1>{_esc(title)}</h1><p class=\"meta\">{_esc(_provenance_text(summary, date))}</p>"
              f'<p class="meta counts">Units of work: {counts}</p>')
    body = (header + _html_tables(summary) + _html_plots(plots) + _html_grid(grid, root)
            + _html_failed(summary["failed"]))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


# ----------------------------------------------------------------------------------------------- markdown


def _md(text) -> str:
    """Text safe inside a Markdown table cell (no table breaks, no HTML tags, no emphasis)."""
    out = str(text)
    for ch in "\\`*[]<>|":
        out = out.replace(ch, "\\" + ch)
    return out.replace("\n", " ")


def _md_table(table: dict) -> str:
    head = [_md(h) for h in table["head"]] + [_md(metric_info(k).header) for k in table["keys"]]
    align = ["---"] * len(table["head"]) + ["---:"] * len(table["keys"])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for i, row in enumerate(table["rows"]):
        cells = [_md(c) for c in row["cells"]]
        for k in table["keys"]:
            value = _md(format_cell(k, row))
            cells.append(f"**{value}**" if i in table["best"][k] else value)
        if row["reference"]:
            cells[0] = f"{cells[0]} (reference)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _md_link(label: str, path: Optional[str], root: Path, out: Path) -> str:
    if not path:
        return f"{_md(label)}: (none)"
    target = os.path.relpath(root / path, out).replace(os.sep, "/")
    suffix = "" if (root / path).is_file() else " (missing)"
    return f"[{_md(label)}]({urllib.parse.quote(target)}){suffix}"


def _md_grid(grid: dict, root: Path, out: Path) -> list[str]:
    lines = []
    for row in grid["rows"]:
        links = [_md_link(c["method"] + (f" ({c['setting']})" if c["setting"] else ""), c["path"], root, out)
                 for c in row["cells"]]
        lines.append(f"- **{_md(row['concept'])}** ({_md(row['purpose'])} prompt, seed {_md(row['seed'])}): "
                     f"{_md(row['prompt'])} — " + ", ".join(links))
    return lines or ["No generated images yet."]


def _render_md(title: str, summary: dict, grid: dict, plots: list[Plot], root: Path, out: Path,
               date: str) -> str:
    lines = [f"# {_md(title)}", "", _md(_provenance_text(summary, date)), "",
             f"Units of work: {_counts_text(summary['counts'])}", "", "## Results per method and setting", ""]
    if summary["results"] is None:
        lines.append("No score rows yet: nothing to compare.")
    else:
        lines += [_md_table(summary["results"]), "", f"Means over concepts; \\[brackets\\]: {CI_TEXT} "
                  "Best per column in **bold**."]
    if summary.get("vs_base"):
        lines += ["", "## Difference from the base alone", "", _md_table(summary["vs_base"]), "",
                  VS_BASE_TEXT]
    for name, key in (("Best H per method", "best_h"), ("Cost per method", "cost")):
        if summary[key]:
            lines += ["", f"## {name}", "", _md_table(summary[key])]
    if plots:
        lines += ["", "## Pareto plots", ""] + [f"![{p.title}](plots/{p.name})" for p in plots]
    lines += ["", "## Images", ""] + _md_grid(grid, root, out)
    if summary["failed"]:
        lines += ["", "## Failed units", ""] + [
            f"- {_md(r.get('key'))}: {_md(_first_line(r.get('error')))}" for r in summary["failed"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- write


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_report(rows: list[dict], root: Path, out: Path, *, title: str = "Benchmark report") -> tuple[Path, Path]:
    """Write ``out/index.html`` (self-contained: images and plots as data URIs, inline CSS, no scripts, no
    external URLs) and ``out/report.md`` with its plots in ``out/plots/``. Paths in ``rows`` are relative to
    ``root``. Returns (index_html, report_md)."""
    root, out = Path(root), Path(out)
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    summary = summarize(rows)
    choice = {r["method"]: r["per_class"] for r in (summary["best_h"] or {"rows": []})["rows"]}
    grid = image_grid([r for r in rows if r.get("status") == "done"], choice)
    plots = make_plots(summary["results"])
    for plot in plots:
        _write(out / "plots" / plot.name, plot.png)
    index, report = out / "index.html", out / "report.md"
    _write(index, _render_html(title, summary, grid, plots, root, date).encode("utf-8"))
    _write(report, _render_md(title, summary, grid, plots, root, out, date).encode("utf-8"))
    return index, report
