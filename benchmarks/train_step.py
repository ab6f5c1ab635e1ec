"""Seconds per training step and peak memory, through the real trainer.

``--base`` (comma-separated, default ``tiny,sd15``; ``benchmarks/bases.py``): the miniatures ``tiny``,
``tiny-sd2``, ``tiny-sdxl`` run on the CPU, each with and without gradient checkpointing side by side, and
each family's plain step over ``tiny``'s when ``tiny`` is in the list (CPU numbers are good for ratios only);
the real-size random shapes ``sd15``, ``sd21``, ``sdxl`` run on a GPU at their native size (512/768/1024 px),
bf16 mixed precision, each method's own default batch, and are skipped (one row says so) without CUDA.
Prints one JSON line per run. Every registered method by default; methods with
prior preservation train with it on (the photos stand in for the class images, so
no sampling is timed), i.e. twice the images per step.

    python benchmarks/train_step.py [--steps 20] [--batch-size 4] [--methods perfusion,dreambooth]
                                    [--base tiny,tiny-sd2,tiny-sdxl]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bases import REAL, TINY, build, parse  # noqa: E402


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default="all", help="comma-separated, or 'all' registered methods")
    parser.add_argument("--base", default="tiny,sd15", help=f"comma-separated, of {', '.join(TINY + REAL)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from personalize.methods import get, names

    bases = parse(args.base)
    for base in [b for b in bases if b in REAL and not torch.cuda.is_available()]:
        print(json.dumps({"base": base, "skipped": "real-size shapes run on a GPU; CUDA is not available"}), flush=True)
    if any(b in TINY for b in bases):  # warm the process up (allocator, kernels): the first run is the slowest
        measure(build("tiny"), "tiny", "textual-inversion", 4, args.batch_size, "cpu")
    for method in (names() if args.methods == "all" else args.methods.split(",")):
        plain = {}
        for base in [b for b in TINY if b in bases]:  # tiny first: the others are compared with it
            rows = []
            for ckpt in (False, True):  # side by side in one run: the ratio is what CPU numbers are good for
                rows.append(measure(build(base), base, method, args.steps, args.batch_size, "cpu",
                                    gradient_checkpointing=ckpt))
                print(json.dumps(rows[-1]), flush=True)
            plain[base] = rows[0]["s_per_step"]
            ratios = {"ratio_checkpointing_over_plain": round(rows[1]["s_per_step"] / rows[0]["s_per_step"], 3)}
            if "tiny" in plain and base != "tiny":
                ratios["ratio_plain_over_tiny"] = round(plain[base] / plain["tiny"], 3)
            print(json.dumps({"method": method, "base": base, **ratios}), flush=True)
        for base in [b for b in bases if b in REAL and torch.cuda.is_available()]:
            batch = get(method).train_defaults.get("batch_size", 16)
            for ckpt in (False, True):
                pipe = build(base, "cuda")
                print(json.dumps(measure(pipe, f"{base}-random-native", method, args.steps, batch, "cuda",
                                         gradient_checkpointing=ckpt, mixed_precision="bf16")), flush=True)
                del pipe
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
