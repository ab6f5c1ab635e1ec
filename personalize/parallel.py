"""Data-parallel training of one concept across processes (``accelerate launch`` or ``torchrun``).

Every process draws the same global batch from the same seeded generator (so the random stream, the prompts
and the text encodings — and with them Perfusion's i* — are identical everywhere, and equal to a one-process
run), runs the UNet on its own contiguous slice of the rows, and averages the gradients before the optimizer
step, so the parameters stay identical on every process. Only the main process writes files (checkpoints,
previews, the concept); the others wait for it at the end.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import BadInputError


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
