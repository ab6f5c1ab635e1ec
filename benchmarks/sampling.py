"""Sampling cost of an attached concept, side by side with the bare base in one run (CPU ratio).

``--base`` (comma-separated, ``benchmarks/bases.py``): ``tiny``, ``tiny-sd2``, ``tiny-sdxl`` run on the CPU;
``sd15``, ``sd21``, ``sdxl`` (real-size random shapes, fp16, native size) on a GPU, skipped without CUDA. The
default is ``sd15`` with CUDA and ``tiny`` without, as before. The concept is a one-step Perfusion concept
trained on that base (a concept must match its base).

    python benchmarks/sampling.py [--steps 20] [--repeats 3] [--base tiny,tiny-sd2,tiny-sdxl]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_photos  # noqa: E402

from bases import REAL, parse, build  # noqa: E402
from personalize import attach, generate, train  # noqa: E402


def once(pipe, prompt: str, steps: int) -> float:
    start = time.perf_counter()
    generate(pipe, prompt, num_images=2, steps=steps, seed=0)
    return time.perf_counter() - start


def measure(name: str, steps: int, repeats: int) -> dict:
    """Best-of-``repeats`` seconds for two images, bare and with a Perfusion concept attached, alternating."""
    device = "cuda" if name in REAL else "cpu"
    pipe = build(name, device, torch.float16 if device == "cuda" else None)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos")
        concept = train(pipe, photos, token="<bench>", superclass="ball", out=Path(tmp) / "c.safetensors",
                        settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0}, masks="none", progress=False,
                        device=device)
        prompt = "a photo of a <bench> on the beach"
        once(pipe, prompt, 2)  # warm-up
        base = edited = float("inf")
        for _ in range(repeats):  # alternate, keep the best of each: robust to a busy machine
            base = min(base, once(pipe, prompt, steps))
            with attach(pipe, concept):
                edited = min(edited, once(pipe, prompt, steps))
    return {"method": "perfusion", "base": name if device == "cpu" else f"{name}-random-native", "device": device,
            "steps": steps, "s_base": round(base, 3), "s_with_concept": round(edited, 3), "ratio": round(edited / base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base", default="sd15" if torch.cuda.is_available() else "tiny")
    args = parser.parse_args()
    for name in parse(args.base):
        if name in REAL and not torch.cuda.is_available():
            print(json.dumps({"base": name, "skipped": "real-size shapes run on a GPU; CUDA is not available"}))
            continue
        print(json.dumps(measure(name, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
