"""LoRA files read the way the stock diffusers loader reads them (``pipe.load_lora_weights``).

diffusers decides what a file means: ``StableDiffusionPipeline.lora_state_dict``
converts kohya / A1111 keys (``lora_unet_*.lora_down.weight`` + ``.alpha``) to
its own and collects the kohya alphas, the file's ``lora_adapter_metadata``
(written by ``save_lora_weights(..., unet_lora_adapter_metadata=...)``) holds
the peft ``LoraConfig`` of a diffusers/peft LoRA, and ``_create_lora_config``
turns either into the config the loader injects. peft then resolves each
layer's rank and alpha from that config on a mirror of the covered layers, so
every layer's scale (alpha / r, or alpha / sqrt(r) with rsLoRA) is the one the
stock loader would apply. :func:`read_lora` folds that scale into ``lora_B``
and returns the pairs in our concept layout (``<part>.<module>.lora_A.weight``,
alpha = rank), for any Linear or Conv2d layer the file covers (attention,
``proj_in``/``proj_out``, feed-forward, text-encoder MLP ...). On SDXL the parts are ``unet``, ``text_encoder``
and ``text_encoder_2`` (kohya's ``lora_te1_``/``lora_te2_``), and kohya's SDXL block names (``input_blocks`` ...)
are mapped with the UNet's config, as ``StableDiffusionXLPipeline.load_lora_weights`` maps them.

On a diffusion transformer the family's own stock class reads the file (``FluxPipeline.lora_state_dict``:
diffusers/ai-toolkit ``transformer.*`` keys, kohya sd-scripts / ComfyUI / XLabs Flux files through diffusers'
converters; ``StableDiffusion3Pipeline.lora_state_dict``: diffusers keys only, no converter exists for SD3), and
the parts are the denoiser (``transformer``) and the text encoders that loader fills (Flux: CLIP-L; SD3: both
CLIPs; never T5). diffusers' kohya Flux converter assumes Flux.1's widths and block counts (single blocks'
``linear1`` is split at 3,072 x 3 + 12,288): a file it cannot convert is refused in one line, as the loader
would fail on it.
"""
from __future__ import annotations

import inspect
import json

import torch

from .. import families
from ..errors import BadInputError

PARTS = ("unet", "text_encoder", "text_encoder_2")  # SD: SDXL's second encoder is kohya's lora_te2_
PAIR = (".lora_A.weight", ".lora_B.weight")
TE_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # load_lora_into_text_encoder's layers


