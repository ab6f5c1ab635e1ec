"""The contract every registered method keeps, checked for each name in ``methods.names()`` on every built-in
test base family (``tiny`` = SD 1.x, ``tiny-sd2`` = SD 2.x: Linear proj_out, v-prediction, OpenCLIP-style text
encoder; ``tiny-sdxl`` = SDXL: two text encoders, pooled text and time ids; ``tiny-sd3`` = SD3: an MMDiT, three
text encoders, flow matching; ``tiny-flux`` = Flux.1-dev: joint and single blocks, CLIP-L pooled + T5, guidance
embedding): a new method or family gets these tests without writing them. A method a family does not support
(``methods.names_for``) is refused there in one line before any work, and nothing is written.

- attach -> detach restores the pipeline bit for bit (modules, weights, tokenizer, output);
- save -> load -> attach reproduces the image of the trained pipeline (with the method's training knobs);
- attach order does not change a composition (or, for a method that replaces the base, composing is refused);
- every knob: a bad value is refused in one line naming the knob, before anything is attached;
- every knob: ``handle.set(knob=v)`` on an attached concept equals attaching with ``knob=v``.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from personalize import attach, families, load_base, load_concept, methods, train
from personalize.edits.state import pipeline_state
from personalize.errors import BadInputError
from personalize.knobs import specs
from personalize.text_stack import family as text_stack_family

NAMES = methods.names()
BASES = ("tiny", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux")
PROMPT = "a photo of a {} ball on the grass"
SETTINGS = {"steps": 2, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
EXTRA = {"dreambooth": {"prior_loss_weight": 0.0}, "custom-diffusion": {"prior_loss_weight": 0.0}}


def image(pipe, tokens=("<disc>",)):
    prompt = PROMPT.format(" and a ".join(tokens))
    size = families.of(pipe).native_resolution(pipe)
    return pipe(prompt, num_inference_steps=2, guidance_scale=6.0, output_type="np", height=size, width=size,
                generator=torch.Generator().manual_seed(5)).images



def _supported(spec: str, name: str) -> bool:
    return name in methods.names_for(families.by_tiny(spec))


SUPPORTED = [(spec, name) for spec in BASES for name in NAMES if _supported(spec, name)]
REFUSED = [(spec, name) for spec in BASES for name in NAMES if not _supported(spec, name)]


# each base loaded and each method trained on it once per run, however pytest orders the parametrized tests
_BASES: dict[str, object] = {}
_TRAINED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def base(request):
    """The built-in base a test's ``base`` parameter names."""
    if request.param not in _BASES:
        _BASES[request.param] = load_base(request.param)
    return _BASES[request.param]


