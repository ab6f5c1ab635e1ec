"""The trainer's fast path (issue 15) and the GPU suite's CPU dry run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalize import train
from personalize.training import FrozenInComputeDtype

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 0, "masks": "none"}


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, m in enumerate((pipe.unet, pipe.text_encoder, pipe.vae))
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("method", ["perfusion", "dreambooth"])
def test_bf16_training_holds_frozen_weights_in_bf16_and_restores_them_exactly(tiny, photos, tmp_path, method):
    before = {k: v.clone() for k, v in _weights(tiny).items()}
    seen = {}

    def look(step, loss, m):
        trainable = {id(p) for g in m.param_groups() for p in g["params"]}
        seen["frozen"] = {p.dtype for mod in (tiny.unet, tiny.text_encoder, tiny.vae) for p in mod.parameters()
                          if id(p) not in trainable}
        seen["trainable"] = {p.dtype for g in m.param_groups() for p in g["params"]}
        seen["loss"] = loss

    extra = {"prior_loss_weight": 0.0} if method == "dreambooth" else {}
    train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors", method=method,
          settings={**FAST, "mixed_precision": "bf16", **extra}, progress=False, callbacks=[look], device="cpu")
    assert seen["frozen"] == {torch.bfloat16}
    assert seen["trainable"] == {torch.float32}  # the master weights stay fp32
    assert isinstance(seen["loss"], torch.Tensor) and seen["loss"].ndim == 0
    after = _weights(tiny)
    assert set(after) == set(before)
    for k, v in before.items():
        if method == "dreambooth" and k.startswith("0."):
            continue  # DreamBooth trains the UNet itself (and puts it back after writing its pipeline folder)
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k


def test_frozen_weights_untouched_without_mixed_precision(tiny):
    frozen = FrozenInComputeDtype(tiny, [], "no")
    frozen.cast()
    assert {p.dtype for p in tiny.unet.parameters()} == {torch.float32}
    frozen.restore()


def test_gpu_suite_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "suite"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out),
           "--parts", "train,sample,eval", "--methods", "perfusion"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    by = {}
    for row in rows:
        by.setdefault(row["bench"], []).append(row)
    steps = sorted((r["method"], r["step"], r.get("compile_cache")) for r in by["train"])
    assert steps == [("perfusion", "eager", None), ("perfusion", "graphs", "cold"), ("perfusion", "graphs", "warm")]
    for row in by["train"]:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["tflop_per_step"] > 0  # FLOPs counted on a real (eager) step
        assert row["step"] == "eager" or row["speedup_vs_eager"] > 0
    assert sorted((r["batch"], r["denoiser"]) for r in by["sample"]) == [(1, "compiled"), (1, "eager"), (2, "eager")]
    for row in by["sample"]:
        assert row["bare_s"] > 0 and row["perfusion_s"] > 0 and row["residuals_lag_s"] > 0
    assert by["eval_tensors"][0]["images_per_s"] > 0
    assert {r["workers"] for r in by["eval_files"]} == {0, 2} and all(r["files"] == 16 for r in by["eval_files"])
    assert all(r["decode_limit_per_s"] > 0 and r["of_decode_limit"] > 0 for r in by["eval_files"])
    assert by["done"]


@pytest.mark.parametrize("method", ["perfusion", "residuals", "textual-inversion", "dreambooth-lora",
                                    "custom-diffusion"])
def test_edit_wrappers_trace_without_graph_breaks(tiny, method):
    """torch.compile sees the UNet with a method's training edits installed as one graph."""
    from personalize.methods import get
    from personalize.training import resolve_settings

    cls = get(method)
    _, config = resolve_settings(cls, {})
    trainable = cls.for_training(tiny, "<disc>", "ball", config)
    try:
        ids = tiny.tokenizer(["a photo of a <disc>"] * 2, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        hidden = tiny.text_encoder(ids)[0]
        trainable.on_text_encoded(ids, hidden)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda x, t, c: tiny.unet(x, t, c).sample)(
            torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), hidden)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        assert explained.graph_count == 1
    finally:
        trainable.remove()
        torch._dynamo.reset()


