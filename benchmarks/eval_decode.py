"""The evaluator's file path against the machine's own decode limit, measured in one run.

    python benchmarks/eval_decode.py [--files 512] [--size 512] [--workers N] [--batch 256] [--repeats 2]
    python benchmarks/eval_decode.py --score [--files 64] [--references 8] [--workers N] [--repeats 2]

The limit is (single-process decode + resize rate) x workers: one process opens each PNG as the evaluator does
(``evaluation.models.load_image``) and applies both of its transforms (CLIP's 224 and DINO's 256 -> 224 bicubic,
``pixel_transform``), in a plain loop. The file path is ``evaluation.decode.preprocessed_batches`` with
``--workers`` worker processes, timed from the call to the last batch (worker start-up included: that is what a
benchmark run pays). Prints one JSON line: both rates, the limit, and the fraction of it the file path reaches
(goal >= 0.8). Runs alternate and the best of each is kept, so a busy machine shows as spread, not as a ratio.

``--score`` times the whole scoring path instead: ``evaluation.score_concept`` (CLIP-T, CLIP-I, DINO-I) with
random-weight CLIP ViT-B/32 and DINO ViT-S/16 (as ``gpu_suite.py`` loads them) on ``--files`` generated PNGs
against ``--references`` photos, three ways: each encoder decoding every file itself (``workers=None``, the path
before the file path: a generated image is decoded three times, a photo twice), every file decoded once in this
process (``workers=0``), and decoded once in ``--workers`` processes. Prints one JSON line: images/s of each
(generated images scored per second, best of ``--repeats``, with the slowest), and that the three agree.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.evaluation.decode import default_workers, preprocessed_batches  # noqa: E402
from personalize.evaluation.models import load_image, pixel_transform  # noqa: E402


def write_pngs(folder: Path, n: int, size: int) -> list[Path]:
    """Smooth random PNGs (like generated images: they compress as photos do, not as noise)."""
    import numpy as np
    from PIL import Image

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        path = folder / f"{i:05d}.png"
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path)
        paths.append(path)
    return paths


def single_process_rate(paths: list[Path], transforms) -> float:
    start = time.perf_counter()
    for path in paths:
        image = load_image(path)
        for t in transforms:
            t(image)
    return len(paths) / (time.perf_counter() - start)


def file_path_rate(paths: list[Path], transforms, batch: int, workers: int) -> float:
    start = time.perf_counter()
    count = sum(b[0].shape[0] for b in preprocessed_batches(paths, transforms, batch, workers))
    return count / (time.perf_counter() - start)


def score_rates(args) -> dict:
    """images/s of ``score_concept`` per ``workers`` setting (best and slowest of the alternating repeats)."""
    import torch

    from personalize.evaluation import ClipEncoder, DinoEncoder, score_concept

    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip, dino = ClipEncoder(random_weights=True, device=device), DinoEncoder(random_weights=True, device=device)
    ways = {"per_encoder": None, "in_process": 0, f"workers_{args.workers}": args.workers}
    times: dict = {k: [] for k in ways}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        gen = write_pngs(Path(tmp), args.files + args.references, args.size)
        gen, refs = gen[: args.files], gen[args.files:]
        score_concept(clip, dino, gen, "a photo", refs, workers=0)  # warm-up: the batch shapes' first passes
        for _ in range(args.repeats):
            for name, workers in ways.items():
                start = time.perf_counter()
                results[name] = score_concept(clip, dino, gen, "a photo of a cat", refs, workers=workers)
                times[name].append(time.perf_counter() - start)
    first = next(iter(results.values()))
    return {"mode": "score", "device": device, "files": args.files, "references": args.references,
            "png_px": args.size, "workers": args.workers, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            **{f"{k}_images_per_s": round(args.files / min(v), 2) for k, v in times.items()},
            **{f"{k}_images_per_s_slowest": round(args.files / max(v), 2) for k, v in times.items()},
            "same_scores": all(r == first for r in results.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=None, help="512, or 64 with --score")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=None,
                        help="the CPU count, or with --score the evaluator's default (cores - 1, at most 8)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--score", action="store_true", help="time score_concept (decode + both encoders)")
    parser.add_argument("--references", type=int, default=8)
    args = parser.parse_args()
    if args.score:
        args.files = args.files or 64
        args.workers = default_workers() if args.workers is None else args.workers
        print(json.dumps(score_rates(args)))
        return
    args.files = args.files or 512
    args.workers = args.workers or os.cpu_count() or 1
    transforms = (pixel_transform(224, 224), pixel_transform(256, 224))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_pngs(Path(tmp), args.files, args.size)
        single = loader = 0.0
        for _ in range(args.repeats):
            single = max(single, single_process_rate(paths[: max(32, args.files // 4)], transforms))
            loader = max(loader, file_path_rate(paths, transforms, args.batch, args.workers))
    limit = single * args.workers
    print(json.dumps({"files": args.files, "png_px": args.size, "workers": args.workers, "batch": args.batch,
                      "cpus": os.cpu_count(), "single_process_images_per_s": round(single, 1),
                      "limit_images_per_s": round(limit, 1), "file_path_images_per_s": round(loader, 1),
                      "of_limit": round(loader / limit, 3)}))


if __name__ == "__main__":
    main()
