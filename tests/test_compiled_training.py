"""The compiled training step (issue 28, item 1): on by default where it pays, never recompiled, equal to eager."""
from __future__ import annotations

import functools

import pytest
import torch

from personalize import train
from personalize.base import load_base
from personalize.errors import BadInputError
from personalize.training.compiled import compile_mode

pytestmark = pytest.mark.usefixtures("keep_compile_settings")

FAST = {"steps": 3, "batch_size": 2, "checkpoint_every": 0, "masks": "none", "flip_p": 0.0}
EXTRA = {"dreambooth": {"prior_loss_weight": 0.0}, "dreambooth-lora": {"prior_loss_weight": 0.0},
         "custom-diffusion": {"prior_loss_weight": 0.0}}


@pytest.mark.parametrize("setting,device,static,expected", [
    (None, "cuda", True, "reduce-overhead"),  # the default on a GPU: CUDA graphs
    (None, "cuda", False, None),  # --buckets: shapes change between steps, so no graphs by default
    (None, "cpu", True, None),  # a CPU gains nothing from launch elimination
    (False, "cuda", True, None),  # --no-compile
    (True, "cpu", True, "reduce-overhead"),  # --compile asked for
    (True, "cuda", False, "reduce-overhead"),
])
def test_compile_is_on_by_default_only_for_static_cuda_runs(setting, device, static, expected):
    assert compile_mode(setting, "reduce-overhead", torch.device(device), static) == expected


def test_a_bad_compile_mode_is_refused_before_any_work(tiny, photos, tmp_path):
    with pytest.raises(BadInputError, match="--compile-mode 'fast'"):
        train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
              settings={**FAST, "compile": True, "compile_mode": "fast"}, progress=False, device="cpu")
    assert not any(tmp_path.glob("c.*"))


def _steps(method: str) -> int:
    """Perfusion's state moves every step (i* set at step 1, then averaged): three steps; two for the others."""
    return 3 if method == "perfusion" else 2


def _train(pipe, photos, out, method, settings) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Train; returns each step's loss and each step's gradients (as the optimizer saw them)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    losses, grads = [], []
    record = register_optimizer_step_pre_hook(lambda opt, args, kwargs: grads.append(
        [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
    try:
        train(pipe, photos, token="<disc>", superclass="ball", out=out, method=method,
              settings={**FAST, "steps": _steps(method), **EXTRA.get(method, {}), **settings}, progress=False,
              device="cpu", callbacks=[lambda step, loss, m: losses.append(loss.clone())])
    finally:
        record.remove()
    return losses, grads


def _assert_equal_within_rounding(compiled, eager):
    """The same losses at every step, and the same first-step gradients (both runs start from one state and
    batch; later steps' parameters differ by the rounding that Adam's normalised first steps amplify)."""
    (losses, grads), (eager_losses, eager_grads) = compiled, eager
    assert len(losses) == len(eager_losses) >= 2
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-3, atol=1e-6)
    assert len(grads[0]) == len(eager_grads[0]) > 0
    for g, e in zip(grads[0], eager_grads[0]):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


@pytest.mark.parametrize("base,method", [("tiny", m) for m in ("perfusion", "residuals", "textual-inversion",
                                                                 "dreambooth", "dreambooth-lora", "custom-diffusion")]
                         + [("tiny-sd3", "perfusion"), ("tiny-flux", "perfusion")])
def test_every_method_trains_compiled_without_recompiling_and_equal_to_eager(photos, tmp_path, monkeypatch, base,
                                                                             method):
    """AOT autograd traces the forward and the backward as inductor would (no code generated): 2-3 steps with
    ``error_on_recompile`` (Perfusion's i* moves every step and its projection is rewritten in place; on a
    diffusion transformer i*_l moves inside the forward, and the projection is computed in the graph), and the
    losses and gradients equal the eager run's within float32 rounding."""
    import copy

    import torch._dynamo

    tiny = load_base(base)
    eager = _train(copy.deepcopy(tiny), photos, tmp_path / "eager.safetensors", method, {"compile": False})
    traced = []
    real_compile = torch.compile

    def compile_aot(module, **kwargs):
        traced.append(kwargs)
        return real_compile(module, **{**kwargs, "backend": "aot_eager", "mode": None})

    monkeypatch.setattr(torch, "compile", compile_aot)
    torch._dynamo.reset()
    try:  # config.patch, not monkeypatch: monkeypatch's undo deletes the option (torch then hides it)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _train(tiny, photos, tmp_path / "compiled.safetensors", method, {"compile": True})
    finally:
        torch._dynamo.reset()
    assert traced == [{"mode": "reduce-overhead", "dynamic": False}]
    _assert_equal_within_rounding(compiled, eager)
