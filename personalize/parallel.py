"""Data-parallel training of one concept across processes (``accelerate launch`` or ``torchrun``).

Every process draws the same global batch from the same seeded generator (so the random stream, the prompts
and the text encodings — and with them Perfusion's i* — are identical everywhere, and equal to a one-process
run), runs the UNet on its own contiguous slice of the rows, and averages the gradients before the optimizer
step, so the parameters stay identical on every process. Only the main process writes files (checkpoints,
previews, the concept); the others wait for it at the end.

The launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun
and ``accelerate launch`` set them) is read and checked in one place, :func:`launch_env`, and the process group is
joined by :func:`join` with a bounded wait (the ``init_timeout`` setting, 60 s by default): a malformed
environment is one line, and a master that cannot be reached is one line after at most that long, not a hang of
torch's default 30 minutes. CPU processes join with gloo (so ``torchrun --nproc_per_node N`` on a machine without a
GPU trains data-parallel), GPU processes with nccl.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import BadInputError

INIT_TIMEOUT = 60.0  # seconds to reach the master and the other processes (TrainConfig.init_timeout)
_LAUNCH = "start the processes with torchrun --nproc_per_node N (or accelerate launch), which sets them"


@dataclass(frozen=True)
class Launch:
    """What the launcher told this process: ``world`` processes, this one is ``rank`` (``local_rank`` on its
    machine), the master at ``addr:port``."""

    world: int
    rank: int
    local_rank: int
    addr: str
    port: int


def _int_env(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int | None:
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInputError(f"launcher environment {name}={text[:40]!r} is not a whole number; {_LAUNCH}") from None
    if value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise BadInputError(f"launcher environment {name}={value} is out of range ({span}); {_LAUNCH}")
    return value


def launch_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launcher's settings from ``env`` (default ``os.environ``), checked; None for a single process (no
    ``WORLD_SIZE``, or ``WORLD_SIZE=1``). A one-line BadInputError for a non-integer value, a missing ``RANK`` or
    master, ``RANK >= WORLD_SIZE``, a port outside 1..65535."""
    env = os.environ if env is None else env
    world = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", 0)
    local = _int_env(env, "LOCAL_RANK", 0)
    if world is None:
        if rank not in (None, 0) or local not in (None, 0):
            raise BadInputError(f"launcher environment sets RANK/LOCAL_RANK but not WORLD_SIZE; {_LAUNCH}")
        return None
    if rank is not None and rank >= world:
        raise BadInputError(f"launcher environment RANK={rank} is not below WORLD_SIZE={world}; {_LAUNCH}")
    if local is not None and local >= world:
        raise BadInputError(f"launcher environment LOCAL_RANK={local} is not below WORLD_SIZE={world}; {_LAUNCH}")
    if world == 1:
        return None
    if rank is None:
        raise BadInputError(f"launcher environment sets WORLD_SIZE={world} but not RANK; {_LAUNCH}")
    addr = (env.get("MASTER_ADDR") or "").strip()
    if not addr:
        raise BadInputError(f"launcher environment sets WORLD_SIZE={world} but not MASTER_ADDR; {_LAUNCH}")
    port = _int_env(env, "MASTER_PORT", 1, 65535)
    if port is None:
        raise BadInputError(f"launcher environment sets WORLD_SIZE={world} but not MASTER_PORT; {_LAUNCH}")
    return Launch(world, rank, rank if local is None else local, addr, port)


def join(device: torch.device, timeout: float = INIT_TIMEOUT) -> Launch | None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA), waiting at most ``timeout`` seconds for the
    master and the other processes; None for a single process. Idempotent (a group already joined is kept)."""
    launch = launch_env()
    if launch is None:
        return None
    import torch.distributed as dist

    if dist.is_initialized():
        return launch
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    try:
        with _quiet_native_stderr():  # c10d logs each failed connect with a C++ stack on fd 2
            dist.init_process_group(backend=backend, init_method="env://",
                                    rank=launch.rank, world_size=launch.world,
                                    timeout=datetime.timedelta(seconds=float(timeout)))
    except Exception as exc:  # DistStoreError, DistNetworkError, RuntimeError (timeout, refused, bad address)
        why = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise BadInputError(f"process {launch.rank} of {launch.world} could not join the process group at "
                            f"{launch.addr}:{launch.port} within {float(timeout):g} s ({type(exc).__name__}: {why}); "
                            "check MASTER_ADDR/MASTER_PORT and that every process was started (init_timeout "
                            "setting: --set init_timeout=SECONDS)") from None
    return launch


@contextlib.contextmanager
def _quiet_native_stderr():
    """Native code's writes to file descriptor 2 go to /dev/null inside the block (Python's own stderr too)."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded, captured): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class DataParallel:
    def __init__(self, accelerator, batch_size: int):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        if batch_size % self.world:
            raise BadInputError(f"--batch-size {batch_size} does not split over {self.world} processes; use a "
                                f"multiple of {self.world} (it is the global batch)")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This process's rows of an ``n``-row (global) batch part."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Mean of each gradient over the processes, in one collective per ~64 MB of gradients."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= 64 * 2**20):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                flat /= self.world
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor over the processes (e.g. the global batch's loss); every process must call it."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(value.clone(), reduction="mean")

    def main_first(self):
        """The main process runs the block first (e.g. writes a cache), then the others."""
        return self.accelerator.main_process_first() if self.world > 1 else contextlib.nullcontext()

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()
