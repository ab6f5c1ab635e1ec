"""The adapter interface every method implements.

A method class is built in one of two ways on a pipeline:
- ``Method.for_training(pipe, token, superclass, config)`` creates fresh
  trainable state (initialised from the superclass) and installs it;
- ``Method.from_concept(pipe, concept, **knobs)`` rebuilds the same state
  from a concept file and installs it.
Both end with the same edits in the pipeline, so what was trained is exactly
what is generated later. The shared trainer only needs ``param_groups``,
``placeholder``, ``templates``, ``on_text_encoded``, the state methods and
``train_defaults`` (the method's own trainer defaults, e.g. its paper's steps
and batch size; explicit settings still win).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..errors import BadInputError


class Method:
    name: ClassVar[str]
    description: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]  # "tokens", "kv", "attention", "proj_out", "unet", "text_encoder"
    Config: ClassVar[type]
    #: knobs ``attach`` accepts, with their meaning (shown in --help and errors)
    knobs: ClassVar[dict[str, str]] = {}
    #: TrainConfig fields this method defaults differently (explicit settings win)
    train_defaults: ClassVar[dict[str, Any]] = {}
    #: several concepts (image folders, tokens) in one run and one file
    multi_concept: ClassVar[bool] = False
    #: False when the method replaces the base (DreamBooth): it attaches alone
    composable: ClassVar[bool] = True
    #: ``personalize export`` formats: name -> how a stock tool loads it (see ``personalize/interop.py``)
    export_formats: ClassVar[dict[str, str]] = {}
    export_needs_base: ClassVar[bool] = False

    def __init__(self, pipe, token: str, superclass: str, config):
        self.pipe = pipe
        self.token = token
        self.superclass = superclass
        self.config = config
        self.installed = False

    # -- construction -------------------------------------------------------------
    @classmethod
    def make_config(cls, overrides: dict[str, Any] | None = None):
        """The method's config with ``overrides`` applied; unknown keys are errors, and every value is coerced to
        its field's type and range-checked (``personalize/settings.py``) before anything is built."""
        from ..settings import coerce_fields

        overrides = dict(overrides or {})
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise BadInputError(
                f"unknown {cls.name} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
            )
        return cls.Config(**coerce_fields(cls.Config, overrides, f"{cls.name} "))

    @classmethod
    def for_training(cls, pipe, token: str, superclass: str, config) -> "Method":
        """Fresh trainable state, installed (methods needing more, e.g. Perfusion's C, override this)."""
        method = cls(pipe, token, superclass, config)
        method.install()
        return method

    @classmethod
    def from_concept(cls, pipe, concept, **knobs) -> "Method":
        raise NotImplementedError

    @classmethod
    def for_import(cls, pipe, found: dict, config) -> "Method":
        """Build (and install) the method for a converted foreign file (``import_state``'s result)."""
        return cls.for_training(pipe, found["token"], found["superclass"], config)

    # -- training ----------------------------------------------------------------
    def placeholder(self) -> str:
        """The words that stand for the concept in training prompts."""
        return self.token

    def templates(self) -> tuple[str, ...]:
        """Training prompt templates; ``{}`` is replaced by :meth:`placeholder`."""
        from ..templates import NEUTRAL_TEMPLATES

        return NEUTRAL_TEMPLATES

    def placeholders(self) -> list[str]:
        """One placeholder per concept of the run (several only for ``multi_concept`` methods)."""
        return [self.placeholder()]

    @classmethod
    def prior_spec(cls, config, superclasses: list[str]):
        """The class images this run trains on beside the photos (``personalize/prior.py``), or None."""
        from ..prior import PriorConfig, spec_from_config

        return spec_from_config(config, superclasses) if isinstance(config, PriorConfig) else None

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def on_text_encoded(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Called by the trainer after each text encoding, before the UNet."""

    def text_path_frozen(self) -> bool:
        """True when nothing this method trains acts on the text encoder's output (no token vector, no text
        encoder weight): the trainer then encodes each distinct prompt once and reuses it."""
        return False

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

    def write_artifacts(self, out) -> dict[str, Any]:
        """After training and ``remove()``: write files beside the concept file ``out`` (DreamBooth's pipeline
        folder); returns the header entries that name them."""
        return {}

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        """Extra entries for an export's ``export.json`` (e.g. the prompt word to use)."""
        return {}

    # -- the pipeline ------------------------------------------------------------
    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError
