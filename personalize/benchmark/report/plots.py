"""The report's Pareto plots (matplotlib, drawn off-screen to PNG bytes) and the Pareto front itself."""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Sequence

from ..plan import BASE
from .summary import _is_base, metric_info, plot_axes


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
    """One Pareto plot per (x, y) pair of :func:`~.summary.plot_axes` the results have."""
    if not results:
        return []
    styles = _method_styles([r["method"] for r in results["rows"]])
    plots = []
    for x_key, y_key in plot_axes():
        points = _plot_points(results, x_key, y_key)
        if points:
            title = f"{metric_info(y_key).label} vs {metric_info(x_key).label}"
            plots.append(Plot(f"pareto_{x_key}_{y_key}.png", title, _pareto_png(points, x_key, y_key, styles)))
    return plots
