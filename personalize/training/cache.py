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
    """Mean and std of the VAE posterior for each image in the denoiser's latent space: shifted by the VAE's shift
    factor (SD3's and Flux's VAEs; SD's have none) and scaled by its scaling factor, as the training scripts of
    each family do (``(latents - shift_factor) * scaling_factor``)."""
    means, stds = [], []
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    for start in range(0, images.shape[0], batch):
        dist = vae.encode(images[start : start + batch].to(vae.device, vae.dtype)).latent_dist
        means.append((dist.mean.float() - shift) * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


class LatentCache:
    """VAE latents of the training images and their mirror images, computed once per run.

    ``weights``: each image's sampling weight (``--repeats``), None = uniform; ``time_ids``: SDXL's add_time_ids of
    each row (the images, then their mirror images) where they are not those of an uncropped square (buckets)."""

    weights: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __init__(self, vae, images: torch.Tensor, masks: torch.Tensor | None, labels: torch.Tensor | None = None,
                 captions: Sequence[str | None] | None = None, weights: torch.Tensor | None = None,
                 time_ids: torch.Tensor | None = None):
        both = torch.cat([images, images.flip(-1)])
        self.mean, self.std = encode_latents(vae, both)
        self.n = images.shape[0]
        self.pixel_shape = tuple(images.shape[-2:])
        # per-image caption templates (``IMAGE.txt``), None where the method's templates apply
        self.captions = list(captions) if captions is not None and any(c is not None for c in captions) else None
        # which concept (multi-concept runs) or class prompt (prior images) each image belongs to
        self.labels = labels if labels is not None else torch.zeros(self.n, dtype=torch.long)
        self.weights = None if weights is None or bool((weights == weights[0]).all()) else weights.float()
        self.total_weight = float(self.n if weights is None else weights.sum())  # a bucket's share of the steps
        self.time_ids = time_ids
        self.masks = None
        if masks is not None:
            m = F.interpolate(masks, size=tuple(self.mean.shape[-2:]), mode="bilinear", align_corners=False)
            self.masks = torch.cat([m, m.flip(-1)])

    def draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        """``rows`` image indices: uniform, or in proportion to the sampling weights (with replacement)."""
        if self.weights is None:
            return torch.randint(self.n, (rows,), generator=generator)
        return torch.multinomial(self.weights, rows, replacement=True, generator=generator)

    def sample(self, idx: torch.Tensor, flip: torch.Tensor, generator: torch.Generator):
        rows = idx + flip.long() * self.n
        eps = torch.randn((rows.shape[0], *self.mean.shape[1:]), generator=generator)
        at = to_device(rows, self.mean.device)
        latents = self.mean[at] + self.std[at] * to_device(eps, self.mean.device)
        time_ids = self.time_ids[rows] if self.time_ids is not None else None
        return latents, (self.masks[rows] if self.masks is not None else None), time_ids


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
    time_ids: torch.Tensor | None = None  # SDXL's add_time_ids per row (buckets); None: an uncropped square


@dataclass(frozen=True)
class CaptionOptions:
    """What happens to a row's prompt before it is encoded (the defaults: nothing).

    ``dropout``: the probability that a photo row's prompt becomes the empty prompt "" (kohya sd-scripts'
    ``caption_dropout_rate``, diffusers' ``proportion_empty_prompts``); ``shuffle``: the comma-separated tags of
    the prompt template are put in a random order, the first ``keep`` of them staying in place (kohya's
    ``shuffle_caption`` / ``keep_tokens``). No tag is ever dropped: the one holding ``{}`` (the concept) stays."""

    dropout: float = 0.0
    shuffle: bool = False
    keep: int = 0


def shuffle_tags(template: str, keep: int, generator: torch.Generator) -> str:
    """``template``'s comma-separated tags, the first ``keep`` in place and the rest in a random order."""
    tags = [t.strip() for t in template.split(",")]
    rest = tags[keep:]
    if len(rest) < 2:
        return template
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(tags[:keep] + [rest[i] for i in order])


def draw_batch(cache, batch_size: int, flip_p: float, num_timesteps: int,
               placeholder: str | Sequence[str], generator: torch.Generator, device,
               templates: tuple[str, ...] = NEUTRAL_TEMPLATES, captions: CaptionOptions | None = None) -> Batch:
    """Everything random about one step, drawn in a fixed order from ``generator``.

    ``cache`` is a :class:`LatentCache` or a ``buckets.BucketedCache`` (whose bucket is drawn first: every row of a
    step has one shape). ``placeholder`` may be a list: the words of each label (concept) of ``cache``.
    ``captions``: dropout and tag shuffling of the prompts (their draws come last, only when enabled)."""
    if hasattr(cache, "pick"):
        cache = cache.pick(generator)
    idx = cache.draw(batch_size, generator)
    flip = torch.rand(batch_size, generator=generator) < flip_p
    if cache.captions is not None:  # a captioned image is never mirrored: its caption may say "left"
        flip &= torch.tensor([cache.captions[i] is None for i in idx.tolist()])
    latents, mask, time_ids = cache.sample(idx, flip, generator)
    noise = to_device(torch.randn(latents.shape, generator=generator), device)
    timesteps = to_device(torch.randint(num_timesteps, (batch_size,), generator=generator), device)
    which = torch.randint(len(templates), (batch_size,), generator=generator)
    words = [placeholder] if isinstance(placeholder, str) else list(placeholder)
    labels = cache.labels[idx].tolist() if len(words) > 1 else [0] * batch_size
    chosen = [templates[i] for i in which.tolist()]
    if cache.captions is not None:
        chosen = [t if cache.captions[i] is None else cache.captions[i] for t, i in zip(chosen, idx.tolist())]
    if captions is not None and captions.shuffle:
        chosen = [shuffle_tags(t, captions.keep, generator) for t in chosen]
    prompts = [fill(t, words[label]) for t, label in zip(chosen, labels)]
    if captions is not None and captions.dropout > 0:
        dropped = (torch.rand(batch_size, generator=generator) < captions.dropout).tolist()
        prompts = ["" if d else p for p, d in zip(prompts, dropped)]
    return Batch(to_device(latents, device), None if mask is None else to_device(mask, device), noise, timesteps,
                 prompts, None if time_ids is None else to_device(time_ids, device))
