"""Image-to-text attention read out of a diffusion transformer's joint attention (SD3, Flux.1): LAG's maps there.

A joint block attends over the text tokens and the image tokens together. Its counterpart of a UNet's
cross-attention map is the block of that attention where image queries meet text keys: for image token l and
text token t, per head,

    p(l, t) = softmax_t( q_l . k_t * d^-1/2 )        (t over the T text tokens only)

averaged over heads, where ``q_l`` and ``k_t`` are what the stock processor attends with: the projections
(``to_q`` of the image stream; ``add_k_proj`` of the text stream in a joint block, the shared ``to_k``'s text rows
in a Flux single block) after the processor's per-head RMS norms (``norm_q``; ``norm_added_k`` or ``norm_k``) and,
on Flux, the rotary embedding of each token's position (text first, then image, as Flux's processor
concatenates them). The softmax runs over the text columns only, as an SD cross-attention's does; the joint
softmax also spreads each query over the L image keys, which would make a map depend on how much a pixel looks at
other pixels, and would cost an L x L product per head.
"""
from __future__ import annotations

import torch
from torch import nn


def _normed(x: torch.Tensor, norm: nn.Module | None, heads: int) -> torch.Tensor:
    """(B, S, heads*d) -> (B, S, heads, d) through the processor's per-head norm (in the model's dtype)."""
    x = x.unflatten(-1, (heads, -1))
    return norm(x) if norm is not None else x


def _rotated(x: torch.Tensor, rotary, rows: slice) -> torch.Tensor:
    """Flux's rotary embedding of the tokens at ``rows`` of the joint sequence (text first, then image)."""
    if rotary is None:
        return x
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=1)


def image_text_probs(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, text: int, rotary=None) -> torch.Tensor:
    """(B, L, T) image-to-text attention of one joint attention, averaged over heads.

    ``q``: the image queries (B, L, C), or a Flux single block's queries over text + image (B, T + L, C);
    ``k``: the text keys (B, T, C), or the single block's keys over text + image; ``text``: T."""
    single = getattr(attn, "add_k_proj", None) is None
    heads = attn.heads
    if single:
        q, k = q[:, text:], k[:, :text]
        k_norm = attn.norm_k
    else:
        k_norm = attn.norm_added_k
    qh = _rotated(_normed(q, attn.norm_q, heads), rotary, slice(text, text + q.shape[1]))
    kh = _rotated(_normed(k, k_norm, heads), rotary, slice(0, text))
    qh, kh = qh.float().transpose(1, 2), kh.float().transpose(1, 2)  # (B, heads, S, d)
    scale = qh.shape[-1] ** -0.5
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, dim=-1).mean(1)


def capture_sites(block_name: str, block: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """``(site, attention, slot)`` to capture in one block: its image queries (slot 0) and text keys (slot 1)."""
    attn = block.attn
    keys = "add_k_proj" if getattr(attn, "add_k_proj", None) is not None else "to_k"
    return [(f"{block_name}.attn.to_q", attn, 0), (f"{block_name}.attn.{keys}", attn, 1)]
