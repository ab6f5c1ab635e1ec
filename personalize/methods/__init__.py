"""Method registry: names map lazily to ``module:Class`` so importing the package stays cheap; a built-in
method's card (:mod:`.cards`) is there without importing its module."""
from __future__ import annotations

import difflib
import importlib

from ..errors import BadInputError

_REGISTRY: dict[str, str] = {
    "perfusion": "personalize.methods.perfusion:Perfusion",
    "residuals": "personalize.methods.residuals:Residuals",
    "textual-inversion": "personalize.methods.textual_inversion:TextualInversion",
    "dreambooth": "personalize.methods.dreambooth:DreamBooth",
    "dreambooth-lora": "personalize.methods.dreambooth_lora:DreamBoothLora",
    "custom-diffusion": "personalize.methods.custom_diffusion:CustomDiffusion",
}


def register(name: str, target: str) -> None:
    """Register a method class given as ``"module:Class"``."""
    if name in _REGISTRY and _REGISTRY[name] != target:
        raise ValueError(f"method {name!r} is already registered as {_REGISTRY[name]}")
    _REGISTRY[name] = target


def names() -> list[str]:
    return sorted(_REGISTRY)


def _known(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BadInputError(f"unknown method '{name}'; {hint}known methods: {', '.join(names())}")


def card(name: str):
    """The card of the method registered as ``name`` (:mod:`.cards`: name, description, sites, ``Config``,
    ``Knobs``, trainer defaults, recipe), without importing the method's module, torch or diffusers: what
    ``--help`` and ``personalize methods`` show. A method registered without a card: its class (a subclass of
    its card in any case)."""
    _known(name)
    from .cards import CARDS

    return CARDS[name] if name in CARDS else get(name)


def get(name: str):
    """The method class registered as ``name`` (with a did-you-mean error)."""
    _known(name)
    module, _, cls = _REGISTRY[name].partition(":")
    method = getattr(importlib.import_module(module), cls)
    from .base import Method

    if not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"{_REGISTRY[name]} is not a personalize Method")
    return method


def refusal(name: str, family) -> str | None:
    """Why the method ``name`` does not work on bases of ``family`` (a :class:`personalize.families.Family`), or
    None: the family refuses it by name (``Family.refuses``), or lacks a site kind its card names."""
    from ..edits.placement import KINDS

    reason = family.refuses.get(name)
    if reason is not None:
        return reason
    missing = [kind for kind in card(name).sites if kind in KINDS and kind not in family.edit_kinds]
    return f"its {' and '.join(missing)} sites have no counterpart in this family yet" if missing else None


def names_for(family) -> list[str]:
    """The methods that work on bases of ``family``."""
    return [n for n in names() if refusal(n, family) is None]


def export_formats_on(name: str, family) -> dict[str, str]:
    """The method's export formats (name -> how a stock tool loads it) that exist for ``family``'s bases
    (``Family.exports``: the formats it keeps per method; a method it does not name keeps all)."""
    formats = get(name).export_formats
    kept = family.exports.get(name)
    return dict(formats) if kept is None else {f: how for f, how in formats.items() if f in kept}


def import_formats_on(name: str, family) -> list[str]:
    """The formats ``personalize import --method name`` reads for ``family``'s bases: the method's own
    (``import_formats``, else its export formats; none without ``import_state``), as ``Family.exports`` keeps
    them."""
    cls = get(name)
    if not hasattr(cls, "import_state"):
        return []
    kept = family.exports.get(name)
    return [f for f in getattr(cls, "import_formats", cls.export_formats) if kept is None or f in kept]
