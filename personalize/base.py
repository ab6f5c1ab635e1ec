"""Base text-to-image pipelines: load one from a spec, and fingerprint it.

A *spec* is one of
- ``"tiny"``: an SD 1.x-shaped pipeline with random weights, built from
  configs with a fixed seed (identical in every process);
- ``"tiny-sd2"``: the same in SD 2.x's shape: Linear ``proj_in``/``proj_out``
  (``use_linear_projection``), per-block head counts, upcast attention, a
  GELU (OpenCLIP-style) text encoder whose tokenizer pads with ``!``, and a
  v-prediction scheduler;
- ``"toy"``: the toy world's trained base, shipped inside the package
  (``personalize/toybase/weights``, see docs/TOYWORLD.md);
- a local diffusers folder (``model_index.json`` inside);
- a hub id such as ``runwayml/stable-diffusion-v1-5`` (same loader; offline it
  fails at once with a one-line message).

The fingerprint (``personalize/fingerprint.py``, re-exported here) identifies
the parts a concept depends on (architecture, tokenizer, text-encoder weights)
so that a concept trained on one base is refused by another.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .errors import BadInputError, BaseModelError
from .fingerprint import Fingerprint, fingerprint  # noqa: F401  (re-exported: the base's identity)

BUILTIN_BASES = ("tiny", "tiny-sd2", "toy")
TOY_WEIGHTS = Path(__file__).resolve().parent / "toybase" / "weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# SD 2.x in miniature, where it differs from SD 1.x (diffusers' stable-diffusion-2-1 configs)
_SD2_UNET = {"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}
_SD2_TEXT = {"hidden_act": "gelu"}
_SD2_SCHEDULER = {"prediction_type": "v_prediction"}


def _tiny_components(family: str = "sd1"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import SD_VOCAB_SIZE, build_clip_tokenizer

    sd2 = family == "sd2"
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
        **(_SD2_UNET if sd2 else {"attention_head_dim": 8}),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=SD_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0 if sd2 else 49407,
            **(_SD2_TEXT if sd2 else {}),
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        **(_SD2_SCHEDULER if sd2 else {}),
    )
    tokenizer = build_clip_tokenizer()
    if sd2:
        tokenizer.pad_token = "!"  # OpenCLIP pads with "!" (id 0), SD 1.x with the end token
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny(family: str = "sd1"):
    """The ``tiny`` base (``family="sd2"``: ``tiny-sd2``): SD classes and shapes in miniature, seeded so every
    process builds the same weights."""
    from diffusers import StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = _tiny_components(family)
    return StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _from_pretrained(source: str, **kwargs):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(
        source, safety_checker=None, requires_safety_checker=False, **kwargs
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def load_base(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a base pipeline from ``spec`` (``tiny``, a local diffusers folder or a hub id)."""
    spec = str(spec)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if spec in ("tiny", "tiny-sd2"):
        pipe = build_tiny("sd2" if spec == "tiny-sd2" else "sd1")
        if dtype is not None:
            pipe.to(dtype=dtype)
    elif spec == "toy":
        if not (TOY_WEIGHTS / "model_index.json").is_file():
            raise BaseModelError(
                "the toy base's weights are not in this installation; build them with 'personalize toyworld train-base'"
            )
        pipe = _from_pretrained(str(TOY_WEIGHTS), **kwargs)
        pipe.to(dtype=dtype or torch.float32)  # shipped as fp16 to stay small; run in fp32 unless asked
    elif Path(spec).exists():
        path = Path(spec)
        if not (path / "model_index.json").is_file():
            raise BadInputError(
                f"base '{spec}' is not a diffusers pipeline folder (no model_index.json); "
                "pass a folder saved with pipe.save_pretrained(), a hub id, or 'tiny'"
            )
        try:
            pipe = _from_pretrained(str(path), **kwargs)
        except Exception as exc:  # diffusers raises many types; one line for the user
            raise BaseModelError(f"could not load base from '{spec}': {_first_line(exc)}") from exc
    elif _HUB_ID.match(spec):
        try:
            pipe = _from_pretrained(spec, **kwargs)
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            hint = (
                "the model hub is unreachable (HF_HUB_OFFLINE is set); download the pipeline elsewhere and pass its local folder"
                if offline
                else "check the id, your network, or pass a local diffusers folder"
            )
            raise BaseModelError(f"could not load base '{spec}' from the model hub: {hint}") from exc
    else:
        raise BadInputError(
            f"base '{spec}' is neither a folder nor a hub id; use one of {', '.join(BUILTIN_BASES)}, "
            "a local diffusers folder, or a hub id like 'org/model'"
        )
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
