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
from typing import Any, Callable, ClassVar

import torch

from ..errors import BadInputError
from ..knobs import parse
from .cards import MethodCard


class Method(MethodCard):
    """A method: its card (:class:`~personalize.methods.cards.MethodCard`: name, description, sites, ``Config``,
    ``Knobs``, ``train_defaults``, ``recipe``; torch-free) and what it does to a pipeline."""

    #: the ``edits.groups.SiteGroup`` its concepts share (one occupant per site for all of them), if any
    Group: ClassVar[type | None] = None
    #: the reference's best-step schedule: validate every N steps and keep the best harmonic mean (0 = keep the
    #: last step); the default of ``train --validate-every`` with an evaluator (a benchmark keeps every
    #: method's last step)
    validate_every: ClassVar[int] = 0
    #: how a prompt names the concept, as the method trains on it and as its paper evaluates it: "word" puts
    #: the token in place of the class word ("a photo of a <tok>": Perfusion §4.5, Textual Inversion);
    #: "modifier" writes the token before the class word ("a photo of a <tok> dog": DreamBooth's "[V] [class]",
    #: Custom Diffusion's "<new1> cat", Personalized Residuals' "V* <macro class>"). See :meth:`subject`.
    prompting: ClassVar[str] = "word"
    #: several concepts (image folders, tokens) in one run and one file
    multi_concept: ClassVar[bool] = False
    #: False when the method replaces the base (DreamBooth): it attaches alone
    composable: ClassVar[bool] = True
    #: ``personalize export`` formats: name -> how a stock tool loads it (see ``personalize/interop.py``)
    export_formats: ClassVar[dict[str, str]] = {}
    export_needs_base: ClassVar[bool] = False
    #: why a method without export formats needs none (shown instead of the list of exporting methods)
    no_export_reason: ClassVar[str] = ""

    def __init__(self, pipe, token: str, superclass: str, config):
        self.check_base(pipe)
        self.pipe = pipe
        self.token = token
        self.superclass = superclass
        self.config = config
        self.installed = False
        self.group = None  # the SiteGroup joined while installed
        self.knob_values = self.Knobs()  # the inference knobs in effect (``set_knobs``)
        self.concept_defaults: dict[str, Any] = {}  # the concept header's inference_defaults
        self._placed: list[tuple[str, list[str]]] = []  # (pipeline part, site names) of own occupants

    # -- construction -------------------------------------------------------------
    @classmethod
    def check_base(cls, pipe) -> None:
        """Refuse (one line) a base whose family lacks a site kind this method edits, or that the family refuses
        for this method, before any work: nothing installs "only the token"."""
        from .. import families

        cls.check_family(families.of(pipe))

    @classmethod
    def check_family(cls, family) -> None:
        """:meth:`check_base` for a family known before its base is loaded (``base.declared_families``)."""
        from .. import families
        from . import names_for, refusal

        reason = refusal(cls.name, family)
        if reason is not None:
            supported = [f.label for f in families.FAMILIES.values() if cls.name in names_for(f)]
            raise BadInputError(f"{cls.name} does not work on {family.label} bases: {reason}; use a base of "
                                f"{', '.join(supported)}, or another method")

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
        """The concept's edits, installed, with inference ``knobs`` (checked before anything is built)."""
        parse(cls, knobs)
        method = cls.rebuild(pipe, concept)
        method.concept_defaults = dict(concept.inference_defaults)
        method.set_knobs(**knobs)
        method.install()
        return method

    @classmethod
    def check_together(cls, concepts: list) -> None:
        """Refuse (one line) concept files of this method that cannot be attached together; called by
        ``compose.prepare`` before any pipeline is loaded."""

    @classmethod
    def rebuild(cls, pipe, concept) -> "Method":
        """The method's state rebuilt from a concept file, not installed (methods whose files need more
        than token, superclass, config and tensors override this)."""
        method = cls(pipe, concept.token, concept.superclass, cls.make_config(concept.config))
        method.load_state_tensors(concept.tensors)
        return method

    @classmethod
    def for_import(cls, pipe, found: dict, config) -> "Method":
        """Build (and install) the method for a converted foreign file (``import_state``'s result)."""
        return cls.for_training(pipe, found["token"], found["superclass"], config)

    # -- training ----------------------------------------------------------------
    @classmethod
    def subject(cls, token: str, superclass: str) -> str:
        """What fills a prompt's ``{}`` for a concept of this method (:attr:`prompting`): the training prompts'
        words, and the benchmark's, so that every method is prompted the way it was trained."""
        return f"{token} {superclass}" if cls.prompting == "modifier" else token

    def placeholder(self) -> str:
        """The words that stand for the concept in training prompts."""
        return self.subject(self.token, self.superclass)

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

    def training_knobs(self) -> dict[str, Any]:
        """The knobs under which attaching reproduces the pipeline as it was during training (Perfusion: the
        training gate); the method contract test uses them."""
        return {}

    # -- inference knobs ---------------------------------------------------------------
    def set_knobs(self, where: str = "", **values: Any) -> None:
        """Change inference knobs in place (installed or not): parsed and range-checked by ``knobs.parse``,
        then applied by :meth:`knobs_changed`; nothing changes if any value is refused."""
        parsed = parse(type(self), values, where)
        old = self.knob_values
        self.knob_values = dataclasses.replace(old, **parsed)
        self.knobs_changed(old)

    def knobs_changed(self, old) -> None:
        """Apply ``self.knob_values`` (``old``: the values before)."""

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
    @property
    def key(self) -> str:
        """The concept's name at every seam (token site entries, occupant keys)."""
        return f"{self.name}:{self.token}"

    def token_vectors(self) -> tuple[list[str], torch.Tensor]:
        """The strings this concept adds at the token seam and their vectors (one row each)."""
        return [self.token], self.embedding

    def occupants(self) -> dict[str, dict[str, Callable]]:
        """This concept's own occupants, ``{pipeline part: {site name: occupant}}`` (additive edits); the site
        names come from ``edits.placement.site_names``."""
        return {}

    def new_group(self):
        """A new instance of :attr:`Group` for this pipeline (the first concept of the method to attach)."""
        return self.Group(self.pipe)

    def on_install(self) -> None:
        """After the seams are occupied (e.g. register with the attention-map capture)."""

    def on_remove(self) -> None:
        """Before the seams are vacated."""

    def token_alias(self) -> str | None:
        """A base word the concept token stands for exactly (DreamBooth's identifier), or None (a new token)."""
        return None

    def install(self) -> None:
        """Occupy the seams: tokens, own occupants, the group; all or nothing."""
        from ..edits.groups import join
        from ..edits.sites import occupy_all
        from ..edits.tokens import token_site

        if self.installed:
            return
        tokens, vectors = self.token_vectors()
        token_site(self.pipe).add(self.key, tokens, vectors, alias=self.token_alias())
        try:
            for part, occupants in self.occupants().items():
                occupy_all(getattr(self.pipe, part), occupants, self.key)
                self._placed.append((part, list(occupants)))
            if self.Group is not None:
                self.group = join(self.pipe, self.Group.KEY, self.new_group, self)
            self.installed = True
            self.on_install()
        except BaseException:
            self._vacate()
            raise

    def remove(self) -> None:
        """Vacate everything :meth:`install` occupied; the last concept out restores the original modules."""
        if self.installed:
            self.on_remove()
            self._vacate()

    def _vacate(self) -> None:
        from ..edits.groups import leave
        from ..edits.sites import vacate_all
        from ..edits.tokens import token_site

        self.installed = False
        if self.group is not None:
            leave(self.pipe, self.group, self)
            self.group = None
        for part, names in self._placed:
            vacate_all(getattr(self.pipe, part), names, self.key)
        self._placed = []
        token_site(self.pipe).remove(self.key)
