"""Configs of real-size diffusion transformers (Flux.1-dev, SD3.5-large, SD3.5-medium), for meta-device size checks:
random weights, the real shapes, the stock ``FluxPipeline`` / ``StableDiffusion3Pipeline``.

The values are those of the published diffusers configs (``transformer/``, ``text_encoder*/``, ``vae/``,
``scheduler/``) of ``black-forest-labs/FLUX.1-dev``, ``stabilityai/stable-diffusion-3.5-large`` and
``stabilityai/stable-diffusion-3.5-medium``, read from copies of those files in public repositories (no hub access
here; sources in ``docs/PERFORMANCE.md``, "Concept size on Flux.1-dev and SD3.5"), and checked by the parameter
counts of the models built here (``tests/test_concept_size.py``) against the published ones: the transformers have
11,901,408,320 (Flux.1-dev, "12 B"), 8,056,627,520 (SD3.5-large) and 2,243,171,520 (SD3.5-medium) parameters, and
with SD3's stored positional table (a persistent buffer, 192² or 384² x the width) 8,146,280,768 ("8.1 B") and
2,469,663,936 ("2.5 B"); the T5-XXL encoder 4,762,310,656 (T5 v1.1 XXL's 4.76 B encoder), CLIP-L 123,060,480
(123,650,304 with SD3's projection), CLIP-G 694,659,840 (as SDXL's), the 16-channel VAE 83,819,683. Fields left at
diffusers' / transformers' defaults are omitted. The tokenizers are stand-ins for shapes: the real CLIP BPE
tokenizer (``tokenizer.build_clip_tokenizer``) and the small offline T5 tokenizer (``tokenizer.build_t5_tokenizer``);
the T5 embedding has the real 32,128 rows.
"""
from __future__ import annotations

from .sd_shapes import SD15_TEXT, SDXL_TEXT_2

# black-forest-labs/FLUX.1-dev transformer/config.json: 19 joint + 38 single blocks, 24 heads of 128 (3,072 wide)
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# stabilityai/stable-diffusion-3.5-large transformer/config.json: 38 joint blocks, 38 heads of 64 (2,432 wide)
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                              attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                              caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                              qk_norm="rms_norm")
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X): 24 joint blocks 1,536 wide, the first
# 13 with a second, image-only attention (attn2)
SD35_MEDIUM_TRANSFORMER = dict(SD35_LARGE_TRANSFORMER, num_layers=24, num_attention_heads=24,
                               caption_projection_dim=1536, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# google/t5-v1_1-xxl's encoder (FLUX.1-dev text_encoder_2/config.json; SD3.5's text_encoder_3 is the same model)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
# CLIP-L and OpenCLIP bigG text towers (SD 1.5's and SDXL's, with the legacy eos_token_id 2 the FLUX.1 / SD3
# configs keep)
CLIP_L = dict(SD15_TEXT, eos_token_id=2)
CLIP_G = dict(SDXL_TEXT_2, eos_token_id=2)
# the 16-channel VAE of FLUX.1-dev (vae/config.json) and of SD3 / SD3.5 (shift and scaling factors differ)
_VAE16 = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, use_quant_conv=False,
              use_post_quant_conv=False, force_upcast=True)
FLUX_VAE = dict(_VAE16, shift_factor=0.1159, scaling_factor=0.3611)
SD3_VAE = dict(_VAE16, shift_factor=0.0609, scaling_factor=1.5305)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

#: name -> (pipeline class, transformer config, VAE config, hub id)
SHAPES = {
    "flux-dev": ("FluxPipeline", FLUX_DEV_TRANSFORMER, FLUX_VAE, "black-forest-labs/FLUX.1-dev"),
    "sd35-large": ("StableDiffusion3Pipeline", SD35_LARGE_TRANSFORMER, SD3_VAE,
                   "stabilityai/stable-diffusion-3.5-large"),
    "sd35-medium": ("StableDiffusion3Pipeline", SD35_MEDIUM_TRANSFORMER, SD3_VAE,
                    "stabilityai/stable-diffusion-3.5-medium"),
}


def _shape(name: str):
    if name not in SHAPES:
        raise ValueError(f"unknown real-size shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def hub_id(name: str) -> str:
    return _shape(name)[3]


def transformer(name: str, device: str = "meta"):
    """The transformer of the named shape; on ``meta`` no memory is allocated."""
    import diffusers
    import torch

    class_name, config = _shape(name)[:2]
    cls = diffusers.FluxTransformer2DModel if class_name == "FluxPipeline" else diffusers.SD3Transformer2DModel
    with torch.device(device):
        return cls(**config)


def pipeline(name: str, device: str = "meta", dtype=None):
    """A stock pipeline of the named shape with random weights (on ``meta``: shapes only): Flux.1-dev's CLIP-L
    (pooled) + T5-XXL, or SD3.5's CLIP-L + CLIP-G (both with projection) + T5-XXL; the tokenizers are the stand-ins
    of the module docstring (T5 at 512 ids, Flux's ``max_sequence_length``)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .families.flux import FLUX_DEV_SCHEDULER
    from .tokenizer import build_clip_tokenizer, build_t5_tokenizer

    import torch

    class_name, _, vae_cfg, _ = _shape(name)
    flux = class_name == "FluxPipeline"
    default = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:  # built in ``dtype``: Flux.1-dev in fp32 is 48 GB
        torch.set_default_dtype(dtype)
    try:
        with _skip_init(device):
            parts = _models(name, device, flux, vae_cfg)
    finally:
        torch.set_default_dtype(default)
    parts["tokenizer"] = build_clip_tokenizer()
    if flux:
        parts["tokenizer_2"] = build_t5_tokenizer(512)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    else:
        parts["tokenizer_2"] = build_clip_tokenizer()
        parts["tokenizer_2"].pad_token = "!"  # OpenCLIP bigG pads with "!"
        parts["tokenizer_3"] = build_t5_tokenizer(512)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    pipe = getattr(diffusers, class_name)(**parts)
    if dtype is not None:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _models(name: str, device: str, flux: bool, vae_cfg: dict) -> dict:
    """The transformer, the VAE and the text encoders of the named shape."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    parts = {"transformer": transformer(name, device)}
    with torch.device(device):
        parts["vae"] = AutoencoderKL(**vae_cfg)
        t5 = T5EncoderModel(T5Config(**T5_XXL))
        if flux:
            parts.update(text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)), text_encoder_2=t5)
        else:
            parts.update(text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                         text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)), text_encoder_3=t5)
    t5.tie_weights()  # T5's shared table is its encoder's embed_tokens (skipped with the initialisation on meta)
    return parts


def _skip_init(device: str):
    """On the meta device, no weight initialisation (there is nothing to initialise; it only costs time)."""
    import contextlib

    if str(device) != "meta":
        return contextlib.nullcontext()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()
