"""Image files decoded and preprocessed in worker processes, for the evaluator's encoders.

Decoding a PNG and resizing it (bicubic, CustomConcept101's preprocessing) costs
milliseconds per image on one core, far more than a ViT-B/32 forward pass on a
GPU. :func:`preprocessed_batches` spreads that work over a ``DataLoader``'s
worker processes (each file decoded once, however many transforms it feeds)
and hands back pinned batches, so the encoders only see tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], transforms: Sequence[Callable]):
        self.paths, self.transforms = [Path(p) for p in paths], list(transforms)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .models import load_image

        image = load_image(self.paths[i])
        return tuple(t(image) for t in self.transforms)


#: images a worker decodes per hand-over: small, so that every worker has work from the start (a worker handed a
#: whole batch of 256 decodes it alone while the others wait: 15 workers and 4,096 files made 16 such batches) and
#: the main process receives a steady stream; the main process joins them into the caller's batches
CHUNK = 16


def preprocessed_batches(paths: Sequence[Path], transforms: Sequence[Callable], batch_size: int = 256,
                         num_workers: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """One tuple per batch: ``transforms[k]`` applied to each image of the batch, stacked, in file order.

    ``num_workers`` 0 decodes in this process; more uses that many worker processes, each handed :data:`CHUNK`
    files at a time (pinned batches on a CUDA machine, for ``non_blocking`` copies)."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError("batch_size must be >= 1 and num_workers >= 0")
    chunk = min(batch_size, CHUNK) if num_workers else batch_size
    loader = torch.utils.data.DataLoader(
        _Files(paths, transforms), batch_size=chunk, shuffle=False, num_workers=num_workers,
        pin_memory=False, persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )
    pending: list[tuple[torch.Tensor, ...]] = []
    held = 0
    for parts in loader:
        pending.append(parts)
        held += parts[0].shape[0]
        while held >= batch_size:
            batch, pending = _take(pending, batch_size)
            held -= batch_size
            yield batch
    if held:
        yield _take(pending, held)[0]


def _take(pending: list[tuple[torch.Tensor, ...]], n: int):
    """The first ``n`` rows of the held chunks as one batch (pinned on a CUDA machine), and the chunk left over."""
    joined = [torch.cat([p[k] for p in pending]) for k in range(len(pending[0]))]
    pin = torch.cuda.is_available()
    batch = tuple(torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, pin_memory=pin).copy_(rows[:n])
                  for rows in joined)
    rest = tuple(rows[n:] for rows in joined)
    return batch, ([rest] if rest[0].shape[0] else [])
