"""personalize: teach a text-to-image model your own concepts.

    from personalize import load_base, train, attach, generate
    pipe = load_base("tiny")
    path = train(pipe, "photos/", token="<teddy>", superclass="teddy", out="teddy.safetensors")
    with attach(pipe, path, beta=0.7):
        images = generate(pipe, "a <teddy> on the beach", num_images=4)

The names are imported on first use (PEP 562 ``__getattr__``): ``import personalize`` and the command line's
``--help`` never load torch or diffusers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module that defines it
_EXPORTS = {
    "Attachment": ".compose",
    "Concept": ".concept",
    "PersonalizeError": ".errors",
    "attach": ".compose",
    "load_base_for": ".compose",
    "fingerprint": ".base",
    "generate": ".generation",
    "load_base": ".base",
    "load_concept": ".concept",
    "save_concept": ".concept",
    "train": ".training",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .base import fingerprint, load_base
    from .compose import Attachment, attach, load_base_for
    from .concept import Concept, load_concept, save_concept
    from .errors import PersonalizeError
    from .generation import generate
    from .training import train


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'personalize' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # once imported, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
