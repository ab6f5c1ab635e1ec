"""The toy base's training recipe: its settings (the defaults made the shipped weights) and schedule helpers.

:class:`BaseRecipe` holds every setting of a run that its checkpoint records (a run's work folder, resume,
export destination, device and DataLoader workers are arguments of :func:`personalize.toybase.train.train_base`
instead). Each field's ``help`` metadata is what ``personalize toyworld train-base --help`` shows.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..errors import BadInputError
from .model import DEFAULT_ARCH

PREDICTION_TYPES = ("v_prediction", "epsilon")


def _opt(default, help: str = ""):
    return field(default=default, metadata={"help": help})


@dataclass
class BaseRecipe:
    """How the toy base is trained (phase 1: VAE; phase 2: text encoder + UNet)."""

    seed: int = _opt(0)
    threads: int = _opt(1, "torch.set_num_threads")
    vae_steps: int = _opt(3000)
    vae_batch: int = _opt(128)
    vae_lr: float = _opt(1e-3)
    vae_kl: float = _opt(1e-6)
    vae_from: Optional[str] = _opt(None, "take the trained VAE (and its latent scaling) from another run's work "
                                         "folder and skip phase 1")
    texture_fraction: float = _opt(0.25)
    steps: int = _opt(3762, "UNet + text encoder steps")
    minutes: float = _opt(0.0, "instead of --steps: after 100 timed steps, set the step count so phase 2 lasts "
                               "about this long (the cosine schedule follows the new length)")
    batch: int = _opt(256)
    lr: float = _opt(1e-3)
    warmup: int = _opt(500)
    weight_decay: float = _opt(0.01)
    ema: float = _opt(0.999)
    caption_dropout: float = _opt(0.1)
    min_snr: float = _opt(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = plain MSE")
    prediction_type: str = _opt("v_prediction", "v_prediction or epsilon")
    vae_channels: str = _opt(",".join(map(str, DEFAULT_ARCH["vae_channels"])),
                             "VAE block widths; n blocks -> 2^(n-1)x downsampling")
    unet_channels: str = _opt(",".join(map(str, DEFAULT_ARCH["unet_channels"])))
    unet_attn: str = _opt(",".join(str(int(a)) for a in DEFAULT_ARCH["unet_cross_attn"]),
                          "per UNet level: 1 = cross-attention block, 0 = plain ResNet block")
    unet_layers: int = _opt(DEFAULT_ARCH["unet_layers"])
    latent_scale_mult: float = _opt(1.0, "latent scaling factor = mult / std(latents); < 1 lowers every "
                                         "timestep's SNR")
    zero_snr: bool = _opt(False, "rescale SD's schedule to zero terminal SNR (+ trailing DDIM timesteps); may be "
                                 "switched on when resuming, to fine-tune a model trained without it")
    scale_images: int = _opt(512, "renders used to set the latent scaling factor")
    ckpt_every: int = _opt(200)
    log_every: int = _opt(25)
    eval_every: int = _opt(0, "every this many phase-2 steps, sample --eval-n held-out captions with the EMA "
                              "weights and append the scores to DIR/evals.jsonl (0 = only at the end, if --eval-n)")
    eval_n: int = _opt(0, "held-out captions per evaluation (0 = no evaluation)")

    def arch(self) -> dict:
        """The architecture these settings ask for (DEFAULT_ARCH with the channel / attention fields replaced)."""
        if self.prediction_type not in PREDICTION_TYPES:
            raise BadInputError(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, "
                                f"not '{self.prediction_type}'")
        arch = dict(DEFAULT_ARCH)
        try:
            arch["vae_channels"] = [int(c) for c in self.vae_channels.split(",")]
            arch["unet_channels"] = [int(c) for c in self.unet_channels.split(",")]
            arch["unet_cross_attn"] = [bool(int(a)) for a in self.unet_attn.split(",")]
        except ValueError as exc:
            raise BadInputError(f"--vae-channels, --unet-channels and --unet-attn are comma-separated whole "
                                f"numbers ({exc})") from exc
        if len(arch["unet_cross_attn"]) != len(arch["unet_channels"]):
            raise BadInputError("--unet-attn needs one flag per --unet-channels level")
        arch["unet_layers"] = self.unet_layers
        return arch

    def command(self, out, resume: bool = False, export=None, device: str = "auto", workers: int = 0) -> str:
        """The ``personalize toyworld train-base`` command line of a run with these settings."""
        words = ["personalize toyworld train-base", "--out", str(out)]
        if resume:
            words.append("--resume")
        for key, value in (("device", device), ("workers", workers), ("export", export)):
            if value not in (None, "auto", 0):
                words += [f"--{key}", str(value)]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                flag = "--" + f.name.replace("_", "-")
                words += [flag] if value is True else [flag, str(value)]
        return " ".join(words)


# these recipe settings come from the checkpoint when a run resumes (the rest may change, e.g. longer schedules)
RESUMED_FROM_CHECKPOINT = ("seed", "vae_batch", "vae_lr", "vae_kl", "texture_fraction", "batch", "lr", "warmup",
                           "weight_decay", "ema", "caption_dropout", "prediction_type", "latent_scale_mult",
                           "min_snr")
RESUME_FALLBACK = {"latent_scale_mult": 1.0, "min_snr": 0.0}  # checkpoints older than these settings


def lr_at(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # pragma: no cover
        return "unknown"


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Logger:
    """Time-stamped lines appended to ``path`` and handed to ``echo`` (e.g. the CLI's print), if given."""

    def __init__(self, path: Path, echo: Optional[Callable[[str], None]] = None):
        self.path, self.echo = path, echo

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self.echo is not None:
            self.echo(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")
