"""The one trainer every method uses.

It owns everything that is not method-specific: reading the photos, caching
their VAE latents once (the images never change during a run), sampling
batches, flips, noise, timesteps and prompt templates from one seeded
generator, the denoising loss (optionally mask-weighted), accelerate's mixed
precision, gradient checkpointing, progress, checkpoints with exact resume,
and RNG-isolated preview images. A method only supplies its trainable state
(see :class:`personalize.methods.base.Method`).

- ``config``: :class:`TrainConfig` and how a run's settings are resolved;
- ``cache``: the VAE latent cache and each step's random :class:`Batch` (repeats, caption dropout, tag shuffling);
- ``buckets``: aspect-ratio buckets (photos, masks and class images fitted without distortion);
- ``step``: one step's denoising loss;
- ``fast_path``: fused AdamW, cached text encodings, frozen weights in the compute dtype;
- ``best``: best-step selection and the progress bar;
- ``loop``: :func:`train`, the loop that ties them together (checkpoints, previews, the concept file).
"""
from .best import _BestKeeper, _Progress
from .buckets import BucketedCache, bucket_sizes, bucketed_cache, closest_bucket
from .cache import Batch, CaptionOptions, LatentCache, PriorData, draw_batch, encode_latents, shuffle_tags
from .config import TrainConfig, resolve_settings, split_overrides
from .fast_path import FrozenInComputeDtype, TextCache
from .loop import (LOSS_EVERY, _validate_words, concept_header, load_base, preview_dir, train,
                   write_preview)
from .step import denoising_loss, denoising_step

__all__ = ["Batch", "BucketedCache", "CaptionOptions", "FrozenInComputeDtype", "LOSS_EVERY", "LatentCache", "PriorData", "TextCache", "TrainConfig",
           "concept_header", "denoising_loss", "denoising_step", "draw_batch", "encode_latents", "load_base",
           "preview_dir", "resolve_settings", "split_overrides", "train", "write_preview", "bucket_sizes",
           "bucketed_cache", "closest_bucket", "shuffle_tags"]
