"""Attaching concepts to a pipeline the user already holds, one or several at once.

``attach(pipe, concepts)`` checks the concepts against each other and against
the pipeline's base fingerprint, rebuilds each method's edits from its file and
installs them at their seams. The returned :class:`Attachment` removes them
again (``detach()`` or ``with attach(...):``), leaving the pipeline
bit-identical to before.

Several concepts may mix any composable methods. Each item is a concept (a
:class:`Concept` or a file path) or ``(concept, {knob: value})``; keyword
knobs apply to every concept whose method takes them, an item's own knobs win.
``token=<new>`` renames a concept's placeholder (to resolve a clash). How the
seams combine several concepts (one shared Perfusion projection, additive
deltas after it, residuals summed per block) is in ``docs/ARCHITECTURE.md``;
every seam combines its occupants in a fixed order, so attach order never
changes the output.

``attach(None, concepts)`` (and ``load_base_for(concepts)``) load the base the
concepts' headers record (``provenance.base``: the ``--base`` they were trained
or imported with); concepts recording different bases are refused, and a header
that records no loadable base (a concept trained on a pipeline object) asks for
the base to be given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import methods as method_registry
from .concept import Concept, check_base, load_concept
from .errors import BadInputError, BaseModelError, PersonalizeError
from .methods.shared import check_composable
from .knobs import parse as parse_knobs
from .templates import check_new_token, check_token
from .text_stack import FAMILIES


class Attachment:
    """Concepts attached to one pipeline; ``detach()`` removes them all."""

    def __init__(self, pipe, methods: list):
        self.pipe = pipe
        self.methods = methods

    @property
    def tokens(self) -> list[str]:
        return [m.token for m in self.methods]

    def set(self, **knobs: Any) -> "Attachment":
        """Change inference knobs in place, e.g. ``handle.set(beta=0.6)`` or ``handle.set(lag=False)``: each knob
        goes to every attached concept whose method takes it (a lone concept gets all, and refuses what it
        does not take). Every value is checked before anything changes; nothing is rebuilt (Perfusion keeps
        its C^-1 and projection, only the gate changes)."""
        plan = _assign(self.methods, knobs, lambda m: type(m), lambda m: m.token)
        for method, values in plan:
            parse_knobs(type(method), values, f"{method.token}: ")
        for method, values in plan:
            method.set_knobs(f"{method.token}: ", **values)
        return self

    def detach(self) -> None:
        for m in reversed(self.methods):
            m.remove()
        self.methods = []

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


@dataclass
class Part:
    """One concept of a composition, with the knobs its method will be built with."""

    concept: Concept
    method_cls: type
    knobs: dict[str, Any]

    @property
    def name(self) -> str:
        return _name(self.concept)


def _name(concept: Concept) -> str:
    return concept.path.name if concept.path is not None else concept.token


def _as_concept(item) -> Concept:
    return item if isinstance(item, Concept) else load_concept(Path(item))


def concept_tokens(concept: Concept) -> list[str]:
    """The placeholder strings a concept adds (several for a multi-concept Custom Diffusion file)."""
    return list(concept.header.get("tokens") or [concept.token])


def renamed(concept: Concept, token: str) -> Concept:
    """``concept`` under another placeholder string (``token=<new>``)."""
    tokens = concept.header.get("tokens")
    if tokens and len(tokens) > 1:
        raise BadInputError(f"'{_name(concept)}' holds {len(tokens)} concepts ({', '.join(tokens)}); "
                            "token= renames single-concept files only")
    renamed_ = concept.with_token(check_token(token, f"--concept {_name(concept)}:token="))
    if tokens:
        renamed_.header["tokens"] = [token]
    return renamed_


def check_lag(concept: Concept, method_cls) -> None:
    """LAG sampling masks personalized residuals; refuse a concept that has none."""
    if "lag" not in method_cls.knobs:
        raise BadInputError(
            f"--lag needs a concept with personalized residuals, but '{_name(concept)}' is a {concept.method} concept "
            "(no residuals); drop --lag or train it with --method residuals"
        )


def _split(item) -> tuple[Any, dict]:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
        return item[0], dict(item[1])
    return item, {}


def _items(concepts) -> list:
    """A list of items; a bare ``(concept, knobs)`` pair is one item."""
    pair = isinstance(concepts, tuple) and len(concepts) == 2 and isinstance(concepts[1], dict)
    return list(concepts) if isinstance(concepts, (list, tuple)) and not pair else [concepts]


def _part(item) -> Part:
    source, knobs = _split(item)
    concept = _as_concept(source)
    knobs = {k: v for k, v in knobs.items() if v is not None}
    token = knobs.pop("token", None)
    if token is not None:
        concept = renamed(concept, str(token))
    return Part(concept, method_registry.get(concept.method), knobs)


def _assign(items: list, knobs: dict[str, Any], cls_of, name_of) -> list[tuple[Any, dict]]:
    """``[(item, {knob: value})]``: each knob for every item whose method takes it (a lone item gets all, and
    refuses what it must); a knob no item takes is refused."""
    out: list[tuple[Any, dict]] = [(item, {}) for item in items]
    for key, value in knobs.items():
        takers = [values for item, values in out if len(items) == 1 or key in cls_of(item).knobs]
        if not takers:
            if key == "lag":
                raise BadInputError(f"--lag needs a concept with personalized residuals, but none of "
                                    f"{', '.join(map(name_of, items))} has residuals; drop --lag")
            methods = ", ".join(sorted({cls_of(item).name for item in items}))
            raise BadInputError(f"no concept here takes {key} (methods: {methods})")
        for values in takers:
            values[key] = value
    return out


def _share(parts: list[Part], shared: dict[str, Any]) -> None:
    """Give each shared knob to every concept that takes it; an item's own knobs win."""
    if len(parts) == 1 and "lag" in shared:
        check_lag(parts[0].concept, parts[0].method_cls)
    for part, values in _assign(parts, shared, lambda p: p.method_cls, lambda p: p.name):
        for key, value in values.items():
            part.knobs.setdefault(key, value)


