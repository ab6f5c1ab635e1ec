"""Every method's defaults are its reference's recipe (issue 17, item 3): pinned here to a table whose numbers each
cite their source, so a changed default fails until this table (and its citation) changes with it.

Sources: the diffusers example scripts in ``../shared/perf-anchors/diffusers-examples/`` (commit 58eb52c0) and the
commands of their READMEs; the papers in ``../shared/papers/``. ``--scale_lr`` multiplies the README's learning rate
by gradient accumulation x batch x processes (and train_custom_diffusion.py doubles it under prior preservation); the
tables hold the *effective* rate, at the batch our trainer uses for the same update.
"""
import copy
import dataclasses

import pytest

from conftest import make_photos
from personalize import methods as registry
from personalize.training import resolve_settings

RECIPES = {
    "textual-inversion": {
        # README: --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 3000 --learning_rate 5e-4
        # --scale_lr -> 5e-4 x 4 x 1 = 2e-3 per update of 4 images. Our trainer has no accumulation: batch 4 in one
        # step (the mean loss of 4 images = the script's 4 accumulated losses / 4) at 2e-3 is the same update.
        "steps": 3000, "batch_size": 4, "lr": 2e-3,
        "weight_decay": 1e-2,  # textual_inversion.py --adam_weight_decay default
        "max_grad_norm": None,  # textual_inversion.py never calls clip_grad_norm_
        "num_vectors": 1,  # textual_inversion.py --num_vectors default
    },
    "custom-diffusion": {
        # README: --train_batch_size 2 --learning_rate 1e-5 --scale_lr --with_prior_preservation --max_train_steps 250
        # --num_class_images 200 --prior_loss_weight 1.0 -> 1e-5 x 1 x 2 = 2e-5, x 2.0 with prior (script) = 4e-5
        "steps": 250, "batch_size": 2, "lr": 4e-5, "prior_loss_weight": 1.0, "num_class_images": 200,
        "weight_decay": 1e-2,  # train_custom_diffusion.py --adam_weight_decay default
        "max_grad_norm": 1.0,  # train_custom_diffusion.py --max_grad_norm default, clip_grad_norm_ every update
        "init_words": "ktn+pll+ucd",  # train_custom_diffusion.py --initializer_token default
    },
    "dreambooth": {
        # README (prior preservation): --train_batch_size 1 --learning_rate 5e-6 (no --scale_lr) --max_train_steps 800
        # --num_class_images 200 --prior_loss_weight 1.0
        "steps": 800, "batch_size": 1, "lr": 5e-6, "lr_text_encoder": 5e-6, "prior_loss_weight": 1.0,
        "num_class_images": 200, "identifier": "sks",  # README: "a photo of sks dog"
        "weight_decay": 1e-2,  # train_dreambooth.py --adam_weight_decay default
        "max_grad_norm": 1.0,  # train_dreambooth.py --max_grad_norm default
    },
    "dreambooth-lora": {
        # README: --train_batch_size 1 --learning_rate 1e-4 (no --scale_lr) --max_train_steps 500, no prior
        "steps": 500, "batch_size": 1, "lr": 1e-4, "prior_loss_weight": 0.0,
        "rank": 4,  # train_dreambooth_lora.py --rank default
        "weight_decay": 1e-2,  # train_dreambooth_lora.py --adam_weight_decay default
        "max_grad_norm": 1.0,  # train_dreambooth_lora.py --max_grad_norm default
    },
    "perfusion": {
        # paper §4.4: "o* with a learning rate of 0.03, for the embedding ... 0.006. We use a batch size of 16",
        # flips p=50%; no clipping listed, but ours clips at 1.0: the mask-weighted loss collapses unclipped
        # (toy world, docs/TOYWORLD.md). 250 steps: our cap for the best-step search (not from the paper).
        "batch_size": 16, "lr_value": 0.03, "lr_embedding": 0.006, "flip_p": 0.5, "max_grad_norm": 1.0,
        "steps": 250,
        # paper §4.4 (sigmoid hyper-parameters): training bias 0.75, temperature 0.1
        "beta_train": 0.75, "tau_train": 0.10,
    },
    "residuals": {
        # paper §4.1: r_i = 0.05 m_i, "150 iterations with a batch size of 4 and learning rate of 1.0e-3"; no clipping
        # listed; the token frozen
        "steps": 150, "batch_size": 4, "lr": 1e-3, "rank_fraction": 0.05, "train_token": False,
        "max_grad_norm": None,
    },
}

