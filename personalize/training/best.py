"""Best-step selection and the progress bar of a training run."""
from __future__ import annotations

import math
from typing import Any

import torch


class _BestKeeper:
    """Best-step selection: each validation result, and a detached copy of the state with the best ``h``."""

    def __init__(self, validator):
        self.validator = validator
        self.results: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_h = float("-inf")
        self.best_state: dict[str, torch.Tensor] | None = None

    def validate(self, pipe, trainable, step: int) -> float | None:
        scores = self.validator(pipe, trainable, step)
        finite = lambda v: None if v is None or not math.isfinite(float(v)) else float(v)  # noqa: E731
        result = {"step": step, **{k: finite(v) for k, v in scores.items()}}  # the header is strict JSON
        self.results.append(result)
        h = float("-inf") if result["h"] is None else result["h"]  # a failed (NaN) validation is never the best
        if self.best_state is None or h > self.best_h:  # ties keep the earlier step
            self.best_step, self.best_h = step, h
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in trainable.state_tensors().items()}
        return result["h"]

    def finish(self, pipe, trainable, last_step: int) -> None:
        """Validate the last step (if not done yet) and put the best state back into ``trainable``."""
        if not self.results or self.results[-1]["step"] != last_step:
            self.validate(pipe, trainable, last_step)
        if self.best_step != last_step:
            trainable.load_state_tensors(self.best_state)

    def provenance(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "validation": self.results}


class _Progress:
    """A rich progress bar on stderr with loss (``with_loss``) and ETA (silent when disabled)."""

    def __init__(self, enabled: bool, total: int, completed: int, description: str, with_h: bool = False,
                 with_loss: bool = True):
        self.progress = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),  # tokens as typed
            *([TextColumn("loss {task.fields[loss]}")] if with_loss else []),
            *([TextColumn("h {task.fields[h]}")] if with_h else []),
            TimeRemainingColumn(), transient=False, console=Console(stderr=True),
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed, loss="-", h="-")

    def update(self, step: int, loss: float | None = None) -> None:
        """Show ``step`` done, and ``loss`` when given (else the last one shown stays)."""
        if self.progress is None:
            return
        if loss is None:
            self.progress.update(self.task, completed=step)
        else:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")

    def show_h(self, h: float | None) -> None:
        """The last validation's harmonic mean."""
        if self.progress is not None:
            self.progress.update(self.task, h="-" if h is None else f"{h:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
