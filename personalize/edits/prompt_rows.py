"""Which encoded prompt each row of the UNet's text context is: one matcher per pipeline.

LAG sampling needs a row's token ids (to find the concept's columns) and
global key-locking needs a second encoding of the same prompt (to swap K's
input). Both learn it the same way: a forward hook on the text encoder records
every encoded prompt (its ids, its output and whatever each subscriber computes
from it at that moment), and a UNet row is matched to a recorded prompt by
exact equality of the encodings (``prompt_embeds`` passed directly, or
``clip_skip``, match nothing, and the callers refuse that in one line).

Subscribers register with :meth:`PromptRows.subscribe`; the hook is installed
with the first and removed with the last. Encodings a subscriber makes inside
its own callback (the key lock encodes the superclass prompt) are not recorded.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .state import pipeline_state, release

#: subscriber callback: (text encoder, args, kwargs, ids, hidden) -> the subscriber's extra for this prompt batch
Extra = Callable[[Any, tuple, dict, torch.Tensor, torch.Tensor], Any]


@dataclass
class Encoded:
    """One text-encoder call: token ids (on the CPU), its output rows, and each subscriber's extra."""

    ids: torch.Tensor
    hidden: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)


class PromptRows:
    """The recent prompt batches of one pipeline and the row matcher (see the module docstring)."""

    KEEP = 8  # prompt batches kept (a pipeline call encodes one or two)

    def __init__(self, pipe):
        self.pipe = pipe
        self.recent: deque[Encoded] = deque(maxlen=self.KEEP)
        self.version = 0  # bumped at every recorded encoding (callers cache per version)
        self._subscribers: dict[str, Extra | None] = {}
        self._handle = None
        self._busy = False

    def subscribe(self, key: str, extra: Extra | None = None) -> None:
        if self._handle is None:
            self._handle = self.pipe.text_encoder.register_forward_hook(self._on_text, with_kwargs=True)
        self._subscribers[key] = extra

    def unsubscribe(self, key: str) -> None:
        self._subscribers.pop(key, None)
        if self._subscribers:
            return
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.recent.clear()
        state = pipeline_state(self.pipe, create=False)
        if state is not None and state.prompt_rows is self:
            state.prompt_rows = None
            release(self.pipe)

    @torch.no_grad()
    def _on_text(self, module, args, kwargs, output) -> None:
        if self._busy:
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return
        hidden = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state
        extras = {}
        self._busy = True
        try:
            for key, extra in self._subscribers.items():
                if extra is not None:
                    extras[key] = extra(module, args, kwargs, ids, hidden)
        finally:
            self._busy = False
        self.recent.append(Encoded(ids.detach().cpu(), hidden.detach(), extras))
        self.version += 1

    @torch.no_grad()
    def match(self, context: torch.Tensor, need: str | None = None) -> dict[int, tuple[Encoded, int]]:
        """``{row of context: (recorded batch, its row)}`` for every row equal to a recorded encoding (oldest
        first); ``need``: only batches recorded while that subscriber was there (they hold its extra)."""
        found: dict[int, tuple[Encoded, int]] = {}
        for encoded in self.recent:
            hidden = encoded.hidden
            if hidden.shape[1:] != context.shape[1:] or (need is not None and need not in encoded.extras):
                continue
            same = (context[:, None] == hidden[None].to(context)).flatten(2).all(-1).cpu()  # (rows, recorded rows)
            for r, j in same.nonzero().tolist():
                found.setdefault(r, (encoded, j))
        return found


def prompt_rows(pipe) -> PromptRows:
    """The pipeline's prompt-row matcher (created on first use)."""
    state = pipeline_state(pipe)
    if state.prompt_rows is None:
        state.prompt_rows = PromptRows(pipe)
    return state.prompt_rows
