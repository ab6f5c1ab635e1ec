"""LAG sampling: the mask rule, its wiring into proj_out, the captured maps, CFG, several concepts."""
import numpy as np
import pytest
import torch

from personalize import attach, load_concept
from personalize.concept import Concept
from personalize.edits.attention_maps import attention_maps
from personalize.edits.placement import transformer_blocks
from personalize.edits.sites import SiteWrapper
from personalize.errors import BadInputError
from personalize.edits.lag import exclusive_masks
from personalize.methods.residuals import Residuals

PROMPT = "a photo of a <disc> ball on the grass"
BASE_PROMPT = "a photo of a httr ball on the grass"  # V* is the frozen 'httr' vector: same text encoding


def image(pipe, prompt=PROMPT, seed=3, **kwargs):
    return pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture(scope="module")
def strong(trained_residuals):
    """The trained concept with its residuals scaled up, so that where they apply is plain to see."""
    concept = load_concept(trained_residuals)
    tensors = {k: v * 200 if k.endswith("lora_B.weight") else v for k, v in concept.tensors.items()}
    return Concept(concept.header, tensors, concept.path)


# --------------------------------------------------------------------------- the rule
def test_single_concept_mask_is_above_the_median():
    attention = torch.tensor([[[0.1, 0.5, 0.2, 0.9, 0.3, 0.7]]])
    assert exclusive_masks(attention).tolist() == [[[False, True, False, True, False, True]]]
    assert not exclusive_masks(torch.zeros(1, 2, 8)).any()  # a concept not in the prompt applies nowhere


def test_several_concepts_larger_attention_wins():
    a = torch.tensor([0.9, 0.8, 0.1, 0.2])
    b = torch.tensor([0.1, 0.9, 0.8, 0.0])
    masks = exclusive_masks(torch.stack([a, b]))
    assert masks.tolist() == [[True, False, False, False], [False, True, True, False]]
    masks = exclusive_masks(torch.rand(3, 2, 64, generator=torch.Generator().manual_seed(0)))
    assert masks.sum(0).max() <= 1  # never two concepts at one position


# --------------------------------------------------------------------------- the wiring
def test_all_zero_masks_give_the_base_output_exactly(tiny, strong, monkeypatch):
    base = image(tiny, BASE_PROMPT)
    with attach(tiny, strong):
        personal = image(tiny)
    assert not np.array_equal(personal, base)
    monkeypatch.setattr("personalize.edits.lag.exclusive_masks", lambda a, active=None: torch.zeros_like(a, dtype=torch.bool))
    with attach(tiny, strong, lag=True):
        nowhere = image(tiny)
    assert np.array_equal(nowhere, base)


def test_all_one_masks_give_the_non_lag_output_exactly(tiny, strong, monkeypatch):
    with attach(tiny, strong):
        personal = image(tiny)
    with attach(tiny, strong, lag=True):
        localized = image(tiny)
    assert not np.array_equal(localized, personal)  # real LAG masks change the image
    monkeypatch.setattr("personalize.edits.lag.exclusive_masks", lambda a, active=None: torch.ones_like(a, dtype=torch.bool))
    with attach(tiny, strong, lag=True):
        everywhere = image(tiny)
    assert np.array_equal(everywhere, personal)


def test_detach_removes_every_hook_and_wrapper(tiny, strong):
    modules = dict(tiny.unet.named_modules())
    before = image(tiny, BASE_PROMPT)
    with attach(tiny, strong, lag=True):
        image(tiny)
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())
    assert all(tiny.unet.get_submodule(n) is m for n, m in modules.items() if n)
    for module in [tiny.unet, tiny.text_encoder] + [b for _, b in transformer_blocks(tiny.unet)]:
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert np.array_equal(image(tiny, BASE_PROMPT), before)


# --------------------------------------------------------------------------- the maps
def _block_sizes(pipe):
    """Each transformer block's H x W, read by a hook of the test's own."""
    sizes, handles = {}, []
    for name, block in transformer_blocks(pipe.unet):
        def hook(module, args, name=name):
            sizes[name] = tuple(args[0].shape[-2:])
        handles.append(block.register_forward_pre_hook(hook))
    return sizes, handles


