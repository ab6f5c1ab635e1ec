"""What the benchmark runner's bookkeeping costs per row (SQLite claim + finish), on this machine.

    python benchmarks/benchmark_runner.py [--rows 2000]

Prints the mean milliseconds per claim+finish for a plan of no-op rows with the
dependency shape of a real benchmark (generate rows depend on a train row, a
score row on its generate rows), for 1 and 2 processes, beside the time of one
toy-world generate row for scale.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from personalize.benchmark.db import BenchmarkDB
from personalize.benchmark.plan import Unit


def fake_plan(n: int) -> list[Unit]:
    units = [Unit(key="train/m/c", kind="train", method="m", method_type="perfusion", concept="c")]
    gens = [Unit(key=f"generate/m/c/default/p{i}_s0", kind="generate", method="m", method_type="perfusion",
                 concept="c", deps=["train/m/c"]) for i in range(n - 2)]
    score = Unit(key="score/m/c/default", kind="score", method="m", method_type="perfusion", concept="c",
                 deps=[u.key for u in gens])
    return units + gens + [score]


def drain(path: str, rank: int, out) -> None:
    db = BenchmarkDB(path)
    db.register(rank, {})
    n = 0
    began = time.perf_counter()
    while True:
        row = db.claim()
        if row is None:
            if db.counts()["running"] == 0:
                break
            time.sleep(0.01)
            continue
        db.finish(row["key"], {}, 0.0, None, {})
        n += 1
    out.put((n, time.perf_counter() - began))
    db.close()


def measure(rows: int, processes: int) -> tuple[float, list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "b.sqlite")
        BenchmarkDB(path).sync_plan(fake_plan(rows), "x", "x")
        q = mp.get_context("spawn").Queue()
        procs = [mp.get_context("spawn").Process(target=drain, args=(path, r, q)) for r in range(processes)]
        for p in procs:
            p.start()
        results = [q.get() for _ in procs]
        for p in procs:
            p.join()
        wall = max(t for _, t in results)
        return 1000 * wall / rows, [n for n, _ in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    for procs in (1, 2):
        ms, split = measure(args.rows, procs)
        print(f"{procs} process(es): {ms:.2f} ms per row (claim + finish), rows per process {split}")


if __name__ == "__main__":
    main()
