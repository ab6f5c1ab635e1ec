"""Export a concept in another tool's format.

``diffusers-lora`` (residuals concepts): a folder that a stock diffusers
pipeline loads without personalize,

    pipe.load_lora_weights(DIR)                       # the residuals (no LAG)
    pipe.load_textual_inversion(DIR / "token.safetensors")   # the token V*

- ``pytorch_lora_weights.safetensors``: peft-style keys
  ``unet.<block>.proj_out.lora_A.weight`` / ``lora_B.weight`` (the concept's
  own tensor names) and, in the header, the peft LoraConfig (per-layer rank and
  alpha = rank, i.e. scale 1) under diffusers' ``lora_adapter_metadata`` key;
- ``token.safetensors``: ``{V*: (1, d)}``, the textual-inversion layout;
- ``export.json``: token, superclass, a prompt to start from, and where the file
  came from.

Every file is written atomically; nothing is pickled.
"""
from __future__ import annotations

import json
from pathlib import Path

from .concept import Concept, load_concept
from .errors import BadInputError
from .paths import atomic_path, inside

FORMATS = ("diffusers-lora",)
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
TOKEN_FILE = "token.safetensors"


def export(concept: Concept | str | Path, out: str | Path, fmt: str = "diffusers-lora") -> Path:
    """Write ``concept`` to the folder ``out`` in format ``fmt``; returns the folder."""
    if fmt not in FORMATS:
        raise BadInputError(f"unknown export format '{fmt}'; known: {', '.join(FORMATS)}")
    concept = concept if isinstance(concept, Concept) else load_concept(Path(concept))
    name = concept.path.name if concept.path is not None else concept.token
    if concept.method != "residuals":
        raise BadInputError(f"'{name}' is a {concept.method} concept; only residuals concepts export as "
                            "diffusers-lora (train with --method residuals)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out '{out}' is a file; pass a folder for the exported LoRA")
    _write_lora(concept, inside(out, LORA_FILE))
    _write_token(concept, inside(out, TOKEN_FILE))
    info = {
        "format": fmt, "token": concept.token, "superclass": concept.superclass,
        "prompt": f"a photo of a {concept.token} {concept.superclass}",
        "token_trained": bool(concept.config.get("train_token", False)),
        "init_token": concept.config.get("init_token"),
        "source": str(concept.path) if concept.path is not None else None,
        "base_fingerprint": concept.header.get("base_fingerprint", {}).get("digest"),
        "load": ["pipe.load_lora_weights(DIR)", f"pipe.load_textual_inversion(DIR/'{TOKEN_FILE}')"],
    }
    with atomic_path(inside(out, "export.json")) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def _write_lora(concept: Concept, path: Path) -> None:
    from safetensors.torch import save_file

    from .methods.residuals import PREFIX, ResidualBank, lora_config

    tensors = {k: v.contiguous() for k, v in concept.tensors.items() if k.startswith(PREFIX)}
    config = lora_config(ResidualBank.ranks_in(concept.tensors)).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()},
                                                                      sort_keys=True, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _write_token(concept: Concept, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({concept.token: concept.tensors["embedding"].contiguous()}, str(tmp))
