"""Single-file checkpoints (AUTOMATIC1111, ComfyUI, model sites: the original LDM key layout) as bases, and
pipelines written as one.

Reading (``load_single_file``, what ``load_base`` does with a file):

1. the keys say what the file is (:func:`identify`): ``conditioner.embedders.1.model.*`` (OpenCLIP bigG beside
   CLIP-L) is SDXL, ``cond_stage_model.model.*`` (OpenCLIP ViT-H) SD 2.x, ``cond_stage_model.transformer.*``
   (CLIP-L) SD 1.x; with ``model.diffusion_model.*`` (the UNet) and ``first_stage_model.*`` (the VAE). Anything
   else -- a LoRA, an embedding, a personalize concept, a diffusers component file, an inpainting or refiner
   model, another architecture -- is refused in one line saying what it looks like and what to pass instead.
   Pickles (``.ckpt``, ``.pt``, ``.bin``) are refused: they can run code when loaded (``load_base`` has no
   allow-pickle switch; convert them to safetensors);
2. the tensor shapes pick the configs: the family's known configs -- the real model (``sd_shapes``: SD 1.5,
   SD 2.1, SDXL base 1.0) and the built-in miniature (``tiny``, ``tiny-sd2``, ``tiny-sdxl``, built on the meta
   device) -- are each written in the LDM layout by :func:`to_original` and the file must hold every one of a
   config's tensors at its shape (extras such as EMA weights, ``position_ids`` or SD 2.x's unused last OpenCLIP
   block are ignored, as diffusers ignores them). Head counts, activations and norms are not in the shapes,
   which is why known configs are matched rather than configs derived;
3. the matched config is written as a diffusers config folder (:func:`write_config_folder`: ``model_index.json``,
   each component's config, the CLIP tokenizer rebuilt offline, the scheduler) and the file is read by stock
   ``from_single_file(file, config=folder, local_files_only=True)``: no hub access. A tensor the file lacks
   would be left on the meta device by diffusers; that is refused too.

The prediction type is not in the weights. SD 1.x and SDXL files are epsilon models; SD 2.x files are taken as
SD 2.1 (768 px, v-prediction), the default of diffusers' ``from_single_file`` for SD 2.x. Overrides, in order:
``prediction_type=`` (Python); A1111's convention of a YAML config beside the file (``model.yaml`` for
``model.safetensors``; ``parameterization: "v"``, or SDXL's ``VScaling`` denoiser, means v-prediction, else
epsilon); the ``modelspec.prediction_type`` metadata kohya's sd-scripts write (``epsilon``/``v``); ComfyUI's
``v_pred`` marker key. An SD 2.x epsilon model is taken as SD 2.x-base (512 px). The scheduler is DDIM with the model's betas and
prediction type (``sd_shapes``; a single file carries none, and stock ``from_single_file`` falls back to DDIM).

Writing (:func:`save_single_file`, DreamBooth's ``single-file`` export): the inverse of diffusers' converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``); the package ships only that direction (its
``scripts/convert_diffusers_to_original_stable_diffusion.py`` is not installed). UNet ``input_blocks``/``middle_block``/
``output_blocks``, VAE ``encoder.down.*``/``decoder.up.*`` (attention as 1x1 convolutions), CLIP-L under
``cond_stage_model.transformer.text_model.*`` (SDXL: ``conditioner.embedders.0.transformer.text_model.*``),
OpenCLIP with fused ``in_proj`` and a transposed ``text_projection`` (SD 2.x: ``cond_stage_model.model.*``, SDXL:
``conditioner.embedders.1.model.*``). SD 2.x's text encoder is written with the layers diffusers has (23 for SD
2.1, whose original has 24): loaders that read OpenCLIP's penultimate layer, as A1111 and ComfyUI do for SD 2.x,
never run the missing last block (not tested here: neither is installed). Safetensors metadata
carries the SAI ModelSpec architecture and prediction type. Reading a written file back with stock
``from_single_file`` gives the same tensors bit for bit (``tests/test_single_file.py``).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError, BaseModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_SD1 = "cond_stage_model.transformer.text_model."
OPENCLIP_SD2 = "cond_stage_model.model."
CLIP_XL = "conditioner.embedders.0.transformer.text_model."
OPENCLIP_XL = "conditioner.embedders.1.model."

#: family -> the text encoders' prefixes in the LDM layout, in pipeline order (text_encoder, text_encoder_2)
TEXT_PREFIXES = {"sd1": (CLIP_SD1,), "sd2": (OPENCLIP_SD2,), "sdxl": (CLIP_XL, OPENCLIP_XL)}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
#: family -> the known configs a file of that family may have: real-size (``sd_shapes``) and built-in miniature
KNOWN = {"sd1": ("sd15", "tiny"), "sd2": ("sd21", "tiny-sd2"), "sdxl": ("sdxl", "tiny-sdxl")}
KNOWN_NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL base 1.0", "tiny": "tiny", "tiny-sd2": "tiny-sd2",
               "tiny-sdxl": "tiny-sdxl"}
#: SAI ModelSpec architecture ids (written by kohya's sd-scripts and Stability's tools) per family/prediction
MODELSPEC = {("sd1", "epsilon"): "stable-diffusion-v1", ("sd2", "epsilon"): "stable-diffusion-v2-512",
             ("sd2", "v_prediction"): "stable-diffusion-v2-768-v", ("sdxl", "epsilon"): "stable-diffusion-xl-v1-base",
             ("sdxl", "v_prediction"): "stable-diffusion-xl-v1-base"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


# -- what a file is ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """A safetensors file's keys and shapes (read without loading a tensor) and its metadata."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)


