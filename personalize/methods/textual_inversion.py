"""Textual Inversion (Gal et al., ICLR 2023): only new token vectors train.

    V*_1..V*_n   the concept's n vectors (``num_vectors``), one Parameter (n, d),
                 registered at the token seam as ``<t>``, ``<t>_1``, ... (diffusers'
                 multi-vector naming, so a stock pipeline expands ``<t>`` the same way)
    init         every vector starts at ``init_word``'s embedding (default: the superclass); a word or
                 class phrase of several tokens ("penguin plushie") starts at the mean of its pieces'
                 rows (the reference scripts accept only a one-token initializer)

The frozen embedding table is never trained or restored; nothing else in the
pipeline changes. Recipe (diffusers ``textual_inversion`` README): batch 1 x 4
gradient accumulation, ``--learning_rate 5e-4 --scale_lr`` = an effective
5e-4 x 4 x 1 = 2e-3, 3000 updates, AdamW weight decay 1e-2, no gradient
clipping (the script never clips). Here: batch 4 in one step at lr 2e-3, the
same update (the script averages the 4 accumulated losses), 3000 steps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import BadInputError
from .base import Method
from .cards import TextualInversionCard, TextualInversionConfig
from .shared import cpu_float, load_into, vector_tokens, word_vector
from .token_files import (check_vectors, family_of, is_sdxl, multi_key_loading, save_a1111, sdxl_loading, ti_pair,
                          token_keys, token_state)

DIFFUSERS_FILE = "learned_embeds.safetensors"


class TextualInversion(TextualInversionCard, Method):
    export_formats: ClassVar[dict[str, str]] = {
        "diffusers": f"{DIFFUSERS_FILE}: pipe.load_textual_inversion(DIR)",
        "a1111": "<token>.pt (string_to_param, AUTOMATIC1111 embeddings folder; a pickle, written not read); "
                 "SDXL: <token>.safetensors (clip_l + clip_g)",
    }

    @classmethod
    def make_config(cls, overrides=None) -> TextualInversionConfig:
        config = super().make_config(overrides)
        if not isinstance(config.num_vectors, int) or config.num_vectors < 1:
            raise BadInputError(f"num_vectors must be a whole number >= 1, not {config.num_vectors!r}")
        return config

    def __init__(self, pipe, token, superclass, config: TextualInversionConfig):
        super().__init__(pipe, token, superclass, config)
        self.tokens = vector_tokens(token, config.num_vectors)
        init = word_vector(pipe, config.init_word or superclass)
        self.embedding = nn.Parameter(init.repeat(config.num_vectors, 1).to(pipe.text_encoder.device))

    # -- training
    def placeholder(self) -> str:
        return " ".join(self.tokens)

    def param_groups(self) -> list[dict]:
        return [{"params": [self.embedding], "lr": self.config.lr, "weight_decay": self.config.weight_decay,
                 "name": "embedding"}]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return cpu_float({"embedding": self.embedding})

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_into({"embedding": self.embedding}, tensors, self.name)

    # -- the pipeline
    def token_vectors(self) -> tuple[list[str], torch.Tensor]:
        return self.tokens, self.embedding

    # -- interop
    @classmethod
    def export(cls, concept, fmt: str, folder: Path, pipe=None) -> list[Path]:
        """diffusers: ``learned_embeds.safetensors``; a1111: ``<token>.pt``. On SDXL both hold the two-key
        ``{"clip_l", "clip_g"}`` layout (``token_files.token_state``); AUTOMATIC1111 reads SDXL embeddings only
        as such a safetensors file, so its export is ``<token>.safetensors``. On Flux (diffusers only) the file is
        ``{"clip_l", "t5"}``, the advanced Flux script's layout."""
        from ..paths import inside, save_safetensors

        state = token_state(concept, concept.token, concept.tensors["embedding"])
        if fmt == "diffusers":
            return [save_safetensors(inside(folder, DIFFUSERS_FILE), state)]
        if is_sdxl(concept):  # the token names the file: it must stay in the folder
            return [save_safetensors(inside(folder, f"{concept.token}.safetensors"), state)]
        path = inside(folder, f"{concept.token}.pt")
        save_a1111(path, concept.token, state[concept.token])
        return [path]

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        if not token_keys(concept):
            return {}
        if not is_sdxl(concept):  # Flux: the advanced Flux script's clip_l + t5 file
            return {"how_to_load": multi_key_loading(DIFFUSERS_FILE, concept.token, family_of(concept))}
        file = DIFFUSERS_FILE if fmt == "diffusers" else f"{concept.token}.safetensors"
        how = sdxl_loading(file, concept.token) if fmt == "diffusers" else \
            f"{file} (clip_l + clip_g) in AUTOMATIC1111's embeddings folder"
        return {"how_to_load": how}

    @classmethod
    def import_state(cls, pipe, state: dict, *, token: str | None, superclass: str, embeddings=None,
                     metadata=None) -> dict[str, Any]:
        """``{token: (n, d)}`` (diffusers), ``string_to_param`` (A1111 .pt), ``emb_params`` (A1111 safetensors) or,
        on SDXL, ``{"clip_l", "clip_g"}`` or diffusers' two files (``embeddings``: the second encoder's
        ``learned_embeds_2.safetensors``), joined into the concept's (n, d_l + d_g) vectors."""
        name, vectors = ti_pair(state, list(embeddings or ()), pipe)
        vectors = check_vectors(pipe, vectors)
        return {"token": token or name, "superclass": superclass, "tensors": {"embedding": vectors},
                "config": {"num_vectors": vectors.shape[0]}}

