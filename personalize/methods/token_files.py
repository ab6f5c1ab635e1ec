"""Token-vector files of other tools, read by every method that imports them (Textual Inversion, Custom
Diffusion's modifier tokens): diffusers' ``{token: (n, d)}``, AUTOMATIC1111's ``string_to_param`` (.pt)
and its safetensors ``emb_params``."""
from __future__ import annotations

import torch

from ..errors import BadInputError


def ti_vectors(state: dict) -> tuple[str | None, torch.Tensor]:
    """(token name or None, vectors) from any of the textual-inversion layouts."""
    if "string_to_param" in state:
        params = state["string_to_param"]
        if not isinstance(params, dict) or "*" not in params:
            raise BadInputError("A1111 embedding has no string_to_param['*']; is it a textual-inversion file?")
        return state.get("name"), params["*"]
    if "emb_params" in state:
        return None, state["emb_params"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        raise BadInputError(f"not a textual-inversion file: expected one token -> vectors entry, found {len(tensors)} "
                            f"tensors ({', '.join(list(tensors)[:3])})")
    return next(iter(tensors.items()))
