"""Image files decoded and preprocessed in worker processes, for the evaluator's encoders.

Decoding a PNG and resizing it (bicubic, CustomConcept101's preprocessing) costs
milliseconds per image on one core, far more than a ViT-B/32 forward pass on a
GPU. :func:`preprocessed_batches` spreads that work over a ``DataLoader``'s
worker processes (each file decoded once, however many transforms it feeds)
and hands back pinned batches, so the encoders only see tensors. :func:`encode_files` is the evaluator's use
of it: every encoder's features of image files, each file decoded once for all of them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
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


def default_workers(device: Union[None, str, torch.device] = None) -> int:
    """Decode workers when none are asked for. On an accelerator: one core left to the main process (it feeds the
    encoders and joins the batches), at most 8 (a many-core host does not start dozens of processes for a folder of
    samples). On the CPU: 0, every file still decoded once, in this process: there the two networks, not the
    decoding, take the time (~0.08 s against ~0.02 s an image on the 2-core CPU here) and use every core, so a
    decoding process can only hide that fifth and competes with them for the cores (docs/PERFORMANCE.md: on the
    2-core CPU here 1 worker was no faster than decoding in this process)."""
    if device is not None and torch.device(device).type == "cpu":
        return 0
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (a container's share), not the host's
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@torch.no_grad()
def encode_files(encoders: Sequence, groups: Sequence[Sequence[Path]], workers: int = 0) -> list[list[np.ndarray]]:
    """Unit-norm features of image files under every encoder: ``out[g][k]`` = ``encoders[k].encode_images(groups[g])``.

    Each file is decoded once (in ``workers`` processes; 0 in this one), resized and cropped for every encoder
    (``pixel_transform`` of ``encoder.preprocess``), sent as uint8 and normalised on the encoder's device
    (``normalize_pixels``: ToTensor + Normalize's arithmetic). Every group is cut into each encoder's
    ``batch_size`` batches from its own first file, as ``encode_images`` cuts them, so the features are
    ``encode_images``'s to the bit."""
    from .models import _normalize, normalize_pixels, pixel_transform

    groups = [[Path(p) for p in g] for g in groups]
    out: list[list] = [[[] for _ in encoders] for _ in groups]
    held: list[list[torch.Tensor]] = [[] for _ in encoders]  # rows of the current group not yet encoded

    def encode(k: int, g: int, n: int) -> None:
        enc = encoders[k]
        rows = held[k][0] if len(held[k]) == 1 else torch.cat(held[k])  # one piece: still pinned, copied async
        held[k] = [rows[n:]] if rows.shape[0] > n else []
        x = normalize_pixels(rows[:n].to(enc.device, non_blocking=True), *enc.preprocess[2:])
        out[g][k].append(_normalize(enc.features(x).float()).cpu())

    sizes = [len(g) for g in groups]
    g, seen = 0, 0  # the group being received, rows of it received
    transforms = [pixel_transform(*e.preprocess[:2]) for e in encoders]
    batch = max(e.batch_size for e in encoders)
    flat = [p for grp in groups for p in grp]
    for parts in (preprocessed_batches(flat, transforms, batch, workers) if flat else ()):
        at = 0
        while at < parts[0].shape[0]:
            while sizes[g] == seen:  # empty groups, or the end of one
                g, seen = g + 1, 0
            take = min(parts[0].shape[0] - at, sizes[g] - seen)
            for k, enc in enumerate(encoders):
                held[k].append(parts[k][at:at + take])
                while sum(h.shape[0] for h in held[k]) >= enc.batch_size:
                    encode(k, g, enc.batch_size)
                if seen + take == sizes[g] and held[k]:  # the group's last, short batch
                    encode(k, g, sum(h.shape[0] for h in held[k]))
            at, seen = at + take, seen + take
    return [[torch.cat(f).numpy() if f else np.zeros((0, 0), np.float32) for f in per] for per in out]
