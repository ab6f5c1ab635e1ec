"""Inference knobs: typed, range-checked settings a method takes at attach time.

Each method declares its knobs as a dataclass (``Method.Knobs``) whose fields
are made with :func:`knob`: name, type (from the annotation: a number, a
flag or one of several words), allowed range, default and help. One parser,
:func:`parse`, serves the Python API (``attach(pipe, c, beta=0.6)``,
``handle.set(beta=0.6)``), the CLI's ``--concept FILE:beta=0.6,lag=1`` and the
benchmark's sweeps, so a value is checked the same way wherever it comes
from; a bad one is a one-line :class:`BadInputError` naming the knob and what
it accepts. Setting a knob to None puts its default back. A default of None means "the concept's own value" (its header's
``inference_defaults``, e.g. Perfusion's ``beta``), which the method resolves.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from typing import Any


from .errors import BadInputError
from .settings import coerce


@dataclasses.dataclass(frozen=True)
class KnobSpec:
    name: str
    kind: type  # float, bool or str
    help: str
    default: Any
    low: float | None = None  # numbers: the range (low exclusive when low_open)
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()  # words: the accepted values

    def allowed(self) -> str:
        """What the knob accepts, as the error message says it."""
        if self.kind is bool:
            return "on or off (1/0, true/false)"
        if self.kind is str:
            return " or ".join(self.choices)
        if self.low is not None and self.high is not None:
            return f"a number in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"

    def parse(self, value, label: str):
        """``value`` (text from the CLI or YAML, or a Python value) as this knob's type, range-checked; None
        is the knob's default."""
        if value is None:
            return self.default
        if self.kind is bool:
            try:
                return coerce(self.name, value, bool, label)
            except BadInputError:
                raise BadInputError(f"{label}={value!r}: use {self.name}=on or {self.name}=off") from None
        if self.kind is str:
            text = str(value).strip().lower()
            if text not in self.choices:
                raise BadInputError(f"{label}={value!r}: use {' or '.join(f'{self.name}={c}' for c in self.choices)}")
            return text
        try:
            number = coerce(self.name, value, float, label)
        except BadInputError:
            raise BadInputError(f"{label} must be {self.allowed()}, not {value!r}") from None
        too_low = self.low is not None and (number < self.low or (self.low_open and number == self.low))
        if too_low or (self.high is not None and number > self.high) or not math.isfinite(number):
            raise BadInputError(f"{label} must be {self.allowed()}, not {value!r}")
        return number


