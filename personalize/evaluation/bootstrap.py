"""Bootstrap confidence intervals for benchmark means (the scheme and its calibration: ``docs/STATISTICS.md``).

A benchmark's headline number is a mean over concepts of per-concept means over images. The concepts are a
sample from the concepts one cares about, so the estimand is the mean over that population of each concept's
mean. An observed concept mean already carries its image noise (prompts and seeds), so the spread of the
concept means over concepts holds *all* of the uncertainty: ``mean_ci(..., over_groups=True)`` resamples the
concepts only, each with its observed mean (the cluster bootstrap). Resampling the images inside each drawn
concept as well (the two-stage scheme this module used to have) counts the image noise twice: intervals too
wide when concepts agree (99-100 % coverage for a nominal 95 %).

With few concepts the plain percentile interval is too narrow (its variance is biased by (n-1)/n and it uses
normal instead of t quantiles: about 90 % coverage at 10 concepts). Each interval here is the percentile
interval of the bootstrap deviations from the estimate, scaled by sqrt(n/(n-1)) and by t_df/z (the ratio of
the Student-t and normal quantiles at the interval's level, df = n-1): for a normal bootstrap distribution
that is exactly the classical t interval, and it keeps the bootstrap's skew otherwise.

One concept (``over_groups=False``): its images are not independent either, since images of one prompt share
that prompt's effect. Given ``clusters`` (a label per image, e.g. its prompt), the units resampled are the
clusters (each with its images' sum and count, so the statistic stays the concept's image mean); without
labels every image is its own unit. Several groups with ``over_groups=False`` (the concepts held fixed) is
the stratified version: each group's units resampled within it, the same scaling per group, df from
Welch-Satterthwaite.

``diff_ci``: the difference of two such means over the same concepts (a method minus the base, or minus
another method). ``paired``: the two sides hold matched images (same concept, prompt, seed and sample; see
:func:`pair_by_ids`), so the per-image differences are bootstrapped like a mean. Unpaired over concepts: the
per-concept differences of means are the units. Deterministic for a seed.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Hashable, Optional, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95

Groups = Sequence[Sequence[float]]
Labels = Optional[Sequence[Optional[Sequence[Hashable]]]]


# ------------------------------------------------------------------------------------------------- quantiles


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` (> 0, may be fractional) degrees of freedom, for 0.5 <= p < 1.

    Newton's method on the CDF, which is 1/2 plus Simpson's rule over the density (numpy has no t
    distribution and the project does not depend on scipy); within 1e-7 of the tables."""
    z = NormalDist().inv_cdf(p)
    if df > 1e7:
        return z
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x):
        return np.exp(log_c - (df + 1) / 2 * np.log1p(np.square(x) / df))

    def cdf(x: float) -> float:
        grid = np.linspace(0.0, x, 4097)
        w = np.ones(4097)
        w[1:-1:2], w[2:-1:2] = 4.0, 2.0
        return 0.5 + float((w * pdf(grid)).sum()) * x / (3 * 4096)

    x = z
    for _ in range(60):
        step = (cdf(x) - p) / float(pdf(x))
        x = max(x - step, x / 2)  # the CDF is concave on x > 0: Newton from the left never overshoots far
        if abs(step) < 1e-10 * max(1.0, x):
            break
    return x


def _critical_ratio(level: float, df: float) -> float:
    """t_df / z at the interval's upper quantile: how much wider than a normal interval a t interval is."""
    p = (1 + level) / 2
    return t_quantile(p, max(df, 1.0)) / NormalDist().inv_cdf(p)


# ------------------------------------------------------------------------------------------------- units


def _units(values: Sequence[float], labels: Optional[Sequence[Hashable]]) -> tuple[np.ndarray, np.ndarray]:
    """(sums, counts) per resampling unit: one per image, or one per distinct label (in order of first
    appearance). Fewer than two labels: the images themselves (one prompt shows no prompt-to-prompt spread)."""
    x = np.asarray(values, dtype=np.float64)
    if labels is not None and len(labels) != len(x):
        raise ValueError(f"{len(labels)} cluster labels for {len(x)} values")
    if labels is None or len(set(labels)) < 2:
        return x, np.ones(len(x))
    index = {lab: i for i, lab in enumerate(dict.fromkeys(labels))}
    which = np.array([index[lab] for lab in labels])
    return np.bincount(which, weights=x), np.bincount(which).astype(np.float64)


def _interval(strata: list[tuple[np.ndarray, np.ndarray, float]], n_boot: int, level: float,
              rng: np.random.Generator) -> tuple[float, float]:
    """The interval of sum_g w_g * mean_g, mean_g = sum(sums_g) / sum(counts_g), each stratum's units resampled
    with replacement: the percentile interval of the deviations, each stratum's scaled by sqrt(n/(n-1)), then
    by t_df / z (df: Welch-Satterthwaite over the strata; n - 1 for one)."""
    estimate, dev, parts = 0.0, np.zeros(n_boot), []
    for sums, counts, weight in strata:
        n, mean = len(sums), float(sums.sum() / counts.sum())
        estimate += weight * mean
        if n < 2:
            continue  # a single unit shows no spread
        pick = rng.integers(0, n, size=(n_boot, n))
        dev += weight * math.sqrt(n / (n - 1)) * (sums[pick].sum(axis=1) / counts[pick].sum(axis=1) - mean)
        resid = (sums - mean * counts) / counts.mean()  # linearised ratio mean: plain deviations when counts agree
        parts.append((weight ** 2 * float(np.square(resid).sum()) / (n * (n - 1)), n - 1))
    var = sum(v for v, _ in parts)
    ratio = 1.0 if var <= 0 else _critical_ratio(level, var ** 2 / sum(v ** 2 / df for v, df in parts))
    lo, hi = np.quantile(dev, [(1 - level) / 2, (1 + level) / 2])
    return estimate + ratio * float(lo), estimate + ratio * float(hi)


