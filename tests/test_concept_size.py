"""Perfusion's per-concept size on an SD 1.5-shaped UNet (meta device) and the shapes it is computed from."""
import importlib.util
from pathlib import Path

from personalize.concept import load_concept
from personalize.methods.perfusion import Perfusion
from personalize.sd_shapes import sd15_unet


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "concept_size.py"
    spec = importlib.util.spec_from_file_location("concept_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sd15_perfusion_concept_fits_the_budget():
    rows = {r["method"]: r for r in _benchmark().measure()}
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