def _check_together(parts: list[Part]) -> None:
    """Refuse compositions that cannot work, before anything is built."""
    if len(parts) > 1:
        for p in parts:
            if not p.method_cls.composable:
                raise BadInputError(f"'{p.name}' is a {p.concept.method} concept: it replaces the UNet and cannot be "
                                    "composed with other concepts; generate with it alone")
    first = parts[0]
    for p in parts[1:]:
        families = [q.concept.base_fingerprint.family for q in (first, p)]
        if all(families) and families[0] != families[1]:
            names = [FAMILIES.get(f, f) for f in families]
            raise BadInputError(f"'{first.name}' was trained on an {names[0]} base and '{p.name}' on an {names[1]} "
                                "base; compose concepts of one base")
        if p.concept.base_fingerprint.differences(first.concept.base_fingerprint):
            bases = [q.concept.header.get("provenance", {}).get("base", "?") for q in (first, p)]
            raise BadInputError(f"'{first.name}' and '{p.name}' were trained on different bases ({bases[0]} vs "
                                f"{bases[1]}); compose concepts of one base")
    seen: dict[str, Part] = {}
    for p in parts:
        for token in concept_tokens(p.concept):
            if token.lower() in seen:
                raise BadInputError(f"'{seen[token.lower()].name}' and '{p.name}' both use the token {token}; rename one, "
                                    f"e.g. --concept {p.name}:token={token.rstrip('>')}2{'>' if token.endswith('>') else ''}")
            seen[token.lower()] = p
    for method_cls in {p.method_cls for p in parts}:
        method_cls.check_together([p.concept for p in parts if p.method_cls is method_cls])


