"""Concept-file size per method for an SD 1.5-shaped UNet built on the meta device (no weights).

Prints one JSON line per method: {"method", "base", "bytes", "tensor_bytes", "tensors"}.
The file is written with the real concept writer (header included) from zero tensors of the real shapes.
Goal for Perfusion: <= 60,000 bytes in fp32. DreamBooth's concept file is a header only; its row adds
"pipeline_bytes", the fp32 weights of the pipeline folder it writes (UNet + text encoder + VAE).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from personalize.concept import Concept, save_concept
from personalize.methods.perfusion import Perfusion, PerfusionConfig
from personalize.sd_shapes import SD15_TEXT, SD15_VAE, sd15_unet


def typical_header(method: str, config: dict, defaults: dict) -> dict:
    return {
        "method": method, "token": "<my-teddy>", "superclass": "teddy", "config": config,
        "inference_defaults": defaults,
        "base_fingerprint": {"architecture": "0" * 16, "tokenizer": "0" * 16, "text_encoder": "0" * 16, "digest": "0" * 16},
        "covariance": "builtin",
        "provenance": {"base": "runwayml/stable-diffusion-v1-5", "steps": 250, "batch_size": 16, "seed": 0,
                       "mixed_precision": "no", "images": ["0" * 64] * 6, "package_version": "0.1.0",
                       "torch": torch.__version__, "created": "2026-01-01T00:00:00+00:00", "seconds": 240.0},
    }


def _row(method: str, label: str, config: dict, shapes: dict[str, tuple], defaults: dict | None = None) -> dict:
    """Write a concept of these tensor shapes (zeros) with the real writer; its size."""
    tensors = {k: torch.zeros(s) for k, s in shapes.items()}
    header = typical_header(method, config, defaults or {})
    with tempfile.TemporaryDirectory() as tmp:
        size = save_concept(Path(tmp) / "c.safetensors", Concept(header, tensors)).stat().st_size
    return {"method": label, "base": "sd15", "bytes": size, "tensor_bytes": sum(t.numel() * 4 for t in tensors.values()),
            "tensors": len(tensors)}


def baselines(unet) -> list[dict]:
    """Textual Inversion, DreamBooth-LoRA, Custom Diffusion (one and two concepts) and DreamBooth."""
    import dataclasses

    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers import AutoencoderKL

    from personalize.methods import get

    text = SD15_TEXT["hidden_size"]
    rows = []
    for name, label, shapes in (
        ("textual-inversion", "textual-inversion (1 vector)", {"embedding": (1, text)}),
        ("dreambooth-lora", "dreambooth-lora (rank 4, UNet)", get("dreambooth-lora").concept_shapes(unet, 4)),
        ("custom-diffusion", "custom-diffusion (1 concept)", get("custom-diffusion").concept_shapes(unet, text)),
        ("custom-diffusion", "custom-diffusion (2 concepts)", get("custom-diffusion").concept_shapes(unet, text, 2)),
        ("dreambooth", "dreambooth (header; weights in OUT.pipeline/)", {}),
    ):
        rows.append(_row(name, label, dataclasses.asdict(get(name).make_config()), shapes))
    with torch.device("meta"):
        parts = (unet, CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), AutoencoderKL(**SD15_VAE))
    rows[-1]["pipeline_bytes"] = sum(p.numel() * 4 for part in parts for p in part.parameters())
    return rows


def measure() -> list[dict]:
    unet = sd15_unet("meta")
    rows = []
    for lock in ("local", "trained"):
        cfg = PerfusionConfig(lock=lock)
        shapes = Perfusion.concept_shapes(unet, SD15_TEXT["hidden_size"], lock=lock)
        tensors = {k: torch.zeros(s) for k, s in shapes.items()}
        header = typical_header("perfusion", cfg.__dict__, {"beta": cfg.beta, "tau": cfg.tau})
        with tempfile.TemporaryDirectory() as tmp:
            path = save_concept(Path(tmp) / "c.safetensors", Concept(header, tensors))
            size = path.stat().st_size
        rows.append({"method": "perfusion" if lock == "local" else "perfusion (trained K)", "base": "sd15",
                     "bytes": size, "tensor_bytes": sum(t.numel() * 4 for t in tensors.values()),
                     "tensors": len(tensors)})
    return rows + baselines(unet)


def main() -> None:
    for row in measure():
        print(json.dumps(row))


if __name__ == "__main__":
    main()
