"""The text side of a base, whatever its family: the family (``personalize.families``) decides, this module is the
one entry point generic code uses.

Everything that encodes a prompt for the denoiser goes through here, so the trainer, the covariance, Perfusion's
encodings and the prompt-row matcher read the same context the stock pipelines build (each family's
``encode_ids`` says how: ``families/sd.py`` for SD 1.x, 2.x and SDXL).
"""
from __future__ import annotations

import torch

from . import families
from .families import Encoding  # noqa: F401  (re-exported: the encoded prompt batch)

FAMILIES = families.LABELS


def family(pipe) -> str:
    """The family's name: ``sd1``, ``sd2``, ``sdxl``, ..."""
    return families.of(pipe).name


def pairs(pipe) -> list[tuple[str, str]]:
    """The (tokenizer, text encoder) attribute names of the pipeline, in the order their outputs are joined."""
    return families.of(pipe).pairs(pipe)


def encoders(pipe) -> list:
    return [getattr(pipe, te) for _, te in pairs(pipe)]


def widths(pipe) -> list[int]:
    """Each text encoder's input-embedding width (a token vector of this base is their concatenation)."""
    return [int(te.get_input_embeddings().embedding_dim) for te in encoders(pipe)]


def tokenize(pipe, prompts: list[str], device=None) -> list[torch.Tensor]:
    """Each tokenizer's ids for ``prompts``, padded to its length (77 for CLIP)."""
    return families.of(pipe).tokenize(pipe, prompts, device)


def encode_ids(pipe, ids: list[torch.Tensor]) -> Encoding:
    """The denoiser's context (and pooled vector) for one id tensor per text encoder."""
    return families.of(pipe).encode_ids(pipe, ids)


def encode(pipe, prompts: list[str]) -> Encoding:
    return encode_ids(pipe, tokenize(pipe, prompts, encoders(pipe)[0].device))


def native_resolution(pipe) -> int:
    """The base's native image size."""
    return families.of(pipe).native_resolution(pipe)
