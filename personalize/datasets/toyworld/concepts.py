"""Held-out concepts: textured objects whose appearance never occurs in the base model's training data.

Each concept is a shape (its superclass, a single CLIP token) with a texture
(stripes, dots, checks, a face, rings, a split). The base UNet/text encoder only
ever see flat-coloured objects; the VAE is trained on world scenes plus generic
full-frame textures so it can reproduce these patterns (see docs/TOYWORLD.md).

    >>> [c.name for c in list_concepts()]
    >>> render_concept_examples("striped_star", "photos/")   # 5 PNGs, an ordinary image folder
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from PIL import Image, ImageDraw

from .world import COLORS, POSITION_PHRASES, POSITIONS, Scene, SceneObject, concept_mask, render_scene

BLACK = (20, 20, 20)
WHITE = (245, 245, 245)


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    superclass: str  # a shape word of the world (one CLIP token)
    description: str
    colors: tuple[tuple[int, int, int], ...]  # the concept's own colours (for fidelity)
    backgrounds: tuple[str, ...]  # world backgrounds its examples use (contrast with its colours)
    mirror_symmetric: bool = True  # False: a horizontal flip changes it (train with flip_p = 0)


CONCEPTS: dict[str, ConceptSpec] = {
    c.name: c
    for c in (
        ConceptSpec("striped_star", "star", "a star with a wide white horizontal band across red",
                    (COLORS["red"], WHITE), ("blue", "green", "purple")),
        ConceptSpec("dotted_square", "square", "a blue square with white polka dots",
                    (COLORS["blue"], WHITE), ("yellow", "red", "green")),
        ConceptSpec("checkered_circle", "circle", "a circle with a black and white checkerboard pattern",
                    (BLACK, WHITE), ("red", "green", "blue", "purple")),
        ConceptSpec("smiley_circle", "circle", "a yellow circle with a black smiling face",
                    (COLORS["yellow"], BLACK), ("blue", "purple", "green", "red")),
        ConceptSpec("bullseye_circle", "circle", "a circle of concentric red and white rings",
                    (COLORS["red"], WHITE), ("blue", "green", "purple")),
        ConceptSpec("split_triangle", "triangle", "a triangle, left half green and right half yellow",
                    (COLORS["green"], COLORS["yellow"]), ("blue", "purple", "red"), mirror_symmetric=False),
        ConceptSpec("striped_heart", "heart", "a heart with vertical purple and yellow stripes",
                    (COLORS["purple"], COLORS["yellow"]), ("blue", "green", "white")),
    )
}

EXAMPLE_EXTENTS = (16.0, 17.5, 19.0)
N_EXAMPLES = 5


def list_concepts() -> list[dict]:
    """[{"name", "superclass", "description"}] for every held-out concept."""
    return [{"name": c.name, "superclass": c.superclass, "description": c.description} for c in CONCEPTS.values()]


def get_concept(name: str) -> ConceptSpec:
    try:
        return CONCEPTS[name]
    except KeyError:
        raise KeyError(f"unknown toy-world concept {name!r}; known: {', '.join(CONCEPTS)}") from None


# --------------------------------------------------------------------------- textures
def concept_texture(name: str, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    """RGB image (size x size) holding concept ``name``'s texture laid out over ``box`` (x0, y0, x1, y1)."""
    spec = get_concept(name)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    c1, c2 = spec.colors
    img = Image.new("RGB", (size, size), c1)
    d = ImageDraw.Draw(img)
    if name == "striped_star":  # 3 horizontal bands (v1 had 5: too fine for 16x16 latents)
        n = 3
        for i in range(1, n, 2):
            d.rectangle((0, y0 + i * h / n, size, y0 + (i + 1) * h / n - 1), fill=c2)
    elif name == "striped_heart":  # 5 vertical bands
        n = 5
        for i in range(1, n, 2):
            d.rectangle((x0 + i * w / n, 0, x0 + (i + 1) * w / n - 1, size), fill=c2)
    elif name == "dotted_square":  # 2 x 2 dots
        r = 0.14 * w
        for fx in (0.28, 0.72):
            for fy in (0.28, 0.72):
                cx, cy = x0 + fx * w, y0 + fy * h
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c2)
    elif name == "checkered_circle":  # 3 x 3 checks
        n = 3
        for i in range(n):
            for j in range(n):
                if (i + j) % 2:
                    d.rectangle((x0 + i * w / n, y0 + j * h / n, x0 + (i + 1) * w / n - 1, y0 + (j + 1) * h / n - 1),
                                fill=c2)
    elif name == "smiley_circle":  # v2: larger eyes and a thicker mouth, so they survive 16x16 latents
        r = 0.12 * w
        for fx in (0.32, 0.68):
            cx, cy = x0 + fx * w, y0 + 0.35 * h
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c2)
        d.arc((x0 + 0.2 * w, y0 + 0.22 * h, x1 - 0.2 * w, y1 - 0.16 * h), 20, 160, fill=c2, width=max(1, int(0.14 * w)))
    elif name == "bullseye_circle":  # red, white, red rings
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for frac, col in ((0.5, c1), (0.34, c2), (0.17, c1)):
            d.ellipse((cx - frac * w, cy - frac * h, cx + frac * w, cy + frac * h), fill=col)
    elif name == "split_triangle":
        d.rectangle(((x0 + x1) / 2, 0, size, size), fill=c2)
    else:  # pragma: no cover
        raise KeyError(name)
    return img


