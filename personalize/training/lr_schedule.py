"""``--lr-scheduler`` / ``--lr-warmup-steps``: the learning rate over a run, from diffusers' ``get_scheduler``
(``diffusers.optimization``, what the diffusers example scripts use).

The schedule multiplies every parameter group's own learning rate (a ``LambdaLR``) and steps once per optimizer
step, over ``--steps``. Every recipe here trains at a constant rate (``constant``, no warm-up), which leaves each
step's rate exactly the configured one. The scheduler's state (plain numbers) is saved in the checkpoint, so a
resumed run continues the schedule where it stopped (``personalize/checkpoints.py``).
"""
from __future__ import annotations

from ..errors import BadInputError

#: the schedules of diffusers' ``SchedulerType`` that need no extra rules (piecewise_constant needs step rules)
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_schedule(name: str, warmup: int, steps: int) -> None:
    """Refuse, before any work, a schedule get_scheduler does not know or a warm-up it would ignore."""
    if name not in SCHEDULES:
        raise BadInputError(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}, not {name!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BadInputError(f"--lr-warmup-steps must be a whole number >= 0, not {warmup!r}")
    if warmup and name == "constant":
        raise BadInputError("--lr-warmup-steps needs a schedule with a warm-up: --lr-scheduler constant_with_warmup "
                            "(or linear, cosine, ...); constant ignores it, as diffusers' get_scheduler does")
    if warmup > steps:
        raise BadInputError(f"--lr-warmup-steps {warmup} is longer than the run (--steps {steps}); "
                            "warm up over fewer steps")


def make_lr_scheduler(optimizer, name: str, warmup: int, steps: int):
    """diffusers' ``get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)``."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    except ValueError as exc:  # polynomial: a learning rate at or below its end rate (1e-7)
        raise BadInputError(f"--lr-scheduler {name}: {exc}; choose a larger learning rate or another "
                            "schedule") from exc
