"""The Perfusion paper's four claims in the toy world on the shipped `toy` base (CPU).

Claim 1 (a concept is learned) runs in every suite: one concept, trained once for the module. Claims 2-4 are
decided on 4 concepts x 4 training seeds with paired 95 % intervals (benchmarks/toyworld_claims.py, 32
trainings, about half an hour on 2 cores): they run when PERSONALIZE_CLAIMS=1 (`make claims`), as strict
xfails where the toy world does not reproduce the claim, so a change that makes one hold is noticed. The
decision code (claims.paired) is checked here on simulated runs with a known answer. Thresholds state the
claims; they were not tuned to the numbers (docs/TOYWORLD.md lists the measured values).
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from personalize.base import TOY_WEIGHTS
from personalize import claims

pytestmark = pytest.mark.skipif(not (TOY_WEIGHTS / "model_index.json").exists(), reason="toy weights not built")

CONCEPT = "split_triangle"  # the held-out texture that survives the VAE best (docs/TOYWORLD.md)
SWEEP = (0.6, 0.8, 1.0, 1.2)  # inference beta; the trained concept's default sits inside it


@pytest.fixture(scope="module")
def toy():
    from personalize import load_base

    return load_base("toy")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("claims")


@pytest.fixture(scope="module")
def reference(toy, work):
    return claims.no_concept_reference(toy, work)


@pytest.fixture(scope="module")
def concepts(toy, work):
    return {"local": claims.train_toy_concept(toy, CONCEPT, work / "local.safetensors", lock="local")}


@pytest.fixture(scope="module")
def measured(toy, work, reference, concepts):
    cache = {}

    def get(lock="local", **knobs):
        key = (lock, tuple(sorted(knobs.items())))
        if key not in cache:
            folder = work / ("-".join([lock] + [f"{k}{v}" for k, v in sorted(knobs.items())]))
            cache[key] = claims.measure_concept(toy, concepts[lock], CONCEPT, folder, reference=reference, **knobs)
        return cache[key]

    return get


def test_claim1_concept_is_learned(toy, work, measured):
    """Fidelity on "a photo of a <tok>" is well above the base's own "a photo of a star"."""
    base = claims.superclass_baseline(toy, CONCEPT, work)["fidelity"]
    got = measured()["fidelity"]
    assert got >= base + 0.10 and got >= 1.5 * base, (got, base)


def _runs(effect: float, rng, concepts: int = 4, seeds: int = 4, images: int = 24, spread: float = 0.0):
    """Simulated paired runs: b is noise around a concept baseline, a = b + effect (+ a concept's own effect)."""
    a, b = {}, {}
    for c in range(concepts):
        base, own = rng.normal(0.5, 0.1), rng.normal(0.0, spread)
        for s in range(seeds):
            stems = [f"p{i}_{k}" for i in range(6) for k in range(images // 6)]
            y = {st: base + rng.normal(0, 0.05) for st in stems}
            b[f"c{c}/{s}"] = y
            a[f"c{c}/{s}"] = {st: v + effect + own + rng.normal(0, 0.05) for st, v in reversed(list(y.items()))}
    return a, b


def test_paired_claim_intervals_find_a_known_effect_and_no_effect():
    rng = np.random.default_rng(0)
    found = claims.paired(*_runs(0.05, rng))
    assert found["diff"] == pytest.approx(0.05, abs=0.01) and claims.excludes_zero(found, +1)
    assert not claims.excludes_zero(found, -1) and found["concepts"] == 4 and found["images"] == 4 * 4 * 24
    misses = sum(claims.excludes_zero(claims.paired(*_runs(0.0, rng, spread=0.02)), +1) for _ in range(100))
    assert misses <= 10  # a null effect passes one-sided at ~2.5 %; 10 of 100 has probability < 1e-3


def test_paired_claim_intervals_pair_images_by_stem_not_by_position():
    a = {"x/0": {"p0_0": 1.0, "p1_0": 2.0}, "y/0": {"p0_0": 3.0, "p1_0": 5.0}}
    b = {"x/0": {"p1_0": 2.0, "p0_0": 1.0, "p2_0": 9.0}, "y/0": {"p1_0": 4.0, "p0_0": 3.0}}
    result = claims.paired(a, b)
    assert result["diff"] == pytest.approx((0.0 + 0.5) / 2) and result["images"] == 4


SLOW = pytest.mark.skipif(os.environ.get("PERSONALIZE_CLAIMS") != "1",
                          reason="32 toy trainings (~30 min on 2 cores): PERSONALIZE_CLAIMS=1 / make claims")


@pytest.fixture(scope="module")
def decided(toy, tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from toyworld_claims import decide

    return decide(toy, tmp_path_factory.mktemp("decide"), claims.CLAIM_CONCEPTS, list(claims.CLAIM_SEEDS))


@SLOW
def test_claim2_key_locking_helps_alignment(decided):
    """On context prompts, local key-locking aligns better than trained K (paired, concepts resampled)."""
    c2 = decided["claim2"]
    assert claims.excludes_zero(c2, +1), c2


@SLOW
@pytest.mark.xfail(strict=True, reason=(
    "not shown at 95 % (benchmarks/toyworld_claims.py, 4 concepts x 4 seeds, 2026-12-06): on prompts without the "
    "token the gated concept moves the base's images by 0.018 mean pixel difference, the same concept ungated by "
    "0.055; paired difference -0.037 [-0.108, +0.001] over 256 image pairs, the interval (concepts resampled, "
    "t with 3 df) just reaching 0; see docs/TOYWORLD.md"))
def test_claim3_gating_preserves_the_prior(decided):
    """On prompts without the token, the gated concept changes the base's image less than the same concept
    with the gate off (paired by prompt and seed, concepts resampled)."""
    c3 = decided["claim3"]
    assert claims.excludes_zero(c3, -1), c3


@SLOW
@pytest.mark.xfail(strict=True, reason=(
    "monotone but not significant at the end points (4 concepts, training seed 0, 2026-12-06): fidelity 0.500, "
    "0.481, 0.446, 0.382, 0.373 and context alignment 0.618, 0.666, 0.716, 0.766, 0.781 at beta 0.6-1.0; "
    "beta 1.0 minus 0.6: fidelity -0.126 [-0.603, +0.236], alignment +0.163 [-0.031, +0.283]; see "
    "docs/TOYWORLD.md"))
def test_claim4_beta_spans_the_tradeoff(decided):
    """Along the beta grid fidelity never rises and context alignment never falls, and the end points differ
    significantly in those directions."""
    c4 = decided["claim4"]
    f, a = c4["fidelity"], c4["alignment"]
    assert all(x >= y for x, y in zip(f, f[1:])) and all(x <= y for x, y in zip(a, a[1:])), c4
    assert claims.excludes_zero(c4["fidelity_end_diff"], -1), c4
    assert claims.excludes_zero(c4["alignment_end_diff"], +1), c4
