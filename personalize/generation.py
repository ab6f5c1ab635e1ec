"""Sampling images and writing them in the evaluator's folder layout.

A generation folder holds PNGs and ``prompts.json`` (file stem -> prompt), the
layout the evaluators read.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .paths import atomic_path, inside


@torch.no_grad()
def generate(pipe, prompt: str, num_images: int = 1, steps: int = 50, guidance: float = 6.0, seed: int = 0,
             negative_prompt: str | None = None) -> list:
    """``num_images`` PIL images; image k uses seed ``seed + k`` so any single image can be reproduced."""
    device = pipe.unet.device
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(gen_device).manual_seed(seed + k) for k in range(num_images)]
    return pipe(
        prompt, num_images_per_prompt=num_images, num_inference_steps=steps, guidance_scale=guidance,
        generator=generators, negative_prompt=negative_prompt, output_type="pil",
    ).images


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def write_images(images: list, prompt: str, out: str | Path, seed: int, prefix: str = "") -> list[Path]:
    """Write PNGs atomically as ``<prefix><prompt-slug>_<seed>.png`` and merge ``prompts.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.json"
    mapping = json.loads(prompts_file.read_text()) if prompts_file.exists() else {}
    paths = []
    for k, image in enumerate(images):
        stem = f"{prefix}{slug(prompt)}_{seed + k}"
        path = inside(out, f"{stem}.png")
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        mapping[stem] = prompt
        paths.append(path)
    with atomic_path(prompts_file) as tmp:
        tmp.write_text(json.dumps(mapping, indent=2, sort_keys=True))
    return paths
