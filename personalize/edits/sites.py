"""Module wrappers at edit sites (cross-attention K/V, ``proj_out``, the layers a LoRA covers).

A :class:`SiteWrapper` replaces a module in place, keeps it as ``base_layer``
and calls each occupant as ``out = occupant(wrapper, x, out)`` in a fixed,
documented order (occupants sorted by their ``order`` attribute, then by the
key they were registered under), so attach order never changes the result.
Occupants are not registered as sub-modules: the UNet's ``state_dict`` and
``parameters()`` stay those of the base model.

peft (and so diffusers' ``load_lora_weights``) must still be able to put its
LoRA layers on an occupied site. Its injection replaces the module at the
site's name with a tuner layer that keeps the module as ``base_layer`` and
decides what it can wrap by type and by walking ``base_layer`` chains. So the
wrapper of a Linear *is* an ``nn.Linear`` (of a Conv2d an ``nn.Conv2d``) to
that check, reads every attribute it does not have from the layer it wraps,
and always sits directly around the original layer, under any tuner layers:
``lora.Linear(base_layer=SiteWrapper(base_layer=Linear))`` whichever came
first. The stock LoRA's delta is then added to the output of our occupants.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class WrapsBaseLayer(nn.Module):
    """A module standing in for its ``base_layer``: an attribute it lacks is the wrapped layer's (weight, bias,
    in_features, kernel_size, padding_idx, ...), so code reading the layer it replaced keeps working."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def get_base_layer(self) -> nn.Module:
        """Itself: diffusers' ``unload_lora_weights`` replaces every module that has a ``base_layer`` by its
        ``get_base_layer()``; a site wrapper or token table is no LoRA layer and stays (see the module docstring)."""
        return self


class SiteWrapper(WrapsBaseLayer):
    """Wraps ``base_layer``; the output is the base output transformed by each occupant."""

    def __init__(self, base_layer: nn.Module):
        nn.Module.__init__(self)  # not the Linear/Conv2d constructors of the typed subclasses below
        self.base_layer = base_layer
        self._occupants: dict[str, Callable] = {}


    def occupants(self) -> list:
        return [self._occupants[k] for k in sorted(self._occupants, key=lambda k: (getattr(self._occupants[k], "order", 0), k))]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for occupant in self.occupants():
            out = occupant(self, x, out)
        return out

    def extra_repr(self) -> str:
        return f"occupants={sorted(self._occupants)}"


class LinearSite(SiteWrapper, nn.Linear):
    """The wrapper of an ``nn.Linear``: an ``nn.Linear`` to isinstance checks (peft's LoRA dispatch)."""


class Conv2dSite(SiteWrapper, nn.Conv2d):
    """The wrapper of an ``nn.Conv2d`` (SD 1.x ``proj_in``/``proj_out``)."""


def wrap(layer: nn.Module) -> SiteWrapper:
    """A wrapper around ``layer`` of the kind peft sees as ``layer``'s type."""
    for kind, cls in ((nn.Linear, LinearSite), (nn.Conv2d, Conv2dSite)):
        if isinstance(layer, kind):
            return cls(layer)
    return SiteWrapper(layer)


def inner_layer(module: nn.Module) -> nn.Module:
    """The original layer under any wrappers (ours and peft's tuner layers both keep it as ``base_layer``)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


def _site(root: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """``(holder, attribute, module)`` for the site ``root.<name>``: the wrapper if there is one, else the original
    layer, looked up under any tuner layers peft put at ``name``."""
    holder, attr = _parent_and_attr(root, name)
    module = getattr(holder, attr)
    while not isinstance(module, SiteWrapper) and isinstance(getattr(module, "base_layer", None), nn.Module):
        holder, attr, module = module, "base_layer", module.base_layer
    return holder, attr, module


def occupy(root: nn.Module, name: str, key: str, occupant: Callable) -> SiteWrapper:
    """Install (once) a wrapper at ``root.<name>`` and register ``occupant`` under ``key``."""
    holder, attr, module = _site(root, name)
    if not isinstance(module, SiteWrapper):
        module = wrap(module)
        setattr(holder, attr, module)
    if key in module._occupants:
        raise ValueError(f"site {name} already holds an occupant named {key!r}")
    module._occupants[key] = occupant
    return module


def vacate(root: nn.Module, name: str, key: str) -> None:
    """Remove ``key`` from the site; the last one out restores the original module object."""
    holder, attr, module = _site(root, name)
    if not isinstance(module, SiteWrapper):
        return
    module._occupants.pop(key, None)
    if not module._occupants:
        setattr(holder, attr, module.base_layer)


def site_occupant(root: nn.Module, name: str, key: str):
    """The occupant registered under ``key`` at ``root.<name>``, or None."""
    _, _, module = _site(root, name)
    return module._occupants.get(key) if isinstance(module, SiteWrapper) else None


def occupy_all(root: nn.Module, occupants: dict[str, Callable], key: str) -> None:
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


def prepare_compiled(root: nn.Module, dtypes, device) -> None:
    """Before ``root`` runs compiled: every occupant that has ``prepare_compiled(dtypes, device)`` makes, eagerly,
    the tensors its compiled form reads (its knob values as tensors that ``handle.set()`` updates in place, and
    any cached projection), so the traced graph takes them as inputs instead of baking Python values in."""
    for module in root.modules():
        if isinstance(module, SiteWrapper):
            for occupant in module.occupants():
                prepare = getattr(occupant, "prepare_compiled", None)
                if prepare is not None:
                    prepare(tuple(dtypes), torch.device(device))


def release_compiled(root: nn.Module) -> None:
    """After ``root`` ran compiled: every occupant that has ``release_compiled()`` goes back to its eager state
    (Residuals: the attention maps captured only while LAG is on)."""
    for module in root.modules():
        if isinstance(module, SiteWrapper):
            for occupant in module.occupants():
                release = getattr(occupant, "release_compiled", None)
                if release is not None:
                    release()
