"""Which encoded prompt each row of the UNet's text context is: one matcher per pipeline.

LAG sampling needs a row's token ids (to find the concept's columns) and
global key-locking needs a second encoding of the same prompt (to swap K's
input). Both learn it the same way: a forward hook on the text encoder records
every encoded prompt (its ids, the UNet context it makes and whatever each
subscriber computes from it at that moment), and a UNet row is matched to a
recorded prompt by exact equality of the encodings (``prompt_embeds`` passed
directly, or ``clip_skip``, match nothing, and the callers refuse that in one
line).

With two text encoders (SDXL) both are hooked: the first one's call is held
until the second one's, and the record is what ``StableDiffusionXLPipeline``
gives the UNet, the two penultimate hidden states side by side
(``text_stack.py``); a subscriber's re-encoding runs both encoders the same way.

On a diffusion transformer (SD3, Flux.1) the context is assembled from several encoders in the family's own
way (SD3: both CLIPs' penultimate states padded and followed by T5's; Flux.1: T5's alone, CLIP-L only pooled),
so each encoder's ids are held until the last encoder of the pair list is called, and the record is the
family's ``encode_ids`` of those ids (``families/``): its context, checked bit for bit against the stock
``encode_prompt`` in the family tests, and its ids aligned with the context's rows.

Subscribers register with :meth:`PromptRows.subscribe`; the hook is installed
with the first and removed with the last. Encodings a subscriber makes inside
its own callback (the key lock encodes the superclass prompt) are not recorded.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import families
from ..text_stack import encoders
from .state import pipeline_state, release

#: re-encodes a prompt batch given new ids (one tensor per text encoder) as the UNet would read it
Reencode = Callable[[list], torch.Tensor]
#: subscriber callback: (re-encode, ids per text encoder, UNet context) -> the subscriber's extra for this batch
Extra = Callable[[Reencode, list, torch.Tensor], Any]


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
        self._handles: list = []
        self._pending = None  # SDXL: the first encoder's call, until the second one's
        self._busy = False

    def subscribe(self, key: str, extra: Extra | None = None) -> None:
        if not self._handles:
            tes = encoders(self.pipe)
            self._handles = [te.register_forward_hook(partial(self._on_text, k, len(tes)), with_kwargs=True)
                             for k, te in enumerate(tes)]
        self._subscribers[key] = extra

    def unsubscribe(self, key: str) -> None:
        self._subscribers.pop(key, None)
        if self._subscribers:
            return
        for handle in self._handles:
            handle.remove()
        self._handles, self._pending = [], None
        self.recent.clear()
        state = pipeline_state(self.pipe, create=False)
        if state is not None and state.prompt_rows is self:
            state.prompt_rows = None
            release(self.pipe)

    @torch.no_grad()
    def _on_text(self, index: int, count: int, module, args, kwargs, output) -> None:
        if self._busy:
            return
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return
        family = families.of(self.pipe)
        if family is not None and family.denoiser == "transformer":
            self._on_dit_text(family, index, count, ids)
            return
        if count == 1:
            calls = [(ids, output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state, module,
                      args, kwargs)]
        else:
            states = getattr(output, "hidden_states", None)
            if states is None:  # not an encoding for the UNet (SDXL's pipeline asks for the hidden states)
                return
            if index == 0:
                self._pending = (ids, states[-2], module, args, kwargs)
                return
            if self._pending is None or self._pending[0].shape != ids.shape:
                return
            calls, self._pending = [self._pending, (ids, states[-2], module, args, kwargs)], None
        context = torch.cat([c[1] for c in calls], dim=-1)

        def reencode(new_ids: list) -> torch.Tensor:
            outs = []
            for (_, _, mod, a, kw), new in zip(calls, new_ids):
                out = mod(new, *a[1:], **kw)
                outs.append(out.hidden_states[-2] if count > 1 else
                            (out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state))
            return torch.cat(outs, dim=-1)

        self._record(ids if count == 1 else calls[0][0], context, reencode, [c[0] for c in calls])

    def _on_dit_text(self, family, index: int, count: int, ids: torch.Tensor) -> None:
        """One encoder call of a diffusion transformer's prompt encoding: hold its ids until the last encoder's."""
        held = self._pending if isinstance(self._pending, list) else []
        if index != len(held) or (held and held[0].shape[0] != ids.shape[0]):
            held = []  # a call out of the pipeline's order starts over (only the first encoder can start)
            if index != 0:
                self._pending = None
                return
        held = [*held, ids]
        if len(held) < count:
            self._pending = held
            return
        self._pending = None

        def reencode(new_ids: list) -> torch.Tensor:
            return family.encode_ids(self.pipe, new_ids).context

        self._busy = True
        try:
            encoding = family.encode_ids(self.pipe, held)
        finally:
            self._busy = False
        self._record(encoding.ids, encoding.context, reencode, held)

    def _record(self, ids: torch.Tensor, context: torch.Tensor, reencode: Reencode, all_ids: list) -> None:
        extras = {}
        self._busy = True
        try:
            for key, extra in self._subscribers.items():
                if extra is not None:
                    extras[key] = extra(reencode, all_ids, context)
        finally:
            self._busy = False
        self.recent.append(Encoded(ids.detach().cpu(), context.detach(), extras))
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
