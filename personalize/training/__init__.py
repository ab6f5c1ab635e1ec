"""The one trainer every method uses (see :mod:`personalize.training.loop`)."""
from .loop import (LOSS_EVERY, Batch, FrozenInComputeDtype, LatentCache, PriorData, TextCache, TrainConfig,
                   _BestKeeper, _Progress, _validate_words, concept_header, denoising_loss, denoising_step,
                   draw_batch, encode_latents, load_base, preview_dir, resolve_settings, split_overrides, train,
                   write_preview)

__all__ = ["Batch", "FrozenInComputeDtype", "LOSS_EVERY", "LatentCache", "PriorData", "TextCache", "TrainConfig",
           "concept_header", "denoising_loss", "denoising_step", "draw_batch", "encode_latents", "load_base",
           "preview_dir", "resolve_settings", "split_overrides", "train", "write_preview"]
