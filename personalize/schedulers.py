"""Sampling schedulers by name (``--scheduler``): the table, its help text, and swapping a pipeline's scheduler.

A base keeps the scheduler it was saved with unless one is asked for; the named one is built with diffusers'
``Cls.from_config(pipe.scheduler.config)``, so it keeps the base's betas, prediction type and timestep spacing.
Training never reads this: its noise schedule is a DDPM scheduler made from the same config
(``personalize/training/loop.py``). Imports no torch or diffusers at import time (the CLI's help reads it).
"""
from __future__ import annotations

from .errors import BadInputError

# name -> diffusers class (the names kohya / A1111 / ComfyUI users know). LMS (needs scipy) and DPM++ SDE (needs
# torchsde) are left out: neither package is a dependency.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-single": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
HELP = ("Sampling scheduler, built from the base's own scheduler config: " + " | ".join(SCHEDULERS)
        + " (diffusers' DDIM, DDPM, PNDM, Euler, Euler ancestral, Heun, DPM-Solver++ multistep / singlestep, UniPC)"
          " \\[default: the base's own: what its scheduler/ folder names; tiny, tiny-sd2, tiny-sdxl and toy: ddim].")


def scheduler_class(name, where: str = "--scheduler") -> str:
    """The diffusers class name of ``SCHEDULERS[name]``; an unknown name is one line listing the choices."""
    cls_name = SCHEDULERS.get(name.lower()) if isinstance(name, str) else None
    if cls_name is None:
        raise BadInputError(f"{where} {name!r} is not a scheduler here; choose one of {', '.join(SCHEDULERS)}")
    return cls_name


def use_scheduler(pipe, name):
    """Give ``pipe`` the scheduler ``name`` built from its own scheduler's config; ``None`` keeps the one it
    has. Returns ``pipe``."""
    if name is None:
        return pipe
    import diffusers

    if "FlowMatch" in type(pipe.scheduler).__name__:  # SD3, Flux: these names are DDPM-family samplers
        raise BadInputError(f"--scheduler {name} is a sampler for SD 1.x/2.x/XL bases; this base samples with its "
                            f"own flow-matching scheduler ({type(pipe.scheduler).__name__}): leave --scheduler out")
    pipe.scheduler = getattr(diffusers, scheduler_class(name)).from_config(pipe.scheduler.config)
    return pipe


def scheduler_name(pipe) -> str:
    """The ``SCHEDULERS`` name of ``pipe``'s scheduler (its class name when it is none of them)."""
    cls_name = type(pipe.scheduler).__name__
    return next((k for k, v in SCHEDULERS.items() if v == cls_name), cls_name)