# Perfusion §4.4: "a validation set of 8 prompts, sampled every 25 training steps"; the other references keep the
# last step
VALIDATE_EVERY = {"perfusion": 25}


def _resolved(name: str) -> dict:
    train_cfg, method_cfg = resolve_settings(registry.get(name), {})
    return {**dataclasses.asdict(train_cfg), **dataclasses.asdict(method_cfg)}


@pytest.mark.parametrize("name", registry.names())
def test_resolved_defaults_are_the_references_recipe(name):
    assert name in RECIPES, f"{name}: add its recipe (with sources) to RECIPES"
    resolved = _resolved(name)
    got = {key: resolved[key] for key in RECIPES[name]}
    assert got == RECIPES[name]


@pytest.mark.parametrize("name", registry.names())
def test_recipe_cites_its_source_and_effective_rate(name):
    """``personalize methods`` shows where each method's defaults come from, the effective rate spelled out."""
    cls = registry.get(name)
    resolved = _resolved(name)
    assert cls.recipe and ("README" in cls.recipe or "paper" in cls.recipe), name
    for key in ("lr", "lr_value", "lr_embedding"):
        if key in resolved:
            forms = {f"{resolved[key]:g}", f"{resolved[key]:.0e}".replace("e-0", "e-")}  # 0.03, 2e-3
            assert any(form in cls.recipe for form in forms), (name, key, cls.recipe)
    assert cls.validate_every == VALIDATE_EVERY.get(name, 0)


def test_methods_command_shows_each_recipe(capsys, monkeypatch):
    from personalize import cli
    from test_bad_input import run_cli

    monkeypatch.setattr(cli.out_console, "width", 1000)
    code, out, err = run_cli(capsys, ["methods"])
    assert code == 0, err
    for name in registry.names():
        assert registry.get(name).recipe in out, name
    code, out, err = run_cli(capsys, ["methods", "textual-inversion"])
    assert code == 0 and registry.get("textual-inversion").recipe in out, err


@pytest.fixture(scope="module")
def ti_runs(tmp_path_factory, _tiny_master):
    """One textual-inversion step on `tiny` per clipping setting (same seed, same photos): the trained vector."""
    from personalize import load_concept, train

    root = tmp_path_factory.mktemp("clip")
    photos = make_photos(root / "photos", n=2)
    runs = {}
    for label, extra in {"default": {}, "zero": {"max_grad_norm": 0}, "tiny": {"max_grad_norm": 1e-12}}.items():
        path = train(copy.deepcopy(_tiny_master), photos, token="<disc>", superclass="ball",
                     out=root / f"{label}.safetensors", method="textual-inversion", progress=False,
                     settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0, **extra})
        runs[label] = load_concept(path).tensors["embedding"]
    return runs


def test_trainer_clips_only_when_the_method_does(ti_runs):
    # textual inversion's default is no clipping: the same update as max_grad_norm 0 (off) ...
    assert ti_runs["default"].equal(ti_runs["zero"])
    # ... and a different one from clipping the gradient to (almost) nothing, which AdamW's eps then damps
    assert not ti_runs["default"].allclose(ti_runs["tiny"])


def test_an_evaluator_without_validate_every_validates_every_25_steps(photos):
    from personalize.cli.train import _validation
    from personalize.evaluation.validation import DEFAULT_PROMPTS, SamplingValidator

    settings = {}
    validator = _validation(settings, None, "toyworld:split_triangle", None, photos, "cpu")
    assert validator.every == 25 and settings["validation_every"] == 25  # samples on the same cadence
    assert _validation({}, None, None, None, photos, "cpu") is None  # no evaluator: keep the last step
    assert _validation({"validation_every": 7}, None, "toyworld:split_triangle", None, photos, "cpu").every == 7
    assert _validation({}, 7, "toyworld:split_triangle", None, photos, "cpu").every == 7  # the older spelling
    # Perfusion §4.4: 8 validation prompts (one sample each by default)
    assert len(DEFAULT_PROMPTS) == 8 and len(set(DEFAULT_PROMPTS)) == 8
    assert SamplingValidator(25, DEFAULT_PROMPTS).num_seeds == 1
