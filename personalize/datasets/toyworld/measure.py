"""Rule-based measurers for the toy world (ground truth from geometry, no learned model).

    detect_scene(image)                     -> background + objects (shape, colour, size, position)
    score_image(image, prompt, ...)         -> which stated attributes hold
    score_folder(folder, prompts, concept=, reference=) -> {"alignment", "fidelity", "leakage", ...}

Detection: the background is the median border colour; objects are the
connected non-background regions (holes filled, over-long regions split at
their thinnest point); colour = nearest palette colour of an object's core
pixels; size = bbox extent against ``world.SIZE_THRESHOLD``; position = nearest
anchor; shape = best soft-IoU against each shape's template stretched to the
object's sub-pixel bbox.
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from .captions import ParsedObject, ParsedPrompt, parse_prompt
from .world import COLORS, POSITIONS, SHAPES, SIZE_THRESHOLD, shape_mask

PathLike = Union[str, os.PathLike]
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
FG_THRESHOLD = 60.0  # RGB distance from the background that counts as foreground
MIN_AREA = 6.0  # px of coverage below which a region is noise
ATTRIBUTES = ("background", "shape", "color", "size", "position")


@dataclass
class DetectedObject:
    shape: str
    color: str
    size: str
    position: str
    extent: float
    center: tuple[float, float]
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 (sub-pixel)
    area: float
    mask: np.ndarray = field(repr=False)  # soft coverage (32, 32), holes filled
    shape_scores: dict = field(default_factory=dict, repr=False)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass
class DetectedScene:
    background: str
    background_rgb: np.ndarray
    objects: list[DetectedObject]


def _as_array(image) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        from ...images import open_rgb

        image = open_rgb(image)  # a file that does not decode: a one-line error naming it
    if isinstance(image, Image.Image):
        if image.size != (32, 32):
            image = image.convert("RGB").resize((32, 32), Image.BOX)
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]


def nearest_color(rgb) -> str:
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    return _PALETTE_NAMES[int(np.argmin(d))]


def _components(binary: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean array, as boolean masks."""
    h, w = binary.shape
    seen = np.zeros_like(binary, dtype=bool)
    comps = []
    for y in range(h):
        for x in range(w):
            if binary[y, x] and not seen[y, x]:
                comp = np.zeros_like(binary, dtype=bool)
                q = deque([(y, x)])
                seen[y, x] = True
                while q:
                    cy, cx = q.popleft()
                    comp[cy, cx] = True
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and binary[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                q.append((ny, nx))
                comps.append(comp)
    return comps


def _fill_holes(binary: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the border through non-object pixels belong to the object."""
    h, w = binary.shape
    outside = np.zeros_like(binary, dtype=bool)
    q = deque()
    for y in range(h):
        for x in (0, w - 1):
            if not binary[y, x] and not outside[y, x]:
                outside[y, x] = True
                q.append((y, x))
    for x in range(w):
        for y in (0, h - 1):
            if not binary[y, x] and not outside[y, x]:
                outside[y, x] = True
                q.append((y, x))
    while q:
        cy, cx = q.popleft()
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            ny, nx = cy + dy, cx + dx
            if 0 <= ny < h and 0 <= nx < w and not binary[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                q.append((ny, nx))
    return ~outside


def _extent(alpha: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel bbox (x0, y0, x1, y1) from a soft coverage mask."""
    cols, rows = alpha.max(axis=0), alpha.max(axis=1)

    def span(p):
        idx = np.nonzero(p > 0.02)[0]
        if len(idx) == 0:
            return 0.0, 0.0
        a, b = idx[0], idx[-1]
        return a + (1 - p[a]), b + p[b]

    x0, x1 = span(cols)
    y0, y1 = span(rows)
    return float(x0), float(y0), float(x1), float(y1)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def classify_shape(alpha: np.ndarray) -> tuple[str, dict[str, float]]:
    """Best-matching shape for a soft object mask (templates stretched to its bbox)."""
    x0, y0, x1, y1 = _extent(alpha)
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scores = {}
    for s in SHAPES:
        t = shape_mask(s, max(w, h), cx, cy, size=alpha.shape[0], stretch=(w, h))
        scores[s] = _soft_iou(alpha, t)
    return max(scores, key=scores.get), scores


def _split_if_elongated(comp: np.ndarray, alpha: np.ndarray) -> list[np.ndarray]:
    """Two touching objects form one wide (or tall) region: cut it at its thinnest column (row)."""
    x0, y0, x1, y1 = _extent(alpha * comp)
    w, h = x1 - x0, y1 - y0
    for axis, long, short in ((1, w, h), (0, h, w)):  # axis=1: columns (left/right)
        if long > 1.55 * max(short, 1.0) and long > 16:
            profile = (alpha * comp).sum(axis=0 if axis == 1 else 1)
            lo, hi = (int(x0), int(x1)) if axis == 1 else (int(y0), int(y1))
            mid_lo, mid_hi = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            cut = mid_lo + int(np.argmin(profile[mid_lo:mid_hi + 1]))
            a, b = comp.copy(), comp.copy()
            if axis == 1:
                a[:, cut:] = False
                b[:, :cut] = False
            else:
                a[cut:, :] = False
                b[:cut, :] = False
            return [m for m in (a, b) if m.any()]
    return [comp]


def detect_scene(image) -> DetectedScene:
    """Background colour and objects of a toy-world image (PIL image, path or HxWx3 array)."""
    arr = _as_array(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_color(bg_rgb)
    dist = np.linalg.norm(arr - bg_rgb[None, None], axis=2)
    binary = dist > FG_THRESHOLD
    objects = []
    for comp in _components(binary):
        core = comp & (dist >= np.percentile(dist[comp], 40))
        obj_rgb = np.median(arr[core], axis=0)
        span = max(np.linalg.norm(obj_rgb - bg_rgb), FG_THRESHOLD)
        direction = (obj_rgb - bg_rgb) / span
        proj = ((arr - bg_rgb[None, None]) @ direction) / span
        alpha_all = np.clip(np.maximum(proj, dist / span * (dist > FG_THRESHOLD)), 0, 1)
        grown = comp.copy()  # include the antialiased rim next to the component
        grown[1:] |= comp[:-1]
        grown[:-1] |= comp[1:]
        grown[:, 1:] |= comp[:, :-1]
        grown[:, :-1] |= comp[:, 1:]
        for part in _split_if_elongated(grown, alpha_all):
            filled = _fill_holes(part & (alpha_all > 0.5))
            alpha = np.where(filled, 1.0, alpha_all * part)
            area = float(alpha.sum())
            if area < MIN_AREA:
                continue
            core = part & (dist >= np.percentile(dist[part], 40))
            color = nearest_color(np.median(arr[core], axis=0))
            x0, y0, x1, y1 = _extent(alpha)
            extent = max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
            shape, scores = classify_shape(alpha)
            objects.append(DetectedObject(shape, color, "large" if extent > SIZE_THRESHOLD else "small", position,
                                          extent, (cx, cy), (x0, y0, x1, y1), area, alpha, scores))
    objects.sort(key=lambda o: -o.area)
    return DetectedScene(bg, bg_rgb, objects[:4])


# --------------------------------------------------------------------------- scoring
def _match(parsed: ParsedPrompt, scene: DetectedScene) -> list[Optional[DetectedObject]]:
    """Assign each stated object a distinct detected object, maximising attributes that hold."""
    stated = parsed.objects
    cands = scene.objects
    best, best_score = [None] * len(stated), (-1, 0.0)
    slots = list(range(len(cands))) + [None] * len(stated)
    for perm in set(itertools.permutations(slots, len(stated))):
        hits, dist = 0, 0.0
        for so, k in zip(stated, perm):
            if k is None:
                continue
            d = cands[k]
            attrs = d.attributes()
            hits += sum(attrs[a] == v for a, v in so.stated().items())
            if so.position is not None:
                px, py = POSITIONS[so.position]
                dist += (d.center[0] - px) ** 2 + (d.center[1] - py) ** 2
            hits += 1e-3  # prefer matching something over nothing
        score = (hits, -dist)
        if score > best_score:
            best_score, best = score, [cands[k] if k is not None else None for k in perm]
    return best


def score_image(image, prompt: Union[str, ParsedPrompt], placeholder: Optional[str] = None,
                superclass: Optional[str] = None, concept: Optional[str] = None) -> dict:
    """Which of the prompt's stated attributes hold in ``image``.

    Returns {"alignment": fraction, "checks": {attr: [bools]}, "fidelity": float|None, "detected": DetectedScene}.
    """
    if concept is not None and superclass is None:
        from .concepts import get_concept

        superclass = get_concept(concept).superclass
    parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt, placeholder, superclass)
    arr = _as_array(image)
    scene = detect_scene(arr)
    checks: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    if parsed.background is not None:
        checks["background"].append(scene.background == parsed.background)
    matched = _match(parsed, scene)
    fidelity = None
    for so, d in zip(parsed.objects, matched):
        for attr, value in so.stated().items():
            checks[attr].append(d is not None and d.attributes()[attr] == value)
        if so.concept and concept is not None:
            fidelity = concept_fidelity(arr, d, concept, scene) if d is not None else 0.0
    flat = [v for vs in checks.values() for v in vs]
    return {"alignment": float(np.mean(flat)) if flat else None, "checks": checks, "fidelity": fidelity,
            "detected": scene, "parsed": parsed}


def concept_fidelity(arr: np.ndarray, obj: DetectedObject, concept: str, scene: Optional[DetectedScene] = None) -> float:
    """0-1: how closely ``obj`` matches ``concept``'s appearance (colour histogram + pattern correlation).

    The concept is re-rendered at the detected object's geometry on the detected background; the
    score is 0.5 * palette-histogram intersection + 0.5 * max(0, pattern correlation) (best of +-1 px shifts),
    both over the object's core pixels.
    """
    from .concepts import concept_object, get_concept
    from .world import Scene, render_scene

    spec = get_concept(concept)
    bg = scene.background if scene is not None else "white"
    ref = np.asarray(render_scene(Scene(bg, (concept_object(concept, obj.position, obj.extent, obj.center),))),
                     dtype=np.float32)
    ref_mask = shape_mask(spec.superclass, obj.extent, *obj.center)
    palette = np.concatenate([_PALETTE, np.array(spec.colors, dtype=np.float32), np.array([[20, 20, 20]], np.float32)])

    def hist(img, m):
        px = img[m]
        if len(px) == 0:
            return np.zeros(len(palette))
        idx = np.argmin(np.linalg.norm(px[:, None] - palette[None], axis=2), axis=1)
        h = np.bincount(idx, minlength=len(palette)).astype(np.float64)
        return h / h.sum()

    best = 0.0
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        shifted = np.roll(np.roll(ref, dy, axis=0), dx, axis=1)
        m = np.roll(np.roll(ref_mask, dy, axis=0), dx, axis=1) > 0.9
        m &= obj.mask > 0.5
        if m.sum() < 4:
            continue
        hi = float(np.minimum(hist(arr, m), hist(shifted, m)).sum())
        a = arr[m] - arr[m].mean(axis=0)
        b = shifted[m] - shifted[m].mean(axis=0)
        denom = np.sqrt((a ** 2).sum() * (b ** 2).sum())
        corr = float((a * b).sum() / denom) if denom > 1e-6 else 0.0
        best = max(best, 0.5 * hi + 0.5 * max(0.0, corr))
    return best


def load_prompts(folder: PathLike, prompts: Union[None, PathLike, dict] = None) -> dict[str, str]:
    from ...samples import prompt_table

    return prompt_table(folder, prompts)


def score_folder(folder: PathLike, prompts: Union[None, PathLike, dict] = None, concept: Optional[str] = None,
                 reference: Optional[PathLike] = None, placeholder: Optional[str] = None,
                 superclass: Optional[str] = None) -> dict:
    """Score a folder of PNGs named ``<stem>.png`` against ``prompts`` (stem -> prompt; default FOLDER/prompts.json).

    ``concept``: a toy-world concept name; its placeholder (``placeholder``, default any ``<...>`` word)
    stands for an object of its superclass shape. ``reference``: a folder with the same stems generated
    without the concept, for ``leakage``.

    Returns {"alignment", "fidelity", "leakage", "per_attribute", "n_images", "per_image"}:
    alignment = mean over images of the fraction of stated attributes that hold (concept appearance excluded);
    fidelity = mean concept fidelity over images whose prompt mentions the concept (None without ``concept``);
    leakage = mean |image - reference| / 255 over prompts that do not mention the concept (None without ``reference``).
    """
    from ...samples import read_samples

    folder = Path(folder)
    samples = read_samples(folder, prompts)
    if concept is not None and superclass is None:
        from .concepts import get_concept

        superclass = get_concept(concept).superclass
    per_image, aligns, fids, leaks = {}, [], [], []
    attr_hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for path, prompt in samples:
        stem = path.stem
        parsed = parse_prompt(prompt, placeholder, superclass)
        res = score_image(path, parsed, concept=concept)
        entry = {"prompt": prompt, "alignment": res["alignment"],
                 "checks": {k: v for k, v in res["checks"].items() if v}}
        if res["alignment"] is not None:
            aligns.append(res["alignment"])
        for a, v in res["checks"].items():
            attr_hits[a].extend(v)
        if parsed.mentions_concept and concept is not None:
            entry["fidelity"] = res["fidelity"]
            fids.append(res["fidelity"] or 0.0)
        if reference is not None and not parsed.mentions_concept:
            ref = Path(reference) / f"{stem}.png"
            if ref.exists():
                diff = float(np.abs(_as_array(path) - _as_array(ref)).mean() / 255.0)
                entry["leakage"] = diff
                leaks.append(diff)
        per_image[stem] = entry
    return {
        "alignment": float(np.mean(aligns)) if aligns else None,
        "fidelity": float(np.mean(fids)) if fids else None,
        "leakage": float(np.mean(leaks)) if leaks else None,
        "per_attribute": {a: float(np.mean(v)) for a, v in attr_hits.items() if v},
        "n_images": len(per_image),
        "per_image": per_image,
    }


__all__ = ["ATTRIBUTES", "DetectedObject", "DetectedScene", "ParsedObject", "classify_shape", "concept_fidelity",
           "detect_scene", "load_prompts", "nearest_color", "score_folder", "score_image"]
