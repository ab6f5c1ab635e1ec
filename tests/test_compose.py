"""Composing concepts of different methods in one generation (issue 6)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import assert_eq4_group
from personalize import attach, load_concept, train
from personalize.concept import Concept
from personalize.edits.placement import cross_attention_layers
from personalize.edits.sites import SiteWrapper, site_occupant
from personalize.errors import BadInputError
from personalize.methods.perfusion import PerfusionGroup, _key
from personalize.methods.rank1 import rank1_edit

BOTH = "a photo of a <disc> next to a <cube> on the grass"
NEITHER = "a photo of a ball next to a cup on the grass"


def image(pipe, prompt, seed=3):
    return pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def wrapped_modules(pipe) -> bool:
    return any(isinstance(m, SiteWrapper) for m in pipe.unet.modules())


@pytest.fixture(scope="module")
def C_inv(_tiny_master):
    from personalize.covariance import covariance_for, inverse

    return inverse(covariance_for(_tiny_master, "builtin")).double()


@pytest.fixture(scope="module")
def first(trained_concept):
    return load_concept(trained_concept)


@pytest.fixture(scope="module")
def second(first, C_inv):
    """A second Perfusion concept '<cube>' whose i* is C^-1-orthogonal to the first's, with its own o*_V."""
    i1 = first.tensors["i_star"].double()
    v = torch.randn(i1.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * i1.norm() / i1.numel() ** 0.5
    v = v - (i1 @ C_inv @ v) / (i1 @ C_inv @ i1) * i1
    tensors = {k: (-t if k.startswith("o_v.") else t) for k, t in first.tensors.items()}
    tensors["i_star"] = v.float()
    return Concept(dict(first.header, token="<cube>"), tensors, None)


@pytest.fixture(scope="module")
def style(tmp_path_factory, _tiny_master):
    """A textual-inversion concept '<style>' (one training step)."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("ti")
    return train(copy.deepcopy(_tiny_master), make_photos(root / "photos"), token="<style>", superclass="ball",
                 out=root / "style.safetensors", method="textual-inversion",
                 settings={"steps": 1, "batch_size": 2, "checkpoint_every": 0}, progress=False)


# --------------------------------------------------------------------------- Perfusion, J concepts
def test_one_concept_in_a_list_equals_the_single_concept_path(tiny, first, C_inv):
    with attach(tiny, first, beta=0.6):
        single = image(tiny, BOTH)
        layer, _ = next(cross_attention_layers(tiny.unet))
        e = torch.randn(1, 5, first.tensors["i_star"].numel(), generator=torch.Generator().manual_seed(0))
        site = tiny.unet.get_submodule(f"{layer}.to_v")
        h = site(e)
        W = site.base_layer.weight
        o_star = first.tensors[f"o_v.{_key(layer)}"]
        formula = rank1_edit(e, W, first.tensors["i_star"], o_star, C_inv, beta=0.6, tau=0.15)
    with attach(tiny, [(first, {"beta": 0.6})]):
        listed = image(tiny, BOTH)
    assert np.array_equal(single, listed)
    torch.testing.assert_close(h, formula, rtol=1e-4, atol=1e-5)


def test_two_perfusion_concepts_share_one_projection_and_each_target_maps_to_its_output(tiny, first, second):
    with attach(tiny, [first, second], beta=0.5, tau=0.02):
        layers = [name for name, _ in cross_attention_layers(tiny.unet)]
        groups = {id(site_occupant(tiny.unet, f"{n}.to_{p}", PerfusionGroup.KEY).group) for n in layers for p in "kv"}
        assert len(groups) == 1
        assert_eq4_group(tiny, [first, second], layers)


def test_prompt_with_neither_token_is_close_to_the_base(tiny, first, second):
    """The gates stay shut for words that are neither concept: the image moves far less than the tokens move it."""
    base = image(tiny, NEITHER)
    with attach(tiny, [first, second]):
        composed = image(tiny, NEITHER)
        with_tokens = image(tiny, BOTH)
    unrelated, concept = np.abs(composed - base).mean(), np.abs(with_tokens - image(tiny, BOTH)).mean()
    assert unrelated < 0.5 * concept  # tiny (random weights): 0.009 vs 0.027 mean pixel


# --------------------------------------------------------------------------- mixing methods
def mix(first, second, trained_residuals, style):
    return [first, (trained_residuals, {"token": "<pot>", "lag": 1}), style, (second, {"beta": 0.6})]


MIXED = "a <disc> next to a <pot> ball and a <cube>, in <style> style"


def test_attach_order_does_not_change_the_output(tiny, first, second, trained_residuals, style):
    items = mix(first, second, trained_residuals, style)
    outputs = []
    for order in (items, items[::-1], [items[2], items[0], items[3], items[1]]):
        with attach(tiny, order, tau=0.2):
            outputs.append(image(tiny, MIXED))
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])


def test_perfusion_residuals_and_textual_inversion_compose_and_detach_restores_the_base(
        tiny, first, second, trained_residuals, style):
    tokenizer, embedding = tiny.tokenizer, tiny.text_encoder.get_input_embeddings()
    before = image(tiny, NEITHER)
    handle = attach(tiny, mix(first, second, trained_residuals, style))
    assert {"<disc>", "<cube>", "<pot>", "<style>"} <= set(tiny.tokenizer.get_vocab())
    composed = image(tiny, MIXED)
    assert composed.shape == before.shape and np.isfinite(composed).all()
    handle.detach()
    assert np.array_equal(image(tiny, NEITHER), before)
    assert tiny.tokenizer is tokenizer and tiny.text_encoder.get_input_embeddings() is embedding
    assert not wrapped_modules(tiny)


# --------------------------------------------------------------------------- global key-locking
def _keys_and_values(pipe, prompt):
    layer, _ = next(cross_attention_layers(pipe.unet))
    seen = {}
    hooks = [pipe.unet.get_submodule(f"{layer}.to_{p}").register_forward_hook(
        lambda m, a, out, p=p: seen.setdefault(p, out.detach().clone())) for p in "kv"]
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    return seen["k"], seen["v"]


def test_global_lock_keys_are_those_of_the_superclass_prompt(tiny, first):
    concept_prompt, super_prompt = "a photo of a <disc> on the grass", "a photo of a ball on the grass"
    with attach(tiny, first, lock="global") as handle:
        assert handle.methods[0].beta == 0.5  # the paper's global-lock default
        k_concept, v_concept = _keys_and_values(tiny, concept_prompt)
        k_super, v_super = _keys_and_values(tiny, super_prompt)
    assert torch.equal(k_concept, k_super)
    assert not torch.equal(v_concept, v_super)
    with attach(tiny, first):  # local lock: the keys read the concept token
        k_local, _ = _keys_and_values(tiny, concept_prompt)
    assert not torch.equal(k_local, k_super)
    assert not wrapped_modules(tiny)


def test_global_lock_per_concept_and_removal(tiny, first, second):
    with attach(tiny, [(first, {"lock": "global"}), second]) as handle:
        group = handle.methods[0].group
        assert group.key_lock is not None and list(group.lock_replacements()) == tiny.tokenizer.convert_tokens_to_ids(["<disc>"])
        image(tiny, BOTH)
    assert group.key_lock is None and not wrapped_modules(tiny)
    with pytest.raises(BadInputError, match="lock=local or lock=global"):
        attach(tiny, first, lock="everywhere")
    assert not wrapped_modules(tiny)


# --------------------------------------------------------------------------- refusals
def test_same_token_is_refused_with_a_rename_hint_and_renaming_works(tiny, first, trained_residuals):
    with pytest.raises(BadInputError, match="both use the token <disc>.*token=<disc2>"):
        attach(tiny, [first, trained_residuals])
    assert not wrapped_modules(tiny)
    with attach(tiny, [first, (trained_residuals, {"token": "<disc2>"})]) as handle:
        assert sorted(handle.tokens) == ["<disc2>", "<disc>"]


def test_concepts_of_different_bases_are_refused(tiny, first, second):
    other = dict(second.header, base_fingerprint=dict(second.header["base_fingerprint"], text_encoder="0" * 16))
    with pytest.raises(BadInputError, match="different bases"):
        attach(tiny, [first, Concept(other, second.tensors)])


def test_dreambooth_full_with_anything_is_refused(tiny, first, second):
    db = Concept(dict(second.header, method="dreambooth", token="<db>"), {})
    with pytest.raises(BadInputError, match="cannot be composed"):
        attach(tiny, [first, db])


def test_perfusion_concepts_with_different_covariances_are_refused(tiny, first, second):
    custom = Concept(dict(second.header, covariance="custom:abc"), second.tensors)
    with pytest.raises(BadInputError, match="one covariance C"):
        attach(tiny, [first, custom])


def test_shared_knob_no_concept_takes_is_refused(tiny, first, style):
    with pytest.raises(BadInputError, match="residuals"):
        attach(tiny, [first, style], lag=True)
    with pytest.raises(BadInputError, match="no concept here takes strength"):
        attach(tiny, [first, style], strength=2)
    assert not wrapped_modules(tiny)


def test_cli_refuses_a_clash_in_one_line(capsys, trained_concept, tmp_path):
    from test_bad_input import error_line, run_cli

    code, _, err = run_cli(capsys, ["generate", "--concept", trained_concept, "--concept", f"{trained_concept}:beta=0.6",
                                    "--prompt", "a <disc>", "--out", tmp_path / "out"])
    assert code == 2 and "token=" in error_line(err) and not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, ["generate", "--concept", f"{trained_concept}:lag=1", "--prompt", "a <disc>",
                                    "--out", tmp_path / "out"])
    assert code == 2 and "residuals" in error_line(err)


def test_cli_composes_two_concepts(capsys, trained_concept, trained_residuals, tmp_path):
    from test_bad_input import run_cli

    code, out, err = run_cli(capsys, ["generate", "--base", "tiny", "--concept", f"{trained_concept}:beta=0.6,tau=0.15",
                                      "--concept", f"{trained_residuals}:token=<pot>,lag=1", "--lock", "global",
                                      "--prompt", "a <disc> and a <pot> ball", "--out", tmp_path / "out",
                                      "--num-images", "1", "--steps", "2", "--device", "cpu"])
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