def concept_object(name: str, position: str, extent: float, center: Optional[tuple[float, float]] = None) -> SceneObject:
    """A scene object standing for concept ``name`` (its superclass shape, its texture)."""
    spec = get_concept(name)
    if center is None:
        ax, ay = POSITIONS[position]
        half = extent / 2 + 0.5
        center = (min(max(ax, half), 32 - half), min(max(ay, half), 32 - half))
    return SceneObject(spec.superclass, "white", "large", position, extent=extent, center=center, appearance=name)


def concept_scenes(name: str, n: int = N_EXAMPLES, seed: int = 0) -> list[Scene]:
    """``n`` deterministic example scenes of concept ``name`` (varied position, size, background)."""
    spec = get_concept(name)
    rng = random.Random(f"{name}:{seed}")
    positions = list(POSITIONS)
    rng.shuffle(positions)
    scenes = []
    for i in range(n):
        pos = positions[i % len(positions)]
        extent = EXAMPLE_EXTENTS[i % len(EXAMPLE_EXTENTS)] + rng.uniform(-0.5, 0.5)
        bg = spec.backgrounds[i % len(spec.backgrounds)]
        scenes.append(Scene(bg, (concept_object(name, pos, extent),)))
    return scenes


def example_caption(scene: Scene) -> str:
    """The caption template of an example scene: where the concept is and on what (``{}`` = the concept),
    e.g. ``a {} on the left, on a blue background``."""
    obj = scene.objects[0]
    return f"a {{}} {POSITION_PHRASES[obj.position]}, on a {scene.background} background"


def render_concept_examples(name: str, out_dir: Union[str, os.PathLike], n: int = N_EXAMPLES, seed: int = 0,
                            resolution: int = 32, captions: bool = True,
                            masks_dir: Union[str, os.PathLike, None] = None) -> list[Path]:
    """Render concept ``name``'s example images into ``out_dir`` as PNGs; returns their paths.

    ``captions``: beside each image an ``IMAGE.txt`` caption stating its position and background (the
    trainer's per-image captions), so a trained concept takes its appearance and leaves the scene to the
    prompt (docs/TOYWORLD.md measures the difference). ``masks_dir``: also the renderer's exact mask of the
    concept in each image (:func:`concept_mask`), same file name, in that folder: what ``--masks DIR`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(concept_scenes(name, n, seed)):
        p = out / f"{name}_{i:02d}.png"
        render_scene(scene, resolution=resolution).save(p)
        if masks_dir is not None:
            concept_mask(scene, resolution=resolution).save(Path(masks_dir) / p.name)
        side = p.with_suffix(".txt")
        if captions:
            side.write_text(example_caption(scene) + "\n")
        elif side.exists():
            side.unlink()
        paths.append(p)
    return paths


def describe(name: str) -> str:
    return get_concept(name).description


__all__ = ["CONCEPTS", "ConceptSpec", "concept_object", "concept_scenes", "concept_texture", "example_caption", "get_concept",
           "list_concepts", "render_concept_examples", "describe"]
_ = math  # keep import (used by future textures)
