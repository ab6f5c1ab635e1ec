"""``personalize benchmark run``: work through a spec's rows until none is left.

Any number of processes (``accelerate launch --num_processes N -m personalize.cli benchmark run``) may
run this loop on one output folder: each claims rows from the shared database, so the pending rows are
split between them without overlap. Rank 0 draws the progress bar over the whole run.

The database is ``OUT/benchmark.sqlite`` unless ``db`` gives a ``postgresql://`` URL: then processes on several
machines (``accelerate launch --num_machines M --machine_rank R …`` on each) share one queue, and OUT must be
the same shared folder on every machine (rows read the files other rows wrote).
"""
from __future__ import annotations

import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .db import BenchmarkQueue, open_db
from .plan import build_plan
from .resources import PeakMemory, git_sha, machine, versions
from .spec import Spec
from .work import Worker, pick_device

DB_NAME = "benchmark.sqlite"


@dataclass
class RunSummary:
    db: str | Path  # the SQLite file, or the PostgreSQL URL without its password
    counts: dict
    ran: int
    failures: list


def database_path(out: str | Path) -> Path:
    return Path(out) / DB_NAME


def plan_into(spec: Spec, out: str | Path, db_url: Optional[str] = None) -> BenchmarkQueue:
    """Create or extend the run's database (``db_url``, or the output folder's SQLite file) with the spec's rows."""
    units = build_plan(spec)  # a spec the plan refuses leaves no database (nor folder) behind
    db = open_db(db_url or database_path(out))
    db.sync_plan(units, spec.digest(), spec.name, out=str(Path(out).resolve()))
    return db


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _leave_process_group() -> tuple[int, int, int]:
    """This process's (rank, world size, local rank) under ``accelerate launch``/torchrun; then forget them.

    Processes coordinate through the database only. Left in the environment, these variables would make the
    trainer's Accelerator join a process group and wait in collectives for processes busy with other rows.
    """
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    for key in DIST_VARS:
        os.environ.pop(key, None)
    return rank, world, local


def _clean_partial_files(out: Path) -> None:
    """Temp files of writes a killed process never finished (only when no other process is alive)."""
    for sub in ("images", "concepts", "data"):
        for tmp in (out / sub).rglob(".*.tmp") if (out / sub).is_dir() else ():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def run_benchmark(spec: Spec, out: str | Path, *, db_url: Optional[str] = None, progress: bool = True,
                  poll: float = 0.5, on_row: Optional[Callable[[dict], None]] = None) -> RunSummary:
    """Run every pending row of ``spec`` under ``out``; finished rows are skipped, failed ones retried.

    ``db_url``: a ``postgresql://`` URL for the queue instead of ``out/benchmark.sqlite`` (several machines).
    """
    out = Path(out)
    rank, world, local_rank = _leave_process_group()
    device = pick_device(spec.device, local_rank)
    db = plan_into(spec, out, db_url)
    db.register(rank, {"world_size": world, **machine(device)})
    db.recover(retry_failed=True)
    db.if_alone(lambda: _clean_partial_files(out))
    worker = Worker(spec, out, device, db)
    ran = 0
    bar = _Bar(progress and rank == 0, db)
    try:
        while True:
            row = db.claim()
            if row is None:
                if db.counts()["running"] == 0:
                    break  # nothing runs and nothing can: done (or blocked by failures)
                db.recover()
                bar.refresh(None)
                time.sleep(poll)
                continue
            bar.refresh(row["key"])
            _execute(db, worker, row, device)
            ran += 1
            if on_row is not None:
                on_row(row)
            bar.refresh(None)
    finally:
        bar.close()
        worker.detach()
        db.stop_heartbeat()
    summary = RunSummary(db=db.path if db_url is None else db.where, counts=db.counts(), ran=ran,
                         failures=db.failures())
    db.close()
    return summary


def _execute(db: BenchmarkQueue, worker: Worker, row: dict, device: str) -> None:
    began = time.perf_counter()
    try:
        with PeakMemory(device) as mem:
            result = worker.run(row)
    except KeyboardInterrupt:
        db.release(row["key"])
        raise
    except Exception as exc:  # one bad row must not stop the run: record it, go on, retry next run
        worker.detach()
        db.fail(row["key"], f"{type(exc).__name__}: {exc}".strip()[:2000] + "\n" + traceback.format_exc(limit=3)[-1500:])
        return
    provenance = {"git_sha": git_sha(), "versions": versions(), "base_fingerprint": worker.base_fingerprint,
                  "memory": mem.kind, "worker": db.worker, **machine(device)}
    # a resumed train row adds the time its killed attempts spent up to the checkpoint it resumed from
    seconds = time.perf_counter() - began + float(result.get("earlier_seconds") or 0.0)
    db.finish(row["key"], result, seconds, mem.peak, provenance)


class _Bar:
    """Rows done / total with ETA over the whole run (all processes), drawn by one process."""

    def __init__(self, enabled: bool, db: BenchmarkQueue):
        self.db = db
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]benchmark[/bold] {task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))
            counts = db.counts()
            self.task = self.progress.add_task("", total=counts["total"], completed=counts["done"])
            self.progress.start()

    def refresh(self, current: Optional[str]) -> None:
        if self.progress is not None:
            from rich.markup import escape

            counts = self.db.counts()
            text = current or ("waiting for other processes" if counts["running"] else "")
            # a row's key holds the spec's names: shown as typed, never read as markup
            self.progress.update(self.task, completed=counts["done"], total=counts["total"], description=escape(text[:60]))

    def close(self) -> None:
        if self.progress is not None:
            self.refresh(None)
            self.progress.stop()


__all__ = ["DB_NAME", "RunSummary", "database_path", "plan_into", "run_benchmark"]
