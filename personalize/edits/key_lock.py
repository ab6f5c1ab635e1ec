"""Global key-locking (Perfusion, inference only): K reads the superclass prompt, V the prompt as written.

While installed on a pipeline:

- a hook on the text encoder encodes every prompt a second time with each
  locked concept's token id replaced by its superclass word's id (one token
  each, so positions line up) and keeps both encodings;
- a pre-hook on the UNet matches each row of ``encoder_hidden_states`` to a
  kept encoding (exact equality, as the attention-map capture does) and builds
  the K context: the superclass encoding where the row had a locked token,
  the row itself elsewhere;
- a pre-hook on every cross-attention ``to_k`` swaps its input for that K
  context, so the base projection and every occupant of the site (Perfusion's
  edit, additive deltas) read it; ``to_v`` is untouched.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import nn

from ..errors import BadInputError

Replacements = Callable[[], dict[int, int]]  # locked token id -> superclass token id


def rows_matching(context: torch.Tensor, hidden: torch.Tensor) -> list[tuple[int, int]]:
    """``(row of context, row of hidden)`` pairs whose encodings are identical."""
    if hidden.shape[1:] != context.shape[1:]:
        return []
    same = (context[:, None] == hidden[None].to(context)).flatten(2).all(-1)
    return [tuple(p) for p in same.nonzero().tolist()]


class KeyLock:
    def __init__(self, pipe, to_k: list[nn.Module], replacements: Replacements):
        self.pipe, self.to_k, self.replacements = pipe, to_k, replacements
        self._encodings: deque = deque(maxlen=8)  # (original, superclass) encodings of recent prompts
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None  # (UNet context, K context)
        self._busy = False
        self._handles: list = []

    def install(self) -> "KeyLock":
        self._handles = [self.pipe.text_encoder.register_forward_hook(self._on_text, with_kwargs=True),
                         self.pipe.unet.register_forward_pre_hook(self._on_unet, with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(self._on_key) for m in self.to_k]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._context = [], None
        self._encodings.clear()

    @torch.no_grad()
    def _on_text(self, module, args, kwargs, output) -> None:
        if self._busy:
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        swapped = ids.clone()
        for token_id, super_id in self.replacements().items():
            swapped[ids == token_id] = super_id
        locked = hidden
        if not torch.equal(swapped, ids):
            self._busy = True
            try:
                again = module(swapped, *args[1:], **kwargs)
            finally:
                self._busy = False
            locked = again[0] if isinstance(again, (tuple, list)) else again.last_hidden_state
        self._encodings.append((hidden.detach(), locked.detach()))

    @torch.no_grad()
    def _on_unet(self, module, args, kwargs) -> None:
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        keys, matched = context.clone(), set()
        for hidden, locked in self._encodings:
            for r, j in rows_matching(context, hidden):
                if r not in matched:
                    keys[r] = locked[j].to(keys)
                    matched.add(r)
        if not matched:
            raise BadInputError("global key-locking could not read the prompt's tokens: pass the prompt as text "
                                "(not prompt_embeds, and without clip_skip) or use lock=local")
        self._context = (context, keys)

    def _on_key(self, module, args):
        if self._context is None or not args:
            return None
        context, keys = self._context
        x = args[0]
        if x is context or (x.shape == context.shape and torch.equal(x, context)):
            return (keys, *args[1:])
        return None
