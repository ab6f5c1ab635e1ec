"""One worker per device: every job that touches a device's pipeline (training, generating, comparing) runs on
that device's single worker thread, in the order it was asked for, so two browser tabs never use one pipeline at
once; they queue.

A training :class:`Job` is watched while it runs (step, loss curve, sample images, its one-line error) and
cancelled by a flag the trainer's per-step callback reads (``train(callbacks=...)``): it stops after the step's
checkpoint, so ``resume`` continues from the last one, as after Ctrl-C in the CLI.
"""
from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PersonalizeError


class Cancelled(Exception):
    """Raised inside a training job's step callback when its cancel button was pressed."""


@dataclass
class Job:
    """A training job as the page shows it."""

    id: int
    name: str
    total: int
    state: str = "queued"  # queued, running, done, failed, cancelled
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    message: str = ""
    result: Any = None
    started: float | None = None
    cancel_requested: bool = False

    def on_step(self, step: int, loss, _method) -> None:
        """``train``'s callback: record the step and its loss; stop here when cancelled."""
        self.step = step
        self.losses.append((step, float(loss)))
        if self.cancel_requested:
            raise Cancelled()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class DeviceQueue:
    """The single worker of one device: ``run`` (wait for a result) and ``submit`` (a training job)."""

    def __init__(self, device: str):
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"personalize-{device}")
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.jobs: dict[int, Job] = {}

    def run(self, work: Callable[[], Any]) -> Any:
        """``work()`` on the worker, after every job asked for before it; its result (or its exception)."""
        return self._pool.submit(work).result()

    def submit(self, name: str, total: int, work: Callable[[Job], Any]) -> Job:
        """Queue training ``work(job)``; the job records how it ended (a PersonalizeError's one line as its
        message; a cancel as ``cancelled``)."""
        with self._lock:
            job = Job(next(self._ids), name, total)
            self.jobs[job.id] = job

        def body():
            if job.cancel_requested:
                job.state, job.message = "cancelled", "cancelled before it started"
                return
            job.state, job.started = "running", time.time()
            try:
                job.result = work(job)
                job.state, job.message = "done", f"done: {job.result}"
            except Cancelled:
                job.state = "cancelled"
                job.message = f"cancelled after step {job.step}; resume continues from the last checkpoint"
            except PersonalizeError as exc:
                job.state, job.message = "failed", str(exc)
            except Exception as exc:  # a bug, not bad input: still one line, naming the exception type
                job.state, job.message = "failed", f"{type(exc).__name__}: {exc}".splitlines()[0]

        job.future: Future = self._pool.submit(body)
        return job

    def cancel(self, job_id: int) -> Job:
        job = self.jobs[job_id]
        job.cancel_requested = True
        return job

    def waiting(self) -> int:
        """Training jobs queued and not started yet."""
        return sum(1 for j in self.jobs.values() if j.state == "queued")

    def close(self) -> None:
        for job in self.jobs.values():
            job.cancel_requested = True
        self._pool.shutdown(wait=True, cancel_futures=False)
