"""The Perfusion paper's four claims, reproduced in the toy world on the shipped `toy` base (CPU).

Two concepts are trained once for the module (local key-locking and the trained-K ablation, ~20 s each);
every measurement samples fixed prompt sets with fixed seeds (see personalize/datasets/toyworld/claims.py)
and scores them with the ground-truth measurers. Thresholds state the claims; they were not tuned to the
numbers (docs/TOYWORLD.md lists the measured values).
"""
import itertools

import numpy as np
import pytest
from PIL import Image

from personalize.base import TOY_WEIGHTS
from personalize.datasets.toyworld import claims

pytestmark = pytest.mark.skipif(not (TOY_WEIGHTS / "model_index.json").exists(), reason="toy weights not built")

CONCEPT = "split_triangle"  # the held-out texture that survives the 8x8-latent VAE best (docs/TOYWORLD.md)
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
    "not reproduced by this criterion: with the concept attached, prompts without it move by 0.0099 mean "
    "pixel difference, 32% of the 0.031 between two seeds of one prompt (the toy's images are mostly flat "
    "background), not <= 25%; the ungated edit leaks about as little (0.011); see docs/TOYWORLD.md"))
def test_claim3_gating_preserves_the_prior(measured, reference):
    """Prompts without the concept (some with its superclass word) change little with it attached:
    far less than the difference between two seeds of the same prompt."""
    gated = measured()["leakage"]
    natural = _seed_to_seed(reference)
    assert gated <= 0.25 * natural, (gated, natural)


@pytest.mark.xfail(strict=False, reason=(
    "not reproduced in the toy world: fidelity falls monotonically with beta (0.273, 0.194, 0.192, 0.190 at "
    "beta 0.6-1.2) but context alignment stays flat within sampling noise (0.668, 0.685, 0.671, 0.685); "
    "see docs/TOYWORLD.md"))
def test_claim4_beta_spans_the_tradeoff(measured):
    """Raising beta lowers fidelity and raises alignment, monotonically over a small sweep."""
    rows = [measured(beta=b) for b in SWEEP]
    fid = [r["fidelity"] for r in rows]
    align = [r["context_alignment"] for r in rows]
    assert all(a >= b for a, b in zip(fid, fid[1:])), fid
    assert all(a <= b for a, b in zip(align, align[1:])), align
    assert fid[0] > fid[-1] and align[-1] > align[0], (fid, align)