def read_lora(pipe, state: dict, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """``{"<part>.<module>.lora_A.weight": A, "...lora_B.weight": scale * B}`` for ``pipe``, as diffusers would load
    ``state`` (a LoRA file's tensors; ``metadata`` its safetensors metadata)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    _check_tensors(tensors)
    converted, alphas = _stock_state_dict(pipe, tensors)
    parts = lora_parts(pipe)
    outside = sorted(k for k in converted if not k.startswith(tuple(p + "." for p in parts)) or "lora" not in k)
    if outside:
        raise BadInputError(f"not a LoRA this method reads: unexpected tensors {', '.join(outside[:3])}")
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    try:
        adapter = json.loads(raw) if raw else None
    except ValueError:
        adapter = None
    if raw and not isinstance(adapter, dict):
        raise BadInputError(f"the file's '{LORA_ADAPTER_METADATA_KEY}' is not a JSON object of LoRA settings; "
                            "diffusers could not load it either")
    if adapter and alphas:
        raise BadInputError("the file has both kohya alphas and diffusers adapter metadata; diffusers refuses it too")
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        pairs = {_strip(k, part): v for k, v in converted.items() if k.startswith(part + ".")}
        if pairs:
            part_alphas = {_strip(k, part): v for k, v in (alphas or {}).items() if k.startswith(part + ".")}
            part_meta = {_strip(k, part): v for k, v in adapter.items() if k.startswith(part + ".")} if adapter else None
            out.update(_part_pairs(pipe, part, pairs, part_alphas, part_meta))
    if not out:
        raise BadInputError(f"the file holds no LoRA pairs for the {families.of(pipe).denoiser} or the text "
                            "encoder(s)")
    return out


def lora_parts(pipe) -> tuple[str, ...]:
    """The pipeline parts the family's stock ``load_lora_weights`` fills: the denoiser, then the text encoders
    (SD: ``unet``, ``text_encoder``, ``text_encoder_2``; Flux: ``transformer``, ``text_encoder``; SD3:
    ``transformer``, ``text_encoder``, ``text_encoder_2``)."""
    family = families.of(pipe)
    if family.denoiser == "unet":
        return PARTS
    return (family.denoiser, *family.lora_text_encoders)


def _stock_state_dict(pipe, tensors: dict) -> tuple[dict, dict | None]:
    """(state dict, alphas) as the family's stock ``lora_state_dict`` returns them (its format converters run)."""
    import diffusers

    family = families.of(pipe)
    try:
        if family.denoiser == "unet":
            # the SDXL loader's lora_state_dict is this same function; unet_config maps kohya's SDXL (SGM) names
            return diffusers.StableDiffusionPipeline.lora_state_dict(tensors, unet_config=pipe.unet.config)
        loader = getattr(diffusers, family.pipeline_classes[0])
        if "return_alphas" in inspect.signature(loader.lora_state_dict).parameters:  # Flux: alphas popped
            return loader.lora_state_dict(dict(tensors), return_alphas=True)
        return loader.lora_state_dict(dict(tensors)), None  # SD3: keys as they are, no alphas
    except AssertionError as exc:  # diffusers' kohya Flux converter asserts Flux.1's widths
        raise BadInputError(f"diffusers' {family.label} LoRA converter cannot read this file on this base (it "
                            f"assumes the real model's layer widths: {_first_line(exc)}); load_lora_weights fails "
                            "on it too") from None
    except (ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise BadInputError(f"not a LoRA diffusers reads: {_first_line(exc)}") from exc


def _check_tensors(tensors: dict) -> None:
    """LoRA weights are floating-point matrices (Conv2d: 4-D kernels) and each ``alpha`` one number."""
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            if value.numel() != 1 or value.dtype == torch.bool:
                raise BadInputError(f"the LoRA's '{key}' holds {value.numel()} values of {value.dtype}; an alpha is "
                                    "one number")
        elif not value.is_floating_point() or value.dim() not in (2, 4) or 0 in value.shape:
            raise BadInputError(f"the LoRA's '{key}' is a {value.dtype} tensor of shape {tuple(value.shape)}; "
                                "LoRA weights are non-empty floating-point matrices (or 4-D conv kernels)")


def _strip(key: str, part: str) -> str:
    return key[len(part) + 1:]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _part_pairs(pipe, part: str, pairs: dict, alphas: dict, meta: dict | None) -> dict[str, torch.Tensor]:
    """One part's pairs in peft layout, scaled as ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` would."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    module = getattr(pipe, part, None)
    if module is None:
        raise BadInputError(f"the LoRA covers {part}, which this base does not have (an SDXL LoRA needs an SDXL base)")
    denoiser = part == families.of(pipe).denoiser  # unet or transformer: load_lora_adapter's rules
    if denoiser:
        if "lora_A" not in next(iter(pairs)):
            pairs = convert_unet_state_dict_to_peft(pairs)
    else:
        try:  # raises on a layout it cannot name (a kohya text-encoder LoRA on q_proj alone): so does the loader
            pairs = convert_state_dict_to_peft(convert_state_dict_to_diffusers(pairs))
        except (ValueError, KeyError) as exc:
            raise BadInputError(f"not a {part} LoRA diffusers reads: {_first_line(exc)}") from None
        if not hasattr(module, "text_model"):  # transformers 5 flattens CLIPTextModel
            pairs = {k.removeprefix("text_model."): v for k, v in pairs.items()}
    if any("lora_magnitude_vector" in k or k.endswith(".bias") for k in pairs):
        raise BadInputError("the LoRA is a DoRA or has LoRA biases; only plain LoRA pairs are supported")
    bad = sorted(k for k in pairs if not k.endswith(PAIR))
    if bad:
        raise BadInputError(f"not a LoRA this method reads: unexpected tensors {', '.join(bad[:3])}")
    names = sorted(k[: -len(PAIR[0])] for k in pairs if k.endswith(PAIR[0]))
    _check_layers(part, module, names, pairs)
    ranks = {n + PAIR[0]: pairs[n + PAIR[0]].shape[0] for n in names}
    if denoiser:  # the ranks as each loader collects them (they seed LoraConfig's r and rank_pattern)
        rank_keys = {f"^{n}{PAIR[1]}": int(pairs[n + PAIR[1]].shape[1]) for n in names}
    else:
        rank_keys = {f"{n}{PAIR[1]}": int(pairs[n + PAIR[1]].shape[1]) for n in names if n.endswith(TE_RANKED)}
    if not rank_keys and not meta:
        raise BadInputError(f"diffusers cannot load this {part} LoRA: it covers none of {', '.join(TE_RANKED)}")
    try:
        config = _create_lora_config(pairs, alphas or None, meta, rank_keys, is_unet=denoiser,
                                     model_state_dict=module.state_dict() if denoiser else None)
    except (TypeError, ValueError, KeyError) as exc:
        raise BadInputError(f"the {part} LoRA's settings are not a LoraConfig diffusers reads: "
                            f"{_first_line(exc)}") from None
    if config.use_dora or config.lora_bias:
        raise BadInputError("the LoRA's config asks for DoRA or LoRA biases; only plain LoRA pairs are supported")
    config.target_modules = set(names)  # the loader injects where the file has tensors (state_dict=...)
    scales = _scales(module, names, config, {n: ranks[n + PAIR[0]] for n in names})
    out = {}
    for n in names:
        out[f"{part}.{n}{PAIR[0]}"] = pairs[n + PAIR[0]].float()
        out[f"{part}.{n}{PAIR[1]}"] = pairs[n + PAIR[1]].float() * scales[n]
    return out


def _check_layers(part: str, module, names: list[str], pairs: dict) -> None:
    from torch import nn

    from ..edits.sites import inner_layer

    for name in names:
        try:
            layer = inner_layer(module.get_submodule(name))
        except AttributeError:
            raise BadInputError(f"the LoRA covers '{part}.{name}', which this base does not have; "
                                "use the base it was made for") from None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or getattr(layer, "groups", 1) != 1:
            raise BadInputError(f"the LoRA covers '{part}.{name}', a {type(layer).__name__}; "
                                "LoRA is supported on Linear and Conv2d layers")
        down, up = (pairs.get(name + p) for p in PAIR)
        if up is None:
            raise BadInputError(f"the LoRA's '{part}.{name}' has lora_A but no lora_B (lora_up); the file is "
                                "incomplete")
        conv = isinstance(layer, nn.Conv2d)
        n_in, n_out = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
        rank = down.shape[0]
        want_down = (rank, n_in, *(down.shape[2:] if conv and down.dim() == 4 else ()))
        want_up = (n_out, rank, *((1, 1) if conv and up.dim() == 4 else ()))
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up or (down.dim() == 4) != conv:
            raise BadInputError(f"the LoRA's '{part}.{name}' has lora_A {tuple(down.shape)} and lora_B "
                                f"{tuple(up.shape)}; this base's layer there needs ({rank}, {n_in}) and "
                                f"({n_out}, {rank}); use the base the file was made for")


def _scales(module, names: list[str], config, ranks: dict[str, int]) -> dict[str, float]:
    """Each layer's LoRA scale as peft sets it from ``config`` (on stand-ins, so ``module`` is not touched)."""
    from ..edits.lora_bank import ADAPTER, LoraBank

    try:
        with torch.random.fork_rng(devices=[]):  # peft initialises the stand-ins' LoRA weights
            bank = LoraBank(module, ranks, config)
    except (TypeError, ValueError, KeyError) as exc:  # settings peft refuses (a rank or alpha that is not a number)
        raise BadInputError(f"the LoRA's settings are not ones peft accepts: {_first_line(exc)}; diffusers could "
                            "not load it either") from None
    found = {n: (getattr(bank.layers[n], "r", {}).get(ADAPTER), getattr(bank.layers[n], "scaling", {}).get(ADAPTER))
             for n in names}
    wrong = sorted(n for n, (r, _) in found.items() if r != ranks[n])
    if wrong:
        raise BadInputError(f"the LoRA's config gives {wrong[0]} rank {found[wrong[0]][0]}, its tensors "
                            f"rank {ranks[wrong[0]]}; diffusers could not load it either")
    return {n: float(scale) for n, (_, scale) in found.items()}
