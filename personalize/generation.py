"""Sampling images and writing them in the evaluator's folder layout.

A generation folder holds PNGs and ``prompts.json`` (file stem -> prompt), the
layout the evaluators read.
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from . import text_stack
from .base import resolution as resolution_of
from .errors import BadInputError
from .families import denoiser
from .edits.sites import prepare_compiled, release_compiled
from .paths import atomic_path, inside, use_compile_cache
from .prompts import check_prompt_length, check_prompt_text, read_prompts


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int = 1, steps: int = 50, guidance: float = 6.0, seed: int = 0,
             negative_prompt: str | None = None, on_step: Optional[Callable[[int], None]] = None,
             resolution: int = 0, compile: bool = False) -> list:
    """``num_images`` PIL images; image k uses seed ``seed + k`` so any single image can be reproduced.

    An empty prompt, or one longer than the text encoder reads, is refused (``personalize/prompts.py``).
    ``on_step(n)`` is called after each of the ``steps`` denoising steps (n = 1..steps). ``resolution``: the
    square image size in pixels (0: the base's native size; else a multiple of the UNet's stride,
    :func:`personalize.base.resolution`). ``compile=True`` runs the denoiser compiled (:func:`compiled_denoiser`):
    minutes of compiling on the first call, faster steps after; the same images up to float rounding."""
    check_prompt_text(prompt, "prompt")
    check_prompt_length(pipe, prompt, "prompt")
    size = resolution_of(pipe, resolution, "resolution")
    check_steps(pipe, steps, "steps")
    device = denoiser(pipe).device
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(seed + k) for k in range(num_images)]
    extra = {}
    if on_step is not None:
        def step_end(_pipe, i, _t, tensors):
            on_step(i + 1)
            return tensors

        extra["callback_on_step_end"] = step_end
    with compiled_denoiser(pipe) if compile else contextlib.nullcontext():
        return pipe(
            prompt, num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance,
            generator=generators, negative_prompt=negative_prompt, output_type="pil", height=size, width=size,
            **extra,
        ).images


@contextlib.contextmanager
def compiled_denoiser(pipe, backend: str | Callable = "inductor", mode: str | None = None):
    """Inside the block, the pipeline's denoiser (UNet or transformer) runs ``torch.compile``d, with whatever
    concepts are attached; on leaving it runs eagerly again.

    Knob changes do not recompile: before compiling, every attached edit makes the tensors its compiled form
    reads (``edits.sites.prepare_compiled``: Perfusion's projection and its beta/tau/gate as tensors,
    DreamBooth-LoRA's scale, Residuals' lag as 0/1), which ``handle.set()`` then updates in place. A compiled
    denoiser captures every Residuals concept's attention maps, LAG on or off, so switching LAG changes no
    graph (what that costs with LAG off is in docs/PERFORMANCE.md); on leaving the block the capture follows
    ``lag`` again. What changes the graph's structure does recompile: attaching or detaching a concept,
    Perfusion's ``lock`` (global key-locking adds a hook at the K projections), another batch size or resolution.
    The compiled function is made once per denoiser and backend and kept (so dynamo's cache of it is reused by
    later blocks), and torch's compile caches are kept across runs (:func:`personalize.paths.use_compile_cache`).
    ``backend``/``mode``: ``torch.compile``'s (e.g. ``backend="eager"`` in tests: traced, no code generated)."""
    use_compile_cache()
    module = denoiser(pipe)
    # K/V sites read the text encoders' dtype
    dtypes = {module.dtype, *(encoder.dtype for encoder in text_stack.encoders(pipe))}
    prepare_compiled(module, sorted(dtypes, key=str), module.device)
    kept = getattr(module, "_personalize_compiled", None)  # ((backend, mode), compiled forward), kept on the module
    if kept is None or kept[0] != (backend, mode):
        kept = ((backend, mode), torch.compile(type(module).forward.__get__(module), backend=backend, mode=mode))
        module._personalize_compiled = kept
    # forward compiled, the denoiser's own hooks eager: what they do per call (LAG's prompt plan, the global key
    # lock's token rows) reads token ids on the host, which a trace would bake in or break on
    before = module.__dict__.get("forward")
    module.forward = kept[1]
    try:
        yield module
    finally:
        if before is None:
            del module.forward
        else:
            module.forward = before
        release_compiled(module)


def check_steps(pipe, steps: int, flag: str = "--steps") -> int:
    """``steps`` if the base's scheduler can sample that many (1 to its training timesteps, 1000 for SD), else a
    one-line BadInputError (diffusers raises a ValueError from inside the pipeline call)."""
    limit = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limit:
        raise BadInputError(f"{flag} {steps!r}: the base's scheduler samples 1 to {limit} steps (its training "
                            "timesteps); use e.g. 50 (Perfusion paper)")
    return steps


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def image_paths(prompt: str, out: str | Path, seed: int, num_images: int, prefix: str = "") -> list[Path]:
    """Where :func:`write_images` puts ``num_images`` images of ``prompt``: ``<prefix><prompt-slug>_<seed+k>.png``."""
    return [inside(out, f"{prefix}{slug(prompt)}_{seed + k}.png") for k in range(num_images)]


def write_images(images: list, prompt: str, out: str | Path, seed: int, prefix: str = "") -> list[Path]:
    """Write PNGs atomically as ``<prefix><prompt-slug>_<seed>.png`` and merge ``prompts.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.json"
    mapping = read_prompts(prompts_file) if prompts_file.exists() else {}
    paths = image_paths(prompt, out, seed, len(images), prefix)
    for image, path in zip(images, paths):
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        mapping[path.stem] = prompt
    with atomic_path(prompts_file) as tmp:
        tmp.write_text(json.dumps(mapping, indent=2, sort_keys=True))
    return paths