def test_masks_have_the_block_size_and_half_ones_non_square(tiny, strong):
    sizes, handles = _block_sizes(tiny)
    with attach(tiny, strong, lag=True):
        image(tiny, height=32, width=48, num_images_per_prompt=2)
        masks = attention_maps(tiny).masks
    for h in handles:
        h.remove()
    assert set(masks) == set(sizes) and len(masks) == 7
    assert {s for s in sizes.values()} == {(16, 24), (8, 12)}
    for block, by_key in masks.items():
        mask = by_key["residuals:<disc>"]
        assert mask.shape == (4, *sizes[block])  # 2 images x (unconditional, conditional)
        share = mask.float().mean(dim=(1, 2))
        assert ((share > 0.4) & (share <= 0.5)).all(), (block, share)
        assert torch.equal(mask[:2], mask[2:])  # CFG: both halves use the conditional half's mask
        assert not torch.equal(mask[2], mask[3])  # each image has its own mask


def test_maps_are_the_softmax_over_text_columns(tiny, strong):
    """Against diffusers' own attention probabilities (classic processor), token + macro-class columns."""
    from diffusers.models.attention_processor import AttnProcessor

    tiny.unet.set_attn_processor(AttnProcessor())
    probs = {}
    for name, block in transformer_blocks(tiny.unet):
        attn = block.transformer_blocks[0].attn2
        original = attn.get_attention_scores

        def scores(*args, name=name, original=original, **kwargs):
            probs[name] = original(*args, **kwargs)
            return probs[name]

        attn.get_attention_scores = scores
    ids = tiny.tokenizer("a photo of a httr ball on the grass").input_ids
    word = {w: tiny.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("httr", "ball")}
    columns = [ids.index(word["httr"]), ids.index(word["ball"])]  # V*'s place and the macro class after it
    assert columns == [5, 6]
    with attach(tiny, strong, lag=True):
        pipe_out = tiny(PROMPT, num_inference_steps=1, guidance_scale=6.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0))
        maps = attention_maps(tiny).maps
    assert pipe_out is not None
    for name, by_key in maps.items():
        ours = by_key["residuals:<disc>"]  # (2, H, W): unconditional row borrows the conditional one
        heads = tiny.unet.get_submodule(name).transformer_blocks[0].attn2.heads
        p = probs[name].view(2, heads, *probs[name].shape[1:]).mean(1)  # (2, HW, 77)
        reference = p[1][:, columns].sum(-1).view(ours.shape[1:])
        torch.testing.assert_close(ours[1], reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[0], reference, rtol=1e-4, atol=1e-6)


def test_two_concepts_share_no_pixel(tiny, strong):
    first = Residuals.from_concept(tiny, strong, lag=True)
    second = Residuals.from_concept(tiny, strong.with_token("<disc2>"), lag=True)
    try:
        image(tiny, "a photo of a <disc> ball next to a <disc2> ball")
        store = attention_maps(tiny)
        for block, masks in store.masks.items():
            a, b = masks["residuals:<disc>"], masks["residuals:<disc2>"]
            assert not (a & b).any()
            maps = store.maps[block]
            both = (maps["residuals:<disc>"] > maps["residuals:<disc>"].flatten(1).median(1).values.view(-1, 1, 1))
            assert (a <= both).all()  # a concept is only ever on above its own median
            assert a.any() and b.any()
    finally:
        second.remove()
        first.remove()
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())


def test_concept_absent_from_prompt_applies_nowhere(tiny, strong):
    base = image(tiny, "a photo of a ball")
    with attach(tiny, strong, lag=True):
        assert np.array_equal(image(tiny, "a photo of a ball"), base)


def test_prompt_embeds_without_text_are_refused(tiny, strong):
    embeds = tiny.text_encoder(tiny.tokenizer(["x"], padding="max_length", return_tensors="pt").input_ids)[0]
    with attach(tiny, strong, lag=True):
        with pytest.raises(BadInputError, match="prompt's tokens"):
            tiny(prompt_embeds=embeds.detach() + 1, negative_prompt_embeds=embeds.detach() + 2,
                 num_inference_steps=1, output_type="latent")


def test_lag_refused_for_a_concept_without_residuals(tiny, trained_concept):
    with pytest.raises(BadInputError, match="residuals"):
        attach(tiny, trained_concept, lag=True)
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())