def read_layout(path: str | Path) -> Layout:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInputError(f"base '{path.name}' is a pickle checkpoint, which can run code when loaded; use the "
                            "model's .safetensors release or convert it to safetensors with a tool you trust")
    if path.suffix.lower() != ".safetensors":
        raise BadInputError(f"base '{path.name}' is a file but not a .safetensors checkpoint; pass an SD 1.x, SD 2.x "
                            "or SDXL single-file checkpoint (.safetensors), a diffusers folder or a hub id")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as exc:
        raise BadInputError(f"base '{path.name}' is not a readable safetensors file ({type(exc).__name__})") from exc
    return Layout(path, shapes, metadata)


def family_of(layout: Layout) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` for a single-file checkpoint; any other file is refused saying what it looks
    like and what to pass instead."""
    name = layout.path.name
    other = _other_architecture(layout)
    if other:
        raise BadInputError(f"base '{name}' is a single-file checkpoint of another architecture (diffusers reads it "
                            f"as '{other}'); personalize takes SD 1.x, SD 2.x and SDXL bases")
    if not (layout.has(UNET) and layout.has(VAE)):
        raise BadInputError(f"base '{name}' {_looks_like(layout)}")
    conv_in = layout.shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise BadInputError(f"base '{name}' is an inpainting or other image-conditioned checkpoint ({conv_in[1]} "
                            "UNet input channels); personalize takes text-to-image SD 1.x, SD 2.x and SDXL bases")
    if layout.has(OPENCLIP_XL) and layout.has(CLIP_XL):
        return "sdxl"
    if layout.has("conditioner.embedders.0.model."):
        raise BadInputError(f"base '{name}' is an SDXL refiner checkpoint (one OpenCLIP text encoder); pass an "
                            "SDXL base checkpoint")
    if layout.has(OPENCLIP_SD2):
        return "sd2"
    if layout.has(CLIP_SD1):
        return "sd1"
    raise BadInputError(f"base '{name}' has a UNet and a VAE in the original layout but no text encoder personalize "
                        "knows (SD 1.x: cond_stage_model.transformer.*, SD 2.x: cond_stage_model.model.*, SDXL: "
                        "conditioner.embedders.*)")


def _other_architecture(layout: Layout) -> str | None:
    """The model type diffusers' own detector (``infer_diffusers_model_type``) names for a file of another
    architecture (SD 3, Flux, a ControlNet, an upscaler, ...); None for SD 1.x/2.x/XL and for what it does not
    recognise (it answers 'v1' then)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ours = {"v1", "v2", "xl_base", "inpainting", "inpainting_v2", "xl_inpaint", "xl_refiner"}  # refused by name below
    shapes = {k: torch.empty(s, device="meta") for k, s in layout.shapes.items()}  # shapes only, no memory
    try:
        kind = infer_diffusers_model_type(shapes)
    except Exception:  # its checks index tensors they expect; a file it half-recognises is not ours either
        return None
    return None if kind in ours else kind


def _looks_like(layout: Layout) -> str:
    """What a file without the checkpoint's parts looks like, and what to do with it."""
    keys = list(layout.shapes)
    joined = "\n".join(keys)
    if "personalize" in layout.metadata:
        return ("is a personalize concept file, not a base; pass it with --concept (and its base model with "
                "--base)")
    if re.search(r"(^|\.)lora_(unet|te\d?)_|\.lora_(down|up|A|B)\.|\.alpha$|lora\.(down|up)", joined, re.M):
        return ("looks like a LoRA, not a base model; use it on its base (pipe.load_lora_weights, or personalize "
                "import --method dreambooth-lora) and pass that base with --base")
    if "custom_diffusion" in joined:
        return ("looks like Custom Diffusion weights, not a base model; import them with personalize import --method "
                "custom-diffusion, and pass their base with --base")
    if set(keys) & {"emb_params", "string_to_param.*", "clip_l", "clip_g"} or (
            len(keys) == 1 and len(layout.shapes[keys[0]]) in (1, 2)
            and (keys[0].startswith("<") or layout.shapes[keys[0]][-1] in (768, 1024, 1280))):
        return ("looks like a textual-inversion embedding, not a base model; load it with "
                "pipe.load_textual_inversion or personalize import --method textual-inversion, on its base")
    if any(k.startswith(("down_blocks.", "mid_block.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return ("looks like one component of a diffusers pipeline (a UNet, VAE or text encoder file); pass the "
                "whole pipeline folder (with model_index.json) instead")
    return ("is no SD 1.x, SD 2.x or SDXL single-file checkpoint (no model.diffusion_model.* UNet and "
            "first_stage_model.* VAE keys); pass such a checkpoint, a diffusers folder or a hub id")


# -- the known configs --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def config_pipeline(name: str, prediction_type: str | None = None):
    """The pipeline of a known config (``sd15``, ``sd21``, ``sdxl``, ``tiny``, ``tiny-sd2``, ``tiny-sdxl``) on the
    meta device: shapes and configs, no weights (built once per process; treat it as read-only).
    ``prediction_type`` changes the scheduler's (SD 2.x epsilon: 512 px, as SD 2.x-base)."""
    from . import sd_shapes

    with _no_init():
        if name in sd_shapes.SHAPES:
            pipe = sd_shapes.pipeline(name, device="meta")
        else:
            from . import families

            family = families.by_tiny(name)
            with torch.device("meta"):
                parts = family.tiny_components()
            pipe = family.assemble(parts)
    if prediction_type is not None and prediction_type != pipe.scheduler.config.prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
        if name == "sd21" and prediction_type == "epsilon":  # SD 2.x-base: 512 px
            pipe.unet.register_to_config(sample_size=64)
            pipe.vae.register_to_config(sample_size=512)
    return pipe


def _no_init():
    """Skip weight initialisation while building on the meta device (it only costs time there)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def write_config_folder(name: str, folder: str | Path, prediction_type: str | None = None,
                        tokenizers: bool = True) -> Path:
    """A diffusers config folder for the known config ``name`` (no weights): what stock
    ``from_single_file(file, config=folder, local_files_only=True)`` needs to read a file of that shape offline.
    ``tokenizers=False`` leaves the tokenizer files out (pass the tokenizers to ``from_single_file`` instead)."""
    folder = Path(folder)
    pipe = config_pipeline(name, prediction_type)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)  # model_index.json
    for part, module in pipe.components.items():
        if module is None:
            continue
        target = folder / part
        if hasattr(module, "save_vocabulary"):  # a tokenizer
            if tokenizers:
                module.save_pretrained(target)
        elif hasattr(module, "save_config"):  # a diffusers model or scheduler
            module.save_config(target)
        else:  # a transformers model: its config only
            module.config.save_pretrained(target)
    return folder


# -- diffusers -> original (LDM) keys ---------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict in the original layout (without the ``model.diffusion_model.``
    prefix): the inverse of diffusers' ``convert_ldm_unet_checkpoint``."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise BaseModelError("this UNet has a different number of layers per block; only SD 1.x, SD 2.x and SDXL "
                             "layouts can be written as a single file")
    n = per + 1  # input/output blocks per level: the resnets (+ attentions), then the down/upsampler
    up_attention = {i: "CrossAttn" in t for i, t in enumerate(config["up_block_types"])}
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        top = ".".join(parts[:-1])
        if top in _UNET_TOP:
            new = f"{_UNET_TOP[top]}.{parts[-1]}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                block = f"input_blocks.{1 + level * n + (per if kind == 'downsamplers' else j)}"
            else:
                block = f"output_blocks.{level * n + (per if kind == 'upsamplers' else j)}"
            if kind == "resnets":
                new = ".".join([block, "0", _RESNET.get(rest[0], rest[0]), *rest[1:]])
            elif kind == "attentions":
                new = ".".join([block, "1", *rest])
            elif kind == "downsamplers":  # downsamplers.0.conv.weight
                new = ".".join([block, "0", "op", *rest[1:]])
            elif kind == "upsamplers":  # after the resnet, and after the attention where there is one
                new = ".".join([block, "2" if up_attention[level] else "1", *rest])
            else:
                raise BaseModelError(f"UNet tensor '{key}' has no place in the single-file layout")
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                new = ".".join([f"middle_block.{2 * j}", _RESNET.get(rest[0], rest[0]), *rest[1:]])
            else:
                new = ".".join(["middle_block.1", *rest])
        else:
            raise BaseModelError(f"UNet tensor '{key}' has no place in the single-file layout")
        out[new] = tensor
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the original layout (no ``first_stage_model.`` prefix): the
    inverse of diffusers' ``convert_ldm_vae_checkpoint`` (attention projections as 1x1 convolutions)."""
    levels = len(config["up_block_types"])
    out = {}
    for key, tensor in state.items():
        side, *parts = key.split(".")
        if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
            out[key] = tensor
            continue
        rest = ".".join(parts)
        if parts[0] in ("down_blocks", "up_blocks"):
            level = int(parts[1]) if side == "encoder" else levels - 1 - int(parts[1])
            stage = "down" if side == "encoder" else "up"
            if parts[2] == "resnets":
                sub = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
                rest = f"{stage}.{level}.block.{parts[3]}.{sub}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                rest = f"{stage}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{'.'.join(parts[4:])}"
        elif parts[0] == "mid_block":
            if parts[1] == "resnets":
                rest = f"mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:])}"
            else:
                name = ".".join(parts[3:-1])
                rest = f"mid.attn_1.{_VAE_ATTENTION[name]}.{parts[-1]}"
                if tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]
        elif parts[0] == "conv_norm_out":
            rest = "norm_out." + parts[-1]
        out[f"{side}.{rest}"] = tensor
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in the layout A1111 keeps for CLIP-L (the transformers names under
    ``prefix`` = ``....transformer.text_model.``): the inverse of diffusers' ``convert_ldm_clip_checkpoint``."""
    return {prefix + k.removeprefix("text_model."): v for k, v in state.items()}


_OPENCLIP = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout under ``prefix`` (``...model.``): fused q/k/v
    ``in_proj``, ``text_projection`` transposed; the inverse of diffusers' ``convert_open_clip_checkpoint``."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
        elif key.startswith("encoder.layers."):
            _, _, i, *rest = key.split(".")
            name, kind = ".".join(rest[:-1]), rest[-1]
            block = f"{prefix}transformer.resblocks.{i}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{block}attn.in_proj_{kind}", {})[name[-6]] = tensor
            else:
                out[f"{block}{_OPENCLIP[name]}.{kind}"] = tensor
        else:
            raise BaseModelError(f"text-encoder tensor '{key}' has no place in OpenCLIP's layout")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def to_original(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SD 1.x, SD 2.x or SDXL pipeline under its original (LDM) key."""
    from .text_stack import family, pairs

    fam = family(pipe)
    out = {UNET + k: v for k, v in unet_to_original(pipe.unet.state_dict(), pipe.unet.config).items()}
    out.update({VAE + k: v for k, v in vae_to_original(pipe.vae.state_dict(), pipe.vae.config).items()})
    for (_, name), prefix in zip(pairs(pipe), TEXT_PREFIXES[fam]):
        state = getattr(pipe, name).state_dict()
        out.update(openclip_to_original(state, prefix) if ".model." in prefix else clip_to_original(state, prefix))
    return out


def save_single_file(pipe, path: str | Path, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``pipe`` as one safetensors checkpoint in the original layout (atomically), with SAI ModelSpec
    metadata naming the architecture and prediction type."""
    from .paths import save_safetensors
    from .text_stack import family

    tensors = to_original(pipe)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    spec = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC.get((family(pipe), prediction), "stable-diffusion-v1"),
            "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
            if family(pipe) == "sdxl" else "https://github.com/Stability-AI/stablediffusion"}
    return save_safetensors(Path(path), tensors, {**spec, **(metadata or {})})


# -- reading a file -------------------------------------------------------------------------------------------------
def match_config(layout: Layout, fam: str, prediction_type: str | None = None) -> str:
    """The known config of ``fam`` whose every tensor the file holds at the same shape."""
    from .sd_shapes import SHAPES

    conv_in = layout.shapes.get(UNET + "input_blocks.0.0.weight", (0,))
    tried = []
    for name in KNOWN[fam]:
        tried.append(KNOWN_NAMES[name])
        if name in SHAPES and conv_in[0] != SHAPES[name][1]["block_out_channels"][0]:
            continue  # not this real-size model: no need to build it
        expected = {k: tuple(v.shape) for k, v in to_original(config_pipeline(name, prediction_type)).items()}
        if all(layout.shapes.get(k) == s for k, s in expected.items()):
            return name
    raise BadInputError(f"base '{layout.path.name}' is an {FAMILY_NAMES[fam]} checkpoint whose tensors fit none of "
                        f"the {FAMILY_NAMES[fam]} configs personalize knows ({', '.join(tried)}): a different or "
                        "incomplete architecture; pass a diffusers folder of it instead")


def prediction_of(layout: Layout, fam: str, override: str | None = None) -> str:
    """The prediction type (see the module docstring for the order of the overrides)."""
    if override is not None:
        if override not in PREDICTION_TYPES:
            raise BadInputError(f"prediction type {override!r}: use one of {', '.join(PREDICTION_TYPES)}")
        return override
    sidecar = layout.path.with_suffix(".yaml")
    if sidecar.is_file():
        import yaml

        try:
            text = sidecar.read_text()
            params = yaml.safe_load(text)["model"]["params"]
            v = params.get("parameterization") == "v" or "VScaling" in text  # SDXL's configs: a V denoiser scaling
        except Exception as exc:
            raise BadInputError(f"'{sidecar.name}' beside the checkpoint is not an LDM config (model: params: ...): "
                                f"{type(exc).__name__}") from exc
        return "v_prediction" if v else "epsilon"
    spec = layout.metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    if "v_pred" in layout.shapes:
        return "v_prediction"
    return "v_prediction" if fam == "sd2" else "epsilon"


def identify(path: str | Path, prediction_type: str | None = None) -> dict[str, Any]:
    """What ``load_single_file`` would load: family, matched config, prediction type (refusals as there)."""
    layout = read_layout(path)
    fam = family_of(layout)
    prediction = prediction_of(layout, fam, prediction_type)
    return {"family": fam, "config": match_config(layout, fam, prediction), "prediction_type": prediction}


def load_single_file(path: str | Path, dtype: torch.dtype | None = None, prediction_type: str | None = None):
    """An SD 1.x, SD 2.x or SDXL single-file checkpoint as a pipeline, through stock ``from_single_file`` with the
    matched known config (offline)."""
    import diffusers
    from diffusers.utils import logging as dlog

    found = identify(path, prediction_type)
    class_name = "StableDiffusionXLPipeline" if found["family"] == "sdxl" else "StableDiffusionPipeline"
    extra = ({"add_watermarker": False} if found["family"] == "sdxl"
             else {"safety_checker": None, "requires_safety_checker": False})
    # the tokenizers are passed in (copies of the config's, rebuilt offline): reading them back from files is slower
    config = config_pipeline(found["config"], found["prediction_type"])
    extra.update({part: copy.deepcopy(module) for part, module in config.components.items()
                  if hasattr(module, "save_vocabulary")})
    dlog.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="personalize-config-") as tmp:
        folder = write_config_folder(found["config"], tmp, found["prediction_type"], tokenizers=False)
        verbosity = dlog.get_verbosity()
        dlog.set_verbosity_error()  # its notes on casting go to stderr; the library does not print
        try:
            if found["family"] == "sdxl":
                extra["text_encoder_2"] = _openclip_xl(path, folder, dtype)
            pipe = getattr(diffusers, class_name).from_single_file(
                str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **extra)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise BaseModelError(f"could not load base from '{Path(path).name}': "
                                 f"{text[0] if text else type(exc).__name__}") from exc
        finally:
            dlog.set_verbosity(verbosity)
    missing = [f"{part}.{n}" for part, module in pipe.components.items() if isinstance(module, torch.nn.Module)
               for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise BadInputError(f"base '{Path(path).name}' lacks {len(missing)} tensors of its "
                            f"{KNOWN_NAMES[found['config']]} config (e.g. {missing[0]})")
    return pipe


def _openclip_xl(path: str | Path, folder: Path, dtype: torch.dtype | None):
    """SDXL's second text encoder, converted by diffusers' own ``convert_open_clip_checkpoint``. Stock
    ``from_single_file`` tells SDXL's two encoders apart by width (CLIP-L 768, bigG 1280) and so gives a file whose
    encoders are equally wide (``tiny-sdxl``'s, both 32) the CLIP-L weights twice; the encoder is passed in
    instead, read strictly (every tensor present)."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModelWithProjection(config)
    with safe_open(str(path), framework="pt") as f:
        checkpoint = {k: f.get_tensor(k) for k in f.keys() if k.startswith(OPENCLIP_XL)}
    model.load_state_dict(convert_open_clip_checkpoint(model, checkpoint, prefix=OPENCLIP_XL), strict=True,
                          assign=True)
    return model.to(dtype=dtype or torch.float32).eval()  # as from_single_file loads the others
