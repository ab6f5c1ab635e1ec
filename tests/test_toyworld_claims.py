"""The Perfusion paper's four claims, reproduced in the toy world on the shipped `toy` base (CPU).

Two concepts are trained once for the module (local key-locking and the trained-K ablation, ~20 s each);
every measurement samples fixed prompt sets with fixed seeds (see personalize/claims.py)
and scores them with the ground-truth measurers. Thresholds state the claims; they were not tuned to the
numbers (docs/TOYWORLD.md lists the measured values).
"""
import itertools

import numpy as np
import pytest
from PIL import Image

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
    return {lock: claims.train_toy_concept(toy, CONCEPT, work / f"{lock}.safetensors", lock=lock)
            for lock in ("local", "trained")}


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


def test_claim2_key_locking_helps_alignment(measured):
    """On context prompts, local key-locking aligns at least as well as trained K, at comparable fidelity."""
    local, trained = measured("local"), measured("trained")
    assert local["context_alignment"] >= trained["context_alignment"], (local, trained)
    assert local["context_fidelity"] >= 0.5 * trained["context_fidelity"], (local, trained)


def _seed_to_seed(folder):
    """Mean pixel difference between two seeds of the same prompt: the natural scale of change."""
    diffs = []
    by_prompt = {}
    for p in sorted(folder.glob("*.png")):
        by_prompt.setdefault(p.stem.rsplit("_", 1)[0], []).append(np.asarray(Image.open(p), dtype=np.float32))
    for images in by_prompt.values():
        diffs += [np.abs(a - b).mean() / 255 for a, b in itertools.combinations(images, 2)]
    return float(np.mean(diffs))


@pytest.mark.xfail(strict=False, reason=(
    "not reproduced by this criterion (v2 base, exact masks, 2026-11-30): with the concept attached, prompts "
    "without it move by 0.0159 mean pixel difference, 63% of the 0.0254 between two seeds of one prompt, not "
    "<= 25%. The gate does act (the ungated edit leaks 0.032, 2x more), but the toy's images are mostly flat "
    "background, so two seeds differ little and the yardstick is small; see docs/TOYWORLD.md"))
def test_claim3_gating_preserves_the_prior(measured, reference):
    """Prompts without the concept (some with its superclass word) change little with it attached:
    far less than the difference between two seeds of the same prompt."""
    gated = measured()["leakage"]
    natural = _seed_to_seed(reference)
    assert gated <= 0.25 * natural, (gated, natural)


@pytest.mark.xfail(strict=False, reason=(
    "reproduced from beta 0.6 to 1.0 but not over the whole sweep (v2 base, exact masks, 2026-11-30): fidelity "
    "0.897, 0.629, 0.390, 0.344 and context alignment 0.650, 0.824, 0.840, 0.834 at beta 0.6, 0.8, 1.0, 1.2; at "
    "1.2 the gate is nearly closed and alignment moves by sampling noise (one image of 24), breaking strict "
    "monotonicity; see docs/TOYWORLD.md"))
def test_claim4_beta_spans_the_tradeoff(measured):
    """Raising beta lowers fidelity and raises alignment, monotonically over a small sweep."""
    rows = [measured(beta=b) for b in SWEEP]
    fid = [r["fidelity"] for r in rows]
    align = [r["context_alignment"] for r in rows]
    assert all(a >= b for a, b in zip(fid, fid[1:])), (fid, align)
    assert all(a <= b for a, b in zip(align, align[1:])), (fid, align)
    assert fid[0] > fid[-1] and align[-1] > align[0], (fid, align)
