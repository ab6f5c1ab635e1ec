"""The compiled training step: which runs compile their denoiser, and how.

On a GPU the eager denoiser issues thousands of small kernels per step, each launched by the host, so a step
costs about the same at batch 1 and batch 16 (docs/PERFORMANCE.md, the H200 suite). ``torch.compile`` with
``mode="reduce-overhead"`` removes that cost: inductor fuses the kernels and CUDA graphs replay the forward's and
the backward's kernels with one launch each. Replay needs static shapes, which the trainer has unless
``--buckets`` is on (one batch size, one resolution); so a CUDA run without buckets compiles by default, and
``--no-compile`` turns it off. The state a method changes between steps (Perfusion's i* projection, the gate)
is updated in place, so the compiled graph keeps reading the same tensors: nothing recompiles and nothing is
captured again (``tests/test_compiled_training.py`` trains every method, on SD and on the diffusion transformers,
with ``error_on_recompile``).
"""
from __future__ import annotations

import torch

from ..errors import BadInputError
from ..paths import use_compile_cache

MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BadInputError(f"--compile-mode {mode!r}: use one of {', '.join(MODES)}")


def compile_mode(setting: bool | None, mode: str, device: torch.device, static_shapes: bool) -> str | None:
    """The ``torch.compile`` mode this run's step uses, or None (eager).

    ``setting``: the ``compile`` setting (None: automatic, on for CUDA with ``static_shapes``)."""
    check_mode(mode)
    if setting is None:
        setting = torch.device(device).type == "cuda" and static_shapes
    return mode if setting else None


def training_denoiser(denoiser: torch.nn.Module, mode: str | None):
    """``denoiser`` compiled for training in ``mode`` (None: the module itself). Shapes are static
    (``dynamic=False``): a changed shape compiles once more rather than making every kernel shape-generic.
    Compiled artifacts go to the package cache, so the next run of the same model skips most of the compiling."""
    if mode is None:
        return denoiser
    use_compile_cache()
    return torch.compile(denoiser, mode=mode, dynamic=False)


def mark_step_begin(mode: str | None) -> None:
    """Under CUDA graphs, tell torch a new training step begins: the previous step's graph outputs may be
    overwritten (without this, cudagraph trees cannot tell a new step from a second forward in the same one)."""
    if mode in ("reduce-overhead", "max-autotune"):  # the modes that capture CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
