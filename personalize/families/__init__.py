"""Model families behind one interface (:class:`~personalize.families.family.Family`): one module per family.

``FAMILIES`` maps each family's name to its object, in the order the README's "Supported bases" table lists them;
``of(pipe)`` is the family of a pipeline, ``get(name)`` one by name, ``by_tiny`` the built-in random test bases.
Adding a family is one module here, an entry in ``_CLASSES``, its tiny test base and the contract tests
(docs/ARCHITECTURE.md, "Adding a family").
"""
from __future__ import annotations

from ..errors import BadInputError
from .family import Encoding, Family, Noised  # noqa: F401  (the interface)
from .flux import Flux
from .sd import StableDiffusion, StableDiffusion2, StableDiffusionXL
from .sd3 import StableDiffusion3

_CLASSES: tuple[type[Family], ...] = (StableDiffusion, StableDiffusion2, StableDiffusionXL, StableDiffusion3, Flux)
FAMILIES: dict[str, Family] = {cls.name: cls() for cls in _CLASSES}
LABELS: dict[str, str] = {name: fam.label for name, fam in FAMILIES.items()}
TINY: dict[str, str] = {fam.tiny: name for name, fam in FAMILIES.items()}  # built-in test base -> family name


def get(name: str) -> Family:
    return FAMILIES[name]


def by_tiny(spec: str) -> Family:
    return FAMILIES[TINY[spec]]


def of(pipe) -> Family:
    """The family of a loaded pipeline (its denoiser and text encoders decide, not its class: an img2img twin made
    with ``from_pipe`` is of its base's family)."""
    for fam in FAMILIES.values():
        if fam.matches(pipe):
            return fam
    raise BadInputError(f"a {type(pipe).__name__} is not a base personalize supports; supported: "
                        f"{', '.join(LABELS.values())}")


def of_denoiser(module) -> Family | None:
    """The (first) family whose denoiser is of ``module``'s class (SD 1.x, 2.x and XL share the UNet class and
    all its site rules); None for another module."""
    name = type(module).__name__
    return next((fam for fam in FAMILIES.values() if name in fam.denoiser_classes), None)


def pipeline_classes() -> dict[str, list[Family]]:
    """Each pipeline class a base folder may declare -> the families that use it."""
    found: dict[str, list[Family]] = {}
    for fam in FAMILIES.values():
        for cls in fam.pipeline_classes:
            found.setdefault(cls, []).append(fam)
    return found


def denoiser(pipe):
    """The pipeline's denoiser: the UNet of SD 1.x/2.x/XL, the transformer of a diffusion transformer."""
    return of(pipe).denoiser_of(pipe)
