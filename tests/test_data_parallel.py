"""One concept trained by two processes (torchrun, gloo on the CPU) equals one process with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from personalize import train
from personalize.concept import load_concept

STEPS = {"steps": 3, "batch_size": 4, "checkpoint_every": 0, "masks": "none"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "personalize.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", ["perfusion", "residuals"])
def test_two_processes_train_what_one_process_trains(tiny, photos, tmp_path, method):
    one = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "one.safetensors", method=method,
                settings=STEPS, progress=False, device="cpu")
    two = tmp_path / "two.safetensors"
    result = _launch(["train", "--base", "tiny", "--images", str(photos), "--token", "<disc>", "--superclass", "ball",
                      "--method", method, "--steps", "3", "--batch-size", "4", "--checkpoint-every", "0",
                      "--device", "cpu", "--masks", "none", "--out", str(two)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote concept") == 1  # said once, by the main process
    a, b = load_concept(one).tensors, load_concept(two).tensors
    assert set(a) == set(b)
    for k in a:  # the same global batch and averaged gradients: equal up to float summation order
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
    assert not list(tmp_path.glob("two.safetensors.ckpt*"))  # no checkpoint folder left by checkpoint_every 0


def test_a_global_batch_that_does_not_split_is_refused(photos, tmp_path):
    result = _launch(["train", "--base", "tiny", "--images", str(photos), "--token", "<disc>", "--superclass", "ball",
                      "--steps", "1", "--batch-size", "3", "--device", "cpu", "--masks", "none", "--out", str(tmp_path / "c.safetensors")])
    assert result.returncode != 0
    assert "does not split over 2 processes" in result.stderr
    assert not (tmp_path / "c.safetensors").exists()
