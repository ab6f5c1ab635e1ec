"""Localized attention-guided (LAG) sampling: where each concept's residual applies.

Personalized Residuals §3.3, Eq. 3. In transformer block i, at every denoising
step, ``A_i`` is the cross-attention mass of the concept token plus every token
of its macro class right after it (:func:`concept_columns`: "V* penguin plushie"
sums V*, penguin, plu and shie; ``edits/attention_maps.py`` captures the maps),
``M_i`` is ``A_i`` binarised at its median, and the block's output is

    (1 - M_i) * base(h) + M_i * personalized(h)  =  base(h) + M_i * delta(h)

so the residual is computed once and the base model draws everything outside
the concept. Under classifier-free guidance both halves use the conditional
half's mask (the capture store maps each unconditional row to it).

Several concepts (the paper leaves this as future work): each concept's map is
binarised at its own median, and a pixel claimed by several goes to the concept
with the larger attention there. :func:`exclusive_masks` is that rule as a pure
function; :func:`block_masks` applies it to the maps of one block in the
current forward, for any number of watched concepts.
"""
from __future__ import annotations

import torch

from .attention_maps import attention_maps


def concept_columns(ids: list[int], token_id: int, macro_ids: list[int]) -> list[int]:
    """The text columns a concept's LAG map sums in a prompt's token ids: each position of its token, and after it
    the positions of the macro-class phrase ``macro_ids`` when the whole phrase follows (as in training,
    "a photo of a V* <macro class>")."""
    n = len(macro_ids)
    cols = []
    for p, i in enumerate(ids):
        if i == token_id:
            cols.append(p)
            if list(ids[p + 1:p + 1 + n]) == list(macro_ids):
                cols.extend(range(p + 1, p + 1 + n))
    return cols


def exclusive_masks(attention: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """(K, ..., P) attention of K concepts over P positions -> (K, ..., P) boolean masks.

    Each concept is on where its attention is above its own median (so about
    half the positions); where several are on, only the largest attention wins
    (ties go to the lower index). A concept with no attention anywhere is off.
    ``active`` (K,) bool: concepts that take part (the others are off and claim
    nothing), so the masks are those of the active concepts' maps alone.
    """
    median = attention.median(dim=-1, keepdim=True).values
    on = attention > median
    if active is not None:
        on = on & active.view(-1, *([1] * (attention.ndim - 1)))
    if attention.shape[0] == 1:
        return on
    score = attention.masked_fill(~on, float("-inf"))
    winner = score.argmax(dim=0, keepdim=True)
    index = torch.arange(attention.shape[0], device=attention.device).view(-1, *([1] * (attention.ndim - 1)))
    return on & (winner == index)


def block_masks(pipe, block: str, keys: list[str], like: torch.Tensor,
                active: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Each watched concept's LAG mask in ``block`` for this forward, shaped to multiply ``like``.

    ``like`` is the input of the block's ``proj_out``: ``(N, C, H, W)`` (SD 1.x
    Conv2d) or ``(N, H*W, C)`` (SD 2.x/XL Linear, and a diffusion transformer's
    joint-block ``attn.to_out.0``), or ``(N, T + H*W, C)``: a Flux single block's
    ``proj_out`` over the text rows and then the image rows, where the text rows
    keep the residual (mask 1: LAG places a concept in the image; the text
    stream carries it there, as it did in training). The latest maps and masks
    of eager sampling are also kept, as (N, H, W) tensors, in
    ``attention_maps(pipe).maps[block]`` and ``.masks[block]``. ``active``: as in :func:`exclusive_masks`.
    """
    store = attention_maps(pipe)
    maps = store.token_maps(block, keys)  # (K, N, H, W)
    k, n, h, w = maps.shape
    masks = exclusive_masks(maps.flatten(2), active).view(k, n, h, w)
    if not torch.compiler.is_compiling():  # kept for inspection by eager sampling (a trace would guard on them)
        store.maps[block] = {key: maps[i] for i, key in enumerate(keys)}
        store.masks[block] = {key: masks[i] for i, key in enumerate(keys)}
    if like.ndim == 4:
        if tuple(like.shape[-2:]) != (h, w):
            raise RuntimeError(f"{block}: proj_out input is {tuple(like.shape[-2:])}, the block recorded {h}x{w}")
        shaped = masks.unsqueeze(2)  # (K, N, 1, H, W)
    else:
        shaped = masks.view(k, n, h * w, 1)
        text = like.shape[1] - h * w
        if text < 0:
            raise RuntimeError(f"{block}: proj_out input has {like.shape[1]} rows, the block recorded {h}x{w}")
        if text:
            shaped = torch.cat([shaped.new_ones(k, n, text, 1), shaped], dim=2)
    shaped = shaped.to(like.dtype)
    return {key: shaped[i] for i, key in enumerate(keys)}
