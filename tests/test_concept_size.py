"""Concept sizes on SD 1.5, SD 2.1 and SDXL shapes (meta device), checked against counts made here from the
published configs, and the shapes they are computed from."""
import importlib.util
from pathlib import Path

import pytest

from personalize.concept import load_concept
from personalize.methods.perfusion import Perfusion
from personalize.sd_shapes import SD21_UNET, SDXL_UNET, sd15_unet, unet


def _benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "concept_size.py"
    spec = importlib.util.spec_from_file_location("concept_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows():
    return {(r["base"], r["method"]): r for r in _benchmark().measure()}


def test_sd15_perfusion_concept_fits_the_budget(rows):
    assert rows["sd15", "perfusion"]["bytes"] <= 60_000
    assert rows["sd15", "perfusion"]["tensor_bytes"] == 4 * (12_480 + 768 + 768)  # o*_V of 16 layers, i*, token
    assert rows["sd15", "perfusion (trained K)"]["tensor_bytes"] == 4 * (2 * 12_480 + 768 + 768)


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
    assert rows["sd15", "textual-inversion (1 vector)"]["tensor_bytes"] == 4 * 768
    # rank 4 on q/k/v/out of 32 attention modules: 3.19 MB, the size of diffusers' own SD 1.5 LoRA files
    assert rows["sd15", "dreambooth-lora (rank 4, UNet)"]["tensor_bytes"] == 3_188_736
    assert rows["sd15", "dreambooth-lora (rank 4, UNet)"]["tensors"] == 2 * 4 * 32
    # dW_K and dW_V of the 16 cross-attentions (12,480 outputs in all, 768 inputs) + one token per concept:
    # the paper's ~75 MB
    assert rows["sd15", "custom-diffusion (1 concept)"]["tensor_bytes"] == 4 * 768 * 2 * 12_480 + 4 * 768
    assert rows["sd15", "custom-diffusion (2 concepts)"]["tensor_bytes"] == 4 * 768 * 2 * 12_480 + 2 * 4 * 768
    db = rows["sd15", "dreambooth (header; weights in OUT.pipeline/)"]
    assert db["tensors"] == 0 and db["pipeline_bytes"] > 4_000_000_000


# ----------------------------------------------------------------------------- SD 2.1 and SDXL
def _transformer_layers(config: dict) -> list[tuple[int, int]]:
    """``(channels, inner transformer layers)`` of every transformer block, counted from a UNet config the way
    diffusers lays the blocks out: ``layers_per_block`` per attention level going down, one in the middle,
    ``layers_per_block + 1`` per attention level going up (independent of the model code)."""
    channels, n = config["block_out_channels"], config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", (1,) * len(channels))
    attn_down = [i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")]
    attn_up = [len(channels) - 1 - i for i, t in enumerate(config["up_block_types"]) if t.startswith("CrossAttn")]
    blocks = [(channels[i], depth[i]) for i in attn_down for _ in range(n)] + [(channels[-1], depth[-1])]
    return blocks + [(channels[i], depth[i]) for i in attn_up for _ in range(n + 1)]


def _cross_widths(config: dict) -> list[int]:
    """Output width of every cross-attention's to_k/to_v (one per inner transformer layer)."""
    return [c for c, layers in _transformer_layers(config) for _ in range(layers)]


def test_the_counts_here_agree_with_diffusers_layout():
    """The independent count above matches the meta UNets (70 cross-attentions and 11 blocks on SDXL)."""
    from personalize.edits.placement import cross_attention_layers, transformer_blocks

    for name, config in (("sd21", SD21_UNET), ("sdxl", SDXL_UNET)):
        model = unet(name)
        assert sorted(a.to_v.out_features for _, a in cross_attention_layers(model)) == sorted(_cross_widths(config))
        assert len(transformer_blocks(model)) == len(_transformer_layers(config))
    assert len(_cross_widths(SDXL_UNET)) == 70 and sum(_cross_widths(SDXL_UNET)) == 83_200
    assert sum(_cross_widths(SD21_UNET)) == 12_480


def test_sd21_sizes(rows):
    o_v, text = sum(_cross_widths(SD21_UNET)), 1024  # OpenCLIP ViT-H
    assert rows["sd21", "perfusion"]["tensor_bytes"] == 4 * (o_v + text + text)
    assert rows["sd21", "textual-inversion (1 vector)"]["tensor_bytes"] == 4 * text
    assert rows["sd21", "custom-diffusion (1 concept)"]["tensor_bytes"] == 4 * (2 * o_v * text + text)
    assert rows["sd21", "residuals (rank 0.05 x channels)"]["trainable"] == 1_239_040  # the same blocks as SD 1.5


def test_sdxl_perfusion_is_kilobyte_scale(rows):
    """o*_V over the 70 cross-attentions + the token (768 + 1280) + i* (2048); the K/V edits read the 2048-wide
    context. 349 KB of fp32 tensors: the issue's 250 KB goal is out of reach in fp32 for 70 layers (the floor
    is 83,200 o*_V floats = 333 KB); the bound here keeps it where it is."""
    o_v = sum(_cross_widths(SDXL_UNET))
    row = rows["sdxl", "perfusion"]
    assert row["tensor_bytes"] == 4 * (o_v + (768 + 1280) + 2048) == 349_184
    assert row["layers"] == 70 and row["o_v_floats"] == o_v
    assert row["bytes"] < 400_000 and row["of_goal"] == round(row["bytes"] / 250_000, 3)
    assert rows["sdxl", "perfusion (trained K)"]["tensor_bytes"] == 4 * (2 * o_v + 2048 + 2048)


def test_sdxl_sizes_of_the_other_methods(rows):
    widths, text = _cross_widths(SDXL_UNET), 2048
    # residuals: LoRA A (r, m) + B (m, r) on each of the 11 blocks' Linear proj_out, r = 0.05 m
    trainable = sum(2 * round(0.05 * c) * c for c, _ in _transformer_layers(SDXL_UNET))
    assert trainable == 1_187_840
    res = rows["sdxl", "residuals (rank 0.05 x channels)"]
    assert res["trainable"] == trainable and res["tensor_bytes"] == 4 * (trainable + text)
    assert rows["sdxl", "textual-inversion (1 vector)"]["tensor_bytes"] == 4 * (768 + 1280)  # clip_l | clip_g
    # rank 4 on self-attention q/k/v/out (c -> c) and cross-attention q/out (c -> c), k/v (2048 -> c)
    lora = sum(4 * (6 * 2 * c + 2 * (text + c)) for c in widths)
    assert rows["sdxl", "dreambooth-lora (rank 4, UNet)"]["tensor_bytes"] == 4 * lora
    cd = rows["sdxl", "custom-diffusion (2 concepts)"]
    assert cd["tensor_bytes"] == 4 * (2 * sum(widths) * text + 2 * text) and cd["exact"] is False
    assert cd["bytes"] >= cd["tensor_bytes"]
    # DreamBooth writes the whole pipeline: diffusers' SDXL UNet (2.57 B) + CLIP-L + bigG + VAE in fp32
    assert rows["sdxl", "dreambooth (header; weights in OUT.pipeline/)"]["pipeline_bytes"] == 4 * (
        2_567_463_684 + 123_060_480 + 694_659_840 + 83_653_863)


def test_sdxl_rows_match_the_methods_built_on_a_meta_sdxl_pipeline(rows):
    """Each method, constructed on a meta SDXL pipeline (tokens in both tables, K/V on the 2048-wide context),
    holds exactly the floats its row counts: trainables plus what it stores frozen (i*, a frozen V*)."""
    import torch

    from personalize.methods import get
    from personalize.sd_shapes import pipeline

    stored_frozen = {"perfusion": 2048, "residuals": 2048}  # i*; Residuals' V* (not trained by default)
    pipe = pipeline("sdxl", "meta")  # one pipeline, one token per method
    for i, (name, label) in enumerate( (("perfusion", "perfusion"), ("residuals", "residuals (rank 0.05 x channels)"),
                        ("textual-inversion", "textual-inversion (1 vector)"),  # (DreamBooth-LoRA: 10 s of peft)
                        ("custom-diffusion", "custom-diffusion (1 concept)"))):
        cls = get(name)
        extra = (torch.eye(2048, device="meta"),) if name == "perfusion" else ()  # C^-1 over the context
        method = cls(pipe, f"<my-teddy-{i}>", "teddy", cls.make_config(), *extra)
        floats = sum(p.numel() for g in method.param_groups() for p in g["params"]) + stored_frozen.get(name, 0)
        assert 4 * floats == rows["sdxl", label]["tensor_bytes"], name
