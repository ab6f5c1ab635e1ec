"""The ``train`` command's trainer and method flags, derived from the Config dataclasses (one source of truth).

A field of ``TrainConfig`` or of a method's ``Config`` whose metadata has ``"flag"`` becomes ``--field-name``
(``--x/--no-x`` for a bool; ``"flag": "multiple"`` a repeatable text option); its help is the field's
``metadata["help"]`` and its default the dataclass default (the trainer's: ``Method.train_defaults`` first),
shown per method. An unset flag leaves the setting alone, so each method keeps its own default; a set flag is
a setting like ``--set`` (and wins over it and over ``--config``). Every other field is a ``--set KEY=VALUE``
setting (``personalize methods NAME`` lists them).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from collections import Counter
from typing import Any, Iterator, List, Optional

import typer


@dataclasses.dataclass(frozen=True)
class Flag:
    """One derived option: ``name`` is the setting, the Python parameter and (dashed) the flag."""

    name: str
    trainer: bool  # a TrainConfig field (else a method's)
    annotation: Any
    option: Any  # typer.Option(...)

    @property
    def multiple(self) -> bool:
        return typing.get_origin(self.annotation) in (list, List)


def fmt(value) -> str:
    """A default as the help, ``personalize methods`` and the tests show it."""
    return str(value)


def method_classes() -> list[tuple[str, Any]]:
    """``(name, card)`` of every registered method: its declaration without its module (no torch; see
    :func:`personalize.methods.card`)."""
    from .. import methods as registry

    return [(name, registry.card(name)) for name in registry.names()]


def trainer_defaults(method_cls) -> dict[str, Any]:
    """Every TrainConfig field's default for ``method_cls`` (a method or its card; its ``train_defaults`` win)."""
    from ..training.config import TrainConfig

    return {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **method_cls.train_defaults}


def method_fields(method_cls) -> Iterator[dataclasses.Field]:
    return iter(dataclasses.fields(method_cls.Config))


def _option_type(config_cls, field: dataclasses.Field):
    """The typer annotation of a flag for ``field`` (all optional: None = not given)."""
    if field.metadata.get("flag") == "multiple":
        return List[str]
    hint = typing.get_type_hints(config_cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if len(args) == 1 else hint
    if base not in (bool, int, float, str):
        raise TypeError(f"{config_cls.__name__}.{field.name}: no flag for a {hint} setting")
    return Optional[base]


def _defaults_text(pairs: list[tuple[str, Any]]) -> str:
    """The defaults of ``(method, default)`` pairs: ``\\[default: X]`` when every method agrees, ``\\[default: X;
    m3 Y]`` when most do (the others listed), else ``\\[default: m1 X, m2 Y, ...]``."""
    shown = [(m, fmt(v)) for m, v in pairs]
    counts = Counter(v for _, v in shown)
    common, n = counts.most_common(1)[0]
    if n == len(shown):
        return f"\\[default: {common}]"
    if n > len(shown) / 2:
        return f"\\[default: {common}; " + ", ".join(f"{m} {v}" for m, v in shown if v != common) + "]"
    return "\\[default: " + ", ".join(f"{m} {v}" for m, v in shown) + "]"


def _sentence(text: str) -> str:
    """The help as an option's sentence: capitalised unless it starts with a name (``torch.compile``, ``no |``)."""
    first, _, rest = text.partition(" ")
    return text[:1].upper() + text[1:] if first.isalpha() and first.islower() and not rest.startswith("|") else text


def _option(name: str, annotation, help_text: str):
    dashed = "--" + name.replace("_", "-")
    if annotation == Optional[bool]:
        return typer.Option(None, f"{dashed}/--no-{name.replace('_', '-')}", help=help_text)
    if annotation == List[str]:
        return typer.Option([], dashed, help=help_text)
    return typer.Option(None, dashed, help=help_text)


def trainer_flags() -> list[Flag]:
    """--steps, --batch-size ...: TrainConfig's flagged fields, defaults per method."""
    from ..training.config import TrainConfig

    classes = method_classes()
    flags = []
    for field in dataclasses.fields(TrainConfig):
        if not field.metadata.get("flag"):
            continue
        annotation = _option_type(TrainConfig, field)
        pairs = [(name, trainer_defaults(cls)[field.name]) for name, cls in classes]
        help_text = f"{_sentence(field.metadata['help'])}. {_defaults_text(pairs)}"
        flags.append(Flag(field.name, True, annotation, _option(field.name, annotation, help_text)))
    return flags


def method_flags() -> list[Flag]:
    """--rank, --num-vectors ...: the methods' flagged Config fields, each flag's help and defaults per method
    (methods sharing a field's help are listed together)."""
    found: dict[str, list] = {}  # name -> [(method, Config, field)]
    for name, cls in method_classes():
        for field in method_fields(cls):
            if field.metadata.get("flag"):
                found.setdefault(field.name, []).append((name, cls.Config, field))
    flags = []
    for name, uses in found.items():
        types = {_option_type(config, field) for _, config, field in uses}
        if len(types) != 1:
            raise TypeError(f"setting '{name}' has different types in {', '.join(m for m, _, _ in uses)}")
        annotation = types.pop()
        by_help: dict[str, list] = {}
        for method, _, field in uses:
            by_help.setdefault(field.metadata["help"], []).append((method, field.default))
        help_text = "; ".join(f"{', '.join(m for m, _ in pairs)}: {text} {_defaults_text(pairs)}"
                              for text, pairs in by_help.items()) + "."
        flags.append(Flag(name, False, annotation, _option(name, annotation, help_text)))
    return flags


def with_flags(func, after: dict[str, list[Flag]]):
    """``func`` (whose derived flags arrive in ``**flags``) with a signature typer reads: its own parameters,
    each list of ``after`` inserted after the named parameter."""
    params = []
    for p in inspect.signature(func).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
        for flag in after.get(p.name, ()):
            params.append(inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=flag.option,
                                            annotation=flag.annotation))
    names = [p.name for p in params]
    if len(names) != len(set(names)):
        raise TypeError(f"a derived flag clashes with a fixed option of {func.__name__}")
    func.__signature__ = inspect.Signature(params)
    return func


def given(flags: list[Flag], values: dict[str, Any]) -> dict[str, Any]:
    """The settings the user gave as flags (None or an empty repeatable = not given; one repeat = the value)."""
    settings = {}
    for flag in flags:
        value = values.get(flag.name)
        if flag.multiple:
            value = (value[0] if len(value) == 1 else list(value)) if value else None
        if value is not None:
            settings[flag.name] = value
    return settings


def defaults_summary(indent: str = "") -> str:
    """One paragraph per method: its trainer defaults (steps, batch size, loss masks) and every Config default."""
    lines = []
    for name, cls in method_classes():
        trainer = trainer_defaults(cls)
        items = [f"steps={trainer['steps']}", f"batch_size={trainer['batch_size']}", f"masks={trainer['masks']}"]
        items += [f"{f.name}={fmt(f.default)}" for f in method_fields(cls)]
        lines.append(f"{indent}{name}: {', '.join(items)}")
    return "\n\n".join(lines)
