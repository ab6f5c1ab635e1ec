"""The tiny SD-1.x-shaped base model: configs, pipeline assembly and fp16 export."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

VOCAB_SIZE = 49408  # full SD 1.x CLIP vocabulary: real token ids work unchanged
MAX_LENGTH = 77

DEFAULT_ARCH: dict = {
    "vae_channels": [32, 64],  # 2 blocks -> 2x downsampling: 32x32 px -> 16x16x4 latents
    "vae_layers": 1,
    "latent_channels": 4,
    "unet_channels": [32, 64, 64],
    "unet_cross_attn": [False, True, True],  # transformer blocks at 8x8 and 4x4 (16x16: ResNet only)
    "unet_layers": 1,
    "unet_heads": 4,
    "text_hidden": 128,
    "text_layers": 3,
    "text_heads": 4,
    "resolution": 32,
}


def scheduler_config(prediction_type: str = "v_prediction", zero_snr: bool = False) -> dict:
    """SD 1.x's schedule; ``zero_snr`` rescales it to zero terminal SNR with trailing sampling timesteps
    (Lin et al. 2024), so the first sampling step sees pure noise and the caption, not low-frequency signal
    left in the latents at t = T, decides the layout."""
    extra = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if zero_snr else {}
    return dict(**extra,
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


def build_scheduler(prediction_type: str = "v_prediction", zero_snr: bool = False):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config(prediction_type, zero_snr))


def build_training_scheduler(prediction_type: str = "v_prediction", zero_snr: bool = False):
    from diffusers import DDPMScheduler

    cfg = scheduler_config(prediction_type, zero_snr)
    cfg.pop("set_alpha_to_one")
    return DDPMScheduler(**cfg)


def build_vae(arch: dict = DEFAULT_ARCH):
    from diffusers import AutoencoderKL

    ch = list(arch["vae_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(ch),
        up_block_types=["UpDecoderBlock2D"] * len(ch),
        block_out_channels=ch,
        layers_per_block=arch["vae_layers"],
        latent_channels=arch["latent_channels"],
        norm_num_groups=norm_groups(ch),
        sample_size=arch["resolution"],
    )


def norm_groups(channels) -> int:
    """Largest of 32/16/8/4 dividing every channel count (GroupNorm needs it)."""
    for g in (32, 16, 8, 4, 2, 1):
        if all(c % g == 0 for c in channels):
            return g
    return 1


def latent_size(arch: dict = DEFAULT_ARCH) -> int:
    return arch["resolution"] // 2 ** (len(arch["vae_channels"]) - 1)


def build_unet(arch: dict = DEFAULT_ARCH):
    from diffusers import UNet2DConditionModel

    ch = list(arch["unet_channels"])
    attn = list(arch.get("unet_cross_attn") or [True] * len(ch))
    return UNet2DConditionModel(
        sample_size=latent_size(arch),
        in_channels=arch["latent_channels"],
        out_channels=arch["latent_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=ch,
        layers_per_block=arch["unet_layers"],
        cross_attention_dim=arch["text_hidden"],
        attention_head_dim=arch["unet_heads"],
        norm_num_groups=norm_groups(ch),
        use_linear_projection=False,
    )


def build_text_encoder(arch: dict = DEFAULT_ARCH):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=arch["text_hidden"],
        intermediate_size=4 * arch["text_hidden"],
        num_hidden_layers=arch["text_layers"],
        num_attention_heads=arch["text_heads"],
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=arch["text_hidden"],
    )
    return CLIPTextModel(cfg)


def build_tokenizer():
    from personalize.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def assemble_pipeline(vae, text_encoder, unet, tokenizer=None, prediction_type: str = "v_prediction",
                      zero_snr: bool = False):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(prediction_type, zero_snr),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


CORPUS_SIZE = 4000


def caption_corpus(n: int = CORPUS_SIZE, seed: int = 7) -> list[str]:
    """``n`` captions drawn like the training captions: the base's own corpus for Perfusion's C
    (shipped as ``captions.txt`` beside the weights; the built-in SD noun corpus means nothing here)."""
    import random

    from ..datasets.toyworld.world import sample_scene, training_caption

    rng = random.Random(seed)
    return [training_caption(sample_scene(rng), rng) for _ in range(n)]


def export_pipeline(pipe, out_dir: os.PathLike | str, info: Optional[dict] = None) -> Path:
    """save_pretrained ``pipe`` as fp16 safetensors into ``out_dir`` (+ TRAINING.json with ``info``, and
    ``captions.txt``, the base's caption corpus)."""
    import copy

    import torch  # here, not at the top: the toy base's recipe (DEFAULT_ARCH) is read by --help

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(pipe)
    half.to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    load_as_float32(out)
    if info is not None:
        (out / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "captions.txt").write_text("\n".join(caption_corpus()) + "\n")
    return out


def load_as_float32(folder: os.PathLike | str) -> None:
    """Mark the text encoder's config float32 (weights stay fp16 on disk).

    transformers 5 loads a model in its config's dtype by default while diffusers loads float32, so a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` would otherwise mix fp16 and fp32 modules on CPU.
    """
    cfg_path = Path(folder) / "text_encoder" / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def folder_size_mb(path: os.PathLike | str) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
