"""Aspect-ratio buckets: photos of any shape trained without distortion (``--buckets``).

Instead of one square centre crop per photo, a run gets a set of frames ("buckets") whose sides are multiples of a
step (64, as kohya sd-scripts' ``bucket_reso_steps`` and SDXL's own training; the UNet's pixel stride on bases too
small for 64) and whose area is at most the target ``resolution``²; each photo goes to the bucket of the closest
aspect ratio, is scaled by one factor until it covers the frame and centre-cropped (the least that can be cut
without distortion: ``images.cover_crop``). Its mask (``--masks``) is cropped exactly as the photo; class images
(prior preservation) are bucketed by the same rule. A step draws all its rows from one bucket (one tensor shape),
the bucket picked with probability proportional to the sampling weight of its photos, so every photo keeps the
frequency it has without buckets. SDXL rows carry their photo's original size and crop (``add_time_ids``).

The bucket list is kohya sd-scripts' ``make_bucket_resolutions`` (``library/model_util.py``) and the assignment
its ``BucketManager.select_bucket`` (closest width / height ratio).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..base import MAX_RESOLUTION, pixel_stride
from ..errors import BadInputError
from ..images import Fitted, load_fitted, load_fitted_masks
from .cache import LatentCache

DEFAULT_STEP = 64  # kohya sd-scripts' bucket_reso_steps default


def bucket_sizes(target: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Every (height, width) bucket: sides multiples of ``step`` in [``min_side``, ``max_side``], area at most
    ``target``², the square ``target`` x ``target`` (rounded down to ``step``) among them; sorted by width / height.

    kohya's ``make_bucket_resolutions``: for each width from ``min_side`` up, the largest height that keeps the area
    within the target, and its transpose."""
    area = target * target
    side = int(math.sqrt(area) // step) * step
    found = {(side, side)}
    width = min_side
    while width <= max_side:
        height = min(max_side, int(area // width) // step * step)
        if height >= min_side:
            found.add((height, width))
            found.add((width, height))
        width += step
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0] * hw[1]))


def closest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose width / height ratio is closest to the image's (kohya's ``select_bucket``); on a tie the
    larger bucket."""
    ratio = width / height
    return min(buckets, key=lambda hw: (abs(hw[1] / hw[0] - ratio), -hw[0] * hw[1]))


def settings(pipe, size: int, step: int = 0, min_side: int = 0, max_side: int = 0) -> tuple[int, int, int]:
    """The run's (step, min_side, max_side); 0 = the default: step 64 where the target size and the UNet's stride
    allow it (else the stride), sides from ``size`` / 2 to 2 x ``size`` (kohya's 256 / 1024 around SD's 512).
    Each must be a multiple of the UNet's pixel stride, the step of the stride and the sides of the step."""
    stride = pixel_stride(pipe)
    if not step:
        step = DEFAULT_STEP if size % DEFAULT_STEP == 0 and DEFAULT_STEP % stride == 0 else stride
    if step < stride or step % stride:
        raise BadInputError(f"bucket_step {step} does not fit this base: give a multiple of its UNet stride {stride}")
    min_side = min_side or max(step, size // 2 // step * step)
    max_side = max_side or min(MAX_RESOLUTION, 2 * size // step * step)
    for name, value in (("bucket_min", min_side), ("bucket_max", max_side)):
        if value % step or not step <= value <= MAX_RESOLUTION:
            raise BadInputError(f"{name} {value} must be a multiple of the bucket step {step} from {step} to "
                                f"{MAX_RESOLUTION}")
    if not min_side <= size // step * step <= max_side:
        raise BadInputError(f"buckets from {min_side} to {max_side} pixels leave out the training size {size}: "
                            "widen bucket_min / bucket_max")
    return step, min_side, max_side


def time_ids(photo: Fitted, flipped: bool) -> list[int]:
    """SDXL's add_time_ids of a bucketed row: original size, crop top-left (mirrored for a flipped row), and the
    bucket as target size (diffusers' train_text_to_image_sdxl.py and kohya's sdxl_train.py)."""
    height, width = photo.pixels.shape[-2:]
    top, left = photo.top_left
    if flipped:
        left = photo.resized[1] - width - left
    return [*photo.original, top, left, height, width]


class BucketedCache:
    """One :class:`LatentCache` per bucket; each step's rows come from one of them (:meth:`pick`)."""

    def __init__(self, caches: list[LatentCache], photos: list[list[int]]):
        self.caches = caches
        self.photos = photos  # the run's photo indices in each bucket
        self.n = sum(c.n for c in caches)
        self.weights = torch.tensor([c.total_weight for c in caches])

    def pick(self, generator: torch.Generator) -> LatentCache:
        """A bucket, with probability proportional to its photos' sampling weights (one bucket: no draw)."""
        if len(self.caches) == 1:
            return self.caches[0]
        return self.caches[int(torch.multinomial(self.weights, 1, generator=generator))]

    def sizes(self) -> dict[str, int]:
        """``{"HxW": photos}`` of each bucket in use (the provenance records it)."""
        return {"x".join(map(str, c.pixel_shape)): c.n for c in self.caches}


def bucketed_cache(vae, paths: Sequence[Path], buckets: Sequence[tuple[int, int]], *,
                   mask_paths: Sequence[Path] | None = None, labels: torch.Tensor | None = None,
                   captions: Sequence[str | None] | None = None,
                   weights: torch.Tensor | None = None) -> BucketedCache:
    """The photos (and their masks) fitted to their buckets and VAE-encoded, one cache per bucket."""
    photos = load_fitted(list(paths), lambda h, w: closest_bucket(h, w, buckets))
    masks = load_fitted_masks(list(mask_paths), photos) if mask_paths is not None else None
    groups: dict[tuple[int, int], list[int]] = {}
    for i, photo in enumerate(photos):
        groups.setdefault(tuple(photo.pixels.shape[-2:]), []).append(i)
    caches, members = [], []
    for shape in sorted(groups):
        idx = groups[shape]
        ids = torch.tensor([time_ids(photos[i], False) for i in idx] + [time_ids(photos[i], True) for i in idx],
                           dtype=torch.float32)
        caches.append(LatentCache(
            vae, torch.stack([photos[i].pixels for i in idx]),
            torch.stack([masks[i] for i in idx]) if masks is not None else None,
            labels[idx] if labels is not None else None,
            [captions[i] for i in idx] if captions is not None else None,
            weights=weights[idx] if weights is not None else None, time_ids=ids))
        members.append(idx)
    return BucketedCache(caches, members)
