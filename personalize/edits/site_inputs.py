"""What the layers at some sites read during one denoiser call, on the base model.

Perfusion on a diffusion transformer (``methods/perfusion.py``, docs/PERFUSION_DIT.md) needs, per joint block,
the text-stream input of ``add_k_proj`` (the normed, timestep-modulated text hidden state, which after the first
block has attended to the image): its covariance over a caption corpus and its value at the superclass word.
Those are statistics of the *base*, whatever is attached:

- :func:`bare` sets every occupant of every site wrapper under a module aside for the duration (the wrappers
  then compute their base layer alone) and puts them back, the same objects in the same order;
- :func:`captured` records the first positional input of the named modules (forward pre-hooks, nothing
  replaced) and, with ``stop``, ends the call after the last of them has been read, so that the blocks after
  the last site (Flux's single-stream blocks) are not run.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .sites import SiteWrapper


class _Enough(Exception):
    """Raised by the last capture hook to end the denoiser call early."""


@contextmanager
def bare(root: nn.Module) -> Iterator[None]:
    """Every :class:`SiteWrapper` under ``root`` runs its base layer alone while inside."""
    stashed = [(m, m._occupants) for m in root.modules() if isinstance(m, SiteWrapper) and m._occupants]
    for module, _ in stashed:
        module._occupants = {}
    try:
        yield
    finally:
        for module, occupants in stashed:
            module._occupants = occupants


@contextmanager
def captured(root: nn.Module, names: list[str], stop: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """``{name: the input of root.<name>}`` filled by the call(s) made inside (the last call's input); with
    ``stop`` the call ends (quietly) once the last name has been read."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name, last):
        def record(module, args):
            seen[name] = args[0].detach()
            if stop and last:
                raise _Enough

        return record

    handles = [root.get_submodule(name).register_forward_pre_hook(hook(name, i == len(names) - 1))
               for i, name in enumerate(names)]
    try:
        yield seen
    except _Enough:
        pass
    finally:
        for handle in handles:
            handle.remove()
