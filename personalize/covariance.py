"""C, the uncentered second moment of text-encoder outputs, and its inverse.

Perfusion measures similarity to a concept's target input in the metric C^-1
(see ``../shared/reference/perfusion-math.md``). C depends on the base model's
text encoder and on the caption corpus, so it is computed once per (base
fingerprint, corpus) and cached on disk.

The built-in corpus is ``CAPTION_TEMPLATES`` × the nouns in
``personalize/data/nouns.txt``: 32 templates × 261 nouns = 8,352 captions,
about 90,000 non-padding token vectors. The paper used ~100k captions, but C
only needs many more samples than its dimension (768 for SD 1.x): ~120
vectors per dimension keep the estimate well conditioned, and the corpus
encodes in minutes on a CPU. Pass ``captions`` (one per line) to use your own.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from importlib import resources
from typing import Callable, Sequence

import torch

from . import text_stack

from .base import fingerprint
from .paths import atomic_path, cache_dir

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a close-up photo of a {}",
    "a bright photo of a {}",
    "a dark photo of the {}",
    "a blurry photo of a {}",
    "a cropped photo of the {}",
    "a good photo of a {}",
    "a photo of one {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a rendering of a {}",
    "a painting of a {}",
    "a drawing of the {}",
    "a sketch of a {}",
    "a cartoon {}",
    "a {} on a table",
    "a {} in the garden",
    "a {} on the beach",
    "a {} in the snow",
    "a {} in the city at night",
    "a red {} next to a blue {}",
    "a {} and a dog",
    "two {} side by side",
    "a {} floating in space",
    "a watercolor painting of a {}",
    "an oil painting of a {} in a forest",
    "a {} wearing a hat",
    "a {} made of wood",
    "a toy {} on the floor",
    "a black and white photo of a {}",
    "a {} in front of a mountain",
)


def builtin_captions() -> list[str]:
    nouns = resources.files("personalize").joinpath("data/nouns.txt").read_text().split()
    return [t.replace("{}", n) for t in CAPTION_TEMPLATES for n in nouns]


BASE_CORPUS_FILE = "captions.txt"


def base_captions(pipe) -> list[str] | None:
    """The caption corpus a base ships in its own folder (``captions.txt``), or None for the built-in one.

    A base whose text encoder never saw everyday nouns (the toy world's) must estimate C from captions of
    its own world: the built-in corpus would measure untrained embeddings.
    """
    root = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    path = Path(root) / BASE_CORPUS_FILE if root else None
    if path is None or not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def default_covariance(pipe) -> tuple[torch.Tensor, str]:
    """C from the base's own corpus if it ships one, else the built-in corpus; and that corpus's id."""
    captions = base_captions(pipe)
    return load_or_compute_covariance(pipe, captions), corpus_id(captions)


def covariance_for(pipe, corpus: str) -> torch.Tensor | None:
    """C for a concept's recorded ``corpus`` id: computed if it is the built-in or the base's own corpus,
    else only from the cache (a custom corpus computed earlier with ``personalize covariance --captions``)."""
    if corpus == "builtin":
        return load_or_compute_covariance(pipe)
    captions = base_captions(pipe)
    if captions is not None and corpus_id(captions) == corpus:
        return load_or_compute_covariance(pipe, captions)
    return cached_covariance(pipe, corpus)


def corpus_id(captions: Sequence[str] | None) -> str:
    """``builtin`` or a short hash of a custom caption list."""
    if captions is None:
        return "builtin"
    return "sha256-" + hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]


@torch.no_grad()
def compute_covariance(
    pipe, captions: Sequence[str], batch_size: int = 64, on_batch: Callable[[int], None] | None = None
) -> torch.Tensor:
    """E[e e^T] over every non-padding position (BOS..EOS) of every caption, float64."""
    device = pipe.text_encoder.device
    total, count = None, 0
    for start in range(0, len(captions), batch_size):
        batch = list(captions[start : start + batch_size])
        # CLIP's text encoder is causal: padding to the batch's longest caption instead of 77
        # leaves every non-padding output unchanged and costs a fraction of the compute.
        encs = [getattr(pipe, tok)(batch, padding="longest", max_length=getattr(pipe, tok).model_max_length,
                                   truncation=True, return_tensors="pt") for tok, _ in text_stack.pairs(pipe)]
        hidden = text_stack.encode_ids(pipe, [e.input_ids for e in encs]).context.double()  # SDXL: both, side by side
        mask = encs[0].attention_mask.to(device).bool()
        vectors = hidden[mask]
        outer = vectors.T @ vectors
        total = outer if total is None else total + outer
        count += vectors.shape[0]
        if on_batch is not None:
            on_batch(len(batch))
    return (total / count).cpu()


def covariance_path(pipe, corpus: str) -> Path:
    return cache_dir("covariance") / f"{fingerprint(pipe).digest}-{corpus}.safetensors"


def load_or_compute_covariance(
    pipe, captions: Sequence[str] | None = None, on_batch: Callable[[int], None] | None = None, recompute: bool = False
) -> torch.Tensor:
    """C for this base and corpus, from the cache or computed and cached (float64)."""
    from safetensors.torch import load_file, save_file

    corpus = corpus_id(captions)
    path = covariance_path(pipe, corpus)
    if path.exists() and not recompute:
        return load_file(str(path))["C"]
    C = compute_covariance(pipe, captions if captions is not None else builtin_captions(), on_batch=on_batch)
    with atomic_path(path) as tmp:
        save_file({"C": C.contiguous()}, str(tmp), metadata={"corpus": corpus})
    return C


def cached_covariance(pipe, corpus: str) -> torch.Tensor | None:
    """C from the cache only, or None."""
    from safetensors.torch import load_file

    path = covariance_path(pipe, corpus)
    return load_file(str(path))["C"] if path.exists() else None


def inverse(C: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """C^-1 with a tiny ridge (relative to the mean eigenvalue) so it is positive definite."""
    C = C.double()
    d = C.shape[0]
    eye = torch.eye(d, dtype=C.dtype)
    return torch.linalg.inv(C + ridge * (torch.trace(C) / d) * eye)