def prepare(concepts, **shared: Any) -> list[Part]:
    """Load and check a composition without a pipeline (the CLI calls this before loading the base)."""
    parts = [_part(item) for item in _items(concepts)]
    if not parts:
        raise BadInputError("no concept given; pass at least one concept file")
    # ``lag=False`` is attach()'s default, not a request; any other given knob (gate=False too) is one
    _share(parts, {k: v for k, v in shared.items() if v is not None and not (k == "lag" and v is False)})
    for p in parts:
        if "lag" in p.knobs and "lag" not in p.method_cls.knobs:
            check_lag(p.concept, p.method_cls)
        p.knobs = parse_knobs(p.method_cls, p.knobs, f"--concept {p.name}:")
    _check_together(parts)
    return parts


def recorded_base(concepts, flag: str = "--base") -> str:
    """The base the concepts' headers record (``provenance.base``), one for all of them; several different
    ones, or a header without a loadable one, are refused in one line asking for ``flag``."""
    from .base import BUILTIN_BASES, _HUB_ID, path_exists

    parts = concepts if isinstance(concepts, list) and all(isinstance(p, Part) for p in concepts) \
        else [_part(item) for item in _items(concepts)]
    if not parts:
        raise BadInputError("no concept given; pass at least one concept file")
    bases = {}
    for p in parts:
        base = p.concept.header.get("provenance", {}).get("base")
        usable = isinstance(base, str) and (base in BUILTIN_BASES or path_exists(base)
                                            or (len(base) <= 200 and _HUB_ID.match(base)))
        if not usable:
            raise BadInputError(f"'{p.name}' records no base it can be loaded from (its header says "
                                f"{_shown(base)}); pass {flag} with the base it was trained on")
        bases.setdefault(base, p.name)
    if len(bases) > 1:
        listed = ", ".join(f"'{name}' on {_shown(base)}" for base, name in bases.items())
        raise BadInputError(f"the concepts record different bases ({listed}); pass {flag} to choose one")
    return next(iter(bases))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_base_for(concepts, device=None, dtype=None, scheduler: str | None = None):
    """The base pipeline the concepts' headers record (:func:`recorded_base`), loaded with
    :func:`personalize.base.load_base`; a recorded base that no longer loads is one line naming it."""
    from .base import load_base

    base = recorded_base(concepts)
    try:
        return load_base(base, device=device, dtype=dtype, scheduler=scheduler)
    except PersonalizeError as exc:
        raise BaseModelError(f"the base the concept records ({_shown(base)}) does not load: {exc}; pass --base") \
            from exc


def attach(pipe, concepts: Concept | str | Path | Sequence, *, lag: bool = False, check_base_weights: bool = True,
           **knobs: Any) -> Attachment:
    """Attach one or several concepts with inference knobs, e.g. ``beta=0.7`` or ``lock="global"``.

    ``pipe``: the base pipeline, or ``None`` to load the one the concepts record (:func:`load_base_for`; it is
    ``handle.pipe`` then). ``concepts``: a concept or file path, ``(concept, {"beta": 0.6, "token": "<b2>"})``,
    or a list of these.
    ``lag=True`` (residuals concepts) turns on localized attention-guided sampling: the residuals apply only
    where the concept is attended. ``lock="global"`` (Perfusion): K projections read the prompt with each
    concept word replaced by its superclass word. ``check_base_weights=False`` accepts text-encoder weights
    that differ from the concept's base (e.g. after a stock ``pipe.fuse_lora()`` on the text encoder), with a
    ``UserWarning``; family, architecture and vocabulary are still checked.
    """
    from .edits.tokens import base_tokenizer

    parts = prepare(concepts, lag=lag, **knobs)
    if pipe is None:
        pipe = load_base_for(parts)
    for p in parts:
        check_base(p.concept, pipe, weights=check_base_weights)
        check_composable(pipe, p.method_cls, len(parts))  # DreamBooth (full) replaces the UNet: it attaches alone
        for token in concept_tokens(p.concept):  # e.g. token=dog: a word the base already knows cannot be added
            check_new_token(base_tokenizer(pipe), token)
    methods: list = []
    try:
        for p in parts:
            methods.append(p.method_cls.from_concept(pipe, p.concept, **p.knobs))
    except BaseException:
        Attachment(pipe, methods).detach()
        raise
    return Attachment(pipe, methods)
