"""``--report-to``: a training run's metrics and sample images in an experiment tracker, through accelerate's
tracker classes (``accelerate.tracking``: ``TensorBoardTracker``, ``WandBTracker``, ``TrackioTracker``).

The trainer logs, per step, ``loss`` (the whole batch's, every process taking part), ``lr`` (each parameter
group's as ``lr/NAME`` when there are several), ``grad_norm`` (the global norm before clipping) and
``step_time`` (seconds of the step itself, samples and saves excluded), and its sample images at the steps
it samples. Only the main process of a data-parallel run creates a tracker. Where each one writes:

- ``tensorboard``: event files in ``OUT.logs/<out stem>/`` (``tensorboard --logdir OUT.logs``); no network;
- ``wandb``: its run folder in ``OUT.logs/wandb/``; ``WANDB_MODE=offline`` runs without a network
  (``wandb sync`` uploads later);
- ``trackio``: its local database, ``TRACKIO_DIR`` (``OUT.logs/trackio`` unless set); local unless a Space is
  configured.

A tracker whose package is not installed is refused before anything is loaded, naming the pip command.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import BadInputError

#: --report-to NAME -> (the module it imports, what to pip install)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}
REPORT_TO = ("none", *TRACKERS)
PROJECT = "personalize"  # the wandb / trackio project every run logs to (the run is named after OUT)


def logs_dir(out: str | Path) -> Path:
    """Where the trackers of the run writing ``out`` keep their files (``OUT.logs/``)."""
    out = Path(out)
    return out.with_name(out.name + ".logs")


def check_report_to(name: str) -> None:
    """Refuse an unknown tracker, or one whose package is missing (one line naming the pip command)."""
    if name not in REPORT_TO:
        raise BadInputError(f"--report-to must be one of {', '.join(REPORT_TO)}, not {name!r}")
    if name == "none":
        return
    module, package = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        raise BadInputError(f"--report-to {name} needs the {package} package, which is not installed: "
                            f"pip install {package} (or pass --report-to none)")


def _plain(value: Any) -> bool | int | float | str:
    """A hyperparameter as every tracker takes it (bool, int, float or str)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def hyperparameters(*configs) -> dict[str, Any]:
    """The run's settings (dataclasses) flattened for ``store_init_configuration``."""
    values: dict[str, Any] = {}
    for config in configs:
        values.update({k: _plain(v) for k, v in dataclasses.asdict(config).items()})
    return values


class Tracker:
    """One run's tracker, or nothing (``name`` none, or not the main process): every call is then a no-op."""

    def __init__(self, name: str, out: str | Path, config: dict[str, Any], enabled: bool = True):
        self.name = name
        self.run = run = Path(out).stem  # the run's name in the tracker
        self.tracker = None
        if name == "none" or not enabled:
            return
        from ..paths import inside

        logs = logs_dir(out)
        logs.mkdir(parents=True, exist_ok=True)
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            inside(logs, run)  # the event folder stays in OUT.logs/
            tracker = TensorBoardTracker(run, logs)
        elif name == "wandb":
            from accelerate.tracking import WandBTracker

            tracker = WandBTracker(PROJECT, name=run, dir=str(logs))
        else:
            from accelerate.tracking import TrackioTracker

            os.environ.setdefault("TRACKIO_DIR", str(inside(logs, "trackio")))
            tracker = TrackioTracker(PROJECT, name=run)
        tracker.start()
        tracker.store_init_configuration(config)
        self.tracker = tracker

    @property
    def active(self) -> bool:
        return self.tracker is not None

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tracker is not None:
            self.tracker.log(values, step=step)

    def log_images(self, images: dict[str, Any], step: int) -> None:
        """``images``: tag -> one PIL image."""
        if self.tracker is None or not images:
            return
        if self.name == "tensorboard":
            import numpy as np

            self.tracker.log_images({k: np.asarray(im)[None] for k, im in images.items()}, step=step,
                                    dataformats="NHWC")
        elif self.name == "wandb":
            self.tracker.log_images({k: [im] for k, im in images.items()}, step=step)
        else:  # accelerate's TrackioTracker has no log_images: trackio's own media type
            import trackio

            self.tracker.log({k: trackio.Image(im) for k, im in images.items()}, step=step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
