"""Global key-locking (Perfusion, inference only): K reads the superclass prompt, V the prompt as written.

While installed on a pipeline:

- the pipeline's prompt-row matcher (``prompt_rows.py``) encodes every prompt
  a second time with each locked concept's token replaced by its superclass
  phrase's tokens and keeps both encodings. A phrase of n tokens moves the
  positions after it by n - 1, so the second encoding is read back through a
  position map (:func:`expand`): the concept's position reads the phrase's last
  token (in a causal text encoder the one that has seen the whole phrase), every
  other position its own token; past CLIP's 77 positions the tail is cut, and a
  position whose token was cut reads the last one. With one-token phrases the
  map is the identity, i.e. the prompt with the ids swapped in place;
- a pre-hook on the UNet matches each row of ``encoder_hidden_states`` to a
  kept encoding (the same matcher LAG's attention maps use) and builds
  the K context: the superclass encoding where the row had a locked token,
  the row itself elsewhere;
- a pre-hook on every cross-attention ``to_k`` swaps its input for that K
  context, so the base projection and every occupant of the site (Perfusion's
  edit, additive deltas) read it; ``to_v`` is untouched.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import BadInputError
from ..families import denoiser
from .prompt_rows import prompt_rows

Replacements = Callable[[], dict[int, list[int]]]  # locked token id -> its superclass phrase's ids
_KEY = "key-lock"


class KeyLock:
    def __init__(self, pipe, to_k: list[nn.Module], replacements: Replacements):
        self.pipe, self.to_k, self.replacements = pipe, to_k, replacements
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None  # (UNet context, K context)
        self._handles: list = []

    def install(self) -> "KeyLock":
        prompt_rows(self.pipe).subscribe(_KEY, self._superclass_encoding)
        self._handles = [denoiser(self.pipe).register_forward_pre_hook(self._on_unet, with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(self._on_key) for m in self.to_k]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._context = [], None
        prompt_rows(self.pipe).unsubscribe(_KEY)

    def _superclass_encoding(self, reencode, ids: list, hidden) -> torch.Tensor:
        """The prompt batch encoded again with every locked token replaced by its superclass phrase, read back at
        the positions of the prompt as written (:func:`expand`); ``ids``: one tensor per text encoder."""
        replacements = self.replacements()
        expanded = [[expand(row, replacements, t.shape[1]) for row in t.tolist()] for t in ids]
        swapped = [torch.tensor([new for new, _ in rows], dtype=t.dtype, device=t.device)
                   for rows, t in zip(expanded, ids)]
        if all(torch.equal(s, t) for s, t in zip(swapped, ids)):
            return hidden.detach()
        again = reencode(swapped).detach()
        where = torch.tensor([w for _, w in expanded[0]], device=again.device)
        return again.gather(1, where[..., None].expand(-1, -1, again.shape[-1]))

    @torch.no_grad()
    def _on_unet(self, module, args, kwargs) -> None:
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        matched = prompt_rows(self.pipe).match(context, need=_KEY)
        if not matched:
            raise BadInputError("global key-locking could not read the prompt's tokens: pass the prompt as text "
                                "(not prompt_embeds, and without clip_skip) or use lock=local")
        keys = context.clone()
        for r, (encoded, j) in matched.items():
            keys[r] = encoded.extras[_KEY][j].to(keys)
        self._context = (context, keys)

    def _on_key(self, module, args):
        if self._context is None or not args:
            return None
        context, keys = self._context
        x = args[0]
        if x is context or (x.shape == context.shape and torch.equal(x, context)):
            return (keys, *args[1:])
        return None


def expand(ids: list[int], replacements: dict[int, list[int]], length: int) -> tuple[list[int], list[int]]:
    """``ids`` with each replaced token spelled out as its phrase, cut to ``length``, and for every position of
    ``ids`` the position to read in the result: the phrase's last token for a replaced token, else its own."""
    new, where = [], []
    for token in ids:
        new.extend(replacements.get(token, (token,)))
        where.append(len(new) - 1)
    return new[:length], [min(w, length - 1) for w in where]
