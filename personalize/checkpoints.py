"""Training checkpoints: one ``state.safetensors`` per run, written atomically.

It holds the method's state tensors, the optimizer state (tensors, plus JSON
for the scalars and param groups), the learning-rate scheduler's state (plain
numbers, JSON) and the training generator's state, so a resumed run continues
bit-exactly, mid-warm-up included. The metadata records which run it belongs
to; resuming another run is refused, naming what differs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .paths import atomic_path

STATE_FILE = "state.safetensors"


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoint of the run writing ``out`` lives (``OUT.ckpt/``)."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def has_checkpoint(out: str | Path) -> bool:
    return (checkpoint_dir(out) / STATE_FILE).is_file()


def optimizer_tensors(optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state flattened for safetensors: its tensors (``PREFIX<param id>.<name>``, on the CPU) and
    the JSON-able rest (scalars and param groups)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optim.") -> None:
    """Restore what :func:`optimizer_tensors` flattened (``tensors`` may hold other entries too)."""
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix):
            pid, k = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[k] = t
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["groups"]})


def save_checkpoint(path: Path, step: int, run_id: dict, method, optimizer, generator: torch.Generator,
                    lr_scheduler=None) -> None:
    from safetensors.torch import save_file

    tensors = {f"method.{k}": v for k, v in method.state_tensors().items()}
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.generator"] = generator.get_state()
    meta = {"step": step, "run": run_id, "optimizer": opt_meta, "i_star_initialized": getattr(method, "i_star_initialized", None)}
    if lr_scheduler is not None:  # a LambdaLR's state: step counts and rates (its lambdas are rebuilt, not saved)
        meta["lr_scheduler"] = {k: v for k, v in lr_scheduler.state_dict().items() if k != "lr_lambdas"}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"personalize_checkpoint": json.dumps(meta)})


def load_checkpoint(path: Path, run_id: dict, method, optimizer, generator: torch.Generator,
                    lr_scheduler=None) -> int:
    """Restore a run's state; returns its step. ``lr_scheduler`` (built on ``optimizer`` before this call)
    continues from the saved state; a checkpoint from before schedules were saved leaves it as built."""
    from safetensors import safe_open

    file = path / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"--resume: no checkpoint in '{path}'; run without --resume to start training")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads(f.metadata()["personalize_checkpoint"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"--resume: checkpoint '{file}' is unreadable; delete '{path}' and start again") from exc
    differs = [k for k in run_id if meta["run"].get(k) != run_id[k]]
    if differs:
        raise CheckpointError(
            f"--resume: the checkpoint in '{path}' is for a different run ({', '.join(differs)} differ); "
            "delete it or use the original settings"
        )
    method.load_state_tensors({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
    if meta.get("i_star_initialized") is not None:
        method.i_star_initialized = meta["i_star_initialized"]
    load_optimizer(optimizer, tensors, meta["optimizer"])
    if lr_scheduler is not None and "lr_scheduler" in meta:
        lr_scheduler.load_state_dict({**meta["lr_scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    generator.set_state(tensors["rng.generator"])
    return int(meta["step"])
