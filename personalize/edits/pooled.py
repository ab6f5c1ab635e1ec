"""The pooled text vector(s) with every Perfusion concept read as its superclass (training and inference): SDXL's
``text_embeds``, SD3's two CLIP ``text_embeds``, Flux's CLIP-L ``pooler_output`` (``Family.pooled_encoders``; one
hook per encoder). Told here for SDXL; on SD3 and Flux the pooled vector enters the transformer's timestep
embedding, i.e. the modulation of every block, just as ungated.

Beside the cross-attention context, SDXL's UNet reads the second text encoder's pooled, projected output
(``added_cond_kwargs["text_embeds"]``, ``text_stack.py``). It is taken at the end token, which in a causal
encoder has attended to every token of the prompt, a concept's included, and it enters through the time
embedding, so it conditions every block of the UNet and is neither key-locked nor gated: through it a
Perfusion concept would act on the image with its gate closed. Perfusion's concept must act only through its
gated K/V edits, so while any Perfusion concept is attached (its ``PerfusionGroup`` holds a
:class:`PooledSuperclass`), a forward hook on the pooled encoder gives every row that holds a Perfusion
concept's token the pooled output of the same ids with each such token spelled as its superclass phrase
(:func:`swap`), i.e. the pooled vector of the superclass prompt. The hidden states (the context), rows without
such a token and the tokens of other methods (Textual Inversion uses the pooled vector for its token) are
untouched.

The hook is on the encoder module, so the trainer (``text_stack.encode_ids``) and a stock ``pipe(prompt)``
read the same pooled vector. The superclass encoding runs for the whole batch on the device and is picked
per row with ``torch.where`` (no host sync in a training step); it has no gradient (base ids through the
frozen encoder). Removing the last Perfusion concept removes the hook.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..transfer import to_device
from .tokens import base_tokenizer

Replacements = Callable[[], dict[int, list[int]]]  # Perfusion token id -> its superclass phrase's ids


class PooledSuperclass:
    """The pooled-vector hook of one text encoder of a pipeline (see the module docstring); ``pair``: the
    (tokenizer, encoder) names, SDXL's ``text_encoder_2`` by default (``Family.pooled_encoders``)."""

    def __init__(self, pipe, replacements: Replacements, pair: tuple[str, str] = ("tokenizer_2", "text_encoder_2")):
        self.pipe, self.replacements = pipe, replacements
        self.encoder = getattr(pipe, pair[1])
        # CLIPTextModelWithProjection (SDXL, SD3): text_embeds, output[0]; CLIPTextModel (Flux's CLIP-L):
        # pooler_output, output[1]
        self.field = 0 if type(self.encoder).__name__.endswith("WithProjection") else 1
        self.eos = base_tokenizer(pipe, pair[0]).eos_token_id
        self._tables: tuple | None = None  # (replacements, device, the lookup tensors of swap)
        self._handle = None

    def install(self) -> "PooledSuperclass":
        self._handle = self.encoder.register_forward_hook(self._on_text, with_kwargs=True)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._tables = None, None

    def _on_text(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(output, (tuple, list)):
            pooled = output[self.field] if len(output) > self.field else None
        elif hasattr(output, "keys"):
            pooled = output.to_tuple()[self.field] if len(output.to_tuple()) > self.field else None
        else:
            pooled = None
        if ids is None or pooled is None or pooled.ndim != 2:
            return None
        replacements = self.replacements()
        if not replacements:
            return None
        tables = self._lookup(replacements, ids.device, ids.dtype)
        swapped, rows = swap(ids, tables, self.eos)
        rest = {**kwargs, "output_hidden_states": False}
        rest.pop("input_ids", None)
        with torch.no_grad():  # module.forward: not through the hooks (ours, the prompt-row matcher's)
            superclass = module.forward(swapped, *args[1:], **rest)
        superclass = (superclass if isinstance(superclass, (tuple, list)) else superclass.to_tuple())[self.field]
        new = torch.where(rows[:, None], superclass.to(pooled.dtype), pooled)
        if isinstance(output, (tuple, list)):
            return type(output)((*output[:self.field], new, *output[self.field + 1:]))
        output = type(output)(**dict(output.items()))
        output[list(output.keys())[self.field]] = new
        return output

    def _lookup(self, replacements: dict[int, list[int]], device, dtype) -> tuple:
        """:func:`swap`'s tables on ``device``, made again only when the concepts change."""
        key = (tuple((k, tuple(v)) for k, v in sorted(replacements.items())), str(device), dtype)
        if self._tables is None or self._tables[0] != key:
            self._tables = (key, tuple(to_device(t, device) for t in tables(replacements, dtype)))
        return self._tables[1]


def tables(replacements: dict[int, list[int]], dtype=torch.long) -> tuple[torch.Tensor, ...]:
    """(replaced ids (R,), their phrases padded (R, P), the phrases' lengths (R,)) for :func:`swap`."""
    items = sorted(replacements.items())
    width = max(len(p) for _, p in items)
    return (torch.tensor([k for k, _ in items], dtype=dtype),
            torch.tensor([list(p) + [0] * (width - len(p)) for _, p in items], dtype=dtype),
            torch.tensor([len(p) for _, p in items], dtype=torch.long))


def swap(ids: torch.Tensor, lookup: tuple[torch.Tensor, ...], eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` (B, L) with every replaced token spelled out as its phrase (:func:`tables`), cut to L as the
    tokenizer cuts a prompt (the end token kept at the last position when the phrases push it past it), and which
    rows held a replaced token. Tensor ops only (no host sync): a prompt spelled with the superclass words
    tokenizes to exactly these ids."""
    keys, phrases, lengths = lookup
    batch, length = ids.shape
    match = ids[..., None] == keys  # (B, L, R)
    replaced = match.any(-1)
    which = match.int().argmax(-1)
    count = torch.where(replaced, lengths[which], torch.ones_like(lengths[which]))  # tokens each position becomes
    start = count.cumsum(1) - count  # where each position's first token goes
    piece = torch.arange(phrases.shape[1], device=ids.device)
    pieces = torch.where(replaced[..., None], phrases[which], ids[..., None])  # (B, L, P)
    target = start[..., None] + piece
    target = torch.where((piece < count[..., None]) & (target < length), target, length)  # the rest: a spare column
    out = torch.zeros(batch, length + 1, dtype=ids.dtype, device=ids.device)
    out.scatter_(1, target.flatten(1), pieces.flatten(1))  # every position < L is written exactly once
    out = out[:, :length]
    is_eos = ids == eos
    end = start.gather(1, is_eos.int().argmax(1, keepdim=True))[:, 0]  # where the first end token went
    cut = is_eos.any(1) & (end >= length)
    out[:, -1] = torch.where(cut, torch.full_like(out[:, -1], eos), out[:, -1])
    return out, replaced.any(1)
