"""The benchmark report: tables, image grids and Pareto plots from the runner's rows, as HTML and Markdown.

The input is a list of plain dicts, one per unit of work (the runner converts its SQLite rows); paths in
rows are relative to the benchmark folder ``root``. Only rows with status "done" enter the numbers.

- ``summarize(rows)``: the numbers the tables show (results per method and setting, Best-H per method, cost
  per method) and which cell of each column is the best.
- ``pareto_front(points)``: indices of the non-dominated points (higher is better on both axes).
- ``write_report(rows, root, out)``: ``out/index.html`` (self-contained) and ``out/report.md`` (+ plots).

The base model (method "base") is shown as a reference row but never competes for "best".

Modules: ``summary`` (numbers and tables), ``plots`` (Pareto plots), ``grid`` (the image grid and its
thumbnails), ``html`` (index.html with its CSS) and ``markdown`` (report.md).
"""
from __future__ import annotations

import datetime
from pathlib import Path

from ...paths import atomic_path
from .grid import MAX_PROMPTS, THUMB_PX, image_grid
from .html import CSS, _html_figure, _render_html  # noqa: F401  (_html_figure: tests import it from here)
from .markdown import _render_md
from .plots import Plot, _method_styles, make_plots, pareto_front  # noqa: F401  (_method_styles: tests too)
from .summary import (COST_KEYS, MetricInfo, format_cell, format_value, metric_info, setting_label,
                      summarize)


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
    done = [r for r in rows if r.get("status") == "done"]
    composed = {r.get("concept") for r in done if r.get("purpose") == "composition"}
    grid = image_grid([r for r in done if r.get("concept") not in composed], choice)
    if composed:  # composition pairs get their own grid (their methods are recipes, not single methods)
        grid["compositions"] = image_grid([r for r in done if r.get("concept") in composed], {})
    plots = make_plots(summary["results"])
    for plot in plots:
        _write(out / "plots" / plot.name, plot.png)
    index, report = out / "index.html", out / "report.md"
    _write(index, _render_html(title, summary, grid, plots, root, date).encode("utf-8"))
    _write(report, _render_md(title, summary, grid, plots, root, out, date).encode("utf-8"))
    return index, report


__all__ = ["COST_KEYS", "CSS", "MAX_PROMPTS", "MetricInfo", "Plot", "THUMB_PX", "format_cell", "format_value",
           "image_grid", "make_plots", "metric_info", "pareto_front", "setting_label", "summarize", "write_report"]
