"""Personalized Residuals on the diffusion transformers (``tiny-flux``, ``tiny-sd3``), LAG from the joint attention.

- the LAG maps are the stock processor's own attention read back: the test records the queries and keys the stock
  attention function receives (after the processor's norms and, on Flux, the rotary embedding), forms the full
  joint softmax over text and image keys, keeps the image-to-text block renormalised over the text columns,
  averages the heads and sums the concept's columns found with the tokenizers, and compares per block;
- under SD3's classifier-free guidance both halves read the conditional half's map;
- every mask on (the median rule replaced by ones) gives the image of LAG off bit for bit: the masks reach every
  residual site, a Flux single block's text rows included;
- the residual sites are each block's attention output projection, at rank round(0.05 x width).
"""
import copy

import numpy as np
import pytest
import torch

from personalize import attach, families, load_base, train
from personalize.edits.attention_maps import attention_maps
from personalize.edits.placement import site_names

PROMPT = "a photo of a <disc> ball on the grass"
BASES = ("tiny-flux", "tiny-sd3")
_CACHE: dict = {}


def _trained(tmp_path_factory, spec):
    """The base and a residuals concept trained 2 steps on it (lr high enough to move the image), once per run."""
    if spec not in _CACHE:
        from conftest import make_photos

        root = tmp_path_factory.mktemp(f"res-{spec}")
        pipe = load_base(spec)
        path = train(copy.deepcopy(pipe), make_photos(root / "photos", n=1), token="<disc>", superclass="ball",
                     out=root / "c.safetensors", method="residuals", progress=False,
                     settings={"steps": 2, "batch_size": 1, "checkpoint_every": 0, "masks": "none", "lr": 0.05})
        _CACHE[spec] = pipe, path
    return _CACHE[spec]


def _image(pipe, steps=2):
    fam = families.of(pipe)
    size = fam.native_resolution(pipe)
    extra = {"max_sequence_length": fam.max_length(pipe, "tokenizer_2")} if fam.name == "flux" else {}
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=6.0, output_type="np", height=size, width=size,
                generator=torch.Generator().manual_seed(5), **extra).images


def _columns(pipe) -> list[int]:
    """The context rows of <disc> and the "ball" after it, from the tokenizers (not the code under test)."""
    fam = families.of(pipe)
    runs = [("tokenizer", 77), ("tokenizer_3", None)] if fam.name == "sd3" else [("tokenizer_2", None)]
    cols, start = [], 0
    for name, _ in runs:
        tok = getattr(pipe, name)
        length = fam.max_length(pipe, name)
        ids = tok(PROMPT, padding="max_length", max_length=length, truncation=True).input_ids
        disc = tok.convert_tokens_to_ids("<disc>")
        ball = tok("ball", add_special_tokens=False).input_ids
        for p, i in enumerate(ids):
            if i == disc and ids[p + 1:p + 1 + len(ball)] == ball:
                cols += [start + p + j for j in range(1 + len(ball))]
        start += length
    return cols


def _record_stock_attention(monkeypatch, pipe, fam):
    """The (query, key) each stock joint attention attends with, in call order, as (B, heads, S, d) (calls inside
    the transformer only: the text encoders use the same attention function)."""
    calls, inside = [], []
    handles = [pipe.transformer.register_forward_pre_hook(lambda *a: inside.append(1)),
               pipe.transformer.register_forward_hook(lambda *a: inside.clear())]
    if fam.name == "flux":
        import diffusers.models.transformers.transformer_flux as flux

        real = flux.dispatch_attention_fn

        def spy(query, key, value, *args, **kwargs):
            if inside:
                calls.append((query.transpose(1, 2).float(), key.transpose(1, 2).float()))
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(flux, "dispatch_attention_fn", spy)
    else:
        import diffusers.models.attention_processor as ap

        real = ap.F.scaled_dot_product_attention

        def spy(query, key, value, *args, **kwargs):
            if inside:
                calls.append((query.float(), key.float()))
            return real(query, key, value, *args, **kwargs)

        monkeypatch.setattr(ap.F, "scaled_dot_product_attention", spy)
    return calls, handles


