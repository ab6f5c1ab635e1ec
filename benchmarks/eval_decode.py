"""The evaluator's file path against the machine's own decode limit, measured in one run.

    python benchmarks/eval_decode.py [--files 512] [--size 512] [--workers N] [--batch 256] [--repeats 2]

The limit is (single-process decode + resize rate) x workers: one process opens each PNG as the evaluator does
(``evaluation.models.load_image``) and applies both of its transforms (CLIP's 224 and DINO's 256 -> 224 bicubic,
``pixel_transform``), in a plain loop. The file path is ``evaluation.decode.preprocessed_batches`` with
``--workers`` worker processes, timed from the call to the last batch (worker start-up included: that is what a
benchmark run pays). Prints one JSON line: both rates, the limit, and the fraction of it the file path reaches
(goal >= 0.8). Runs alternate and the best of each is kept, so a busy machine shows as spread, not as a ratio.
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

from personalize.evaluation.decode import preprocessed_batches  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=512)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
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
