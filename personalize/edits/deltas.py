"""Additive occupants for module sites: ``out + delta(x)``.

- :class:`WeightDelta`: ``x dW^T`` with dW (d_out, d_in), a Parameter owned by
  the method (Custom Diffusion's K/V deltas over the base weights).
  ``detach_first`` stops the gradient through sequence position 0 (the BOS
  token), as Custom Diffusion's reference does; the forward value is unchanged.
- LoRA occupants (DreamBooth-LoRA) use the same order with peft layers.

Additive occupants run after Perfusion's edit (``ADDITIVE_ORDER`` 10 > 0),
which replaces ``W e`` and must see the base output first.
"""
from __future__ import annotations

import torch
from torch import nn

ADDITIVE_ORDER = 10


class WeightDelta:
    order = ADDITIVE_ORDER

    def __init__(self, delta: torch.Tensor, detach_first: bool = False):
        self.delta, self.detach_first = delta, detach_first

    def __call__(self, wrapper: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        d = x @ self.delta.to(x.dtype).mT
        if self.detach_first and d.ndim == 3 and d.requires_grad:
            d = torch.cat([d[:, :1].detach(), d[:, 1:]], dim=1)
        return out + d
