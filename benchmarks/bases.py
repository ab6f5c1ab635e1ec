"""The bases a benchmark can run on: the built-in random miniatures (CPU) and real-size random shapes (GPU).

``tiny``, ``tiny-sd2``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``: ``load_base`` (the built-in miniatures).
``sd15``, ``sd21``, ``sdxl``: ``personalize.sd_shapes.pipeline`` (SD 1.5, SD 2.1, SDXL base 1.0 shapes with random
weights, the real tokenizers), at their native 512/768/1024 px; ``flux`` (Flux.1-dev) and ``sd3`` (SD3.5-medium):
``personalize.dit_shapes.pipeline``, random weights in the published shapes. Meant for a GPU. Each real-size shape
has a miniature twin of its family, which is what a dry run on the CPU uses instead.
"""
from __future__ import annotations

TINY = ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-flux", "tiny-sd3")
REAL = ("sd15", "sd21", "sdxl", "flux", "sd3")
TWIN = dict(zip(REAL, TINY))
DIT_SHAPES = {"flux": "flux-dev", "sd3": "sd35-medium"}  # personalize.dit_shapes names


def build(name: str, device: str = "cpu", dtype=None):
    """The pipeline called ``name`` (one of :data:`TINY` or :data:`REAL`) on ``device``."""
    if name in TINY:
        from personalize.base import load_base

        return load_base(name, device=device, dtype=dtype)
    if name in DIT_SHAPES:
        from personalize.dit_shapes import pipeline

        return pipeline(DIT_SHAPES[name], device, dtype)
    if name in REAL:
        from personalize.sd_shapes import pipeline

        return pipeline(name, device, dtype)
    raise ValueError(f"unknown base {name!r}; known: {', '.join(TINY + REAL)}")


def parse(spec: str) -> list[str]:
    """A comma-separated ``--base`` value, each name checked."""
    names = [s for s in spec.split(",") if s]
    unknown = [n for n in names if n not in TINY + REAL]
    if unknown or not names:
        raise SystemExit(f"--base: unknown {', '.join(unknown) or 'nothing given'}; known: {', '.join(TINY + REAL)}")
    return names
