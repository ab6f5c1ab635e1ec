"""Bootstrap confidence intervals for benchmark means (stratified: images are resampled within each concept).

A benchmark's headline number is a mean over concepts of per-concept means over images; its uncertainty
comes from which images (prompts x seeds) were sampled. ``mean_ci`` resamples each concept's images with
replacement (concepts stay fixed, each keeps its own weight) and takes the percentile interval of the
resulting means; ``diff_ci`` does the same for the difference of two such means over the same concepts
(e.g. a method minus the base model), resampling both sides independently. Deterministic for a seed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _boot_means(groups: Sequence[Sequence[float]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean over groups of each group's mean."""
    total = np.zeros(n_boot)
    for g in groups:
        x = np.asarray(g, dtype=np.float64)
        idx = rng.integers(0, len(x), size=(n_boot, len(x)))
        total += x[idx].mean(axis=1)
    return total / len(groups)


def _usable(groups) -> bool:
    return len(groups) > 0 and all(len(g) > 0 for g in groups) and all(
        np.isfinite(np.asarray(g, dtype=np.float64)).all() for g in groups)


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(groups: Sequence[Sequence[float]], n_boot: int = N_BOOT, level: float = LEVEL,
            seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile interval of the mean over ``groups`` of group means; None without data in every group."""
    if not _usable(groups):
        return None
    return _interval(_boot_means(groups, n_boot, np.random.default_rng(seed)), level)


def diff_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = N_BOOT,
            level: float = LEVEL, seed: int = 0) -> Optional[tuple[float, float]]:
    """Percentile interval of mean(a) - mean(b) (each a mean over its groups of group means)."""
    if not (_usable(a) and _usable(b)):
        return None
    rng = np.random.default_rng(seed)
    return _interval(_boot_means(a, n_boot, rng) - _boot_means(b, n_boot, rng), level)


__all__ = ["LEVEL", "N_BOOT", "diff_ci", "mean_ci"]
