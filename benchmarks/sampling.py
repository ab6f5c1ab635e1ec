"""Sampling cost of an attached concept, side by side with the bare base in one run (CPU ratio).

    python benchmarks/sampling.py [--steps 20] [--repeats 3]
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
from conftest import make_photos  # noqa: E402

from personalize import attach, generate, load_base, train  # noqa: E402


def once(pipe, prompt: str, steps: int) -> float:
    start = time.perf_counter()
    generate(pipe, prompt, num_images=2, steps=steps, seed=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from personalize.sd_shapes import sd15_pipeline

        pipe, name = sd15_pipeline("cuda", dtype=torch.float16), "sd15-random-512px"
    else:
        pipe, name = load_base("tiny"), "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos")
        concept = train(load_base("tiny"), photos, token="<bench>", superclass="ball", out=Path(tmp) / "c.safetensors",
                        settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0}, masks="none", progress=False)
        if name != "tiny":  # a concept must match its base: train one on this base
            concept = train(pipe, photos, token="<bench>", superclass="ball", out=Path(tmp) / "d.safetensors",
                            settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0}, masks="none", progress=False)
        prompt = "a photo of a <bench> on the beach"
        once(pipe, prompt, 2)  # warm-up
        base = edited = float("inf")
        for _ in range(args.repeats):  # alternate, keep the best of each: robust to a busy machine
            base = min(base, once(pipe, prompt, args.steps))
            with attach(pipe, concept):
                edited = min(edited, once(pipe, prompt, args.steps))
    print(json.dumps({"method": "perfusion", "base": name, "device": device, "steps": args.steps,
                      "s_base": round(base, 3), "s_with_concept": round(edited, 3),
                      "ratio": round(edited / base, 3)}))


if __name__ == "__main__":
    main()