def knob(default: Any, help: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         choices: tuple[str, ...] = ()) -> Any:
    """A knob field of a method's ``Knobs`` dataclass."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low, "high": high,
                                                         "low_open": low_open, "choices": tuple(choices)})


@dataclasses.dataclass
class NoKnobs:
    """A method without inference knobs."""


def specs(knobs_cls: type) -> dict[str, KnobSpec]:
    """Every knob of ``knobs_cls`` by name, in declaration order."""
    hints = typing.get_type_hints(knobs_cls)
    out = {}
    for f in dataclasses.fields(knobs_cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if args else kind
        out[f.name] = KnobSpec(f.name, kind, f.metadata.get("help", ""), f.default, f.metadata.get("low"),
                               f.metadata.get("high"), f.metadata.get("low_open", False),
                               f.metadata.get("choices", ()))
    return out


def parse(method_cls, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` checked against ``method_cls.Knobs``: unknown names refused, each value parsed and range-checked.

    ``where`` prefixes the knob in messages (e.g. ``--concept teddy.safetensors:``). Only the given knobs are
    returned; the method fills in the rest from its defaults."""
    known = specs(method_cls.Knobs)
    unknown = sorted(set(values) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise BadInputError(f"{method_cls.name} does not take {', '.join(unknown)}; {takes}")
    return {name: known[name].parse(value, f"{where}{name}") for name, value in values.items()}


def describe(knobs_cls: type) -> dict[str, str]:
    """``{name: help, with what it accepts}`` for ``--help``, ``personalize methods`` and errors."""
    return {name: f"{spec.help} ({spec.allowed()})" for name, spec in specs(knobs_cls).items()}


_KNOB_PART = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=.*", re.S)


def _knob_text(rest: str) -> dict[str, str] | None:
    """``beta=0.6,lag=1`` as ``{name: value text}``; None when ``rest`` is not such a list."""
    parts = rest.split(",")
    if not rest or not all(_KNOB_PART.fullmatch(p) for p in parts):
        return None
    pairs = [(key.strip(), value.strip()) for key, _, value in (p.partition("=") for p in parts)]
    if len({key for key, _ in pairs}) != len(pairs):
        return None  # a knob given twice: no valid knob list (refused by the caller)
    return dict(pairs)


def split_concept_arg(text: str) -> tuple[str, dict[str, str]]:
    """``FILE:beta=0.6,lag=1,token=<x>`` -> ``(FILE, {knob: value text})``: the CLI's ``--concept`` syntax.

    A path may hold ``:`` itself (``runs/12:30/teddy.safetensors``): when the whole text names an existing file it
    is the path, with no knobs; else the text splits at the last ``:`` whose right side is a knob list
    (``name=value`` parts separated by ``,``), preferring a split whose left side is an existing file (so a
    ``token=<a:b>`` value may hold ``:`` too). Without such a split the whole text is the path. ``FILE:beta``
    (a colon after an existing file, then no ``=``) is refused in one line."""
    if os.path.isfile(text):
        return text, {}
    splits = [(text[:i], knobs) for i in range(len(text) - 1, 0, -1) if text[i] == ":"
              for knobs in [_knob_text(text[i + 1:])] if knobs is not None]
    for path, knobs in splits:
        if os.path.isfile(path):
            return path, knobs
    if splits:
        return splits[0]
    for i, c in enumerate(text):
        if c == ":" and os.path.isfile(text[:i]):
            raise BadInputError(f"--concept {text!r}: knobs must look like FILE:beta=0.6,tau=0.15, each given once")
    return text, {}


class KnobTensor:
    """A number knob as 0-dim tensors, one per (device, dtype) asked for, which :meth:`set` updates in place.

    A compiled denoiser reads the knob through :meth:`on`: the tensor is a graph input, so a new value
    (``handle.set(scale=0.5)``) reaches the compiled graph without a recompile, where a Python float would be
    specialised on. Eager code keeps reading :attr:`value`. The tensors are made eagerly, before compiling
    (``edits.sites.prepare_compiled``); :meth:`on` then only looks them up."""

    def __init__(self, value: float):
        self.value = float(value)
        self._tensors: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def set(self, value: float) -> None:
        self.value = float(value)
        for tensor in self._tensors.values():
            tensor.fill_(self.value)

    def on(self, device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor for ``device``/``dtype`` (default float32), made on first use (eagerly: call it before
        compiling)."""
        import torch  # here, not at the top: the CLI's --help imports this module and must not load torch

        dtype = torch.float32 if dtype is None else dtype
        key = (str(device), dtype)
        tensor = self._tensors.get(key)
        if tensor is None:
            tensor = self._tensors[key] = torch.full((), self.value, dtype=dtype, device=device)
        return tensor

    def prepared(self, device, dtype: "torch.dtype | None" = None) -> bool:
        """Whether :meth:`on` has made the tensor for ``device``/``dtype`` (before compiling)."""
        import torch

        return (str(device), torch.float32 if dtype is None else dtype) in self._tensors

    def traced(self, device, dtype: torch.dtype | None = None) -> "torch.Tensor | float":
        """What traced code reads: the prepared tensor, or the float when none was prepared (a UNet the user
        compiled themselves): dynamo then guards on the value, so a change recompiles instead of going
        unseen, as a tensor made inside the trace (a constant of the graph) would."""
        import torch

        return self._tensors.get((str(device), torch.float32 if dtype is None else dtype), self.value)
