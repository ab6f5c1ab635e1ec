"""Best-step selection: validation during training keeps the best state and never changes the trajectory."""
import math

import pytest
import torch
from safetensors.torch import load_file

from personalize import load_concept, train
from personalize.errors import BadInputError
from personalize.evaluation.validation import (ClipValidator, SamplingValidator, ToyWorldValidator, Validator,
                                               make_validator)

WORDS = {"token": "<disc>", "superclass": "ball"}
FAST = {"batch_size": 2, "checkpoint_every": 0, "seed": 3, "masks": "none"}
TINY_SAMPLING = {"num_seeds": 1, "steps": 2}  # a single short sample per prompt keeps the tests quick


class PeakAt(Validator):
    """h = -|step - k|: the best step is k; records the steps it saw."""

    def __init__(self, k, every=1):
        self.k, self.every, self.steps = k, every, []

    def __call__(self, pipe, method, step):
        self.steps.append(step)
        return {"h": -abs(step - self.k), "distance": abs(step - self.k)}


class NoisyLast(SamplingValidator):
    """Samples with the live concept and draws from the global RNG; h grows with the step (the last is best)."""

    def __call__(self, pipe, method, step):
        self.sample(pipe, method)
        torch.rand(7)
        torch.randn(3, 3)
        return {"h": float(step)}


def _train(pipe, photos, out, steps, method="perfusion", **kwargs):
    return train(pipe, photos, **WORDS, out=out, method=method, settings={**FAST, "steps": steps},
                 progress=False, **kwargs)


def _assert_same_tensors(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["perfusion", "residuals", "textual-inversion"])
def test_best_step_equals_a_plain_run_of_that_many_steps(tiny, photos, tmp_path, method):
    validator = PeakAt(k=2)
    best = _train(tiny, photos, tmp_path / "best.safetensors", 4, method, validation=validator)
    plain = _train(tiny, photos, tmp_path / "plain.safetensors", 2, method)
    _assert_same_tensors(best, plain)
    provenance = load_concept(best).header["provenance"]
    assert provenance["best_step"] == 2 and provenance["steps"] == 4
    assert [r["step"] for r in provenance["validation"]] == [1, 2, 3, 4] == validator.steps
    assert [r["h"] for r in provenance["validation"]] == [-1.0, 0.0, -1.0, -2.0]
    assert provenance["validation"][0]["distance"] == 1.0


def test_validating_with_sampling_and_global_rng_keeps_the_trajectory(tiny, photos, tmp_path):
    validator = NoisyLast(every=2, prompts=["a photo of a {}"], **TINY_SAMPLING)
    with_validation = _train(tiny, photos, tmp_path / "v.safetensors", 3, validation=validator)
    plain = _train(tiny, photos, tmp_path / "p.safetensors", 3)
    _assert_same_tensors(with_validation, plain)
    provenance = load_concept(with_validation).header["provenance"]
    assert provenance["best_step"] == 3
    assert [r["step"] for r in provenance["validation"]] == [2, 3]  # every 2 steps, and the last


def test_ties_keep_the_earlier_step_and_nan_is_never_best(tiny, photos, tmp_path):
    class Flat(Validator):
        every = 1

        def __call__(self, pipe, method, step):
            return {"h": float("nan") if step == 1 else 0.5}

    out = _train(tiny, photos, tmp_path / "t.safetensors", 3, validation=Flat())
    provenance = load_concept(out).header["provenance"]
    assert provenance["best_step"] == 2
    assert provenance["validation"][0]["h"] is None  # recorded as JSON null


def test_resume_restarts_best_tracking(tiny, photos, tmp_path):
    out = tmp_path / "r.safetensors"
    train(tiny, photos, **WORDS, out=out, settings={**FAST, "steps": 2, "checkpoint_every": 1}, progress=False)
    validator = PeakAt(k=1)  # step 1 was before the resume: the best of what is validated now is step 3
    train(tiny, photos, **WORDS, out=out, settings={**FAST, "steps": 4, "checkpoint_every": 1}, progress=False,
          resume=True, validation=validator)
    provenance = load_concept(out).header["provenance"]
    assert validator.steps == [3, 4] and provenance["best_step"] == 3


def test_clip_validator_random_weights(tiny, photos, tmp_path):
    validator = ClipValidator(2, sorted(photos.glob("*.png")), prompts=["a photo of a {}"], random_weights=True,
                              **TINY_SAMPLING)
    out = _train(tiny, photos, tmp_path / "c.safetensors", 3, validation=validator)
    results = load_concept(out).header["provenance"]["validation"]
    assert [r["step"] for r in results] == [2, 3]
    for r in results:
        assert {"h", "clip_image", "clip_text"} <= set(r)
        assert math.isfinite(r["h"]) and r["h"] >= 0 and 0 <= r["clip_text"] <= 2.5


def test_clip_text_compares_with_the_superclass_prompt(tiny, photos):
    from personalize.methods import get

    method = get("residuals").for_training(tiny, "<disc>", "ball", get("residuals").make_config())
    try:
        samples = NoisyLast(every=1, prompts=["a {} on the beach"], **TINY_SAMPLING).sample(tiny, method)
    finally:
        method.remove()
    assert [(s.prompt, s.text) for s in samples] == [("a <disc> ball on the beach", "a ball on the beach")]


def test_toyworld_validator_on_a_tiny_run(tiny, photos, tmp_path):
    from personalize.datasets.toyworld import CONCEPTS

    name = sorted(CONCEPTS)[0]
    validator = make_validator(f"toyworld:{name}", 3, photos, **TINY_SAMPLING)
    assert isinstance(validator, ToyWorldValidator)
    out = _train(tiny, photos, tmp_path / "t.safetensors", 3, validation=validator)
    provenance = load_concept(out).header["provenance"]
    (result,) = provenance["validation"]
    assert result["step"] == 3 and provenance["best_step"] == 3
    assert all(math.isfinite(result[k]) and result[k] >= 0 for k in ("h", "fidelity", "alignment"))


@pytest.mark.parametrize("evaluator", ["foo", "toyworld", "toyworld:nope", "clip:x"])
def test_make_validator_refuses_bad_evaluators(photos, evaluator):
    with pytest.raises(BadInputError) as info:
        make_validator(evaluator, 1, photos, random_weights=True)
    assert len(str(info.value).splitlines()) == 1


def test_make_validator_refuses_bad_prompts_and_intervals(photos):
    with pytest.raises(BadInputError, match="no {}"):
        make_validator("clip", 1, photos, prompts=["a photo"], random_weights=True)
    with pytest.raises(BadInputError, match="positive"):
        make_validator("clip", 0, photos, random_weights=True)


def test_train_refuses_a_validator_without_a_positive_interval(tiny, photos, tmp_path):
    out = tmp_path / "z.safetensors"
    with pytest.raises(BadInputError, match="positive whole number"):
        _train(tiny, photos, out, 2, validation=PeakAt(k=1, every=0))
    assert not out.exists()
