"""The trainer's own settings (:class:`TrainConfig`) and how a run's settings are resolved."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import BadInputError
from ..segment import DEFAULT_SEGMENTER


@dataclass
class TrainConfig:
    """Settings shared by every method (the method's own live in its Config)."""

    steps: int = dataclasses.field(default=250, metadata={
        "help": "optimizer steps (Perfusion paper: 210 on average, 400 at most)", "flag": True})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "images per step", "flag": True})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed for batches, flips, noise", "flag": True})
    flip_p: float = dataclasses.field(default=0.5, metadata={
        "help": "probability of a horizontal flip (paper: 0.5; 0 for asymmetric objects)"})
    mixed_precision: str = dataclasses.field(default="no", metadata={"help": "no | fp16 (GPU) | bf16", "flag": True})
    gradient_checkpointing: bool = dataclasses.field(default=False, metadata={
        "help": "trade compute for memory", "flag": True})
    checkpoint_every: int = dataclasses.field(default=50, metadata={
        "help": "save a resumable checkpoint every N steps (0 = never)", "flag": True})
    preview_every: int = dataclasses.field(default=0, metadata={
        "help": "write a preview image to OUT.previews/ every N steps (0 = never)", "flag": True})
    preview_prompt: str = dataclasses.field(default="a photo of a {}", metadata={
        "help": "prompt of the previews, {} = the concept"})
    max_grad_norm: float | None = dataclasses.field(default=1.0, metadata={
        "help": "clip the gradient's global norm at this value; 0 or None = no clipping (each method sets its "
                "reference's: the diffusers DreamBooth / Custom Diffusion scripts clip at 1.0, textual_inversion.py "
                "does not)"})
    compile: bool | None = dataclasses.field(default=None, metadata={
        "help": "torch.compile the denoiser's training step (forward and backward) with --compile-mode; unset = "
                "on for a CUDA run whose shapes are static (no --buckets), where the eager step is bound by the "
                "host's kernel launches, off elsewhere; the compiled artifacts are cached across runs", "flag": True})
    compile_mode: str = dataclasses.field(default="reduce-overhead", metadata={
        "help": "torch.compile's mode: reduce-overhead (CUDA graphs: the step's kernels replayed, no per-kernel "
                "launch cost; on a CPU the same as default), default, max-autotune or max-autotune-no-cudagraphs",
        "flag": True})
    resolution: int = dataclasses.field(default=0, metadata={
        "help": "train at this image size in pixels, a multiple of the UNet's stride (0 = the base's native size: "
                "512 SD 1.5, 768 SD 2.1, 1024 SDXL)", "flag": True})
    masks: str = dataclasses.field(default="none", metadata={
        "help": "weight the loss by a mask per photo: auto (each photo segmented by --segmenter prompted with the superclass, soft "
                "mask / max, cached; Perfusion paper 4.4), none, or a folder of masks named like the photos "
                "(./auto for a folder named auto)", "flag": True})
    segmenter: str = dataclasses.field(default=DEFAULT_SEGMENTER, metadata={
        "help": "CLIPSeg model of --masks auto: a hub id or a local folder (save_pretrained; safetensors)",
        "flag": True})
    init_timeout: float = dataclasses.field(default=60.0, metadata={
        "help": "data parallel (torchrun / accelerate launch): seconds to wait for the master and the other "
                "processes before a one-line error (torch's own default is 30 minutes)"})

    # -- watching a run: trackers, sample images, intermediate concepts, the learning-rate schedule (the diffusers
    # example scripts' --report_to, --validation_prompt/--validation_steps, --checkpointing_steps, --lr_scheduler,
    # --lr_warmup_steps; training/watch.py)
    report_to: str = dataclasses.field(default="none", metadata={
        "help": "log loss, learning rate, gradient norm, step time and the sample images to a tracker through "
                "accelerate: tensorboard (event files in OUT.logs/), wandb (WANDB_MODE=offline works without a "
                "network), trackio (a local database, TRACKIO_DIR, default OUT.logs/trackio) or none (diffusers' "
                "train_dreambooth.py --report_to; its default is tensorboard, ours none)", "flag": True})
    validation_prompt: Any = dataclasses.field(default=None, metadata={
        "help": "prompt of the sample images, {} = the concept (the token, or the token and class word as the "
                "method trains); repeatable; also what --evaluator scores (diffusers' --validation_prompt) "
                "(unset: the evaluator's prompts, else preview_prompt)", "flag": "multiple"})
    validation_every: int = dataclasses.field(default=0, metadata={
        "help": "every N steps and at the last, sample one image per --validation-prompt (25 sampler steps, "
                "guidance 6, seed --seed; the training RNG untouched) into OUT.samples/step-NNNNNN/ and the "
                "tracker; with --evaluator the same steps are scored and the best kept (0 = off; train uses 25, "
                "Perfusion §4.4, when --validation-prompt, --evaluator or --clip-weights is given; diffusers' "
                "--validation_steps)", "flag": True})
    save_every: int = dataclasses.field(default=0, metadata={
        "help": "also write the concept every N steps as OUT.steps/step-NNNNNN.safetensors, each a complete concept "
                "(0 = only the final file; diffusers' --checkpointing_steps, here usable concepts, not resume "
                "state: that is --checkpoint-every)", "flag": True})
    lr_scheduler: str = dataclasses.field(default="constant", metadata={
        "help": "the learning-rate schedule, diffusers' get_scheduler: constant, constant_with_warmup, linear, cosine, "
                "cosine_with_restarts or polynomial, decaying over --steps (diffusers' --lr_scheduler; every "
                "recipe here trains at a constant rate)", "flag": True})
    lr_warmup_steps: int = dataclasses.field(default=0, metadata={
        "help": "steps of linear warm-up from 0 to the learning rate, for every schedule but constant "
                "(diffusers' --lr_warmup_steps; its scripts default to 500, the recipes here to 0)", "flag": True})

    # -- the data as practitioners prepare it (kohya sd-scripts' dataset options, diffusers' example scripts)
    repeats: Any = dataclasses.field(default=None, metadata={
        "help": "how often photos are drawn, as kohya's dataset repeats (the N of an N_name folder), one value or "
                "one per --images in order: a row of a step is photo i with probability repeats_i / sum of repeats, "
                "the share an epoch of kohya's repeated list gives it. Steps, not epochs, set the run's length, so "
                "one value for every photo changes nothing; different values balance concepts of a multi-concept "
                "run (unset = 1 each)", "flag": "multiple"})
    caption_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "probability that a photo's prompt is replaced by the empty prompt \"\" (kohya's "
                "caption_dropout_rate, diffusers' proportion_empty_prompts; 0 = never, their default): the rows "
                "train the unconditional prediction that classifier-free guidance subtracts. Refused for methods "
                "that train only the token's vector (textual-inversion: a row without the token gives it no "
                "gradient); class images keep their prompt", "flag": True})
    shuffle_tags: bool = dataclasses.field(default=False, metadata={
        "help": "shuffle the comma-separated tags of each caption (IMAGE.txt) every time it is drawn, as kohya's "
                "shuffle_caption; no tag is dropped, so the one naming the concept ({}) always stays", "flag": True})
    keep_tags: int = dataclasses.field(default=0, metadata={
        "help": "with --shuffle-tags, keep the first N tags in place (kohya's keep_tokens, counted in tags)",
        "flag": True})
    buckets: bool = dataclasses.field(default=False, metadata={
        "help": "train on aspect-ratio buckets instead of square centre crops (kohya's enable_bucket): frames with sides "
                "multiples of 64 (the UNet stride on tiny bases) and area up to resolution², each photo, its mask "
                "and each class image scaled to cover the closest-ratio frame and centre-cropped, no distortion; "
                "a step draws from one bucket; SDXL rows carry their original size and crop", "flag": True})
    bucket_step: int = dataclasses.field(default=0, metadata={
        "help": "side step of the buckets in pixels (kohya's bucket_reso_steps: 64; 0 = 64, or the UNet stride "
                "where 64 does not fit)"})
    bucket_min: int = dataclasses.field(default=0, metadata={
        "help": "smallest bucket side in pixels (kohya's min_bucket_reso: 256 at 512; 0 = resolution / 2)"})
    bucket_max: int = dataclasses.field(default=0, metadata={
        "help": "largest bucket side in pixels (kohya's max_bucket_reso: 1024 at 512; 0 = 2 x resolution)"})


def split_overrides(method_cls, overrides: dict[str, Any] | None) -> tuple[dict, dict]:
    """Split a flat settings dict (e.g. from --config YAML) into trainer and method settings."""
    overrides = dict(overrides or {})
    method_settings = overrides.pop(method_cls.name, {}) or {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    train, unknown = {}, []
    for key, value in overrides.items():
        if key in train_fields:
            train[key] = value
        elif key in method_fields:
            method_settings[key] = value
        else:
            unknown.append(key)
    if unknown:
        known = sorted(train_fields | method_fields)
        raise BadInputError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return train, method_settings


def resolve_settings(method_cls, settings: dict[str, Any] | None) -> tuple[TrainConfig, Any]:
    """The trainer's and the method's configs: TrainConfig defaults < the method's ``train_defaults`` < ``settings``."""
    from ..settings import coerce_fields

    train_over, method_over = split_overrides(method_cls, settings)
    train_cfg = TrainConfig(**coerce_fields(TrainConfig, {**method_cls.train_defaults, **train_over}))
    return train_cfg, method_cls.make_config(method_over)
