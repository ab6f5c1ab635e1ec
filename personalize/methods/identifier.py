"""DreamBooth's identifier token, shared by DreamBooth and DreamBooth-LoRA: the concept token is a *frozen* copy
of a rare word's embedding (``identifier``, default "sks"), so "a photo of a <tok> dog" here is "a photo of a
sks dog" in any stock pipeline holding the same weights."""
from __future__ import annotations

from typing import Any

import torch

from .shared import word_vector


class IdentifierToken:
    """The concept token as DreamBooth's identifier: a frozen copy of the ``identifier`` word's embedding."""

    prompting = "modifier"  # "a photo of [V] [class]"

    def _init_identifier(self) -> None:
        vector = word_vector(self.pipe, self.config.identifier, single=True)
        self.vector = vector.unsqueeze(0).to(self.pipe.text_encoder.device)

    def token_vectors(self) -> tuple[list[str], torch.Tensor]:
        return [self.token], self.vector

    def token_alias(self) -> str:
        """The text encoders read the identifier's own id where the token is (``edits/tokens.py``): its vector is
        the word's, and a CLIP pooling at the highest id pools as for "sks" (FLUX.1's CLIP-L)."""
        return self.config.identifier

    def templates(self) -> tuple[str, ...]:
        return ("a photo of a {}",)  # the reference's instance prompt "a photo of [V] [class]"

    @classmethod
    def export_notes(cls, concept, fmt: str) -> dict[str, Any]:
        word = concept.config.get("identifier", "sks")
        return {"prompt": f"a photo of a {word} {concept.superclass}",
                "note": f"write '{word}' where personalize prompts use '{concept.token}'"}
