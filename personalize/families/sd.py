"""The UNet families: SD 1.x, SD 2.x and SDXL (DDPM noise schedule, ε- or v-prediction, CLIP text encoders).

- SD 1.x / 2.x: the text encoder's last hidden state is the UNet's context (``StableDiffusionPipeline
  .encode_prompt`` without ``clip_skip``);
- SDXL: each encoder's penultimate hidden state, concatenated on the feature axis (768 + 1280 = 2,048 wide on
  the real model), and the pooled, projected output of the second encoder, which the UNet reads with the
  ``add_time_ids`` (``StableDiffusionXLPipeline.encode_prompt`` / ``_get_add_time_ids``).

Both SDXL tokenizers share the CLIP BPE vocabulary and differ only in the padding token, so a token id means the
same word in both, and added tokens get the same ids in both.

The built-in random test bases (``tiny``, ``tiny-sd2``, ``tiny-sdxl``) are the families in miniature, built
from configs with seed 0: SD 2.x has Linear ``proj_in``/``proj_out`` (``use_linear_projection``), per-block head
counts, upcast attention, a GELU (OpenCLIP-style) text encoder whose tokenizer pads with ``!``, and a
v-prediction scheduler; SDXL two text encoders (the second with a projection), a 64-wide context that is their
outputs side by side, a first block without attention and two transformer layers in the second.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .family import Encoding, Family, Noised

# SD 2.x in miniature, where it differs from SD 1.x (diffusers' stable-diffusion-2-1 configs)
_SD2_UNET = {"use_linear_projection": True, "attention_head_dim": (2, 4), "upcast_attention": True}
_SD2_TEXT = {"hidden_act": "gelu"}
_SD2_SCHEDULER = {"prediction_type": "v_prediction"}
# SDXL in miniature (diffusers' SDXL pipeline test configs): the UNet reads the pooled text and six time ids
_SDXL_UNET = {"use_linear_projection": True, "attention_head_dim": (2, 4), "cross_attention_dim": 64,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
              "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 32}
UNET_KINDS = frozenset({"cross_attention", "kv", "proj_out", "attention", "text_attention", "transformer"})


def tiny_clip_config(pad_id: int, **extra):
    """A 2-layer, 32-wide CLIP text encoder over the real CLIP vocabulary (the tiny bases' text encoders)."""
    from transformers import CLIPTextConfig

    from ..tokenizer import SD_VOCAB_SIZE

    return CLIPTextConfig(vocab_size=SD_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id, **extra)


def tiny_vae(latent_channels: int = 4, **extra):
    """The tiny bases' VAE: two levels (a pixel stride of 2), 16/32 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         latent_channels=latent_channels, norm_num_groups=16, sample_size=32, **extra)


class StableDiffusion(Family):
    """SD 1.x: one CLIP text encoder (quick-GELU), ε-prediction."""

    name: ClassVar[str] = "sd1"
    label: ClassVar[str] = "SD 1.x"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    tiny: ClassVar[str] = "tiny"
    edit_kinds = UNET_KINDS
    # Custom Diffusion as diffusers' own format (load_attn_procs); its full-rank LoRA is for the transformers
    exports: ClassVar[dict[str, tuple[str, ...]]] = {"custom-diffusion": ("diffusers",)}

    def matches(self, pipe) -> bool:
        return (getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is None
                and self._gelu(pipe) == (self.name == "sd2"))

    @staticmethod
    def _gelu(pipe) -> bool:
        return getattr(getattr(pipe.text_encoder, "config", None), "hidden_act", "quick_gelu") == "gelu"

    def load_kwargs(self, class_name: str) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def assemble(self, parts: dict, class_name: str | None = None):
        return super().assemble({"feature_extractor": None, **parts}, class_name)

    def tiny_components(self) -> dict:
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        from ..tokenizer import build_clip_tokenizer

        sd2, xl = self.name == "sd2", self.name == "sdxl"
        unet_shape = dict(
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            **(_SD2_UNET if sd2 else {"attention_head_dim": 8}),
        )
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                    layers_per_block=1, norm_num_groups=16, **(_SDXL_UNET if xl else unet_shape))
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_clip_config(0 if sd2 else 49407, **(_SD2_TEXT if sd2 else {})))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  **(_SD2_SCHEDULER if sd2 else {}))
        tokenizer = build_clip_tokenizer()
        if sd2:
            tokenizer.pad_token = "!"  # OpenCLIP pads with "!" (id 0), SD 1.x with the end token
        parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        if xl:  # SDXL's second encoder is OpenCLIP bigG: GELU, a text projection, and a tokenizer padding with "!"
            from transformers import CLIPTextModelWithProjection

            parts["text_encoder_2"] = CLIPTextModelWithProjection(tiny_clip_config(0, **_SD2_TEXT))
            parts["tokenizer_2"] = build_clip_tokenizer()
            parts["tokenizer_2"].pad_token = "!"
        return parts

    # -- text --------------------------------------------------------------------------------------------------
    def encode_ids(self, pipe, ids: list[torch.Tensor]) -> Encoding:
        te = pipe.text_encoder
        return Encoding(te(ids[0].to(te.device))[0], None, ids[0])

    # -- the objective: DDPM, ε or v ---------------------------------------------------------------------------
    def noise_schedule(self, pipe):
        """A DDPM scheduler from the pipeline's own scheduler config, whatever scheduler samples."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def noised(self, schedule, latents, noise, steps) -> Noised:
        noisy = schedule.add_noise(latents, noise, steps)
        if schedule.config.prediction_type == "v_prediction":
            return Noised(noisy, steps, schedule.get_velocity(latents, noise, steps))
        return Noised(noisy, steps, noise)

    def predict(self, pipe, denoiser, noised, context, pooled, time_ids=None):
        return denoiser(noised.latents, noised.timesteps, context, **self.unet_kwargs(pipe, pooled, noised.latents,
                                                                                      time_ids)).sample

    def unet_kwargs(self, pipe, pooled, latents, time_ids=None) -> dict:
        return {}

    # -- image sizes -------------------------------------------------------------------------------------------
    def native_resolution(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def pixel_stride(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


class StableDiffusion2(StableDiffusion):
    """SD 2.x: one OpenCLIP text encoder (GELU, pads with "!"), v-prediction at 768 px."""

    name: ClassVar[str] = "sd2"
    label: ClassVar[str] = "SD 2.x"
    tiny: ClassVar[str] = "tiny-sd2"


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP text encoders side by side, the second's pooled output and six time ids."""

    name: ClassVar[str] = "sdxl"
    label: ClassVar[str] = "SDXL"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    tiny: ClassVar[str] = "tiny-sdxl"
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    token_keys = ("clip_l", "clip_g")  # the two-key layout SDXL embeddings are shared in
    pooled_encoders = (("tokenizer_2", "text_encoder_2"),)  # text_embeds in added_cond_kwargs

    def matches(self, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is not None

    def load_kwargs(self, class_name: str) -> dict:
        return {"add_watermarker": False}

    def encode_ids(self, pipe, ids: list[torch.Tensor]) -> Encoding:
        hidden, pooled = [], None
        for (_, te_name), row_ids in zip(self.pairs(pipe), ids):
            te = getattr(pipe, te_name)
            out = te(row_ids.to(te.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            hidden.append(out.hidden_states[-2])
        return Encoding(torch.cat(hidden, dim=-1), pooled, ids[0])

    def unet_kwargs(self, pipe, pooled, latents, time_ids=None) -> dict:
        """SDXL's ``added_cond_kwargs``: the pooled text and the time ids (``time_ids``: each row's own original
        size, crop and target size, e.g. of a bucketed photo; None = an uncropped image at the latents' size)."""
        if pooled is None:
            return {}
        if time_ids is not None:
            ids = time_ids.to(pooled.device, pooled.dtype)
        else:
            height, width = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
            ids = square_time_ids(height, width, pooled.shape[0], pooled.device, pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


def square_time_ids(height: int, width: int, rows: int, device=None, dtype=None) -> torch.Tensor:
    """SDXL's ``add_time_ids`` for an uncropped ``height`` x ``width`` image at the same target size."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=dtype or torch.float32, device=device)
    return row.expand(rows, 6)
