"""Personalized Residuals: parameter count, what training touches, Conv2d and Linear proj_out, export."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from personalize import attach, generate, load_concept, train
from personalize.edits.sites import SiteWrapper
from personalize.methods import get
from personalize.methods.residuals import Residuals, layer_ranks
from personalize.sd_shapes import sd15_unet
from personalize.training import TrainConfig, resolve_settings

FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 0}
PROMPT = "a photo of a <disc> ball"


def image(pipe, prompt=PROMPT, seed=3, **kwargs):
    return pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def tiny_linear():
    """The tiny base with ``use_linear_projection`` (SD 2.x/XL style: Linear proj_in/proj_out)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from personalize.base import build_tiny

    pipe = build_tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**dict(config, use_linear_projection=True))
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- sizes
def test_sd15_has_exactly_1239040_trainable_parameters():
    unet = sd15_unet("meta")
    ranks = layer_ranks(unet)
    assert len(ranks) == 16
    assert sorted(ranks.values()) == [16] * 5 + [32] * 5 + [64] * 6  # round(0.05 * m) for m = 320, 640, 1280
    assert Residuals.trainable_count(unet) == 1_239_040
    assert Residuals.trainable_count(unet, rank=4) == sum(2 * 4 * m for m in [320] * 5 + [640] * 5 + [1280] * 6)


def test_method_is_registered_with_paper_defaults():
    cls = get("residuals")
    assert cls is Residuals
    cfg, mcfg = resolve_settings(cls, {})
    assert (cfg.steps, cfg.batch_size) == (150, 4) and mcfg.lr == 1e-3 and not mcfg.train_token
    cfg, _ = resolve_settings(cls, {"steps": 7})
    assert (cfg.steps, cfg.batch_size) == (7, 4)  # explicit settings win over the method's defaults
    cfg, _ = resolve_settings(get("perfusion"), {})
    assert (cfg.steps, cfg.batch_size) == (TrainConfig.steps, TrainConfig.batch_size)


# --------------------------------------------------------------------------- training
def _train(pipe, photos, tmp_path, name="c", **settings):
    seen = {"prompts": []}
    original = Residuals.on_text_encoded

    def grab(step, loss, method):
        seen["state"] = {k: v.clone() for k, v in method.state_tensors().items()}
        seen["trainable"] = [p for g in method.param_groups() for p in g["params"]]

    def spy(self, ids, hidden):
        expected = self.pipe.tokenizer(PROMPT, padding="max_length", max_length=ids.shape[1]).input_ids
        seen["prompts"] += [row == expected for row in ids.tolist()]
        return original(self, ids, hidden)

    Residuals.on_text_encoded = spy
    try:
        path = train(pipe, photos, token="<disc>", superclass="ball", out=tmp_path / f"{name}.safetensors",
                     method="residuals", settings={**FAST, **settings}, progress=False, callbacks=[grab])
    finally:
        Residuals.on_text_encoded = original
    return path, seen


def test_training_changes_only_the_residuals(tiny, photos, tmp_path):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    before.update({f"te.{k}": v.clone() for k, v in tiny.text_encoder.state_dict().items()})
    init = Residuals(copy.deepcopy(tiny), "<disc>", "ball", Residuals.Config()).state_tensors()
    path, seen = _train(tiny, photos, tmp_path)
    state = seen["state"]
    assert seen["prompts"] and all(seen["prompts"])  # every prompt is the paper's "a photo of a V* <class>"
    assert torch.equal(state["embedding"], init["embedding"]), "the token trained although train_token is off"
    table = tiny.text_encoder.get_input_embeddings().weight
    httr = tiny.tokenizer("httr", add_special_tokens=False).input_ids[0]
    assert torch.equal(state["embedding"][0], table[httr])  # V* starts at a rarely used token
    b_keys = [k for k in state if k.endswith("lora_B.weight")]
    assert len(b_keys) == 7 and all(torch.count_nonzero(init[k]) == 0 for k in b_keys)  # starts as the base
    assert all(not torch.equal(state[k], init[k]) for k in b_keys), "a residual did not train"
    assert sum(p.numel() for p in seen["trainable"]) == Residuals.trainable_count(tiny.unet)
    after = dict(tiny.unet.state_dict())
    after.update({f"te.{k}": v for k, v in tiny.text_encoder.state_dict().items()})
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "a base weight changed"
    assert not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())
    assert set(load_concept(path).tensors) == set(state)


def test_train_token_trains_the_embedding(tiny, photos, tmp_path):
    init = Residuals(copy.deepcopy(tiny), "<disc>", "ball", Residuals.Config()).state_tensors()
    _, seen = _train(tiny, photos, tmp_path, train_token=True)
    assert not torch.equal(seen["state"]["embedding"], init["embedding"])


