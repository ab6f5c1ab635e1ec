"""Evaluator backends, registered once: their metrics (name, direction, range, label) and factories.

A :class:`Backend` is named (``clip``) or takes an argument after a colon (``toyworld:<concept>``). Everything
that switches on the evaluator reads it from here:

- ``make_validator`` (:mod:`.validation`): ``parse("toyworld:split_triangle")`` -> the backend and its
  argument, then ``backend.load("validator")(argument, every, reference_images, ...)``;
- the benchmark (``benchmark/spec.py``, ``work.py``, ``scoring.py``): ``get(spec.evaluator["backend"])``, its
  ``options`` (extra spec keys), ``sources`` (concept sources it can score) and ``load("scorer")``;
- the report: a metric's label and direction with :func:`metric`, the Pareto plots and the Best-H pair with
  :func:`backends`;
- metric objects: ``backend.load("metric_objects")(**options)``.

Factories are given as ``"module:attribute"`` strings (imported on first use, so this module stays cheap and
free of import cycles) or as the objects themselves. An unknown backend is a one-line BadInputError naming the
registered ones (with a did-you-mean).
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import BadInputError


@dataclass(frozen=True)
class MetricSpec:
    """One number a backend reports. ``higher_is_better``: the direction (None: none, never "best")."""

    name: str
    label: str
    higher_is_better: Optional[bool]
    range: tuple[Optional[float], Optional[float]] = (None, None)  # (low, high); None: unbounded that way

    @property
    def arrow(self) -> str:
        return {True: " ↑", False: " ↓"}.get(self.higher_is_better, "")


@dataclass(frozen=True)
class Backend:
    """An evaluator backend.

    ``argument``: what follows ``name:`` on the command line (e.g. "concept" for ``toyworld:<concept>``), None
    for a backend used by its bare name. Factories (``"module:attribute"`` or the object):

    - ``validator(argument, every, reference_images, prompts=None, clip_weights=None, random_weights=False,
      device="cpu", **sampling) -> Validator`` for best-step selection (unused options are ignored);
    - ``scorer``: an object with ``base(worker, concept, gens)`` and
      ``method(worker, concept, gens, leaks, base_leaks, base)`` returning a benchmark score row's result;
    - ``metric_objects(**options) -> {name: Metric}``.

    ``options``: the extra keys a benchmark spec's ``evaluator:`` may give; ``sources``: the benchmark concept
    sources it can score (None: any), ``sources_text`` names them in errors; ``plots``: (x, y) metric pairs
    for the report's Pareto plots; ``best_h``: the (image, text) metric pair of the report's Best-H table.
    """

    name: str
    metrics: tuple[MetricSpec, ...]
    validator: Any
    scorer: Any
    metric_objects: Any = None
    argument: Optional[str] = None
    example: str = ""
    options: tuple[str, ...] = ()
    sources: Optional[frozenset] = None
    sources_text: str = ""
    plots: tuple[tuple[str, str], ...] = ()
    best_h: Optional[tuple[str, str]] = None

    @property
    def usage(self) -> str:
        """How the command line spells it: ``clip`` or ``toyworld:<concept>``."""
        return self.name if self.argument is None else f"{self.name}:<{self.argument}>"

    def evaluator_for(self, concept_name: str) -> str:
        """The ``--evaluator`` string for one benchmark concept."""
        return self.name if self.argument is None else f"{self.name}:{concept_name}"

    def load(self, factory: str):
        """A factory by field name, imported when it is a ``"module:attribute"`` string."""
        ref = getattr(self, factory)
        if ref is None:
            raise BadInputError(f"evaluator '{self.name}' has no {factory}")
        if isinstance(ref, str):
            module, _, attr = ref.partition(":")
            return getattr(importlib.import_module(module), attr)
        return ref


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend, replace: bool = False) -> Backend:
    """Add ``backend``. Its metrics must agree (label, direction) with the same names in other backends."""
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"evaluator backend {backend.name!r} is already registered")
    if ":" in backend.name or not backend.name:
        raise ValueError(f"evaluator backend name {backend.name!r}: a non-empty name without ':'")
    for spec in backend.metrics:
        known = metric(spec.name)
        if known is not None and (known.label, known.higher_is_better) != (spec.label, spec.higher_is_better):
            owner = next(b.name for b in _BACKENDS.values() if known in b.metrics)
            if owner != backend.name:
                raise ValueError(f"metric {spec.name!r} of {backend.name!r} disagrees with {owner!r}'s")
    _BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _BACKENDS.pop(name, None)


def names() -> list[str]:
    return list(_BACKENDS)


def backends() -> list[Backend]:
    """The registered backends, in registration order."""
    return list(_BACKENDS.values())


def _unknown(name: str, what: str, choices: list[str], tail: str = "") -> BadInputError:
    close = difflib.get_close_matches(name, list(_BACKENDS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return BadInputError(f"{what}; {hint}known: {', '.join(choices)}{tail}")


def get(name: str, what: str = "evaluator.backend") -> Backend:
    """The backend registered as ``name`` (a benchmark spec's ``evaluator.backend``), or a one-line error."""
    backend = _BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise _unknown(str(name), f"{what} {name!r} is unknown", names())
    return backend


def parse(evaluator: str, flag: str = "--evaluator") -> tuple[Backend, Optional[str]]:
    """``"clip"`` or ``"toyworld:split_triangle"`` -> (backend, argument or None), or a one-line error."""
    evaluator = str(evaluator)
    name, colon, argument = evaluator.partition(":")
    backend = _BACKENDS.get(name)
    examples = "; ".join(b.example for b in _BACKENDS.values() if b.example)
    examples = f" ({examples})" if examples else ""
    if backend is None:
        raise _unknown(name, f"{flag} '{evaluator}': unknown evaluator",
                       [f"'{b.usage}'" for b in _BACKENDS.values()], examples)
    if backend.argument is None and colon:
        raise BadInputError(f"{flag} '{evaluator}': {name} takes no ':{argument}'; use '{name}'")
    if backend.argument is not None and not argument:
        raise BadInputError(f"{flag} '{evaluator}': {name} needs a {backend.argument}: use '{backend.usage}'"
                            + (f" ({backend.example})" if backend.example else ""))
    return backend, (argument if backend.argument is not None else None)


def metric(name: str) -> Optional[MetricSpec]:
    """The spec of metric ``name`` (the first backend that has it), None when no backend reports it."""
    for backend in _BACKENDS.values():
        for spec in backend.metrics:
            if spec.name == name:
                return spec
    return None


def higher_is_better(name: str) -> Optional[bool]:
    spec = metric(name)
    return None if spec is None else spec.higher_is_better


# ----------------------------------------------------------------------------------------------- built-ins
# A backend's metrics in the order the report shows its columns.
_COS = (-1.0, 1.0)

register(Backend(
    name="clip",
    metrics=(
        MetricSpec("clip_text", "CLIP-T", True, (0.0, 2.5)),
        MetricSpec("clip_text_norm", "CLIP-T norm", True, (0.0, None)),
        MetricSpec("clip_image", "CLIP-I", True, _COS),
        MetricSpec("dino_image", "DINO-I", True, _COS),
        MetricSpec("h", "H", True),
        MetricSpec("leakage_dino", "no-leak DINO", True, _COS),
        MetricSpec("clip_image_sp", "CLIP-I shape-pres.", True, _COS),  # the Perfusion view (protocol.py)
        MetricSpec("dino_image_sp", "DINO-I shape-pres.", True, _COS),
        MetricSpec("clip_text_norm_sp", "CLIP-T norm shape-pres.", True, (0.0, None)),
        MetricSpec("h_sp", "H (Perfusion view)", True),
    ),
    validator="personalize.evaluation.validation:clip_validator",
    scorer="personalize.benchmark.scoring:CLIP_SCORER",
    metric_objects="personalize.evaluation:build_metrics",
    options=("clip_weights", "dino_weights", "random_weights"),
    plots=(("clip_text", "clip_image"), ("clip_text", "dino_image")),
    best_h=("clip_image_sp", "clip_text_norm_sp"),  # the Perfusion paper's Best H: shape-preserving prompts
))

register(Backend(
    name="toyworld",
    metrics=(
        MetricSpec("alignment", "alignment", True, (0.0, 1.0)),
        MetricSpec("fidelity", "fidelity", True, (0.0, 1.0)),
        MetricSpec("alignment_norm", "alignment / base", True, (0.0, None)),
        MetricSpec("no_concept_alignment", "alignment w/o concept", True, (0.0, 1.0)),
        MetricSpec("h", "H", True),
        MetricSpec("leakage", "leakage", False, (0.0, 1.0)),  # mean pixel difference from the base's images
    ),
    validator="personalize.evaluation.validation:toyworld_validator",
    scorer="personalize.benchmark.scoring:TOY_SCORER",
    metric_objects="personalize.evaluation.metrics:toyworld_metrics",
    argument="concept",
    example="e.g. toyworld:split_triangle; 'personalize toyworld concepts' lists them",
    sources=frozenset({"toyworld"}),
    sources_text="toy-world concepts",
    plots=(("alignment", "fidelity"),),
    best_h=("fidelity", "alignment"),
))

__all__ = ["Backend", "MetricSpec", "backends", "get", "higher_is_better", "metric", "names", "parse", "register",
           "unregister"]
