"""One training step's loss: encode the prompts, noise the latents, predict, compare (optionally mask-weighted)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from .. import families, text_stack
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

    With a ``prior`` batch (class images, prior preservation) the loss is ``loss(batch) + prior_weight *
    loss(prior)``; both go through one UNet pass when their images have one size (always, without buckets), else
    through one pass each. ``unet``: the module to call instead of ``pipe.unet`` (its compiled form); ``texts``:
    encodings kept per prompt (when nothing trained acts on the text path); ``rows(n)``: the slice of an n-row
    batch part this process trains on (data parallel: the prompts of the whole batch are still encoded, so the
    method's text hook sees the same rows in every process)."""
    n = batch.latents.shape[0]
    parts = [batch] if prior is None else [batch, prior]
    prompts = [p for part in parts for p in part.prompts]
    ids = [to_device(i, batch.latents.device) for i in text_stack.tokenize(pipe, prompts)]
    encoding = text_stack.encode_ids(pipe, ids) if texts is None else texts.encode(pipe, prompts, ids)
    hidden, pooled = encoding.context, encoding.pooled
    method.on_text_encoded(encoding.ids, hidden)
    mine = rows(n) if rows is not None else slice(0, n)  # this process's rows of the photos (and class images)
    starts = [0, n]  # where each part's rows begin in the encoded prompts
    pieces = [_Rows(part.latents[mine], part.noise[mine], part.timesteps[mine],
                    hidden[start:start + len(part.prompts)][mine],
                    None if pooled is None else pooled[start:start + len(part.prompts)][mine],
                    None if part.time_ids is None else part.time_ids[mine]) for start, part in zip(starts, parts)]
    mask = batch.mask if batch.mask is None or rows is None else batch.mask[mine]
    m = pieces[0].latents.shape[0]
    if len(pieces) == 2 and pieces[0].latents.shape[1:] == pieces[1].latents.shape[1:]:
        pred, target = _predict(pipe, scheduler, unet, _Rows.join(pieces))
        preds, targets = [pred[:m], pred[m:]], [target[:m], target[m:]]
    else:
        preds, targets = zip(*(_predict(pipe, scheduler, unet, piece) for piece in pieces))
    loss = denoising_loss(preds[0], targets[0], mask)
    if prior is None:
        return loss
    return loss + prior_weight * denoising_loss(preds[1], targets[1], None)


@dataclass
class _Rows:
    """The rows of one UNet pass."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    hidden: torch.Tensor
    pooled: torch.Tensor | None
    time_ids: torch.Tensor | None

    @staticmethod
    def join(pieces: list["_Rows"]) -> "_Rows":
        cat = lambda *ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
        return _Rows(*(cat(*(getattr(p, f.name) for p in pieces)) for f in dataclasses.fields(_Rows)))


def _predict(pipe, scheduler, unet, r: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's prediction for ``r.latents`` noised at the drawn steps, and its target (the family decides
    both: ε or v for the DDPM families, the flow-matching velocity for the flow families)."""
    family = families.of(pipe)
    noised = family.noised(scheduler, r.latents, r.noise, r.timesteps)
    pred = family.predict(pipe, family.denoiser_of(pipe) if unet is None else unet, noised, r.hidden, r.pooled,
                          r.time_ids)
    if noised.weight is not None:
        return pred * noised.weight.sqrt(), noised.target * noised.weight.sqrt()
    return pred, noised.target
