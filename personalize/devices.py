"""The one check of a ``--device`` string: what torch can name here, and what this machine has.

Accepted: ``cpu``, ``cuda``, ``cuda:N`` (N < the number of visible GPUs) and ``mps``; None (and ``auto``) is
``cuda`` when a GPU is visible, else ``cpu``. Anything else, or a device this machine does not have, is one
BadInputError before any work: ``--device cuda`` on a machine without a GPU is refused, never quietly run on the
CPU.
"""
from __future__ import annotations

import re

import torch

from .errors import BadInputError

ACCEPTED = "cpu, cuda, cuda:N or mps"
_FORM = re.compile(r"(cpu|cuda|mps)(?::(\d{1,3}))?")


def resolve_device(spec: str | torch.device | None, flag: str = "--device") -> torch.device:
    """``spec`` as a ``torch.device`` this machine has, or a one-line BadInputError naming ``flag``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "auto")):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(spec, str):
        raise BadInputError(f"{flag} must be a string ({ACCEPTED}); got {type(spec).__name__}")
    text = spec.strip().lower()
    form = _FORM.fullmatch(text)
    if form is None:
        shown = spec if len(spec) <= 40 else spec[:40] + "..."
        raise BadInputError(f"{flag} {shown!r} is not a device; use {ACCEPTED}")
    kind, index = form.group(1), form.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise BadInputError(f"{flag} {spec!r}: the CPU has no index; use --device cpu")
        return torch.device("cpu")
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise BadInputError(f"{flag} mps: this machine has no Apple-silicon GPU (torch.backends.mps.is_available() "
                                "is False); pass --device cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise BadInputError(f"{flag} {text}: this machine has no CUDA GPU (torch.cuda.is_available() is False); pass "
                            "--device cpu or leave --device out")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise BadInputError(f"{flag} {text}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return torch.device(text)
