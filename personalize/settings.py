"""Setting values checked before any work starts: each coerced to its declared type, finite, and in range.

One mechanism for every number or flag a user can give: ``--set KEY=VALUE`` and ``--config`` YAML (trainer
and method settings, checked against the dataclass field's annotated type) and the CLI's own numeric
options (``--guidance``, ``--beta`` ...). Inference knobs (``--concept FILE:beta=0.6``) are typed per method
in ``personalize/knobs.py``, which uses :func:`coerce` for their values. The ranges
depend on the name only (:func:`bound`), so a new setting called ``lr_something`` or ``steps`` is checked
without any code here.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .errors import BadInputError

#: > 0
POSITIVE = frozenset({"steps", "batch_size", "num_images", "class_steps", "num_vectors", "init_timeout"})
POSITIVE_PREFIXES = ("lr", "tau")  # learning rates (lr, lr_value, lr_embedding ...), gate temperatures
#: >= 0
NON_NEGATIVE = frozenset({"checkpoint_every", "preview_every", "num_class_images", "weight_decay", "prior_loss_weight",
                          "max_grad_norm", "guidance", "class_guidance", "rank", "validate_every", "validation_every", "keep_tags",
                          "bucket_step", "bucket_min", "bucket_max",
                          "save_every", "lr_warmup_steps", "workers",
                          "beta", "beta_train", "beta_global"})  # Perfusion's gate threshold on s (s = 1 at the concept)
#: in [0, 1]
UNIT = frozenset({"flip_p", "ema", "caption_dropout"})
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed's limit

_TRUE, _FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def bound(name: str) -> tuple[float, bool, float] | None:
    """``(low, low_inclusive, high)`` for the setting ``name`` (None: any finite value)."""
    if name in NON_NEGATIVE:  # first: lr_warmup_steps is a count, not a learning rate
        return 0.0, True, math.inf
    if name in POSITIVE or name.startswith(POSITIVE_PREFIXES):
        return 0.0, False, math.inf
    if name in UNIT:
        return 0, True, 1
    if name == "seed":
        return 0, True, SEED_MAX
    return None


def _range_text(b: tuple[float, bool, float], whole: bool = False) -> str:
    low, inclusive, high = b
    if high != math.inf:
        return f"between {low:g} and {high}"
    if whole and not inclusive:  # a whole number > 0 is one >= 1
        return f">= {math.floor(low) + 1}"
    return f">= {low:g}" if inclusive else f"> {low:g}"


def check_number(name: str, value, label: str | None = None, whole: bool = False):
    """``value`` if it is a finite number in ``name``'s range (:func:`bound`), else a one-line BadInputError.

    ``label`` is how the message names it (default ``setting 'NAME'``; the CLI passes ``--flag``)."""
    label = label or f"setting '{name}'"
    b = bound(name)
    kind = "a whole number" if whole else "a finite number"
    want = f"{kind} {_range_text(b, whole)}" if b else kind
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{label} must be {want}, not {value!r}")
    if b is not None:
        low, inclusive, high = b
        if value < low or (value == low and not inclusive) or value > high:
            raise BadInputError(f"{label} must be {want}, not {value!r}")
    return value


def coerce(name: str, value, annotation, label: str | None = None):
    """``value`` as ``annotation`` (int, float, bool, str, ``X | None``, Any), range-checked; else BadInputError.

    Accepts what YAML and ``--set`` JSON parsing produce: ``2`` or ``2.0`` for an int, ``1`` for a float,
    ``true``/``on``/``1`` for a bool, a number for a text setting (``--set identifier=123``)."""
    label = label or f"setting '{name}'"
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X] / X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        annotation = rest[0] if len(rest) == 1 else Any
    if annotation is Any or annotation not in (int, float, bool, str):
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise BadInputError(f"{label} must be true or false, not {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise BadInputError(f"{label} must be text, not {value!r}")
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if annotation is float else int(value.strip())
        except ValueError:
            number = value
    if annotation is int:
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            b = bound(name)
            raise BadInputError(f"{label} must be a whole number{' ' + _range_text(b, True) if b else ''}, not {value!r}")
        return check_number(name, number, label, whole=True)
    if isinstance(number, int) and not isinstance(number, bool):
        number = float(number)
    return check_number(name, number, label)


def check_options(**values) -> None:
    """The CLI's numeric options (``name=value``; None = not given), each checked by its name's range."""
    for name, value in values.items():
        if value is not None:
            check_number(name, value, f"--{name.replace('_', '-')}", whole=isinstance(value, int))


def coerce_fields(config_cls, values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` (field name -> value) coerced to ``config_cls``'s annotated field types and checked.

    ``where`` prefixes the label (e.g. the method's name); unknown keys are left for the caller to refuse."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return {key: coerce(key, value, hints[key], f"{where}setting '{key}'") if key in fields else value
            for key, value in values.items()}
