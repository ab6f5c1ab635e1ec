"""The toy world's base model factory: a tiny SD-1.x-shaped pipeline trained from scratch on the toy world.

- ``model``: architecture, pipeline assembly and fp16 export;
- ``recipe``: :class:`BaseRecipe`, the training settings (defaults = the shipped weights' recipe);
- ``data``: every step's batch, derived from (seed, phase, step);
- ``checkpoint``: resumable checkpoints (safetensors + a JSON sidecar);
- ``vae``: the VAE's latent scaling, reconstruction report and decoder fine-tuning;
- ``train``: :func:`train_base`, the two-phase training loop;
- ``evaluate``: sampling and scoring on held-out captions, loading the shipped weights, exporting a run;
- ``weights/``: the shipped base (``personalize.base.load_base("toy")``).

    from personalize.toybase.evaluate import load_base_pipeline, evaluate_base, export_from_checkpoint
    from personalize.toybase.train import train_base
    from personalize.toybase.recipe import BaseRecipe

The data it learns from (world, concepts, captions, measurers) live in :mod:`personalize.datasets.toyworld`.
See docs/TOYWORLD.md.
"""