@pytest.mark.parametrize("method,settings,cached", [
    ("residuals", {}, True),
    ("residuals", {"train_token": True}, False),
    ("dreambooth-lora", {"train_text_encoder": True}, False),
    ("perfusion", {}, False),
])
def test_text_encoder_outputs_are_reused_only_when_the_text_path_is_frozen(tiny, photos, tmp_path, method, settings,
                                                                            cached):
    calls = []
    handle = tiny.text_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors", method=method,
              settings={**FAST, "steps": 4, "batch_size": 4, "flip_p": 0.0, **settings}, progress=False,
              device="cpu")
    finally:
        handle.remove()
    training_calls = calls[-4:] if not cached else calls
    if cached:  # only prompts never seen before are encoded: fewer rows than 4 steps x 4 prompts
        assert sum(calls) < 16
    else:
        assert training_calls == [4, 4, 4, 4]


def test_reused_text_encodings_train_the_same_residuals(tiny, photos, tmp_path, monkeypatch):
    """Caching is an optimisation only: the trained tensors are identical with and without it."""
    import copy

    from personalize.concept import load_concept
    from personalize.methods.residuals import Residuals

    fresh = copy.deepcopy(tiny)
    a = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "a.safetensors", method="residuals",
              settings={**FAST, "steps": 3}, progress=False, device="cpu")
    monkeypatch.setattr(Residuals, "text_path_frozen", lambda self: False)
    b = train(fresh, photos, token="<disc>", superclass="ball", out=tmp_path / "b.safetensors", method="residuals",
              settings={**FAST, "steps": 3}, progress=False, device="cpu")
    ta, tb = load_concept(a).tensors, load_concept(b).tensors
    assert set(ta) == set(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("method", ["perfusion", "residuals", "dreambooth-lora", "custom-diffusion"])
def test_methods_keep_pytorch_sdpa_attention(tiny, method):
    """Edits wrap projections; the attention itself stays torch's scaled_dot_product_attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from personalize.methods import get
    from personalize.training import resolve_settings

    cls = get(method)
    trainable = cls.for_training(tiny, "<disc>", "ball", resolve_settings(cls, {})[1])
    try:
        processors = tiny.unet.attn_processors
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values()), \
            {type(p).__name__ for p in processors.values()}
    finally:
        trainable.remove()


def test_gpu_suite_dry_run_on_flux_skips_refused_methods_and_times_the_familys_script(tmp_path):
    """``--base flux``: DreamBooth-LoRA trains (no method is refused on Flux any more, so no row is skipped); the
    family's diffusers script is run from ``--anchors`` with the same batch, resolution and precision and timed
    from its step log (a stand-in script here: it records its arguments and writes the log the anchors' step
    timer writes)."""
    anchors = tmp_path / "anchors"
    (anchors / "diffusers-examples").mkdir(parents=True)
    (anchors / "diffusers-examples" / "train_dreambooth_lora_flux.py").write_text(
        "import json, os, sys\n"
        "json.dump(sys.argv[1:], open(os.environ['ARGS_OUT'], 'w'))\n"
        "json.dump({'stamps': [0.5 * i for i in range(10)], 'peak_gib': None}, open(os.environ['STEP_LOG'], 'w'))\n")
    out = tmp_path / "suite"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--base", "flux", "--out", str(out),
           "--parts", "train,scripts", "--methods", "dreambooth-lora", "--anchors", str(anchors), "--train-steps", "eager"]
    env = {**os.environ, "ARGS_OUT": str(tmp_path / "args.json")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["bench"] == "skipped"]
    (ours,) = [r for r in rows if r["bench"] == "train"]
    assert ours["method"] == "dreambooth-lora" and "error" not in ours and ours["step_s"] > 0
    (script,) = [r for r in rows if r["bench"] == "diffusers_script"]
    assert script["script"] == "train_dreambooth_lora_flux" and script["step_s"] == 0.5
    assert script["speedup_ours_vs_script"] == round(0.5 / ours["step_s"], 3)
    args = json.loads((tmp_path / "args.json").read_text())
    given = dict(zip(args[::2], args[1::2]))
    assert (given["--resolution"], given["--train_batch_size"], given["--mixed_precision"]) == (
        "32", str(ours["batch"]), "no")  # the CPU dry run: the tiny base's size, our batch, fp32
