"""The training data of a run: VAE latents cached once, and each step's random batch drawn from them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..templates import NEUTRAL_TEMPLATES, fill
from ..transfer import to_device


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for each image, already scaled by the VAE's scaling factor."""
    means, stds = [], []
    scale = vae.config.scaling_factor
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start : start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """VAE latents of the training images and their mirror images, computed once per run."""

    def __init__(self, vae, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor | None = None,
                 captions: Sequence[str | None] | None = None):
        both = torch.cat([images, images.flip(-1)])
        self.mean, self.std = encode_latents(vae, both)
        self.n = images.shape[0]
        # per-image caption templates (``IMAGE.txt``), None where the method's templates apply
        self.captions = list(captions) if captions is not None and any(c is not None for c in captions) else None
        # which concept (multi-concept runs) or class prompt (prior images) each image belongs to
        self.labels = labels if labels is not None else torch.zeros(self.n, dtype=torch.long)
        self.masks = None
        if masks is not None:
            size = self.mean.shape[-1]
            m = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
            self.masks = torch.cat([m, m.flip(-1)])

    def sample(self, idx: torch.Tensor, flip: torch.Tensor, generator: torch.Generator):
        rows = idx + flip.long() * self.n
        eps = torch.randn((rows.shape[0], *self.mean.shape[1:]), generator=generator)
        at = to_device(rows, self.mean.device)
        latents = self.mean[at] + self.std[at] * to_device(eps, self.mean.device)
        return latents, (self.masks[rows] if self.masks is not None else None)



@dataclass
class PriorData:
    cache: "LatentCache"
    prompts: list[str]  # the class prompt of each label
    weight: float



@dataclass
class Batch:
    latents: torch.Tensor
    mask: torch.Tensor | None
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]


def draw_batch(cache: "LatentCache", batch_size: int, flip_p: float, num_timesteps: int,
               placeholder: str | Sequence[str], generator: torch.Generator, device,
               templates: tuple[str, ...] = NEUTRAL_TEMPLATES) -> Batch:
    """Everything random about one step, drawn in a fixed order from ``generator``.

    ``placeholder`` may be a list: the words of each label (concept) of ``cache``."""
    idx = torch.randint(cache.n, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < flip_p
    if cache.captions is not None:  # a captioned image is never mirrored: its caption may say "left"
        flip &= torch.tensor([cache.captions[i] is None for i in idx.tolist()])
    latents, mask = cache.sample(idx, flip, generator)
    noise = to_device(torch.randn(latents.shape, generator=generator), device)
    timesteps = to_device(torch.randint(num_timesteps, (batch_size,), generator=generator), device)
    which = torch.randint(len(templates), (batch_size,), generator=generator)
    words = [placeholder] if isinstance(placeholder, str) else list(placeholder)
    labels = cache.labels[idx].tolist() if len(words) > 1 else [0] * batch_size
    prompts = [fill(templates[i], words[label]) for i, label in zip(which.tolist(), labels)]
    if cache.captions is not None:
        prompts = [p if cache.captions[i] is None else fill(cache.captions[i], words[label])
                   for p, i, label in zip(prompts, idx.tolist(), labels)]
    return Batch(to_device(latents, device), None if mask is None else to_device(mask, device), noise, timesteps,
                 prompts)
