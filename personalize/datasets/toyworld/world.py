"""The toy world: procedural 32x32 scenes, rendered with PIL, and their captions.

A scene is a background colour and one or two objects. Each object has a shape,
a colour, a size (small/large) and a position (left/right/top/bottom/center).
Everything is deterministic from a seed. Every attribute word is a single token
of the SD 1.x CLIP tokenizer (checked by ``tests/test_toyworld_world.py``).

    >>> scene = sample_scene(random.Random(0))
    >>> caption(scene)
    'a large purple heart on the left and a small green star on the right, on a blue background'
    >>> image = render_scene(scene)          # PIL.Image, 32x32 RGB
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 40),
    "purple": (150, 55, 185),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
SIZES: dict[str, tuple[float, float]] = {"small": (9.0, 11.0), "large": (14.5, 16.0)}
SIZE_THRESHOLD = 12.5  # bbox extent (px) separating small from large
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (8.5, 16.0),
    "right": (23.5, 16.0),
    "top": (16.0, 8.5),
    "bottom": (16.0, 23.5),
    "center": (16.0, 16.0),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
VOCABULARY: tuple[str, ...] = (
    tuple(COLORS) + SHAPES + tuple(SIZES) + tuple(POSITIONS)
    + ("a", "on", "the", "at", "in", "and", "background", "photo", "of")
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str
    # exact geometry in pixels (bbox extent and centre); None = the nominal value
    extent: Optional[float] = None
    center: Optional[tuple[float, float]] = None
    # a held-out concept's appearance (name in ``concepts.CONCEPTS``); None = flat colour
    appearance: Optional[str] = None

    def geometry(self) -> tuple[float, float, float]:
        s = self.extent if self.extent is not None else sum(SIZES[self.size]) / 2
        cx, cy = self.center if self.center is not None else POSITIONS[self.position]
        return s, cx, cy


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    def key(self) -> str:
        """Canonical attribute string (ignores exact geometry and object order)."""
        objs = sorted(f"{o.size} {o.color} {o.shape} {o.position}" for o in self.objects)
        return " | ".join(objs) + f" || {self.background}"


# --------------------------------------------------------------------------- shapes
def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(k: int = 60) -> list[tuple[float, float]]:
    pts = []
    for i in range(k):
        t = 2 * math.pi * i / k
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x, y))
    return pts


def _circle(k: int = 64) -> list[tuple[float, float]]:
    return [(math.cos(2 * math.pi * i / k), math.sin(2 * math.pi * i / k)) for i in range(k)]


def _normalise(pts: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale a polygon so its bbox is centred on 0 with max extent 1."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    ext = max(max(xs) - min(xs), max(ys) - min(ys))
    return [((x - cx) / ext, (y - cy) / ext) for x, y in pts]


_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "circle": _normalise(_circle()),
    "square": _normalise([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _normalise([(0, -1), (1, 0.732), (-1, 0.732)]),
    "star": _normalise(_star()),
    "heart": _normalise(_heart()),
}


def shape_polygon(shape: str, extent: float, cx: float, cy: float,
                  scale: float = 1.0, stretch: Optional[tuple[float, float]] = None) -> list[tuple[float, float]]:
    """Polygon (in pixels * ``scale``) of ``shape`` with bbox extent ``extent`` centred on (cx, cy).

    ``stretch=(w, h)`` instead fits the shape's bbox to w x h (non-uniform).
    """
    unit = _UNIT_POLYGONS[shape]
    if stretch is not None:
        xs, ys = [p[0] for p in unit], [p[1] for p in unit]
        uw, uh = max(xs) - min(xs), max(ys) - min(ys)
        sx, sy = stretch[0] / uw, stretch[1] / uh
    else:
        sx = sy = extent
    return [((cx + x * sx) * scale, (cy + y * sy) * scale) for x, y in unit]


def shape_mask(shape: str, extent: float, cx: float, cy: float, size: int = RESOLUTION,
               supersample: int = SUPERSAMPLE, stretch: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Antialiased coverage mask in [0, 1], shape (size, size)."""
    big = Image.new("L", (size * supersample, size * supersample), 0)
    ImageDraw.Draw(big).polygon(shape_polygon(shape, extent, cx, cy, supersample, stretch), fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------- rendering
TextureFn = Callable[[int, tuple[float, float, float, float]], Image.Image]


def render_scene(scene: Scene, resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> Image.Image:
    """Render ``scene`` as an RGB PIL image (``resolution`` px square, box-filtered from ``supersample``x)."""
    from .concepts import concept_texture  # local import: concepts depends on this module

    scale = supersample * resolution / RESOLUTION
    big_size = resolution * supersample
    canvas = Image.new("RGB", (big_size, big_size), COLORS[scene.background])
    for obj in scene.objects:
        s, cx, cy = obj.geometry()
        mask = Image.new("L", (big_size, big_size), 0)
        ImageDraw.Draw(mask).polygon(shape_polygon(obj.shape, s, cx, cy, scale), fill=255)
        if obj.appearance is None:
            fill = Image.new("RGB", (big_size, big_size), COLORS[obj.color])
        else:
            box = ((cx - s / 2) * scale, (cy - s / 2) * scale, (cx + s / 2) * scale, (cy + s / 2) * scale)
            fill = concept_texture(obj.appearance, big_size, box)
        canvas.paste(fill, (0, 0), mask)
    return canvas.resize((resolution, resolution), Image.BOX)


def concept_mask(scene: Scene, resolution: int = RESOLUTION, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The exact soft mask (8-bit L, antialiased like :func:`render_scene`) of the scene's held-out concept
    objects (those with an ``appearance``): what a zero-shot segmenter estimates for a real photo."""
    scale = supersample * resolution / RESOLUTION
    big = Image.new("L", (resolution * supersample,) * 2, 0)
    for obj in scene.objects:
        if obj.appearance is not None:
            s, cx, cy = obj.geometry()
            ImageDraw.Draw(big).polygon(shape_polygon(obj.shape, s, cx, cy, scale), fill=255)
    return big.resize((resolution, resolution), Image.BOX)


def render_array(scene: Scene) -> np.ndarray:
    """uint8 array (32, 32, 3)."""
    return np.asarray(render_scene(scene), dtype=np.uint8)


# --------------------------------------------------------------------------- captions
def object_phrase(obj: SceneObject, *, size: bool = True, color: bool = True, position: bool = True,
                  noun: Optional[str] = None) -> str:
    words = ["a"]
    if size:
        words.append(obj.size)
    if color:
        words.append(obj.color)
    words.append(noun or obj.shape)
    if position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def caption(scene: Scene, *, size: bool = True, color: bool = True, position: bool = True,
            background: bool = True, order: Optional[Sequence[int]] = None, prefix: str = "") -> str:
    """The caption stating every attribute (flags drop some, for caption variety)."""
    idx = list(order) if order is not None else list(range(len(scene.objects)))
    text = " and ".join(object_phrase(scene.objects[i], size=size, color=color, position=position) for i in idx)
    if background:
        text += f", on a {scene.background} background"
    return prefix + text


def is_held_out(scene: Scene, fraction: float = 0.1) -> bool:
    """Deterministic split: about ``fraction`` of attribute combinations never appear in training."""
    h = int(hashlib.sha1(scene.key().encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000


def sample_object(rng: random.Random, position: str, exclude_colors: Sequence[str] = (),
                  jitter_along: bool = True) -> SceneObject:
    shape = rng.choice(SHAPES)
    color = rng.choice([c for c in COLORS if c not in exclude_colors])
    size = rng.choice(tuple(SIZES))
    lo, hi = SIZES[size]
    extent = rng.uniform(lo, hi)
    ax, ay = POSITIONS[position]
    if jitter_along:
        dx, dy = rng.uniform(-1, 1), rng.uniform(-1, 1)
    else:  # two objects: jitter only across the axis joining them, to keep them apart
        if position in ("left", "right"):
            dx, dy = 0.0, rng.uniform(-1, 1)
        else:
            dx, dy = rng.uniform(-1, 1), 0.0
    return SceneObject(shape, color, size, position, extent=extent, center=(ax + dx, ay + dy))


def sample_scene(rng: random.Random, n_objects: Optional[int] = None, held_out: Optional[bool] = False,
                 max_tries: int = 1000) -> Scene:
    """A random scene. ``held_out``: False = training split only, True = held-out split only, None = any."""
    for _ in range(max_tries):
        bg = rng.choice(tuple(COLORS))
        n = n_objects if n_objects is not None else rng.choice((1, 2))
        if n == 1:
            objs = (sample_object(rng, rng.choice(tuple(POSITIONS)), exclude_colors=(bg,)),)
        else:
            pair = rng.choice(PAIRS)
            if rng.random() < 0.5:
                pair = pair[::-1]
            objs = tuple(sample_object(rng, p, exclude_colors=(bg,), jitter_along=False) for p in pair)
        scene = Scene(bg, objs)
        if held_out is None or is_held_out(scene) == held_out:
            return scene
    raise RuntimeError("could not sample a scene in the requested split")


def training_caption(scene: Scene, rng: random.Random) -> str:
    """Caption variety for training: mostly full captions, sometimes with attributes left out."""
    order = list(range(len(scene.objects)))
    rng.shuffle(order)
    if rng.random() < 0.75:
        return caption(scene, order=order)
    single = len(scene.objects) == 1
    return caption(
        scene,
        size=rng.random() < 0.5,
        color=rng.random() < 0.5,
        position=(rng.random() < 0.5) or not single,
        background=rng.random() < 0.5,
        order=order,
        prefix="a photo of " if rng.random() < 0.3 else "",
    )


def heldout_scenes(n: int, seed: int = 1234) -> list[Scene]:
    """``n`` deterministic scenes from the held-out split (for evaluation)."""
    rng = random.Random(seed)
    return [sample_scene(rng, held_out=True) for _ in range(n)]


def with_appearance(obj: SceneObject, appearance: Optional[str]) -> SceneObject:
    return replace(obj, appearance=appearance)
