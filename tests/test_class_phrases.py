"""Class phrases as superclasses ("penguin plushie", "action figure", "teddybear" = teddy + bear) in every method.

- the shipped CustomConcept101 list: 101 concepts, 24 class phrases of several CLIP tokens;
- every method builds (``for_training``) and takes one training step (loss, backward, a gradient on what it
  trains) for each of CC101's class phrases (its 59 distinct phrases cover all 101 concepts), on one shared tiny
  pipeline at batch 1, without prior preservation. The token seam copies the CLIP tokenizer at each attach
  (0.3 s of Rust-tokenizer serialisation, the same for every phrase since the token is the same): the loop reuses
  that copy, the only thing it shares between phrases;
- a sample of multi-token phrases goes the whole way for every method: ``train()`` -> file -> ``attach`` ->
  generate, export where the method exports, and a composition (Perfusion with the global key lock next to
  Residuals with LAG);
- equivalence: with a one-token superclass everything is what the single-word code computed (the old formulas are
  written out here), and the phrase rules are checked against independent computations.
"""
from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch

from personalize import attach, load_concept, methods, train
from personalize.datasets.customconcept101 import CATEGORIES, cc101_concepts
from personalize.edits.key_lock import expand
from personalize.edits.lag import concept_columns
from personalize.edits.placement import cross_attention_layers
from personalize.errors import BadInputError
from personalize.methods.shared import word_vector
from personalize.prior import PriorConfig
from personalize.templates import NEUTRAL_TEMPLATES, fill, phrase_ids, word_position
from personalize.training import _validate_words

NAMES = methods.names()
NO_PRIOR = {"dreambooth": {"prior_loss_weight": 0.0}, "custom-diffusion": {"prior_loss_weight": 0.0}}
PHRASES = sorted({c.class_phrase for c in cc101_concepts()})
SAMPLE = "penguin plushie"  # 3 tokens: penguin + plu + shie
IMPORTED = {"textual-inversion": "learned_embeds.safetensors", "dreambooth-lora": "pytorch_lora_weights.safetensors"}


