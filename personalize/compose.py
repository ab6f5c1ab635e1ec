"""Attaching concepts to a pipeline the user already holds.

``attach(pipe, concept)`` checks the concept against the pipeline's base
fingerprint, rebuilds the method's edits from the file and installs them at
their seams. The returned :class:`Attachment` removes them again
(``detach()`` or ``with attach(...):``), leaving the pipeline bit-identical to
before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import methods as method_registry
from .concept import Concept, check_base, load_concept
from .errors import BadInputError
from .methods.shared import check_composable


class Attachment:
    """Concepts attached to one pipeline; ``detach()`` removes them all."""

    def __init__(self, pipe, methods: list):
        self.pipe = pipe
        self.methods = methods

    @property
    def tokens(self) -> list[str]:
        return [m.token for m in self.methods]

    def detach(self) -> None:
        for m in reversed(self.methods):
            m.remove()
        self.methods = []

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _as_concept(item) -> Concept:
    return item if isinstance(item, Concept) else load_concept(Path(item))


def check_lag(concept: Concept, method_cls) -> None:
    """LAG sampling masks personalized residuals; refuse a concept that has none."""
    if "proj_out" not in method_cls.sites:
        name = concept.path.name if concept.path is not None else concept.token
        raise BadInputError(
            f"--lag needs a concept with personalized residuals, but '{name}' is a {concept.method} concept "
            "(no residuals); drop --lag or train it with --method residuals"
        )


def attach(pipe, concepts: Concept | str | Path | Sequence, *, lag: bool = False, **knobs: Any) -> Attachment:
    """Attach one concept (a :class:`Concept` or a file path) with inference knobs, e.g. ``beta=0.7``.

    ``lag=True`` (residuals concepts) turns on localized attention-guided
    sampling: the residuals apply only where the concept is attended.
    """
    items = list(concepts) if isinstance(concepts, (list, tuple)) else [concepts]
    if len(items) != 1:
        raise BadInputError(
            "attaching several concepts at once is not supported yet (it comes with composition); attach one concept"
        )
    concept = _as_concept(items[0])
    method_cls = method_registry.get(concept.method)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    lag = bool(knobs.pop("lag", lag))
    if lag:
        check_lag(concept, method_cls)
        knobs["lag"] = True
    check_base(concept, pipe)
    check_composable(pipe, method_cls, len(items))  # DreamBooth (full) replaces the UNet: it attaches alone
    method = method_cls.from_concept(pipe, concept, **knobs)
    return Attachment(pipe, [method])
