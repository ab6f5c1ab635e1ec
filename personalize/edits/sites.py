"""Module wrappers at edit sites (cross-attention K/V, ``proj_out``).

A :class:`SiteWrapper` replaces a module in place, keeps it as ``base_layer``
and calls each occupant as ``out = occupant(wrapper, x, out)`` in a fixed,
documented order (occupants sorted by their ``order`` attribute, then by the
key they were registered under), so attach order never changes the result.
Occupants are not registered as sub-modules: the UNet's ``state_dict`` and
``parameters()`` stay those of the base model.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn


class SiteWrapper(nn.Module):
    """Wraps ``base_layer``; the output is the base output transformed by each occupant."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self._occupants: dict[str, Callable] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def occupants(self) -> list:
        return [self._occupants[k] for k in sorted(self._occupants, key=lambda k: (getattr(self._occupants[k], "order", 0), k))]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for occupant in self.occupants():
            out = occupant(self, x, out)
        return out


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def occupy(root: nn.Module, name: str, key: str, occupant: Callable) -> SiteWrapper:
    """Install (once) a wrapper at ``root.<name>`` and register ``occupant`` under ``key``."""
    parent, attr = _parent_and_attr(root, name)
    module = getattr(parent, attr)
    if not isinstance(module, SiteWrapper):
        module = SiteWrapper(module)
        setattr(parent, attr, module)
    if key in module._occupants:
        raise ValueError(f"site {name} already holds an occupant named {key!r}")
    module._occupants[key] = occupant
    return module


def vacate(root: nn.Module, name: str, key: str) -> None:
    """Remove ``key`` from the site; the last one out restores the original module object."""
    parent, attr = _parent_and_attr(root, name)
    module = getattr(parent, attr)
    if not isinstance(module, SiteWrapper):
        return
    module._occupants.pop(key, None)
    if not module._occupants:
        setattr(parent, attr, module.base_layer)


def site_occupant(root: nn.Module, name: str, key: str):
    """The occupant registered under ``key`` at ``root.<name>``, or None."""
    parent, attr = _parent_and_attr(root, name)
    module = getattr(parent, attr)
    return module._occupants.get(key) if isinstance(module, SiteWrapper) else None


def cross_attention_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, attention)`` for every cross-attention module of a diffusers UNet, in module order."""
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False):
            yield name, module
