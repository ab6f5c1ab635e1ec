"""One training step's loss: encode the prompts, noise the latents, predict, compare (optionally mask-weighted)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import text_stack
from ..transfer import to_device
from .cache import Batch
from .fast_path import TextCache


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    weight = mask.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)



def denoising_step(pipe, scheduler, method, batch: Batch, prior: Batch | None = None,
                   prior_weight: float = 0.0, unet=None, texts: "TextCache | None" = None,
                   rows: Callable[[int], slice] | None = None) -> torch.Tensor:
    """Encode the prompts (method hook), noise the latents, predict, and return the loss.

    With a ``prior`` batch (class images, prior preservation) both go through one UNet pass and the loss is
    ``loss(batch) + prior_weight * loss(prior)``. ``unet``: the module to call instead of ``pipe.unet`` (its
    compiled form); ``texts``: encodings kept per prompt (when nothing trained acts on the text path);
    ``rows(n)``: the slice of an n-row batch part this process trains on (data parallel: the prompts of the whole
    batch are still encoded, so the method's text hook sees the same rows in every process)."""
    n = batch.latents.shape[0]
    if prior is not None:
        batch = Batch(torch.cat([batch.latents, prior.latents]), batch.mask, torch.cat([batch.noise, prior.noise]),
                      torch.cat([batch.timesteps, prior.timesteps]), batch.prompts + prior.prompts)
    ids = [to_device(i, batch.latents.device) for i in text_stack.tokenize(pipe, batch.prompts)]
    encoding = text_stack.encode_ids(pipe, ids) if texts is None else texts.encode(pipe, batch.prompts, ids)
    hidden, pooled = encoding.context, encoding.pooled
    method.on_text_encoded(encoding.ids, hidden)
    mask = batch.mask
    if rows is not None and rows(n) != slice(0, n):  # this process's rows of the photos (and of the class images)
        mine = torch.arange(batch.latents.shape[0])
        mine = torch.cat([mine[:n][rows(n)], mine[n:][rows(n)]]) if prior is not None else mine[rows(n)]
        mine = to_device(mine, batch.latents.device)
        batch = Batch(batch.latents[mine], None, batch.noise[mine], batch.timesteps[mine], [])
        hidden = hidden[mine]
        pooled = None if pooled is None else pooled[mine]
        mask = None if mask is None else mask[rows(n)]
        n = len(range(n)[rows(n)])
    noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    size = batch.latents.shape[-1] * pipe.vae_scale_factor
    extra = text_stack.unet_kwargs(pipe, pooled, batch.latents.shape[-2] * pipe.vae_scale_factor, size)
    pred = (pipe.unet if unet is None else unet)(noisy, batch.timesteps, hidden, **extra).sample
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps)
    else:
        target = batch.noise
    if prior is None:
        return denoising_loss(pred, target, mask)
    return denoising_loss(pred[:n], target[:n], mask) + prior_weight * denoising_loss(pred[n:], target[n:], None)
