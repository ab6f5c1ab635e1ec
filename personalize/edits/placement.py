"""Where each kind of site is in a pipeline: the one module that walks the UNet and the text encoder.

A method names the kinds of sites it edits (``Method.sites``) and asks here for
their module names; it never searches the model itself. Kinds:

=================  ======================================================================================
``cross_attention``  every cross-attention module (``attn2``) of the UNet, in module order
``kv``               ``<cross-attention>.to_k`` and ``.to_v`` (Perfusion, Custom Diffusion)
``proj_out``         each transformer block's ``proj_out`` (Conv2d 1x1 in SD 1.x, Linear in SD 2.x/XL)
``attention``        ``to_q``/``to_k``/``to_v``/``to_out.0`` of every UNet attention (DreamBooth-LoRA)
``text_attention``   ``q_proj``/``k_proj``/``v_proj``/``out_proj`` of every text-encoder attention
``transformer``      the transformer blocks themselves (attention-map capture, LAG)
=================  ======================================================================================

The token seam (``tokens.py``) and the whole-UNet swap (DreamBooth) need no names.
Works on any diffusers UNet built from ``Transformer2DModel`` blocks and
``Attention`` modules (SD 1.x, 2.x, XL), also on the meta device.

On a diffusion transformer (Flux.1, SD3: joint-attention blocks where the text stream and the image stream are
projected separately and attend together) the kinds have their counterparts:

=================  ======================================================================================
``cross_attention``  every joint attention (one with text-stream projections ``add_k_proj``/``add_v_proj``)
``kv``               ``<joint attention>.add_k_proj`` and ``.add_v_proj``: the text tokens' keys and values
``proj_out``         each block's attention output projection: ``attn.to_out.0`` of a joint block (image
                     stream), ``proj_out`` of a Flux single block (its attention output and MLP, fused)
``attention``        the modules diffusers' DreamBooth-LoRA script of the family trains (``Family.lora_targets``)
``transformer``      the blocks (``transformer_blocks.N``, Flux's ``single_transformer_blocks.N``)
=================  ======================================================================================
"""
from __future__ import annotations

from typing import Callable, Iterator

from torch import nn

from .sites import inner_layer

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
KINDS = ("cross_attention", "kv", "proj_out", "attention", "text_attention", "transformer")
#: every seam a method may name in ``Method.sites``: the token seam, the site kinds, whole-module swaps
SEAMS = ("tokens", *KINDS, "unet", "text_encoder")


def cross_attention_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, attention)`` for every cross-attention module of a diffusers UNet, in module order."""
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention) and getattr(module, "is_cross_attention", False):
            yield name, module


def transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, Transformer2DModel)`` for every transformer block of a diffusers UNet, in module order."""
    from diffusers.models import Transformer2DModel

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def block_cross_attentions(block: nn.Module) -> list[nn.Module]:
    """The cross-attention (``attn2``) of each inner transformer layer of a block."""
    return [layer.attn2 for layer in block.transformer_blocks if getattr(layer, "attn2", None) is not None]


def linear_sites(root: nn.Module, suffixes: tuple[str, ...], within: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the Linear modules (wrapped or not, by us or by peft) called one of ``suffixes`` inside the modules
    of ``root`` for which ``within`` holds (e.g. diffusers ``Attention``), in module order."""
    scopes = [(n, m) for n, m in root.named_modules() if within(m)]
    names = []
    for scope, module in scopes:
        for sub, child in module.named_modules():
            if not sub or "base_layer" in sub.split("."):
                continue
            if isinstance(inner_layer(child), nn.Linear) and any(sub == s or sub.endswith("." + s) for s in suffixes):
                names.append(f"{scope}.{sub}" if scope else sub)
    return list(dict.fromkeys(names))


def joint_attentions(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention)`` for every joint attention of a diffusion transformer (text-stream K/V), in order."""
    return [(n, m) for n, m in root.named_modules()
            if getattr(m, "add_k_proj", None) is not None and getattr(m, "to_q", None) is not None]


def dit_blocks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every block of a diffusion transformer: the joint blocks, then Flux's single ones."""
    return [(f"{stack}.{i}", block) for stack in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(root, stack, None) or ())]


def _dit_site_names(root: nn.Module, family, kind: str) -> list[str]:
    if kind == "cross_attention":
        return [name for name, _ in joint_attentions(root)]
    if kind == "kv":
        return [f"{name}.add_{p}_proj" for name, _ in joint_attentions(root) for p in ("k", "v")]
    if kind == "proj_out":
        return [f"{name}.attn.to_out.0" if getattr(block.attn, "to_out", None) is not None else f"{name}.proj_out"
                for name, block in dit_blocks(root)]
    if kind == "transformer":
        return [name for name, _ in dit_blocks(root)]
    if kind == "attention":
        return linear_sites(root, family.lora_targets, lambda m: m is root)
    raise ValueError(f"unknown site kind {kind!r} for a diffusion transformer; known: {', '.join(KINDS)}")


def site_names(root: nn.Module, kind: str) -> list[str]:
    """Module names of every site of ``kind`` in ``root`` (the denoiser; the text encoder for
    ``text_attention``)."""
    from .. import families

    family = families.of_denoiser(root)
    if family is not None and family.denoiser == "transformer" and kind != "text_attention":
        return _dit_site_names(root, family, kind)
    if kind == "cross_attention":
        return [name for name, _ in cross_attention_layers(root)]
    if kind == "kv":
        return [f"{name}.to_{p}" for name, _ in cross_attention_layers(root) for p in ("k", "v")]
    if kind == "proj_out":
        return [f"{name}.proj_out" for name, _ in transformer_blocks(root)]
    if kind == "transformer":
        return [name for name, _ in transformer_blocks(root)]
    if kind == "attention":
        from diffusers.models.attention_processor import Attention

        return linear_sites(root, UNET_ATTENTION, lambda m: isinstance(m, Attention))
    if kind == "text_attention":
        return linear_sites(root, TEXT_ATTENTION, lambda m: type(m).__name__.endswith("Attention"))
    raise ValueError(f"unknown site kind {kind!r}; known: {', '.join(KINDS)}")
