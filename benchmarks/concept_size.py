"""Concept-file size per method for an SD 1.5-shaped UNet built on the meta device (no weights).

Prints one JSON line per method: {"method", "base", "bytes", "tensor_bytes", "tensors"}.
The file is written with the real concept writer (header included) from zero tensors of the real shapes.
Goal for Perfusion: <= 60,000 bytes in fp32.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from personalize.concept import Concept, save_concept
from personalize.methods.perfusion import Perfusion, PerfusionConfig
from personalize.sd_shapes import SD15_TEXT, sd15_unet


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
    return rows


def main() -> None:
    for row in measure():
        print(json.dumps(row))


if __name__ == "__main__":
    main()
