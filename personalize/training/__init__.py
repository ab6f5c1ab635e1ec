"""The one trainer every method uses.

It owns everything that is not method-specific: reading the photos, caching
their VAE latents once (the images never change during a run), sampling
batches, flips, noise, timesteps and prompt templates from one seeded
generator, the denoising loss (optionally mask-weighted), accelerate's mixed
precision, gradient checkpointing, progress, checkpoints with exact resume,
RNG-isolated preview and sample images, experiment trackers, learning-rate
schedules and intermediate concept files. A method only supplies its trainable
state (see :class:`personalize.methods.base.Method`).

- ``config``: :class:`TrainConfig` and how a run's settings are resolved;
- ``cache``: the VAE latent cache and each step's random :class:`Batch` (repeats, caption dropout, tag shuffling);
- ``buckets``: aspect-ratio buckets (photos, masks and class images fitted without distortion);
- ``step``: one step's denoising loss;
- ``fast_path``: fused AdamW, cached text encodings, frozen weights in the compute dtype;
- ``best``: best-step selection and the progress bar;
- ``trackers``: ``--report-to``, accelerate's experiment trackers;
- ``lr_schedule``: diffusers' ``get_scheduler`` learning-rate schedules;
- ``snapshots``: sample images (``OUT.samples/``) and intermediate concepts (``OUT.steps/``);
- ``loop``: :func:`train`, the loop that ties them together (checkpoints, previews, the concept file).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: name -> the submodule that defines it; imported on first use (PEP 562), so that ``TrainConfig`` (read by
#: ``personalize train --help``) comes without torch
_EXPORTS = {
    **dict.fromkeys(("_BestKeeper", "_Progress"), ".best"),
    **dict.fromkeys(("BucketedCache", "bucket_sizes", "bucketed_cache", "closest_bucket"), ".buckets"),
    **dict.fromkeys(("Batch", "CaptionOptions", "LatentCache", "PriorData", "draw_batch", "encode_latents",
                     "shuffle_tags"), ".cache"),
    **dict.fromkeys(("TrainConfig", "resolve_settings", "split_overrides"), ".config"),
    **dict.fromkeys(("FrozenInComputeDtype", "TextCache"), ".fast_path"),
    **dict.fromkeys(("LOSS_EVERY", "_validate_words", "concept_header", "load_base", "preview_dir", "train",
                     "write_preview"), ".loop"),
    **dict.fromkeys(("samples_dir", "steps_dir"), ".snapshots"),
    **dict.fromkeys(("denoising_loss", "denoising_step"), ".step"),
    "logs_dir": ".trackers",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .best import _BestKeeper, _Progress
    from .buckets import BucketedCache, bucket_sizes, bucketed_cache, closest_bucket
    from .cache import Batch, CaptionOptions, LatentCache, PriorData, draw_batch, encode_latents, shuffle_tags
    from .config import TrainConfig, resolve_settings, split_overrides
    from .fast_path import FrozenInComputeDtype, TextCache
    from .loop import (LOSS_EVERY, _validate_words, concept_header, load_base, preview_dir, train,
                       write_preview)
    from .snapshots import samples_dir, steps_dir
    from .step import denoising_loss, denoising_step
    from .trackers import logs_dir

__all__ = ["Batch", "BucketedCache", "CaptionOptions", "FrozenInComputeDtype", "LOSS_EVERY", "LatentCache", "PriorData", "TextCache", "TrainConfig",
           "concept_header", "denoising_loss", "denoising_step", "draw_batch", "encode_latents", "load_base",
           "logs_dir", "preview_dir", "resolve_settings", "samples_dir", "split_overrides", "steps_dir", "train",
           "write_preview", "bucket_sizes", "bucketed_cache", "closest_bucket", "shuffle_tags"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
