"""The trainer's own settings (:class:`TrainConfig`) and how a run's settings are resolved."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import BadInputError


@dataclass
class TrainConfig:
    """Settings shared by every method (the method's own live in its Config)."""

    steps: int = 250  # Perfusion paper: 210 on average, 400 at most (a method may default otherwise)
    batch_size: int = 16  # Perfusion paper (Method.train_defaults overrides per method)
    seed: int = 0
    flip_p: float = 0.5  # paper: horizontal flips with p = 0.5 (set 0 for asymmetric objects)
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    preview_every: int = 0  # 0 = no previews
    preview_prompt: str = "a photo of a {}"
    max_grad_norm: float = 1.0
    compile: bool = False  # torch.compile the UNet for this run (minutes of compiling; pays off on long GPU runs)


def split_overrides(method_cls, overrides: dict[str, Any] | None) -> tuple[dict, dict]:
    """Split a flat settings dict (e.g. from --config YAML) into trainer and method settings."""
    overrides = dict(overrides or {})
    method_settings = overrides.pop(method_cls.name, {}) or {}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
    train, unknown = {}, []
    for key, value in overrides.items():
        if key in train_fields:
            train[key] = value
        elif key in method_fields:
            method_settings[key] = value
        else:
            unknown.append(key)
    if unknown:
        known = sorted(train_fields | method_fields)
        raise BadInputError(f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    return train, method_settings


def resolve_settings(method_cls, settings: dict[str, Any] | None) -> tuple[TrainConfig, Any]:
    """The trainer's and the method's configs: TrainConfig defaults < the method's ``train_defaults`` < ``settings``."""
    from ..settings import coerce_fields

    train_over, method_over = split_overrides(method_cls, settings)
    train_cfg = TrainConfig(**coerce_fields(TrainConfig, {**method_cls.train_defaults, **train_over}))
    return train_cfg, method_cls.make_config(method_over)
