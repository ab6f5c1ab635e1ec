"""Additive occupants for module sites: ``out + delta(x)``.

- :class:`WeightDelta`: ``x dW^T`` with dW (d_out, d_in), a Parameter owned by
  the method (Custom Diffusion's K/V deltas over the base weights).
  ``detach_first`` stops the gradient through sequence position 0 (the BOS
  token), as Custom Diffusion's reference does; the forward value is unchanged.
- LoRA occupants (DreamBooth-LoRA) use the same order with peft layers.

Additive occupants run after Perfusion's edit (``ADDITIVE_ORDER`` 10 > 0),
which replaces ``W e`` and must see the base output first. :func:`occupy_all` / :func:`vacate_all` install
and remove one method's occupants at many sites at once.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .sites import occupy, vacate

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


def occupy_all(root: nn.Module, occupants: Mapping[str, Callable], key: str) -> None:
    """Register each ``occupants[site name]`` under ``key``; on failure, undo the ones already placed."""
    placed = []
    try:
        for name, occupant in occupants.items():
            occupy(root, name, key, occupant)
            placed.append(name)
    except BaseException:
        vacate_all(root, placed, key)
        raise


def vacate_all(root: nn.Module, names, key: str) -> None:
    for name in names:
        vacate(root, name, key)


def linear_sites(root: nn.Module, suffixes: tuple[str, ...], within: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the Linear modules (wrapped or not, by us or by peft) called one of ``suffixes`` inside the modules
    of ``root`` for which ``within`` holds (e.g. diffusers ``Attention``), in module order."""
    from .sites import inner_layer

    scopes = [(n, m) for n, m in root.named_modules() if within(m)]
    names = []
    for scope, module in scopes:
        for sub, child in module.named_modules():
            if not sub or "base_layer" in sub.split("."):
                continue
            if isinstance(inner_layer(child), nn.Linear) and any(sub == s or sub.endswith("." + s) for s in suffixes):
                names.append(f"{scope}.{sub}" if scope else sub)
    return list(dict.fromkeys(names))
