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


def preprocessed_batches(paths: Sequence[Path], transforms: Sequence[Callable], batch_size: int = 256,
                         num_workers: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """One tuple per batch: ``transforms[k]`` applied to each image of the batch, stacked, in file order.

    ``num_workers`` 0 decodes in this process; more uses that many worker processes."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError("batch_size must be >= 1 and num_workers >= 0")
    loader = torch.utils.data.DataLoader(
        _Files(paths, transforms), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    yield from loader