def _usable(groups) -> bool:
    """Data in every group, all finite, and at least two observations: one image resamples to itself, and a
    zero-width "interval" around it would read as certainty (and mark any difference significant)."""
    return len(groups) > 0 and all(len(g) > 0 for g in groups) and sum(len(g) for g in groups) >= 2 and all(
        np.isfinite(np.asarray(g, dtype=np.float64)).all() for g in groups)


def _labels(clusters: Labels, n_groups: int) -> list:
    if clusters is None:
        return [None] * n_groups
    if len(clusters) != n_groups:
        raise ValueError(f"cluster labels for {len(clusters)} groups, data for {n_groups}")
    return list(clusters)


# -------------------------------------------------------------------------------------------------- public


def mean_ci(groups: Groups, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0,
            over_groups: bool = False, clusters: Labels = None) -> Optional[tuple[float, float]]:
    """Interval of the mean over ``groups`` (concepts) of group means; None without data in every group (or
    with a single observation in all).

    ``over_groups`` (and two or more groups): the groups are a sample, the estimand the population mean; the
    groups' means are resampled (cluster bootstrap). Otherwise the groups are fixed and each one's images are
    resampled within it, in units of ``clusters[g]`` (a label per image, e.g. its prompt; None: each image)."""
    if not _usable(groups):
        return None
    rng = np.random.default_rng(seed)
    if over_groups and len(groups) > 1:
        means = np.array([np.mean(np.asarray(g, dtype=np.float64)) for g in groups])
        return _interval([(means, np.ones(len(means)), 1.0)], n_boot, level, rng)
    strata = [(*_units(g, lab), 1.0 / len(groups)) for g, lab in zip(groups, _labels(clusters, len(groups)))]
    return _interval(strata, n_boot, level, rng)


def can_pair(a: Groups, b: Groups) -> bool:
    """Same number of groups and of images in each: the shape ``diff_ci(paired=True)`` needs. Whether the
    images really match is for their ids to say (:func:`pair_by_ids`), never for their counts."""
    return len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))


def pair_by_ids(a: Sequence[float], a_ids: Optional[Sequence[str]], b: Sequence[float],
                b_ids: Optional[Sequence[str]]) -> Optional[tuple[list[float], list[float], list[str]]]:
    """The values of the images both sides have, matched by id (an inner join, in sorted id order): (a's, b's,
    the ids). None when either side has no ids, ids not parallel to its values or repeated (nothing can be
    paired safely), or no id in common."""
    def index(values, ids):
        if ids is None or len(ids) != len(values) or len(set(ids)) != len(ids):
            return None
        return dict(zip(map(str, ids), values))
    ia, ib = index(a, a_ids), index(b, b_ids)
    if ia is None or ib is None:
        return None
    common = sorted(ia.keys() & ib.keys())
    if not common:
        return None
    return [float(ia[i]) for i in common], [float(ib[i]) for i in common], common


def diff_ci(a: Groups, b: Groups, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0,
            over_groups: bool = False, paired: bool = False, clusters: Labels = None,
            clusters_b: Labels = None) -> Optional[tuple[float, float]]:
    """Interval of mean(a) - mean(b) (each a mean over its groups of group means).

    ``paired``: group i of ``a`` and of ``b`` hold matched images in the same order (:func:`pair_by_ids`), so
    the per-image differences are bootstrapped as by :func:`mean_ci` (``clusters``: their labels).
    Unpaired, ``over_groups``: the same concepts on both sides; the per-concept differences of means are
    resampled. Unpaired, fixed groups: each side's groups resampled within themselves (``clusters`` for a's,
    ``clusters_b`` for b's)."""
    if paired and not can_pair(a, b):
        raise ValueError("diff_ci(paired=True) needs the same number of images in each group of a and b")
    if not (_usable(a) and _usable(b)):
        return None
    if paired:
        diffs = [np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) for x, y in zip(a, b)]
        return mean_ci(diffs, n_boot, level, seed, over_groups, clusters)
    if over_groups and len(a) != len(b):
        raise ValueError("diff_ci(over_groups=True) needs the same groups (concepts) on both sides")
    rng = np.random.default_rng(seed)
    if over_groups and len(a) > 1:
        d = np.array([np.mean(np.asarray(x, dtype=np.float64)) - np.mean(np.asarray(y, dtype=np.float64))
                      for x, y in zip(a, b)])
        return _interval([(d, np.ones(len(d)), 1.0)], n_boot, level, rng)
    strata = [(*_units(g, lab), 1.0 / len(a)) for g, lab in zip(a, _labels(clusters, len(a)))]
    strata += [(*_units(g, lab), -1.0 / len(b)) for g, lab in zip(b, _labels(clusters_b, len(b)))]
    return _interval(strata, n_boot, level, rng)


def significant(ci: Optional[tuple[float, float]]) -> Optional[bool]:
    """True when the interval of a difference excludes 0; None without an interval."""
    return None if ci is None else bool(ci[0] > 0 or ci[1] < 0)


__all__ = ["LEVEL", "N_BOOT", "can_pair", "diff_ci", "mean_ci", "pair_by_ids", "significant", "t_quantile"]
