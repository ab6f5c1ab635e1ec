"""The toy base's training data: every step's batch derived from (seed, phase, step) alone.

Phase 1 (VAE) sees world scenes plus generic full-frame textures; phase 2 (text encoder + UNet) sees world
scenes with training captions (10 % dropped), their noise and timesteps.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from ..datasets.toyworld.world import COLORS, render_array, sample_scene, training_caption


def generic_texture(rng: random.Random, size: int = 32, supersample: int = 4) -> np.ndarray:
    """A full-frame generic pattern (stripes / checks / dots / blobs, random colours) for VAE training only."""
    from PIL import Image, ImageDraw

    big = size * supersample

    def col():
        if rng.random() < 0.5:
            return rng.choice(list(COLORS.values()) + [(20, 20, 20), (240, 130, 30), (240, 150, 190)])
        return tuple(rng.randrange(256) for _ in range(3))

    img = Image.new("RGB", (big, big), col())
    d = ImageDraw.Draw(img)
    kind = rng.randrange(4)
    period = rng.uniform(3, 9) * supersample
    c2 = col()
    if kind == 0:  # stripes, random angle
        ang = rng.choice([0, 90, rng.uniform(0, 180)])
        layer = Image.new("RGB", (big * 2, big * 2), img.getpixel((0, 0)))
        dl = ImageDraw.Draw(layer)
        x = rng.uniform(0, period)
        while x < 2 * big:
            dl.rectangle((x, 0, x + period / 2, 2 * big), fill=c2)
            x += period
        layer = layer.rotate(ang, resample=Image.BILINEAR)
        img = layer.crop((big // 2, big // 2, big // 2 + big, big // 2 + big))
    elif kind == 1:  # checks
        off = rng.uniform(0, period)
        n = int(big / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2:
                    d.rectangle((off + i * period, off + j * period, off + (i + 1) * period, off + (j + 1) * period), fill=c2)
    elif kind == 2:  # dots
        r = period * rng.uniform(0.2, 0.4)
        off = rng.uniform(0, period)
        n = int(big / period) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                cx, cy = off + i * period, off + j * period
                d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=c2)
    else:  # random blobs / polygons / arcs
        for _ in range(rng.randint(2, 8)):
            x0, y0 = rng.uniform(-10, big), rng.uniform(-10, big)
            w = rng.uniform(2, 16) * supersample
            shape = rng.randrange(3)
            if shape == 0:
                d.ellipse((x0, y0, x0 + w, y0 + w * rng.uniform(0.5, 1.5)), fill=col())
            elif shape == 1:
                pts = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, w)) for _ in range(rng.randint(3, 6))]
                d.polygon(pts, fill=col())
            else:
                d.arc((x0, y0, x0 + w, y0 + w), rng.uniform(0, 360), rng.uniform(0, 360), fill=col(),
                      width=int(rng.uniform(1, 3) * supersample))
    return np.asarray(img.resize((size, size), Image.BOX), dtype=np.uint8)


def to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def vae_batch(seed: int, step: int, batch: int, texture_fraction: float) -> torch.Tensor:
    rng = random.Random(f"{seed}:vae:{step}")
    arrays = []
    for _ in range(batch):
        if rng.random() < texture_fraction:
            arrays.append(generic_texture(rng))
        else:
            arrays.append(render_array(sample_scene(rng, held_out=False)))
    return to_tensor(arrays)


class CaptionIds:
    """Caches tokenizer ids (SD pipeline tokenization: pad to 77 with <|endoftext|>, no attention mask)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        out = []
        for c in captions:
            ids = self.cache.get(c)
            if ids is None:
                ids = self.tok(c, padding="max_length", max_length=self.tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids[0]
                if len(self.cache) < 200_000:
                    self.cache[c] = ids
            out.append(ids)
        return torch.stack(out)


def unet_batch(seed: int, step: int, batch: int, dropout: float) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(f"{seed}:unet:{step}")
    arrays, caps = [], []
    for _ in range(batch):
        scene = sample_scene(rng, held_out=False)
        arrays.append(render_array(scene))
        cap = training_caption(scene, rng)
        caps.append("" if rng.random() < dropout else cap)
    return to_tensor(arrays), caps


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` = that step's whole batch (renders, token ids, noise, timesteps), derived from
    ``(seed, phase, step)`` alone: a DataLoader's worker processes can render ahead without changing a
    single number, and a resumed run sees exactly the data an uninterrupted one would."""

    def __init__(self, args, phase: str, tokenizer=None, num_timesteps: int = 1000, latent_shape=(4, 16, 16)):
        self.args, self.phase, self.num_timesteps, self.latent_shape = args, phase, num_timesteps, latent_shape
        self.ids_of = CaptionIds(tokenizer) if tokenizer is not None else None

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int) -> dict:
        a = self.args
        if self.phase == "vae":
            x = vae_batch(a.seed, step, a.vae_batch, a.texture_fraction)
            gen = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
            return {"x": x, "eps_post": torch.randn((x.shape[0], *self.latent_shape), generator=gen)}
        x, caps = unet_batch(a.seed, step, a.batch, a.caption_dropout)
        gen = torch.Generator().manual_seed(a.seed * 1_000_003 + 500_000 + step)
        shape = (x.shape[0], *self.latent_shape)
        eps_post = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), generator=gen)
        return {"x": x, "ids": self.ids_of(caps), "eps_post": eps_post, "noise": noise, "t": t}


def step_loader(dataset: StepBatches, start: int, workers: int):
    """Batches for steps start, start+1, ... in order (``workers`` processes render ahead)."""
    sampler = range(start, 1 << 40)
    if workers <= 0:
        return (dataset[i] for i in sampler)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                            prefetch_factor=4, persistent_workers=False,
                                            pin_memory=torch.cuda.is_available()))
