"""The adapter interface every method implements.

A method class is built in one of two ways on a pipeline:
- ``Method.for_training(pipe, token, superclass, config)`` creates fresh
  trainable state (initialised from the superclass) and installs it;
- ``Method.from_concept(pipe, concept, **knobs)`` rebuilds the same state
  from a concept file and installs it.
Both end with the same edits in the pipeline, so what was trained is exactly
what is generated later. The shared trainer only needs ``param_groups``,
``placeholder``, ``on_text_encoded`` and the state methods.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..errors import BadInputError


class Method:
    name: ClassVar[str]
    description: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]  # "tokens", "kv", "proj_out", "unet"
    Config: ClassVar[type]
    #: knobs ``attach`` accepts, with their meaning (shown in --help and errors)
    knobs: ClassVar[dict[str, str]] = {}

    def __init__(self, pipe, token: str, superclass: str, config):
        self.pipe = pipe
        self.token = token
        self.superclass = superclass
        self.config = config
        self.installed = False

    # -- construction -------------------------------------------------------------
    @classmethod
    def make_config(cls, overrides: dict[str, Any] | None = None):
        """The method's config with ``overrides`` applied; unknown keys are errors."""
        overrides = dict(overrides or {})
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise BadInputError(
                f"unknown {cls.name} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        return cls.Config(**overrides)

    @classmethod
    def for_training(cls, pipe, token: str, superclass: str, config) -> "Method":
        raise NotImplementedError

    @classmethod
    def from_concept(cls, pipe, concept, **knobs) -> "Method":
        raise NotImplementedError

    # -- training ----------------------------------------------------------------
    def placeholder(self) -> str:
        """The words that stand for the concept in training prompts."""
        return self.token

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def on_text_encoded(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Called by the trainer after each text encoding, before the UNet."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume or save the concept (trainable and running state)."""
        raise NotImplementedError

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def concept_tensors(self) -> dict[str, torch.Tensor]:
        """What goes into the concept file (defaults to the full state)."""
        return self.state_tensors()

    def inference_defaults(self) -> dict[str, Any]:
        return {}

    def header_fields(self) -> dict[str, Any]:
        """Extra top-level header entries the method needs at attach time."""
        return {}

    # -- the pipeline ------------------------------------------------------------
    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError
