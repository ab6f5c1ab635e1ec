"""What is attached to one pipeline, in one object per pipeline.

Every seam keeps its per-pipeline bookkeeping here instead of in a module-level
dictionary of its own: the token site, the site groups (all Perfusion concepts
share one, all residual concepts another), the prompt-row matcher that LAG and
global key-locking read, the attention-map store, and which concept replaced
the whole UNet (DreamBooth). The object lives as long as the pipeline (a weak
reference) and is dropped when the last thing is removed, so a pipeline with
everything detached carries nothing of ours.
"""
from __future__ import annotations

import weakref
from typing import Any

_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PipelineState:
    """The attachments of one pipeline (see the module docstring)."""

    def __init__(self, pipe):
        self.pipe_ref = weakref.ref(pipe)
        self.tokens = None  # edits.tokens.TokenSite while any token is attached
        self.groups: dict[str, Any] = {}  # group key -> edits.groups.SiteGroup
        self.prompt_rows = None  # edits.prompt_rows.PromptRows while LAG or a global key lock needs it
        self.attention_maps = None  # edits.attention_maps.AttentionMaps while LAG watches a concept
        self.replaced_by: str | None = None  # key of a concept that swapped the whole UNet in
        self.cache: dict[Any, Any] = {}  # per-pipeline values computed once (e.g. Perfusion's C^-1 per corpus)

    def empty(self) -> bool:
        return (self.tokens is None and not self.groups and self.prompt_rows is None
                and self.attention_maps is None and self.replaced_by is None)


def pipeline_state(pipe, create: bool = True) -> PipelineState | None:
    """The pipeline's state (created on first use unless ``create`` is False)."""
    state = _STATES.get(pipe)
    if state is None and create:
        state = _STATES[pipe] = PipelineState(pipe)
    return state


def release(pipe) -> None:
    """Drop the pipeline's state once nothing is attached (the cache goes with it)."""
    state = _STATES.get(pipe)
    if state is not None and state.empty():
        del _STATES[pipe]
