"""What a run leaves along the way: sample images every ``validation_every`` steps (``OUT.samples/``) and
intermediate concepts every ``save_every`` steps (``OUT.steps/``).

Sample images come from their own seeded generators inside ``torch.random.fork_rng``, so sampling never changes
the training trajectory; each step's folder is laid out like ``generate``'s output (PNGs named
``<prompt index>-<prompt slug>_<seed>.png`` and ``prompts.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..templates import fill

SAMPLE_STEPS = 25  # sampler steps of a sample image (as the previews and the validators)
SAMPLE_GUIDANCE = 6.0


def samples_dir(out: str | Path) -> Path:
    """Where the sample images of the run writing ``out`` go (``OUT.samples/``)."""
    out = Path(out)
    return out.with_name(out.name + ".samples")


def steps_dir(out: str | Path) -> Path:
    """Where the intermediate concepts of the run writing ``out`` go (``OUT.steps/``)."""
    out = Path(out)
    return out.with_name(out.name + ".steps")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def step_concept(out: str | Path, step: int) -> Path:
    """The intermediate concept file of ``step``: ``OUT.steps/step-NNNNNN.safetensors``."""
    return steps_dir(out) / f"{step_name(step)}.safetensors"


def sample_prompts(templates: Sequence[str], placeholders: Sequence[str]) -> list[str]:
    """Each template filled with each concept's placeholder (a template without ``{}`` is used as written, once)."""
    prompts: list[str] = []
    for template in templates:
        for placeholder in (placeholders if "{}" in template else placeholders[:1]):
            prompts.append(fill(template, placeholder))
    return prompts


@torch.no_grad()
def write_samples(pipe, out: str | Path, step: int, prompts: Sequence[str], seed: int) -> dict[str, object]:
    """One image per prompt into ``OUT.samples/step-NNNNNN/``; returns ``{tag: image}`` for the tracker."""
    from ..generation import generate, slug, write_images

    folder = samples_dir(out) / step_name(step)
    tagged = {}
    device = torch.device(getattr(pipe, "device", "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, prompt in enumerate(prompts):
            (image,) = generate(pipe, prompt, num_images=1, steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE, seed=seed)
            write_images([image], prompt, folder, seed, prefix=f"{i:02d}-")
            tagged[f"samples/{i:02d}-{slug(prompt)}"] = image
    return tagged
