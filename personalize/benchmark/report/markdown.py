"""The report's ``report.md``: the same tables (best in bold), the plots and links to the grid's images."""
from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Optional

from .plots import Plot
from .stats import COMPOSITION_TEXT, H2H_TEXT, VIEWS_TEXT
from .summary import (CI_TEXT, VS_BASE_TEXT, _counts_text, _first_line, _provenance_text, comparability_text,
                      format_cell, metric_info)


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
             f"Units of work: {_counts_text(summary['counts'])}", "",
             _md(comparability_text(summary.get("comparability"))), ""]
    if summary.get("protocol"):
        lines += ["## Protocol per method", "", _md_table(summary["protocol"]), ""]
    lines += ["## Results per method and setting", ""]
    if summary["results"] is None:
        lines.append("No score rows yet: nothing to compare.")
    else:
        lines += [_md_table(summary["results"]), "", f"Means over concepts; \\[brackets\\]: {CI_TEXT} "
                  "Best per column in **bold**."]
    if summary.get("vs_base"):
        lines += ["", "## Difference from the base alone", "", _md_table(summary["vs_base"]), "",
                  VS_BASE_TEXT]
    for name, key, note in (("CC101 view", "cc101_view", ""), ("Perfusion view", "perfusion_view", VIEWS_TEXT),
                            ("Head to head", "head_to_head", H2H_TEXT),
                            ("Compositions", "compositions", COMPOSITION_TEXT),
                            ("Per concept", "per_concept", "Intervals over each concept's images.")):
        if summary.get(key):
            lines += ["", f"## {name}", "", _md_table(summary[key])] + (["", _md(note)] if note else [])
    for name, key in (("Best H per method", "best_h"), ("Cost per method", "cost")):
        if summary[key]:
            lines += ["", f"## {name}", "", _md_table(summary[key])]
    if plots:
        lines += ["", "## Pareto plots", ""] + [f"![{p.title}](plots/{p.name})" for p in plots]
    lines += ["", "## Images", ""] + _md_grid(grid, root, out)
    if grid.get("compositions"):
        lines += ["", "## Composition images", ""] + _md_grid(grid["compositions"], root, out)
    if summary["failed"]:
        lines += ["", "## Failed units", ""] + [
            f"- {_md(r.get('key'))}: {_md(_first_line(r.get('error')))}" for r in summary["failed"]]
    return "\n".join(lines) + "\n"
