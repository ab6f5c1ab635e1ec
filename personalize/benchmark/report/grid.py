"""The report's image grid: which generated image each (concept, prompt, method) cell shows, and its thumbnail."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional

from ..plan import BASE, LEAKAGE_CONCEPT
from .summary import _concept_class, _is_base, _of_kind, setting_label

THUMB_PX = 160
MAX_PROMPTS = 2


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

    from ...errors import PersonalizeError
    from ...images import open_rgb

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
