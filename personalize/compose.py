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


def attach(pipe, concepts: Concept | str | Path | Sequence, **knobs: Any) -> Attachment:
    """Attach one concept (a :class:`Concept` or a file path) with inference knobs, e.g. ``beta=0.7``."""
    items = list(concepts) if isinstance(concepts, (list, tuple)) else [concepts]
    if len(items) != 1:
        raise BadInputError(
            "attaching several concepts at once is not supported yet (it comes with composition); attach one concept"
        )
    concept = _as_concept(items[0])
    method_cls = method_registry.get(concept.method)
    check_base(concept, pipe)
    method = method_cls.from_concept(pipe, concept, **{k: v for k, v in knobs.items() if v is not None})
    return Attachment(pipe, [method])
