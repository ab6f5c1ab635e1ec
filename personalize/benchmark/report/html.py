"""The report's ``index.html``: one self-contained page (inline CSS, images and plots as data URIs, no scripts)."""
from __future__ import annotations

import html
from pathlib import Path

from .grid import _data_uri, _thumbnail
from .plots import Plot
from .stats import COMPOSITION_TEXT, H2H_TEXT, VIEWS_TEXT
from .summary import (CI_TEXT, VS_BASE_TEXT, _first_line, _is_base, _provenance_text, comparability_text, format_cell,
                      metric_info)

VS_BASE_NOTE = f'<p class="note">{VS_BASE_TEXT}</p>'

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
.views{display:flex;flex-wrap:wrap;gap:24px}
.view{flex:1 1 520px}
details summary{cursor:pointer;color:#39424e;margin-bottom:8px}
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
    parts = [f'<p class="meta">{_esc(comparability_text(summary.get("comparability")))}</p>']
    if summary.get("protocol"):
        parts.append(_html_section("Protocol per method", _html_table(summary["protocol"]) + (
            '<p class="note">Each method is prompted as it trained (and as its paper evaluates it); every method '
            "keeps the same training step, so no selection favours one of them.</p>")))
    parts.append(_html_section("Results per method and setting", results))
    parts += _html_extra(summary)
    if summary.get("vs_base"):
        parts.append(_html_section("Difference from the base alone", _html_table(summary["vs_base"]) + VS_BASE_NOTE))
    if summary["best_h"]:
        parts.append(_html_section("Best H per method", _html_table(summary["best_h"]) + (
            '<p class="note">Per class, the setting with the best harmonic mean H of image and text '
            "similarity (CLIP backend: CLIP-I and normalised CLIP-T on shape-preserving prompts); then the mean "
            "over classes.</p>")))
    if summary["cost"]:
        parts.append(_html_section("Cost per method", _html_table(summary["cost"]) + (
            '<p class="note">Train time, file size and parameters: mean over concepts. Time per image: '
            "over all generated images. Peak memory: the highest of the method's runs.</p>")))
    return "".join(parts)


def _html_extra(summary: dict) -> list[str]:
    """The protocol views side by side, head-to-head differences, compositions and per-concept scores."""
    parts = []
    if summary.get("perfusion_view"):
        views = "".join(f'<div class="view"><h3>{_esc(name)}</h3>{_html_table(summary[key])}</div>'
                        for name, key in (("CC101 view", "cc101_view"), ("Perfusion view", "perfusion_view"))
                        if summary.get(key))
        parts.append(_html_section("CC101 and Perfusion protocols side by side",
                                   f'<div class="views">{views}</div><p class="note">{_esc(VIEWS_TEXT)}</p>'))
    if summary.get("head_to_head"):
        parts.append(_html_section("Head to head", _html_table(summary["head_to_head"])
                                   + f'<p class="note">{_esc(H2H_TEXT)}</p>'))
    if summary.get("compositions"):
        parts.append(_html_section("Compositions", _html_table(summary["compositions"])
                                   + f'<p class="note">{_esc(COMPOSITION_TEXT)} [brackets]: {_esc(CI_TEXT)}</p>'))
    if summary.get("per_concept"):
        n = len(summary["per_concept"]["rows"])
        parts.append(_html_section("Per concept", f"<details><summary>{n} rows (method, setting, concept), with "
                                   f"intervals over images</summary>{_html_table(summary['per_concept'])}</details>"))
    return parts


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


def _html_grid(grid: dict, root: Path, title: str = "Images") -> str:
    """The image grid; a composition grid (``grid["compositions"]``) follows as its own section."""
    more = _html_grid(grid["compositions"], root, "Composition images") if grid.get("compositions") else ""
    if not grid["rows"]:
        return _html_section(title, "<p>No generated images yet.</p>") + more
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
    return _html_section(title, table + note) + more


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
