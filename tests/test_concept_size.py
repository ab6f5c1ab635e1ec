"""Perfusion's per-concept size on an SD 1.5-shaped UNet (meta device) and the shapes it is computed from."""
import importlib.util
from pathlib import Path

import pytest

from personalize.concept import load_concept
from personalize.methods.perfusion import Perfusion
from personalize.sd_shapes import sd15_unet


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "concept_size.py"
    spec = importlib.util.spec_from_file_location("concept_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return {r["method"]: r for r in _benchmark().measure()}


def test_sd15_perfusion_concept_fits_the_budget(rows):
    assert rows["perfusion"]["bytes"] <= 60_000
    assert rows["perfusion"]["tensor_bytes"] == 4 * (12_480 + 768 + 768)  # o*_V of 16 layers, i*, token
    assert rows["perfusion (trained K)"]["tensor_bytes"] == 4 * (2 * 12_480 + 768 + 768)


def test_sd15_has_sixteen_cross_attention_layers():
    shapes = Perfusion.concept_shapes(sd15_unet("meta"), 768)
    o_v = [s for k, s in shapes.items() if k.startswith("o_v.")]
    assert len(o_v) == 16 and sum(s[0] for s in o_v) == 12_480


def test_shapes_match_a_real_concept(tiny, trained_concept):
    concept = load_concept(trained_concept)
    shapes = Perfusion.concept_shapes(tiny.unet, tiny.text_encoder.config.hidden_size)
    assert {k: tuple(v.shape) for k, v in concept.tensors.items()} == shapes


def test_sd15_sizes_of_the_baselines(rows):
    """Every baseline has a row; the tensor bytes are what the SD 1.5 shapes imply (fp32)."""
    assert rows["textual-inversion (1 vector)"]["tensor_bytes"] == 4 * 768
    # rank 4 on q/k/v/out of 32 attention modules: 3.19 MB, the size of diffusers' own SD 1.5 LoRA files
    assert rows["dreambooth-lora (rank 4, UNet)"]["tensor_bytes"] == 3_188_736
    assert rows["dreambooth-lora (rank 4, UNet)"]["tensors"] == 2 * 4 * 32
    # dW_K and dW_V of the 16 cross-attentions (12,480 outputs in all, 768 inputs) + one token per concept:
    # the paper's ~75 MB
    assert rows["custom-diffusion (1 concept)"]["tensor_bytes"] == 4 * 768 * 2 * 12_480 + 4 * 768
    assert rows["custom-diffusion (2 concepts)"]["tensor_bytes"] == 4 * 768 * 2 * 12_480 + 2 * 4 * 768
    db = rows["dreambooth (header; weights in OUT.pipeline/)"]
    assert db["tensors"] == 0 and db["pipeline_bytes"] > 4_000_000_000