def test_fixed_rank_and_rank_fraction(tiny, photos, tmp_path):
    path, _ = _train(tiny, photos, tmp_path, name="r1", rank=1, steps=1)
    ranks = {k: v.shape[0] for k, v in load_concept(path).tensors.items() if k.endswith("lora_A.weight")}
    assert set(ranks.values()) == {1}
    path, _ = _train(tiny, photos, tmp_path, name="r2", rank_fraction=0.25, steps=1)
    shapes = [v.shape for k, v in load_concept(path).tensors.items() if k.endswith("lora_A.weight")]
    assert {(s[0], s[1]) for s in shapes} == {(8, 32), (16, 64)}


def test_resume_is_exact(tiny, photos, tmp_path):
    settings = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "seed": 3}
    straight = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "a.safetensors",
                     method="residuals", settings=settings, progress=False)

    def crash(step, loss, method):
        if step == 3:
            raise KeyboardInterrupt

    again = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(tiny, photos, token="<disc>", superclass="ball", out=again, method="residuals", settings=settings,
              progress=False, callbacks=[crash])
    train(tiny, photos, token="<disc>", superclass="ball", out=again, method="residuals", settings=settings,
          progress=False, resume=True)
    a, b = load_concept(straight).tensors, load_concept(again).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- attach: Conv2d and Linear proj_out
def _saved_equals_trained(pipe, photos, tmp_path, layer_type):
    seen = {}

    def last(step, loss, method):
        if step == FAST["steps"]:
            seen["image"] = image(pipe)

    path = train(pipe, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors", method="residuals",
                 settings=FAST, progress=False, callbacks=[last])
    proj = pipe.unet.down_blocks[0].attentions[0].proj_out
    assert type(proj) is layer_type
    modules = dict(pipe.unet.named_modules())
    with attach(pipe, path) as handle:
        wrapped = pipe.unet.down_blocks[0].attentions[0].proj_out
        assert isinstance(wrapped, SiteWrapper) and wrapped.base_layer is proj
        assert handle.tokens == ["<disc>"]
        again = image(pipe)
    assert np.array_equal(seen["image"], again)  # the file rebuilds exactly what was trained
    assert all(pipe.unet.get_submodule(n) is m for n, m in modules.items() if n)
    return path


def test_conv2d_proj_out_sd1(tiny, photos, tmp_path):
    _saved_equals_trained(tiny, photos, tmp_path, nn.Conv2d)


def test_linear_proj_out_sd2_style(photos, tmp_path):
    pipe = tiny_linear()
    path = _saved_equals_trained(pipe, photos, tmp_path, nn.Linear)
    shapes = {tuple(v.shape) for k, v in load_concept(path).tensors.items() if k.endswith("lora_A.weight")}
    assert shapes == {(2, 32), (3, 64)}  # Linear LoRA pairs, not 1x1 convolutions
    base = image(pipe)
    with attach(pipe, path, lag=True):
        lagged = image(pipe)
    assert lagged.shape == base.shape and np.isfinite(lagged).all()


def test_python_end_to_end(tiny, trained_residuals, tmp_path):
    plain = generate(tiny, "a photo of a httr ball", num_images=1, steps=3, seed=1)[0]
    flags = {id(p): p.requires_grad for p in tiny.unet.parameters()}
    with attach(tiny, trained_residuals):
        personal = generate(tiny, PROMPT, num_images=1, steps=3, seed=1)[0]
        assert {id(p): p.requires_grad for p in tiny.unet.parameters()} == flags  # peft never touched the UNet
    with attach(tiny, trained_residuals, lag=True):
        localized = generate(tiny, PROMPT, num_images=1, steps=3, seed=1)[0]
    assert personal.size == plain.size == localized.size
    assert len(tiny.tokenizer) == 49408 and not any(isinstance(m, SiteWrapper) for m in tiny.unet.modules())


# --------------------------------------------------------------------------- export
def test_export_loads_into_a_stock_pipeline(tiny, trained_residuals, tmp_path):
    from personalize.base import load_base
    from personalize.interop import export_concept

    folder = export_concept(trained_residuals, tmp_path / "lora")
    assert {p.name for p in folder.iterdir()} == {"pytorch_lora_weights.safetensors", "token.safetensors",
                                                   "export.json"}
    with attach(tiny, trained_residuals):
        ours = image(tiny)
    stock = load_base("tiny")
    before = image(stock, "a photo of a httr ball")
    stock.load_lora_weights(str(folder))
    stock.load_textual_inversion(str(folder / "token.safetensors"))
    theirs = image(stock)
    assert np.array_equal(ours, theirs)
    assert not np.array_equal(theirs, before)  # the LoRA really was loaded
