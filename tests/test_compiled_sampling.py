"""Sampling with the denoiser compiled and concepts attached (issue 28, item 3): knob changes reach the compiled
graph as tensors, so ``handle.set()`` never recompiles, and the compiled samples equal the eager ones.

The backend (:func:`counting_backend`) counts the frames dynamo compiles and runs each traced graph as is, as
torch's ``eager`` backend does (no code generation: fast on CPU, and exact against eager sampling);
``error_on_recompile`` turns any recompile into an error."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch._dynamo

from conftest import FAST, make_photos
from personalize import attach, train
from personalize.generation import compiled_denoiser, generate

pytestmark = pytest.mark.usefixtures("keep_compile_settings")


@pytest.fixture
def lora_concept(tmp_path_factory, _tiny_master):
    """A DreamBooth-LoRA concept trained for one step at a high lr (its delta must move the samples)."""
    root = tmp_path_factory.mktemp("lora")
    return train(copy.deepcopy(_tiny_master), make_photos(root / "photos"), token="<disc>", superclass="ball",
                 out=root / "lora.safetensors", method="dreambooth-lora", settings={**FAST, "steps": 1, "lr": 5e-2},
                 progress=False)


def counting_backend():
    """A torch.compile backend: the traced graph itself (torch's ``eager`` backend), counting the frames compiled
    in its ``frames`` list (a plain function: dynamo runs a callable object's graphs far slower on CPU)."""
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    backend.frames = frames
    return backend


@pytest.fixture
def no_recompiles():
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield
    finally:
        torch._dynamo.reset()


def _sample(pipe, prompt: str = "a photo of a <disc>") -> torch.Tensor:
    return pipe(prompt, num_inference_steps=1, guidance_scale=6.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_knobs_reach_the_compiled_unet_without_recompiling(tiny, trained_concept, lora_concept, no_recompiles,
                                                         monkeypatch):
    """Perfusion (beta, tau, gate) and DreamBooth-LoRA (scale) attached together, the UNet traced once: each knob
    setting in turn samples eagerly and compiled; the two are equal, nothing recompiles, and every change moves
    the compiled samples (the knobs are live graph inputs, not constants)."""
    counter = counting_backend()
    settings = [{}, {"beta": 0.4, "tau": 0.3}, {"gate": "off"}, {"scale": 0.3}]
    outputs = []
    with attach(tiny, [trained_concept, (lora_concept, {"token": "<dl>"})]) as handle:
        for knobs in settings:
            handle.set(**knobs)
            eager = _sample(tiny)
            with compiled_denoiser(tiny, backend=counter):
                compiled = _sample(tiny)
            assert len(counter.frames) >= 1, "the UNet did not run compiled"
            frames = frames if outputs else len(counter.frames)
            assert len(counter.frames) == frames, f"{knobs} recompiled the UNet"
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
            outputs.append(compiled)
        for knobs, a, b in zip(settings[1:], outputs, outputs[1:]):
            assert not torch.equal(a, b), f"{knobs} did not change the compiled samples: the tensor path is dead"

        # generate(compile=True): the same compiled UNet (torch.compile given the same backend), the eager images
        monkeypatch.setattr(torch, "compile", lambda fn, backend=None, mode=None, _real=torch.compile:
                            _real(fn, backend=counter))
        compiled_during = []
        eager_images = generate(tiny, "a photo of a <disc>", steps=1, resolution=32)
        images = generate(tiny, "a photo of a <disc>", steps=1, resolution=32, compile=True,
                          on_step=lambda n: compiled_during.append("forward" in vars(tiny.unet)))
        assert compiled_during == [True] and len(counter.frames) == frames
        assert [img.tobytes() for img in images] == [img.tobytes() for img in eager_images]
        assert "forward" not in vars(tiny.unet)  # eager again after the call


def test_a_unet_compiled_by_the_user_follows_knob_changes(tiny, trained_concept):
    """``pipe.unet.compile()`` without :func:`compiled_denoiser` (no tensors prepared): a knob change retraces
    with the new values instead of reading the old gate (the compiled samples equal the eager ones)."""
    torch._dynamo.reset()
    try:
        with attach(tiny, trained_concept) as handle:
            eager = [_sample(tiny), handle.set(beta=0.4) and _sample(tiny)]
            handle.set(beta=None)
            tiny.unet.compile(backend=counting_backend())
            compiled = [_sample(tiny), handle.set(beta=0.4) and _sample(tiny)]
        assert not torch.equal(eager[0], eager[1])
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch._dynamo.reset()


def test_lag_switches_without_recompiling_and_equals_eager(tiny, trained_residuals, no_recompiles):
    """Residuals' ``lag`` is a 0/1 tensor in the compiled graph (the maps are captured either way): on, off, on
    is traced once and each state equals eager sampling bit for bit; leaving the block stops the capture LAG off
    does not need."""
    counter = counting_backend()
    from personalize.edits.attention_maps import attention_maps

    with attach(tiny, trained_residuals) as handle:
        outputs = []
        for lag in (True, False, True):
            handle.set(lag=lag)
            eager = _sample(tiny, "a photo of a <disc> ball")
            with compiled_denoiser(tiny, backend=counter):
                compiled = _sample(tiny, "a photo of a <disc> ball")
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
            outputs.append(compiled)
        assert not torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
        handle.set(lag=False)
        assert not attention_maps(tiny).watchers
    assert len(counter.frames) == 1


def test_a_concept_with_lag_off_takes_no_pixel_from_one_with_lag_on(tiny, trained_residuals, no_recompiles):
    """Compiled, both concepts' maps are captured; the one with LAG off must not take part in the pixel contest
    (eager never computes its map), so the samples equal eager for every on/off pair without recompiling."""
    counter = counting_backend()
    from personalize.concept import load_concept

    second = load_concept(trained_residuals).with_token("<disc2>")
    prompt = "a photo of a <disc> ball next to a <disc2> ball"
    with attach(tiny, trained_residuals) as first, attach(tiny, second) as other:
        for lags in ((True, True), (True, False), (False, True)):
            first.set(lag=lags[0])
            other.set(lag=lags[1])
            eager = _sample(tiny, prompt)
            with compiled_denoiser(tiny, backend=counter):
                compiled = _sample(tiny, prompt)
            torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert len(counter.frames) == 1


def test_generate_compile_flag_samples_compiled(capsys, tmp_path, monkeypatch):
    """``personalize generate --compile`` samples inside :func:`compiled_denoiser` (recorded here, no trace)."""
    import contextlib

    import personalize.generation as generation
    from test_bad_input import run_cli

    entered = []
    monkeypatch.setattr(generation, "compiled_denoiser",
                        lambda pipe: entered.append(pipe) or contextlib.nullcontext())
    args = ["generate", "--base", "tiny", "--prompt", "a ball", "--num-images", "1", "--steps", "1",
            "--resolution", "32", "--device", "cpu"]
    code, _, err = run_cli(capsys, [*args, "--out", tmp_path / "eager"])
    assert code == 0 and not entered, err
    code, _, err = run_cli(capsys, [*args, "--out", tmp_path / "compiled", "--compile"])
    assert code == 0 and len(entered) == 1, err


def test_compile_cache_lives_in_the_package_cache(monkeypatch, tmp_path):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from personalize.paths import cache_dir, use_compile_cache

    inductor_config.fx_graph_cache = False  # put back by _keep_compile_settings
    functorch_config.enable_autograd_cache = False
    folder = use_compile_cache()
    assert folder == cache_dir("torch-compile") and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    assert inductor_cache_dir() == str(folder)  # where inductor will write
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    mine = tmp_path / "my-inductor-cache"  # a user's own setting is kept
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(mine))
    assert use_compile_cache() == mine and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(mine)
