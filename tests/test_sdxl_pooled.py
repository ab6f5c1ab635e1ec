"""SDXL's pooled text vector under Perfusion (issue 24, item 7; ``personalize/edits/pooled.py``).

SDXL's UNet reads the second text encoder's pooled output (``added_cond_kwargs["text_embeds"]``), taken at the end
token, which has seen the concept's token; it conditions the whole UNet and is neither key-locked nor gated. While
Perfusion concepts are attached, a row holding one of their tokens gets the pooled vector of the superclass prompt,
in training (``text_stack``, which the trainer encodes with) and through a stock ``pipe(prompt)``:

- the swap spells each token as its superclass phrase exactly as the tokenizer spells the superclass prompt
  (phrases of several tokens, and prompts that the phrase pushes past 77 tokens);
- the trainer's UNet reads the superclass prompts' pooled vectors;
- a stock ``pipe(prompt)`` gives the UNet the superclass prompt's pooled vector, and with the gate closed the
  image is the base's for the concept's projected-out context ``e_perp`` (all the K/V edit leaves, ``W e_perp``)
  and the superclass prompt's pooled vector: nothing of the concept reaches the UNet outside its gate;
- several Perfusion concepts are all swapped, another method's token (Textual Inversion) is not; detach removes
  the hook.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_photos
from personalize import attach, load_base, load_concept, text_stack, train
from personalize.concept import Concept
from personalize.edits.pooled import swap, tables
from personalize.edits.tokens import token_site
from personalize.templates import phrase_ids

PROMPT = "a photo of a <disc> ball on the grass"
SUPER = PROMPT.replace("<disc>", "ball")
CLOSED = 100.0  # beta: sigmoid((s - 100) / tau) is 0 in float32 for any s near 1, so every gate is shut


@pytest.fixture(scope="module")
def xl_master():
    return load_base("tiny-sdxl")


@pytest.fixture
def xl(xl_master):
    return copy.deepcopy(xl_master)


def pooled_of(pipe, prompts: list[str]) -> torch.Tensor:
    """The pooled vectors a stock SDXL pipeline builds for ``prompts`` (no guidance)."""
    return pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[2]


class UNetInputs:
    """What the UNet is called with (context and pooled text), one entry per call."""

    def __init__(self, pipe):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = pipe.unet.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        context = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        self.calls.append((context.detach().clone(), kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def trained(xl_master, tmp_path_factory):
    """A Perfusion concept trained two steps on tiny-sdxl (a large embedding rate, so its token vector is far from
    the superclass word's after the first step), with the trainer's prompts and the UNet's pooled input per step."""
    root = tmp_path_factory.mktemp("pooled")
    prompts, steps = [], []
    tokenize = text_stack.tokenize

    def recording(pipe, batch, *args, **kwargs):
        prompts.append(list(batch))
        return tokenize(pipe, batch, *args, **kwargs)

    def keep(module, args, kwargs):  # the prompts the step encoded last, and the pooled vector the UNet reads
        steps.append((prompts[-1], kwargs["added_cond_kwargs"]["text_embeds"].detach().clone()))

    pipe = copy.deepcopy(xl_master)
    handle = pipe.unet.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(text_stack, "tokenize", recording)
            path = train(pipe, make_photos(root / "photos"), token="<disc>", superclass="ball",
                         out=root / "disc.safetensors", masks="none", progress=False,
                         settings={"steps": 2, "batch_size": 2, "checkpoint_every": 0, "lr_embedding": 0.05})
    finally:
        handle.remove()
    return load_concept(path), steps


# --------------------------------------------------------------------------- the swap
def test_the_swap_spells_the_superclass_as_the_tokenizer_does(xl):
    token_site(xl).add("test", ["<disc>", "<cube>"], torch.zeros(2, sum(text_stack.widths(xl))))
    disc, cube = (xl.tokenizer.convert_tokens_to_ids(t) for t in ("<disc>", "<cube>"))
    replacements = {disc: phrase_ids(xl.tokenizer, "ball"), cube: phrase_ids(xl.tokenizer, "teddy bear plushie")}
    assert len(replacements[cube]) > 2
    prompts = [
        "a photo of a <disc> next to a <cube>",
        "a <cube> " + "very " * 70 + "<disc>",  # the phrase pushes the end token past 77: it stays last
        "a <cube> " + "very " * 66 + "<disc>",  # ... and one that still fits
        "a photo of a ball",  # no concept token: unchanged
    ]
    written = [p.replace("<disc>", "ball").replace("<cube>", "teddy bear plushie") for p in prompts]

    def ids(texts):
        return xl.tokenizer_2(texts, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    got, rows = swap(ids(prompts), tables(replacements), xl.tokenizer_2.eos_token_id)
    assert torch.equal(got, ids(written))
    assert rows.tolist() == [True, True, True, False]


# --------------------------------------------------------------------------- training
def test_the_trainer_reads_the_superclass_pooled_vector(trained, xl):
    concept, steps = trained
    assert len(steps) == 2
    for prompts, pooled in steps:
        assert all("<disc>" in p for p in prompts)
        torch.testing.assert_close(pooled, pooled_of(xl, [p.replace("<disc>", "ball") for p in prompts]),
                                   rtol=0, atol=1e-6)
    # and the token's vector did move away from the superclass word's (so its own pooled vector differs)
    from personalize.methods.shared import word_vector

    assert (concept.tensors["embedding"][0] - word_vector(xl, "ball")).abs().max() > 1e-2


def test_text_stack_gives_perfusion_the_superclass_pooled_vector_and_no_gradient_through_it(xl, trained):
    from personalize.methods.perfusion import Perfusion

    concept, _ = trained
    base = text_stack.encode(xl, [SUPER])
    method = Perfusion.rebuild(xl, concept)
    method.install()
    try:
        method.embedding.requires_grad_(True)
        got = text_stack.encode(xl, [PROMPT])
        assert torch.equal(got.pooled, base.pooled)
        (pooled_grad,) = torch.autograd.grad(got.pooled.sum(), method.embedding, retain_graph=True, allow_unused=True,
                                             materialize_grads=True)
        assert not pooled_grad.any()  # the token is not trained through the pooled vector
        (context_grad,) = torch.autograd.grad(got.context.sum(), method.embedding)
        assert context_grad.any() and not torch.equal(got.context, base.context)  # but acts in the context
    finally:
        method.remove()
    assert not xl.text_encoder_2._forward_hooks


# --------------------------------------------------------------------------- inference, stock pipe(prompt)
def image(pipe, prompt=None, **kwargs):
    return pipe(prompt, num_inference_steps=2, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(3), **kwargs).images


@pytest.mark.parametrize("lock", ["local", "global"])
def test_the_unet_reads_the_superclass_pooled_vector(xl, trained, lock):
    concept, _ = trained
    want = pooled_of(xl, [SUPER])
    with attach(xl, concept, lock=lock), UNetInputs(xl) as inputs:
        image(xl, PROMPT)
        negative = pooled_of(xl, ["a <disc> ball, blurry"])  # a negative prompt with the token is swapped too
    context, pooled = inputs.calls[0]
    assert pooled.shape[0] == 2 and not pooled[0].any()  # SDXL zeroes the unconditional row
    assert torch.equal(pooled[1:], want)
    assert torch.equal(negative, pooled_of(xl, ["a ball ball, blurry"]))
    assert not xl.text_encoder_2._forward_hooks


def test_with_the_gate_closed_the_image_is_the_bases_for_e_perp_and_the_superclass_pooled_vector(xl, trained):
    """Gate shut: every K/V site computes ``W e_perp`` (e: the prompt's context with the concept's token, e_perp: e
    with the concepts' i* directions projected out), which the base computes for the context ``e_perp``; the pooled
    vector must be the superclass prompt's, or the concept leaks into the whole UNet outside its gate."""
    from personalize.methods.perfusion import PerfusionGroup
    from personalize.edits.state import pipeline_state

    concept, _ = trained
    with attach(xl, concept, beta=CLOSED), UNetInputs(xl) as inputs:
        closed = image(xl, PROMPT)
        proj = pipeline_state(xl).groups[PerfusionGroup.KEY].projection(torch.float32, "cpu")
        ids = xl.tokenizer_2([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        leak = xl.text_encoder_2.forward(ids.input_ids)[0]  # forward: past the hook, the token's own pooled vector
    context = inputs.calls[0][0][1:]  # the conditional row (the unconditional one is SDXL's zeros)
    e_perp = context - (context @ proj.coeff_map) @ proj.basis.T
    assert not torch.allclose(e_perp, context)
    base = image(xl, prompt_embeds=e_perp, pooled_prompt_embeds=pooled_of(xl, [SUPER]))
    np.testing.assert_allclose(closed, base, rtol=0, atol=1e-4)  # float rounding of W e - (W U)(U^T C^-1 e): ~1e-6
    # what the UNet made of the token's own pooled vector (before the swap): far outside that tolerance (~0.07)
    assert np.abs(image(xl, prompt_embeds=e_perp, pooled_prompt_embeds=leak) - base).max() > 1e-2


# --------------------------------------------------------------------------- several concepts, other methods
@pytest.fixture(scope="module")
def style(xl_master, tmp_path_factory):
    """A textual-inversion concept '<style>' on tiny-sdxl (one step, a large rate: far from its init word)."""
    root = tmp_path_factory.mktemp("pooled-ti")
    return load_concept(train(copy.deepcopy(xl_master), make_photos(root / "photos"), token="<style>",
                              superclass="ball", out=root / "style.safetensors", method="textual-inversion",
                              settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0, "lr": 0.05},
                              progress=False))


def test_every_perfusion_token_is_swapped_and_another_methods_token_is_not(xl, trained, style):
    concept, _ = trained
    teddy = Concept(dict(concept.header, token="<cube>", superclass="teddy bear"), concept.tensors, None)
    mixed = "a <disc> next to a <cube>, in <style> style"
    with attach(xl, [concept, teddy, style], beta=0.6):
        got = pooled_of(xl, [mixed])
        assert torch.equal(got, pooled_of(xl, ["a ball next to a teddy bear, in <style> style"]))
        assert not torch.equal(got, pooled_of(xl, ["a ball next to a teddy bear, in ball style"]))
    with attach(xl, style):  # Textual Inversion alone: its token keeps acting on the pooled vector (no hook)
        assert not xl.text_encoder_2._forward_hooks
    assert not xl.text_encoder_2._forward_hooks
