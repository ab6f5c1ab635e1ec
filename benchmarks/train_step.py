"""Seconds per training step and peak memory, through the real trainer.

CPU: the ``tiny`` base (always). GPU (when CUDA is available): an SD 1.5-shaped
pipeline with random weights at 512 px, at each method's own default batch size.
Prints one JSON line per run. Every registered method by default; methods with
prior preservation train with it on (the photos stand in for the class images, so
no sampling is timed), i.e. twice the images per step.

    python benchmarks/train_step.py [--steps 20] [--batch-size 4] [--methods perfusion,dreambooth]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_photos  # noqa: E402

from personalize import train  # noqa: E402
from personalize.base import load_base  # noqa: E402


def measure(pipe, base_name: str, method: str, steps: int, batch_size: int, device: str, **settings) -> dict:
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step, loss, m):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", n=5, size=96)
        settings = {**_prior_settings(method, photos), **settings}
        last[0] = time.perf_counter()
        train(pipe, photos, token="<bench>", superclass="ball", out=Path(tmp) / "c.safetensors", method=method,
              settings={"steps": steps, "batch_size": batch_size, "checkpoint_every": 0, **settings},
              masks="none", progress=False, callbacks=[tick], device=device)
    warm = sorted(times[2:] or times)
    prior = settings.pop("class_images", None) is not None
    row = {"method": method, "base": base_name, "device": device, "batch_size": batch_size, "prior": prior, **settings,
           "s_per_step": round(warm[len(warm) // 2], 4), "steps_timed": len(warm)}  # median: robust to a busy CPU
    if device == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        row["gpu"] = torch.cuda.get_device_name()
    else:
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def _prior_settings(method: str, photos: Path) -> dict:
    """Prior preservation as the method defaults it, with the photos as class images (nothing to sample)."""
    from personalize.methods import get
    from personalize.prior import PriorConfig

    config = get(method).make_config()
    on = isinstance(config, PriorConfig) and config.prior_loss_weight > 0
    return {"class_images": str(photos)} if on else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from personalize.methods import get, names

    for method in (names() if args.methods == "all" else args.methods.split(",")):
        rows = []
        for ckpt in (False, True):  # side by side in one run: the ratio is what CPU numbers are good for
            pipe = load_base("tiny")
            rows.append(measure(pipe, "tiny", method, args.steps, args.batch_size, "cpu", gradient_checkpointing=ckpt))
            print(json.dumps(rows[-1]), flush=True)
        print(json.dumps({"method": method, "base": "tiny", "ratio_checkpointing_over_plain":
                          round(rows[1]["s_per_step"] / rows[0]["s_per_step"], 3)}), flush=True)
        if torch.cuda.is_available():
            from personalize.sd_shapes import sd15_pipeline

            for ckpt in (False, True):
                pipe = sd15_pipeline("cuda")
                batch = get(method).train_defaults.get("batch_size", 16)
                print(json.dumps(measure(pipe, "sd15-random-512px", method, args.steps, batch, "cuda",
                                         gradient_checkpointing=ckpt, mixed_precision="bf16")), flush=True)
                del pipe
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
