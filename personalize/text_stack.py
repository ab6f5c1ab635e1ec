"""The text side of a base, whatever its family: one text encoder (SD 1.x, SD 2.x) or two (SDXL).

Everything that encodes a prompt for the UNet goes through here, so the trainer, the covariance, Perfusion's
encodings and the prompt-row matcher read the same context the stock pipelines build:

- SD 1.x / 2.x: the text encoder's last hidden state (``StableDiffusionPipeline.encode_prompt`` without
  ``clip_skip``);
- SDXL: each encoder's penultimate hidden state, concatenated on the feature axis (768 + 1280 = 2,048 wide on
  the real model), and the pooled, projected output of the second encoder, which the UNet reads with the
  ``add_time_ids`` (``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``).

Both SDXL tokenizers share the CLIP BPE vocabulary and differ only in the padding token, so a token id means
the same word in both, and added tokens get the same ids in both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def family(pipe) -> str:
    """``sd1``, ``sd2`` or ``sdxl``: two text encoders make SDXL; a GELU (OpenCLIP) text encoder SD 2.x."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    act = getattr(getattr(pipe.text_encoder, "config", None), "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def pairs(pipe) -> list[tuple[str, str]]:
    """The (tokenizer, text encoder) attribute names of the pipeline, in the order their outputs are joined."""
    found = [("tokenizer", "text_encoder")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        found.append(("tokenizer_2", "text_encoder_2"))
    return found


def encoders(pipe) -> list:
    return [getattr(pipe, te) for _, te in pairs(pipe)]


def widths(pipe) -> list[int]:
    """Each text encoder's input-embedding width (a token vector of this base is their concatenation)."""
    return [int(te.get_input_embeddings().embedding_dim) for te in encoders(pipe)]


@dataclass
class Encoding:
    """A prompt batch as the UNet reads it: the context (B, 77, D), the pooled vector (SDXL; else None) and the
    first tokenizer's ids (where a concept's token sits; the second tokenizer puts it at the same places)."""

    context: torch.Tensor
    pooled: torch.Tensor | None
    ids: torch.Tensor


def tokenize(pipe, prompts: list[str], device=None) -> list[torch.Tensor]:
    """Each tokenizer's ids for ``prompts``, padded to its ``model_max_length`` (77)."""
    out = []
    for tok_name, _ in pairs(pipe):
        tok = getattr(pipe, tok_name)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(ids if device is None else ids.to(device))
    return out


def encode_ids(pipe, ids: list[torch.Tensor]) -> Encoding:
    """The UNet's context (and pooled vector) for one id tensor per text encoder."""
    tes = encoders(pipe)
    if len(tes) == 1:
        return Encoding(tes[0](ids[0].to(tes[0].device))[0], None, ids[0])
    hidden, pooled = [], None
    for te, row_ids in zip(tes, ids):
        out = te(row_ids.to(te.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])
    return Encoding(torch.cat(hidden, dim=-1), pooled, ids[0])


def encode(pipe, prompts: list[str]) -> Encoding:
    return encode_ids(pipe, tokenize(pipe, prompts, pipe.text_encoder.device))


def time_ids(height: int, width: int, rows: int, device=None, dtype=None) -> torch.Tensor:
    """SDXL's ``add_time_ids`` for an uncropped ``height`` x ``width`` image at the same target size."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=dtype or torch.float32, device=device)
    return row.expand(rows, 6)


def unet_kwargs(pipe, encoding_pooled: torch.Tensor | None, height: int, width: int,
                rows_time_ids: torch.Tensor | None = None) -> dict:
    """Extra UNet arguments of the family: SDXL's ``added_cond_kwargs`` (pooled text, time ids); else none.

    ``rows_time_ids``: each row's own (original size, crop top-left, target size), e.g. of a bucketed photo;
    None = an uncropped ``height`` x ``width`` image for every row."""
    if encoding_pooled is None:
        return {}
    if rows_time_ids is not None:
        ids = rows_time_ids.to(encoding_pooled.device, encoding_pooled.dtype)
    else:
        ids = time_ids(height, width, encoding_pooled.shape[0], encoding_pooled.device, encoding_pooled.dtype)
    return {"added_cond_kwargs": {"text_embeds": encoding_pooled, "time_ids": ids}}


def native_resolution(pipe) -> int:
    """The base's native image size: the UNet's latent size times the VAE's scale factor."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
