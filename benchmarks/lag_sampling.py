"""Sampling time of a residuals concept with and without LAG, side by side in one run (alternating runs).

    python benchmarks/lag_sampling.py [--steps 20] [--repeats 4] [--base tiny|tiny-sd3|tiny-flux|sd15] [--size PX]

``tiny`` (default), ``tiny-sd3`` and ``tiny-flux`` (LAG from the joint attention) run on the CPU; ``sd15`` is an SD 1.5-shaped pipeline with
random weights (fp16 on a GPU, fp32 on the CPU; ``--size`` picks the image
size, default 512). Prints one JSON line with the best time of each mode, their
ratio (LAG / no LAG), and the seconds spent inside LAG's own code in the best
LAG run (the map, mask and row-matching functions, timed directly), which a
busy machine disturbs far less than the ratio of two wall-clock times.
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

from personalize import attach, families, load_base, train  # noqa: E402


class LagClock:
    """Adds up the time spent in LAG's own functions (maps + masks per block, the per-call row plan)."""

    def __init__(self):
        import personalize.edits.lag as lag
        from personalize.edits.attention_maps import AttentionMaps

        self.seconds = 0.0
        self._patch(lag, "block_masks")
        self._patch(AttentionMaps, "_make_plan")

    def _patch(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)


def once(pipe, prompt: str, steps: int, size: int | None) -> float:
    extra = {} if size is None else {"height": size, "width": size}
    start = time.perf_counter()
    with torch.no_grad():
        pipe(prompt, num_images_per_prompt=2, num_inference_steps=steps, guidance_scale=6.0, output_type="latent",
             generator=torch.Generator(families.denoiser(pipe).device).manual_seed(0), **extra)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--base", choices=("tiny", "tiny-sd3", "tiny-flux", "sd15"), default="tiny")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (sd15)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.base == "sd15":
        from personalize.sd_shapes import sd15_pipeline

        pipe = sd15_pipeline(device, dtype=torch.float16 if device == "cuda" else None)
    else:
        pipe, device = load_base(args.base), "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos")
        concept = train(pipe, photos, token="<bench>", superclass="ball", out=Path(tmp) / "c.safetensors",
                        method="residuals", settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0},
                        progress=False, device=device)
        prompt = "a photo of a <bench> ball on the beach"
        with attach(pipe, concept):
            once(pipe, prompt, 2, args.size)  # warm-up
        clock = LagClock()
        times = {False: float("inf"), True: float("inf")}
        in_lag = 0.0
        for _ in range(args.repeats):  # alternate, keep the best of each: robust to a busy machine
            for lag in (False, True):
                with attach(pipe, concept, lag=lag):
                    clock.seconds = 0.0
                    seconds = once(pipe, prompt, args.steps, args.size)
                if seconds < times[lag]:
                    times[lag] = seconds
                    in_lag = clock.seconds if lag else in_lag
    print(json.dumps({"method": "residuals", "base": args.base, "device": device, "size": args.size,
                      "steps": args.steps, "images": 2, "s_without_lag": round(times[False], 3),
                      "s_with_lag": round(times[True], 3), "ratio": round(times[True] / times[False], 3),
                      "s_inside_lag_code": round(in_lag, 3), "lag_code_share": round(in_lag / times[True], 4)}))


if __name__ == "__main__":
    main()
