"""The trainer's fast path (issue 15) and the GPU suite's CPU dry run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalize import train
from personalize.training import FrozenInComputeDtype

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 0}


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
           "--parts", "train,sample,eval", "--methods", "perfusion,residuals"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    by = {}
    for row in rows:
        by.setdefault(row["bench"], []).append(row)
    assert {r["method"] for r in by["train"]} == {"perfusion", "residuals"}
    for row in by["train"]:
        assert "error" not in row, row
        assert row["step_s"] > 0 and row["tflop_per_step"] > 0  # FLOPs counted on a real step
    assert {r["batch"] for r in by["sample"]} == {1, 2}
    for row in by["sample"]:
        assert row["bare_s"] > 0 and row["perfusion_s"] > 0 and row["residuals_lag_s"] > 0
    assert by["eval_tensors"][0]["images_per_s"] > 0
    assert {r["workers"] for r in by["eval_files"]} == {0, 2} and all(r["files"] == 16 for r in by["eval_files"])
    assert by["done"]
