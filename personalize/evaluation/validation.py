"""Validation during training, for best-step selection.

A :class:`Validator` is called by ``training.train(..., validation=...)`` every ``every`` steps and at the
last step, with the live pipeline (the method's edits installed) and the method; it returns at least
``{"h": float}`` plus its component scores. The trainer keeps the state with the highest ``h``.

Both validators here sample a few images (prompts × seeds, with the base's own scheduler: DDIM on tiny and
toy) from their own generators inside ``torch.random.fork_rng``, so validating never changes the training
trajectory:

- :class:`ClipValidator`: CLIP-I against the training photos (all-pairs mean cosine) and CLIP-T
  (``2.5 * max(cos, 0)``) against the prompt with the concept words replaced by the superclass, i.e.
  CustomConcept101's "photo of a <new1> cat" with the token removed; ``h`` = their harmonic mean.
- :class:`ToyWorldValidator`: the toy world's ground-truth measurers; ``h`` = harmonic mean of
  fidelity and alignment.

The defaults are Perfusion's schedule (paper §4.4: "a validation set of 8 prompts, sampled every 25 training
steps", keep the step with the best harmonic mean of CLIP-I and CLIP-T): :data:`VALIDATE_EVERY` = 25,
:data:`DEFAULT_PROMPTS` 8 prompts (the paper does not list its 8; these are CustomConcept101-style: neutral,
backgrounds, styles), one sample each.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import BadInputError
from ..templates import fill
from .protocol import harmonic_mean

#: Perfusion §4.4: validate every 25 steps (the default wherever an evaluator is configured)
VALIDATE_EVERY = 25
#: Perfusion §4.4: 8 validation prompts (its list is unpublished: 2 neutral, 4 backgrounds, 2 styles)
DEFAULT_PROMPTS = ("a photo of a {}", "a {} on the beach", "a {} in the snow", "a {} in a living room",
                   "a {} with a city in the background", "a {} in the jungle", "a watercolor painting of a {}",
                   "a pencil sketch of a {}")
TOY_PROMPTS = ("a photo of a {}", "a {} on the left, on a green background")


class Validator:
    """``every``: validate every N steps (and at the last step); ``__call__`` returns {"h": ..., ...}."""

    every: int = 1

    def __call__(self, pipe, method, step: int) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class Sample:
    prompt: str  # what the image was generated from (the live placeholder filled in)
    text: str  # the same prompt with the superclass word in place of the concept (for CLIP-T)
    seed: int
    image: Any


@contextlib.contextmanager
def isolated_rng(pipe):
    """Global RNG state (CPU, and the pipeline's GPU) is restored afterwards."""
    device = torch.device(getattr(pipe, "device", "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _concept_words(method) -> list[tuple[str, str]]:
    """(placeholder, superclass) per concept of the method (several for a multi-concept run)."""
    superclass = method.superclass
    superclasses = [superclass] if isinstance(superclass, str) else list(superclass)
    placeholders = method.placeholders()
    if len(superclasses) != len(placeholders):
        superclasses = superclasses[:1] * len(placeholders)
    return list(zip(placeholders, superclasses))


class SamplingValidator(Validator):
    """Samples ``prompts`` × ``num_seeds`` images (seeds ``seed``...) with the live concept; subclasses score them."""

    def __init__(self, every: int, prompts: Sequence[str], num_seeds: int = 1, steps: int = 25,
                 guidance: float = 6.0, seed: int = 0):
        if every < 1:
            raise BadInputError(f"validation every {every} steps: use a positive number of steps")
        if num_seeds < 1 or steps < 1:
            raise BadInputError("validation needs at least one seed and one sampling step")
        self.prompts = check_prompts(prompts)
        self.every, self.num_seeds, self.steps, self.guidance, self.seed = every, num_seeds, steps, guidance, seed

    @torch.no_grad()
    def sample(self, pipe, method, concepts: Optional[list[tuple[str, str]]] = None) -> list[Sample]:
        from ..generation import generate

        out = []
        with isolated_rng(pipe):
            for placeholder, superclass in concepts or _concept_words(method):
                for template in self.prompts:
                    prompt = fill(template, placeholder)
                    images = generate(pipe, prompt, num_images=self.num_seeds, steps=self.steps,
                                      guidance=self.guidance, seed=self.seed)
                    out += [Sample(prompt, fill(template, superclass), self.seed + k, im) for k, im in enumerate(images)]
        return out


class ClipValidator(SamplingValidator):
    """h = harmonic_mean(CLIP-I vs. the training photos, CLIP-T); CLIP from ``clip_weights`` (a local file),
    the hub (open_clip 'openai' ViT-B/32, QuickGELU), or ``random_weights=True`` (tests)."""

    def __init__(self, every: int, reference_images: Sequence, prompts: Sequence[str] = DEFAULT_PROMPTS,
                 clip_weights: Union[None, str, Path] = None, random_weights: bool = False,
                 device: Union[str, torch.device] = "cpu", **sampling):
        from .models import ClipEncoder

        super().__init__(every, prompts, **sampling)
        references = list(reference_images)
        if not references:
            raise BadInputError("validation: no reference images to compare the samples with")
        self.clip = ClipEncoder(weights=clip_weights, random_weights=random_weights, device=device)
        self.reference = self.clip.encode_images(references)

    def __call__(self, pipe, method, step: int) -> dict[str, Any]:
        from .metrics import ClipTextScore

        samples = self.sample(pipe, method)
        images = [s.image for s in samples]
        clip_image = float(np.mean(self.clip.encode_images(images) @ self.reference.T))
        text = ClipTextScore(self.clip)
        text.update(images, [s.text for s in samples], token=())
        clip_text = text.compute()
        return {"h": harmonic_mean(clip_image, clip_text), "clip_image": clip_image, "clip_text": clip_text}


class ToyWorldValidator(SamplingValidator):
    """h = harmonic_mean(fidelity, alignment) from the toy world's ``score_folder`` (``concept_name``: a toy concept)."""

    def __init__(self, concept_name: str, every: int, prompts: Sequence[str] = TOY_PROMPTS, **sampling):
        from ..datasets.toyworld import CONCEPTS

        if concept_name not in CONCEPTS:
            raise BadInputError(f"unknown toy-world concept '{concept_name}'; known: {', '.join(CONCEPTS)}")
        super().__init__(every, prompts, **sampling)
        self.concept = concept_name

    def __call__(self, pipe, method, step: int) -> dict[str, Any]:
        from ..datasets.toyworld import score_folder
        from ..generation import write_images

        placeholder, superclass = _concept_words(method)[0]
        samples = self.sample(pipe, method, [(placeholder, superclass)])
        with tempfile.TemporaryDirectory(prefix="validation-") as folder:
            for s in samples:
                write_images([s.image], s.prompt, folder, s.seed)
            scores = score_folder(folder, concept=self.concept, placeholder=placeholder)
        fidelity, alignment = scores["fidelity"] or 0.0, scores["alignment"] or 0.0
        return {"h": harmonic_mean(fidelity, alignment), "fidelity": fidelity, "alignment": alignment}


def check_prompts(prompts: Sequence[str]) -> tuple[str, ...]:
    prompts = tuple(prompts)
    if not prompts:
        raise BadInputError("no validation prompts; give --validation-prompt 'a photo of a {}' (one or more)")
    for p in prompts:
        if "{}" not in p:
            raise BadInputError(f"validation prompt '{p}' has no {{}} for the concept; e.g. 'a {{}} on the beach'")
    return prompts


def _reference_files(reference_images) -> list[Path]:
    """Image files from a folder, a list of folders and/or files."""
    from ..images import list_images

    items = [reference_images] if isinstance(reference_images, (str, Path)) else list(reference_images)
    files: list[Path] = []
    for item in items:
        files += list_images(item) if Path(item).is_dir() else [Path(item)]
    return files


def clip_validator(argument: None, every: int, reference_images, prompts: Optional[Sequence[str]] = None,
                   clip_weights: Union[None, str, Path] = None, random_weights: bool = False,
                   device: Union[str, torch.device] = "cpu", **sampling) -> ClipValidator:
    """The ``clip`` backend's validator factory (see :mod:`.registry`)."""
    return ClipValidator(every, _reference_files(reference_images), prompts or DEFAULT_PROMPTS,
                         clip_weights=clip_weights, random_weights=random_weights, device=device, **sampling)


def toyworld_validator(concept_name: str, every: int, reference_images, prompts: Optional[Sequence[str]] = None,
                       clip_weights=None, random_weights: bool = False, device=None, **sampling) -> ToyWorldValidator:
    """The ``toyworld:<concept>`` backend's validator factory (no reference images or models: ground truth)."""
    return ToyWorldValidator(concept_name, every, prompts or TOY_PROMPTS, **sampling)


def make_validator(evaluator: str, every: int, reference_images, prompts: Optional[Sequence[str]] = None,
                   clip_weights: Union[None, str, Path] = None, random_weights: bool = False,
                   device: Union[str, torch.device] = "cpu", **sampling) -> Validator:
    """A validator from its name: a registered backend, e.g. ``"clip"`` or ``"toyworld:<concept>"``
    (``reference_images``: the training photos, a folder or a list; ``sampling``: num_seeds, steps, guidance,
    seed). An unknown name is a one-line BadInputError listing the registered backends."""
    from .registry import parse

    backend, argument = parse(evaluator)
    return backend.load("validator")(argument, every, reference_images, prompts, clip_weights=clip_weights,
                                     random_weights=random_weights, device=device, **sampling)


__all__ = ["ClipValidator", "DEFAULT_PROMPTS", "VALIDATE_EVERY", "Sample", "SamplingValidator", "TOY_PROMPTS", "ToyWorldValidator",
           "Validator", "clip_validator", "isolated_rng", "make_validator", "toyworld_validator"]