@pytest.fixture
def tiny(base):
    """A fresh copy of the module's base (tests attach things to it)."""
    return copy.deepcopy(base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    """Each method trained two steps on the base; with the image its live pipeline rendered at the last step."""
    spec = base._personalize_base
    if spec not in _TRAINED:
        _TRAINED[spec] = _train_all(tmp_path_factory, base)
    return _TRAINED[spec]


def _train_all(tmp_path_factory, base):
    from conftest import make_photos

    root = tmp_path_factory.mktemp("contract")
    photos = make_photos(root / "photos", n=2)
    found = {}
    for name in NAMES:
        if not _supported(base._personalize_base, name):
            continue
        seen = {}

        def render(step, loss, method, seen=seen):
            if step == SETTINGS["steps"]:
                with torch.no_grad():
                    seen["image"] = image(method.pipe)
                seen["knobs"] = method.training_knobs()

        path = train(copy.deepcopy(base), photos, token="<disc>", superclass="ball",
                     out=root / f"{name}.safetensors", method=name, settings={**SETTINGS, **EXTRA.get(name, {})},
                     callbacks=[render], progress=False)
        found[name] = (path, seen["image"], seen["knobs"])
    return found


def snapshot(pipe):
    """Everything attaching may touch: module objects, tensors, tokenizer and embedding objects."""
    from personalize import text_stack

    parts = (families.denoiser(pipe), *text_stack.encoders(pipe))
    return ([id(m) for part in parts for m in part.modules()],
            {f"{i}.{k}": v.clone() for i, part in enumerate(parts) for k, v in part.state_dict().items()},
            [(id(getattr(pipe, tok)), len(getattr(pipe, tok)), id(getattr(pipe, te).get_input_embeddings()))
             for tok, te in text_stack.pairs(pipe)])


def valid_value(spec):
    """A valid value of a knob that differs from its default."""
    if spec.kind is bool:
        return not spec.default if spec.default is not None else True
    if spec.kind is str:
        return next(c for c in spec.choices if c != spec.default)
    if spec.low is not None and spec.high is not None:
        return (spec.low + spec.high) / 3
    return (spec.low or 0) + 0.3


def bad_values(spec):
    if spec.kind is bool:
        return ["maybe"]
    if spec.kind is str:
        return ["bogus"]
    out = ["abc", float("nan"), float("inf")]
    if spec.low is not None:
        out.append(spec.low - 1)
    if spec.high is not None:
        out.append(spec.high + 1)
    return out


KNOBS = [(spec, name, knob) for spec, name in SUPPORTED for knob in specs(methods.get(name).Knobs)]
# knob updates run the same code on SD 2.x as on SD 1.x and on Flux as on SD3 (checked on tiny, tiny-sdxl, tiny-sd3);
# Perfusion's lock=global is refused on the diffusion transformers (tests/test_perfusion_dit.py)
SET_KNOBS = [case for case in KNOBS if case[0] not in ("tiny-sd2", "tiny-flux")
             and case != ("tiny-sd3", "perfusion", "lock")]


def test_every_method_is_covered_and_names_real_seams():
    from personalize.edits.placement import SEAMS

    assert {"perfusion", "residuals", "textual-inversion", "dreambooth", "dreambooth-lora",
            "custom-diffusion"} <= set(NAMES)
    assert {k for _, _, k in KNOBS} >= {"beta", "tau", "gate", "lock", "lag", "scale"}
    assert {spec for spec, _ in SUPPORTED} == set(BASES)  # every family trains something
    for name in NAMES:
        cls = methods.get(name)
        assert "tokens" in cls.sites and set(cls.sites) <= set(SEAMS), (name, cls.sites)


# every method works on every family today: the refusal path is then checked with one refusal put in
REFUSAL_CASES = REFUSED or [("tiny-sd3", "residuals")]


@pytest.mark.parametrize("base,name", REFUSAL_CASES, indirect=["base"])
def test_a_method_the_family_lacks_is_refused_in_one_line_before_any_work(name, base, tmp_path, monkeypatch):
    """Where the family has every site kind the method edits, it trains (the ``trained`` fixture); elsewhere
    ``train`` refuses it in one line naming the family and why, before any work: nothing written."""
    from conftest import make_photos

    family = families.of(base)
    if (base._personalize_base, name) not in REFUSED:
        monkeypatch.setattr(type(family), "refuses", {**family.refuses, name: "a reason put in by the test"})
    photos = make_photos(tmp_path / "photos", n=1)
    with pytest.raises(BadInputError) as err:
        train(copy.deepcopy(base), photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
              method=name, settings=SETTINGS, progress=False)
    message = str(err.value)
    assert "\n" not in message and families.of(base).label in message and name in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.parametrize("base,name", SUPPORTED, indirect=["base"])
def test_attach_then_detach_restores_the_pipeline_bit_for_bit(name, trained, tiny):
    path, _, _ = trained[name]
    before, base_image = snapshot(tiny), image(tiny)
    with attach(tiny, path):
        assert not np.array_equal(image(tiny), base_image), "the concept changed nothing"
    after = snapshot(tiny)
    assert after[0] == before[0] and after[2:] == before[2:]
    assert after[1].keys() == before[1].keys() and all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert np.array_equal(image(tiny), base_image)
    assert pipeline_state(tiny, create=False) is None  # nothing of ours is left on the pipeline


@pytest.mark.parametrize("base,name", SUPPORTED, indirect=["base"])
def test_save_load_attach_reproduces_the_trained_pipeline(name, trained, tiny):
    path, trained_image, knobs = trained[name]
    with attach(tiny, load_concept(path), **knobs):
        np.testing.assert_allclose(image(tiny), trained_image, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base,name", SUPPORTED, indirect=["base"])
def test_attach_order_does_not_change_a_composition(name, trained, tiny):
    partners = [m for m in ("textual-inversion", "residuals", "perfusion", "custom-diffusion", "dreambooth-lora")
                if m != name and m in trained][:2]
    items = [trained[name][0]] + [(trained[m][0], {"token": f"<p{i}>"}) for i, m in enumerate(partners)]
    tokens = ("<disc>", "<p0>", "<p1>")
    if not methods.get(name).composable:
        with pytest.raises(BadInputError, match="cannot be composed") as err:
            attach(tiny, items)
        assert "\n" not in str(err.value) and pipeline_state(tiny, create=False) is None
        return
    outputs = []
    orders = [items, items[::-1]]
    if text_stack_family(tiny) == "sd1":  # a third order on SD 1.x only (the ordering code is family-blind)
        orders.append([items[1], items[0], items[2]])
    for order in orders:
        with attach(tiny, order):
            outputs.append(image(tiny, tokens))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("base,name,knob", KNOBS, indirect=["base"])
def test_a_bad_knob_value_is_refused_in_one_line(name, knob, trained, tiny):
    spec = specs(methods.get(name).Knobs)[knob]
    for bad in bad_values(spec):
        with pytest.raises(BadInputError) as err:
            attach(tiny, trained[name][0], **{knob: bad})
        message = str(err.value)
        assert knob in message and "\n" not in message, message
        assert pipeline_state(tiny, create=False) is None  # refused before anything was attached
    with attach(tiny, trained[name][0]) as handle, pytest.raises(BadInputError, match=knob):
        handle.set(**{knob: bad_values(spec)[0]})


@pytest.mark.parametrize("base,name,knob", SET_KNOBS, indirect=["base"])
def test_set_in_place_equals_attaching_with_the_knob(name, knob, trained, tiny):
    path = trained[name][0]
    value = valid_value(specs(methods.get(name).Knobs)[knob])
    with attach(tiny, path, **{knob: value}):
        fresh = image(tiny)
    with attach(tiny, path) as handle:
        default = image(tiny)
        handle.set(**{knob: value})
        changed = image(tiny)
        handle.set(**{knob: None})
        back = image(tiny)
    assert np.array_equal(changed, fresh)
    assert np.array_equal(back, default)