@pytest.mark.parametrize("spec", BASES)
def test_lag_maps_are_the_stock_joint_attentions_image_to_text_mass(tmp_path_factory, monkeypatch, spec):
    pipe, path = _trained(tmp_path_factory, spec)
    fam = families.of(pipe)
    with attach(pipe, path, lag=True):
        calls, handles = _record_stock_attention(monkeypatch, pipe, fam)
        try:
            _image(pipe, steps=1)
        finally:
            monkeypatch.undo()
            for handle in handles:
                handle.remove()
        store = attention_maps(pipe)
        maps = {block: m["residuals:<disc>"] for block, m in store.maps.items()}
        cols = _columns(pipe)
    blocks = site_names(pipe.transformer, "transformer")
    assert list(maps) == blocks and len(calls) == len(blocks) and cols
    for block, (q, k) in zip(blocks, calls):
        n, h, w = maps[block].shape
        text = k.shape[2] - h * w
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # the joint softmax
        if fam.name == "flux":  # text first, then image
            image_rows, text_cols = slice(text, None), slice(0, text)
        else:  # SD3: image first, then text
            image_rows, text_cols = slice(0, h * w), slice(h * w, None)
        block_probs = probs[:, :, image_rows, text_cols]
        block_probs = (block_probs / block_probs.sum(-1, keepdim=True)).mean(1)  # over the text columns; heads
        expected = block_probs[..., cols].sum(-1)  # (B, h*w)
        if fam.name == "sd3":  # the CFG batch is [negative, prompt]: both read the prompt's row
            assert torch.equal(maps[block][0], maps[block][1])
            expected = expected[1:].expand(2, -1)
        torch.testing.assert_close(maps[block].reshape(n, -1), expected, rtol=1e-4, atol=1e-6)
        assert store.masks[block]["residuals:<disc>"].float().mean() == 0.5  # binarised at the median


@pytest.mark.parametrize("spec", BASES)
def test_masks_all_on_give_the_image_without_lag(tmp_path_factory, monkeypatch, spec):
    """LAG's masks multiply every residual site's delta, a Flux single block's text rows included (kept on)."""
    from personalize.edits import lag

    pipe, path = _trained(tmp_path_factory, spec)
    base = _image(pipe)
    with attach(pipe, path) as handle:
        plain = _image(pipe)
        handle.set(lag=True)
        lagged = _image(pipe)
        monkeypatch.setattr(lag, "exclusive_masks", lambda attention, active=None: torch.ones_like(attention, dtype=torch.bool))
        all_on = _image(pipe)
    assert np.array_equal(all_on, plain)
    assert np.abs(lagged - plain).max() > 1e-3 and np.abs(plain - base).max() > 1e-2


@pytest.mark.parametrize("spec", BASES)
def test_residual_sites_are_each_blocks_attention_output_projection(spec):
    from personalize.methods.residuals import layer_ranks

    pipe = load_base(spec)
    denoiser = pipe.transformer
    expected = [f"transformer_blocks.{i}.attn.to_out.0" for i in range(len(denoiser.transformer_blocks))]
    expected += [f"single_transformer_blocks.{i}.proj_out"
                 for i in range(len(getattr(denoiser, "single_transformer_blocks", None) or ()))]
    width = denoiser.config.num_attention_heads * denoiser.config.attention_head_dim
    assert layer_ranks(denoiser) == dict.fromkeys(expected, max(1, round(0.05 * width)))


@pytest.mark.parametrize("spec", BASES)
def test_two_lag_concepts_split_the_image_tokens_in_any_order(tmp_path_factory, spec):
    """Two residual concepts with LAG in one prompt: each block's masks are disjoint, and the attach order does not
    change the image (the same concept file under a second token stands in for a second concept)."""
    pipe, path = _trained(tmp_path_factory, spec)
    items = [(path, {"lag": True}), (path, {"token": "<p0>", "lag": True})]
    fam = families.of(pipe)
    size = fam.native_resolution(pipe)
    extra = {"max_sequence_length": fam.max_length(pipe, "tokenizer_2")} if fam.name == "flux" else {}

    def render():
        return pipe("a photo of a <disc> ball next to a <p0> ball", num_inference_steps=2, guidance_scale=6.0,
                    output_type="np", height=size, width=size, generator=torch.Generator().manual_seed(5),
                    **extra).images

    outputs = []
    for order in (items, items[::-1]):
        with attach(pipe, order):
            outputs.append(render())
            masks = attention_maps(pipe).masks
            for block, by_concept in masks.items():
                a, b = by_concept["residuals:<disc>"], by_concept["residuals:<p0>"]
                assert not (a & b).any() and a.any() and b.any(), block
    assert np.array_equal(outputs[0], outputs[1])
