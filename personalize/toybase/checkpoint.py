"""The toy base's training checkpoint: ``DIR/checkpoint/`` holding ``state.safetensors`` + ``state.json``.

The safetensors file holds every tensor (VAE, UNet, text encoder, their EMA copies, both optimizers' state
flattened as :mod:`personalize.checkpoints` does it, the torch RNG state); the JSON sidecar holds the rest
(phase, step, training seconds, latent scaling factor, architecture, recipe settings, optimizer scalars and
param groups). The folder is replaced atomically, so a reader never sees one file of one checkpoint beside the
other of another. Nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints import load_optimizer, optimizer_tensors
from ..errors import CheckpointError
from ..paths import atomic_dir

CKPT = "checkpoint"
TENSORS = "state.safetensors"
SIDECAR = "state.json"
MODULES = ("vae", "unet", "te", "ema_unet", "ema_te")
OPTIMIZERS = ("vae_opt", "opt")


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir).expanduser() / CKPT


def has_checkpoint(run_dir) -> bool:
    path = checkpoint_path(run_dir)
    return (path / TENSORS).is_file() and (path / SIDECAR).is_file()


def save(run_dir, *, state: dict, modules: dict[str, dict[str, torch.Tensor]], optimizers: dict) -> Path:
    """Write ``modules`` (name -> state dict), ``optimizers`` (name -> optimizer) and the JSON-able ``state``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, sd in modules.items():
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in sd.items()})
    meta = dict(state, optimizers={})
    for name, opt in optimizers.items():
        t, m = optimizer_tensors(opt, prefix=f"{name}.")
        tensors.update(t)
        meta["optimizers"][name] = m
    tensors["torch_rng"] = torch.get_rng_state()
    path = checkpoint_path(run_dir)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / SIDECAR).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def read(run_dir) -> dict:
    """The checkpoint as a dict: the sidecar's fields, each module's state dict under its name, ``tensors``
    (everything, for :func:`load_optimizers`) and ``torch_rng``."""
    from safetensors.torch import load_file

    path = checkpoint_path(run_dir)
    if not has_checkpoint(run_dir):
        old = Path(run_dir).expanduser() / "checkpoint.pt"
        hint = (f" ('{old}' is the old pickled format, which is no longer read: start a new run)"
                if old.is_file() else "")
        raise CheckpointError(f"no toy-base checkpoint in '{path}'{hint}")
    try:
        meta = json.loads((path / SIDECAR).read_text())
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:
        raise CheckpointError(f"toy-base checkpoint '{path}' is unreadable ({type(exc).__name__}); "
                              "delete it and start again") from exc
    state = dict(meta, tensors=tensors, torch_rng=tensors["torch_rng"])
    for name in MODULES:
        prefix = f"{name}."
        state[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return state


def load_optimizers(state: dict, optimizers: dict) -> None:
    """Restore the optimizers :func:`save` wrote (name -> optimizer) from :func:`read`'s ``state``."""
    for name, opt in optimizers.items():
        load_optimizer(opt, state["tensors"], state["optimizers"][name], prefix=f"{name}.")