def _generate(pipe, prompt):
    return pipe(prompt, num_inference_steps=1, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# --------------------------------------------------------------------------- the shipped list
def test_the_cc101_list_has_101_concepts_24_of_them_with_multi_token_classes(_tiny_master):
    concepts = cc101_concepts()
    assert len(concepts) == 101 and len({c.name for c in concepts}) == 101
    assert {c.category for c in concepts} <= set(CATEGORIES)
    assert all(c.name.startswith(c.category) and c.prompt_file.startswith("prompts/") for c in concepts)
    by_name = {c.name: c for c in concepts}
    assert by_name["plushie_penguin"].class_phrase == "penguin plushie"
    assert by_name["plushie_teddybear"].class_phrase == "teddybear"
    assert by_name["plushie_dice"].instance_prompt == "photo of a <new1> dice plushie"  # as the dataset has it
    tok = _tiny_master.tokenizer
    several = [c for c in concepts if len(phrase_ids(tok, c.class_phrase)) > 1]
    assert len(several) == 24  # the count: these could not be trained before
    assert len(PHRASES) == 59


def test_the_cc101_list_is_package_data():
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["personalize"]
    data = root / "personalize" / "datasets" / "customconcept101_concepts.json"
    assert data.is_file()
    assert any(fnmatch.fnmatch("datasets/customconcept101_concepts.json", p) for p in patterns)


# --------------------------------------------------------------------------- every phrase, every method
@pytest.fixture(scope="module")
def shared(_tiny_master, tmp_path_factory):
    """One tiny pipeline, the latents of a 2-photo folder, a scheduler."""
    from conftest import make_photos
    from diffusers import DDPMScheduler

    from personalize.images import list_images, load_images
    from personalize.training.cache import LatentCache

    pipe = copy.deepcopy(_tiny_master)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    photos = make_photos(tmp_path_factory.mktemp("phrases") / "photos", n=2)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    cache = LatentCache(pipe.vae, load_images(list_images(photos), size), None)
    return pipe, cache, DDPMScheduler.from_config(pipe.scheduler.config)


@pytest.fixture
def one_tokenizer_copy(monkeypatch):
    """The token seam's tokenizer copy made once for the loop (see the module docstring)."""
    import personalize.edits.tokens as tokens

    made = {}

    def deepcopy(obj):
        if id(obj) not in made:
            made[id(obj)] = (obj, copy.deepcopy(obj))
        return made[id(obj)][1]

    monkeypatch.setattr(tokens, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    # the reused copy keeps '<tok>' (the same id every time); the last removal must not point it at the original
    # tokenizer (``_follow`` does that for twins made with ``from_pipe``, which this loop has none of)
    monkeypatch.setattr(tokens.TokenSite, "_follow", lambda self, old, new: None)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_takes_a_training_step_for_every_cc101_class_phrase(name, shared, one_tokenizer_copy):
    from personalize.training.cache import draw_batch
    from personalize.training.step import denoising_step

    pipe, cache, scheduler = shared
    cls = methods.get(name)
    config = cls.make_config(NO_PRIOR.get(name, {}))
    for phrase in PHRASES:
        _validate_words(pipe, "<tok>", phrase)
        method = cls.for_training(pipe, "<tok>", phrase, config)
        try:
            batch = draw_batch(cache, 1, 0.0, scheduler.config.num_train_timesteps, method.placeholders(),
                               torch.Generator().manual_seed(0), "cpu", method.templates())
            loss = denoising_step(pipe, scheduler, method, batch)
            loss.backward()
            grads = [p.grad for g in method.param_groups() for p in g["params"] if p.grad is not None]
            assert torch.isfinite(loss) and any(bool(g.abs().sum() > 0) for g in grads), (name, phrase)
            if name in ("textual-inversion", "perfusion"):  # the token starts at the phrase's mean row
                assert torch.equal(method.embedding.detach()[0].cpu(), word_vector(pipe, phrase)), phrase
            else:  # the phrase is spelled out in the training prompt
                assert batch.prompts[0].endswith(f"<tok> {phrase}"), (phrase, batch.prompts)
            if issubclass(cls.Config, PriorConfig):  # the class images' prompt (prior preservation)
                spec = cls.prior_spec(cls.make_config({"prior_loss_weight": 1.0}), [phrase])
                assert spec.prompts == [f"a photo of a {phrase}"]
        finally:
            method.remove()


# --------------------------------------------------------------------------- the whole way, a sample
@pytest.fixture(scope="module")
def phrase_concepts(tmp_path_factory, _tiny_master, tiny_segmenter):
    """Every method trained one step on 'penguin plushie' (Custom Diffusion: with 'action figure' jointly);
    Perfusion with its default zero-shot masks, a tiny random CLIPSeg prompted with the phrase."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("phrase-concepts")
    photos = make_photos(root / "photos", n=2)
    settings = {"steps": 1, "batch_size": 1, "checkpoint_every": 0}
    found = {}
    for name in NAMES:
        pipe = copy.deepcopy(_tiny_master)
        if name == "custom-diffusion":
            images, token, superclass = [photos, photos], ["<a>", "<b>"], [SAMPLE, "action figure"]
        else:
            images, token, superclass = photos, "<a>", SAMPLE
        found[name] = train(pipe, images, token=token, superclass=superclass, out=root / f"{name}.safetensors",
                            method=name, settings={**settings, **NO_PRIOR.get(name, {}),
                                                   "segmenter": str(tiny_segmenter)}, progress=False)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_a_phrase_concept_trains_saves_attaches_and_exports(name, phrase_concepts, tiny, tmp_path):
    from personalize.interop import export_concept, import_file

    concept = load_concept(phrase_concepts[name])
    assert concept.superclass == SAMPLE
    with attach(tiny, concept):
        out = _generate(tiny, f"a photo of a <a> {SAMPLE} on the grass")
    assert np.isfinite(out).all()
    if methods.get(name).export_formats:
        folder = export_concept(concept, tmp_path / "export", base=tiny if name == "custom-diffusion" else None)
        assert (folder / "export.json").is_file()
    if name in IMPORTED:  # and back, with the phrase as superclass
        back = import_file(tiny, folder / IMPORTED[name], method=name, out=tmp_path / "back.safetensors",
                           token="<b>", superclass=SAMPLE)
        assert load_concept(back).superclass == SAMPLE


def test_phrase_concepts_compose_with_the_global_lock_and_lag(phrase_concepts, tiny):
    perfusion, residuals = phrase_concepts["perfusion"], phrase_concepts["residuals"]
    prompt = f"a photo of a <p> {SAMPLE} next to a <a> {SAMPLE}"
    with attach(tiny, [(perfusion, {"token": "<p>", "lock": "global"}), (residuals, {"lag": True})]) as handle:
        out = _generate(tiny, prompt)
        lagged = next(m for m in handle.methods if m.name == "residuals")
        ids = tiny.tokenizer(prompt).input_ids
        cols = lagged.lag_columns(ids)
        start = ids.index(tiny.tokenizer.convert_tokens_to_ids("<a>"))
    assert np.isfinite(out).all()
    assert cols == list(range(start, start + 4))  # V*, penguin, plu, shie


# --------------------------------------------------------------------------- Perfusion: equivalence, phrase rules
def _old_e_super(pipe, word):
    """The single-word formula: mean encoding at the word's position over the neutral templates."""
    tok = pipe.tokenizer
    prompts = [fill(t, word) for t in NEUTRAL_TEMPLATES]
    positions = [word_position(tok, t, word) for t in NEUTRAL_TEMPLATES]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids)[0].float()
    return torch.stack([hidden[i, p] for i, p in enumerate(positions)]).mean(0)


def _perfusion(pipe, superclass):
    return methods.get("perfusion").for_training(pipe, "<tok>", superclass, methods.get("perfusion").make_config())


def test_perfusion_with_a_one_token_superclass_starts_exactly_as_before(tiny):
    e_super = _old_e_super(tiny, "ball")
    (ball,) = tiny.tokenizer("ball", add_special_tokens=False).input_ids
    row = tiny.text_encoder.get_input_embeddings().weight[ball].detach().float()
    method = _perfusion(tiny, "ball")
    try:
        assert torch.equal(method.e_super, e_super) and torch.equal(method.i_star, e_super)
        assert torch.equal(method.embedding.detach()[0], row)
        for layer, attn in cross_attention_layers(tiny.unet):
            key = layer.replace(".", "/")
            base_k = getattr(attn.to_k, "base_layer", attn.to_k).weight.float()
            assert torch.equal(method.o_k[key], (base_k @ e_super).detach())
    finally:
        method.remove()


def test_perfusion_reads_a_phrase_at_its_last_token(tiny):
    """e_super: the mean over the templates of the encoding at the phrase's last token; the token vector: the
    mean of the phrase's input rows."""
    tok = tiny.tokenizer
    pieces = phrase_ids(tok, SAMPLE)
    prompts = [fill(t, SAMPLE) for t in NEUTRAL_TEMPLATES]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = tiny.text_encoder(ids)[0].float()
    last = [row.tolist().index(pieces[-1]) for row in ids]  # "shie" occurs once in each template
    expected = torch.stack([hidden[i, p] for i, p in enumerate(last)]).mean(0)
    table = tiny.text_encoder.get_input_embeddings().weight
    method = _perfusion(tiny, SAMPLE)
    try:
        assert torch.allclose(method.e_super, expected, rtol=0, atol=1e-6)
        assert torch.allclose(method.embedding.detach()[0], table[pieces].float().mean(0), rtol=0, atol=1e-7)
        assert not torch.allclose(method.e_super, _old_e_super(tiny, SAMPLE))  # not the first piece
    finally:
        method.remove()


# --------------------------------------------------------------------------- global key-locking
def test_expand_maps_positions_through_the_phrase():
    assert expand([0, 5, 9, 1, 1], {9: [7]}, 5) == ([0, 5, 7, 1, 1], [0, 1, 2, 3, 4])  # one token: in place
    new, where = expand([0, 5, 9, 3, 1, 1], {9: [7, 8, 6]}, 6)
    assert new == [0, 5, 7, 8, 6, 3] and where == [0, 1, 4, 5, 5, 5]  # the tail is cut, past it reads the last
    assert expand([0, 9, 2, 9, 1], {9: [7, 8]}, 5) == ([0, 7, 8, 2, 7], [0, 2, 3, 4, 4])


def _key_inputs(pipe, prompt):
    layer, _ = next(cross_attention_layers(pipe.unet))
    seen = {}
    hook = pipe.unet.get_submodule(f"{layer}.to_k").register_forward_hook(
        lambda m, args, out: seen.setdefault("k", args[0].detach().clone()))
    try:
        pipe(prompt, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        hook.remove()
    return seen["k"]


def test_global_lock_with_a_phrase_keys_read_the_phrase_prompt(phrase_concepts, tiny):
    """K's input is the prompt with the concept token spelled out as the phrase, read at the mapped positions:
    positions before the token exactly, the token's position at the phrase's last token, later ones shifted."""
    concept_prompt, phrase_prompt = "a photo of a <a> on the grass", f"a photo of a {SAMPLE} on the grass"
    with attach(tiny, phrase_concepts["perfusion"], lock="global"):
        k_concept = _key_inputs(tiny, concept_prompt)
        ids = tiny.tokenizer(concept_prompt, padding="max_length", max_length=77).input_ids
        replacements = {tiny.tokenizer.convert_tokens_to_ids("<a>"): phrase_ids(tiny.tokenizer, SAMPLE)}
    k_phrase = _key_inputs(tiny, phrase_prompt)  # the base pipeline: the phrase prompt as written
    _, where = expand(ids, replacements, 77)
    assert where[5] == 7 and where[6] == 8  # <a> -> "shie", "on" shifted by two
    assert torch.equal(k_concept, k_phrase[:, where])


# --------------------------------------------------------------------------- Residuals / LAG
def _old_lag_columns(ids, token_id, macro_id):
    cols = []
    for p, i in enumerate(ids):
        if i == token_id:
            cols.append(p)
            if p + 1 < len(ids) and ids[p + 1] == macro_id:
                cols.append(p + 1)
    return cols


@pytest.mark.parametrize("ids", [[0, 5, 9, 3, 1], [0, 9, 3, 9, 4, 1], [0, 9], [0, 3, 4, 9, 3], [9, 3, 9, 3, 9]])
def test_lag_columns_of_a_one_token_class_are_as_before(ids):
    assert concept_columns(ids, 9, [3]) == _old_lag_columns(ids, 9, 3)


def test_lag_columns_sum_v_star_and_every_phrase_token():
    assert concept_columns([0, 9, 3, 4, 5, 1], 9, [3, 4, 5]) == [1, 2, 3, 4]
    assert concept_columns([0, 9, 3, 4, 1, 9, 3, 4, 5], 9, [3, 4, 5]) == [1, 5, 6, 7, 8]  # only the whole phrase
    assert concept_columns([0, 9, 3, 4], 9, [3, 4, 5]) == [1]  # cut off: V* alone


def test_residuals_train_with_the_phrase_after_v_star(tiny):
    method = methods.get("residuals").for_training(tiny, "<tok>", SAMPLE, methods.get("residuals").make_config())
    try:
        assert method.placeholder() == f"<tok> {SAMPLE}" and method.templates() == ("a photo of a {}",)
        assert method.macro_ids == {"tokenizer": phrase_ids(tiny.tokenizer, SAMPLE)}  # the context is CLIP's rows
    finally:
        method.remove()


# --------------------------------------------------------------------------- the baselines
def test_textual_inversion_starts_at_the_phrase_mean_or_the_word_row(tiny):
    cls = methods.get("textual-inversion")
    table = tiny.text_encoder.get_input_embeddings().weight.detach().float()
    for superclass in ("ball", "teddybear"):
        method = cls.for_training(tiny, "<tok>", superclass, cls.make_config({"num_vectors": 2}))
        try:
            expected = table[phrase_ids(tiny.tokenizer, superclass)].mean(0)
            assert torch.allclose(method.embedding.detach(), expected.expand(2, -1), rtol=0, atol=1e-7)
            if superclass == "ball":
                assert torch.equal(method.embedding.detach()[0], table[phrase_ids(tiny.tokenizer, "ball")[0]])
        finally:
            method.remove()


def test_an_empty_superclass_is_still_refused(tiny):
    with pytest.raises(BadInputError, match="empty"):
        _validate_words(tiny, "<tok>", " ")
    with pytest.raises(BadInputError, match="already in the vocabulary"):  # the placeholder stays one new token
        _validate_words(tiny, "dog", SAMPLE)
