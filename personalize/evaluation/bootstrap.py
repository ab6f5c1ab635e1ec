"""Bootstrap confidence intervals for benchmark means.

A benchmark's headline number is a mean over concepts of per-concept means over images; its uncertainty
comes from which images (prompts x seeds) were sampled and, for an average over concepts, from which
concepts were benchmarked. ``mean_ci`` resamples each concept's images with replacement and takes the
percentile interval of the resulting means; with ``over_groups=True`` (the report's averages) it is the
stratified two-stage bootstrap: each replicate also resamples the concepts with replacement (a concept drawn
twice reuses that replicate's image resample). ``diff_ci`` does the same for the difference of two such means
over the same concepts (a method minus the base, or minus another method): the concepts are drawn once for
both sides, and with ``paired=True`` (images generated from the same prompt and seed, in the same order) the
per-image differences are resampled together. Deterministic for a seed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _image_means(groups: Sequence[Sequence[float]], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_groups): each group's mean over a resample of its images."""
    out = np.empty((n_boot, len(groups)))
    for j, g in enumerate(groups):
        x = np.asarray(g, dtype=np.float64)
        out[:, j] = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return out


def _over(per: np.ndarray, pick: Optional[np.ndarray]) -> np.ndarray:
    """(n_boot,) means over groups: all groups (``pick`` None) or the resampled ones."""
    return per.mean(axis=1) if pick is None else np.take_along_axis(per, pick, axis=1).mean(axis=1)


def _pick(n_groups: int, n_boot: int, rng: np.random.Generator, over_groups: bool) -> Optional[np.ndarray]:
    return rng.integers(0, n_groups, size=(n_boot, n_groups)) if over_groups else None


def _usable(groups) -> bool:
    """Data in every group, all finite, and at least two observations: one image resamples to itself, and a
    zero-width "interval" around it would read as certainty (and mark any difference significant)."""
    return len(groups) > 0 and all(len(g) > 0 for g in groups) and sum(len(g) for g in groups) >= 2 and all(
        np.isfinite(np.asarray(g, dtype=np.float64)).all() for g in groups)


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(groups: Sequence[Sequence[float]], n_boot: int = N_BOOT, level: float = LEVEL,
            seed: int = 0, over_groups: bool = False) -> Optional[tuple[float, float]]:
    """Percentile interval of the mean over ``groups`` of group means; None without data in every group (or
    with a single observation in all).
    ``over_groups``: resample the groups too (stratified two-stage bootstrap)."""
    if not _usable(groups):
        return None
    rng = np.random.default_rng(seed)
    per = _image_means(groups, n_boot, rng)
    return _interval(_over(per, _pick(len(groups), n_boot, rng, over_groups)), level)


def can_pair(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> bool:
    """Same number of groups and of images in each: images can be paired (same prompt and seed, same order)."""
    return len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))


def diff_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], n_boot: int = N_BOOT,
            level: float = LEVEL, seed: int = 0, over_groups: bool = False,
            paired: bool = False) -> Optional[tuple[float, float]]:
    """Percentile interval of mean(a) - mean(b) (each a mean over its groups of group means).

    ``paired``: group i of ``a`` and of ``b`` hold images of the same prompts and seeds in the same order, so
    the per-image differences are resampled (needs :func:`can_pair`). ``over_groups``: resample the groups,
    the same draw for both sides (needs as many groups on both sides)."""
    if paired and not can_pair(a, b):
        raise ValueError("diff_ci(paired=True) needs the same number of images in each group of a and b")
    if not (_usable(a) and _usable(b)):
        return None
    if paired:
        diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)]
        return mean_ci(diffs, n_boot, level, seed, over_groups)
    if over_groups and len(a) != len(b):
        raise ValueError("diff_ci(over_groups=True) needs the same groups (concepts) on both sides")
    rng = np.random.default_rng(seed)
    per_a, per_b = _image_means(a, n_boot, rng), _image_means(b, n_boot, rng)
    pick = _pick(len(a), n_boot, rng, over_groups)
    return _interval(_over(per_a, pick) - _over(per_b, pick), level)


def significant(ci: Optional[tuple[float, float]]) -> Optional[bool]:
    """True when the interval of a difference excludes 0; None without an interval."""
    return None if ci is None else bool(ci[0] > 0 or ci[1] < 0)


__all__ = ["LEVEL", "N_BOOT", "can_pair", "diff_ci", "mean_ci", "significant"]
