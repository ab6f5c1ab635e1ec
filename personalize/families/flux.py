"""Flux.1: a rectified-flow diffusion transformer (``FluxTransformer2DModel``: joint then single-stream blocks)
read through CLIP-L's pooled vector and T5's hidden states, its latents packed into 2x2 patches.

- **text** (``FluxPipeline.encode_prompt``): CLIP-L (``tokenizer`` / ``text_encoder``, 77 ids) gives only its
  pooled output (``pooled_projections``); T5 (``tokenizer_2`` / ``text_encoder_2``, padded to the pipeline's
  ``max_sequence_length``, 512; 77 on ``tiny-flux``, see ``max_length``; no attention mask) gives the context
  (``encoder_hidden_states``); the text
  position ids (``txt_ids``) are zeros. The encoding's ``ids`` are T5's: they are aligned with the context's rows.
- **sampling** (the stock ``FluxPipeline``): Flux.1-dev is guidance-distilled: one transformer pass per step
  with the guidance scale fed to its guidance embedding (``guidance_embeds``), no classifier-free guidance batch
  (true CFG runs only when a negative prompt and ``true_cfg_scale > 1`` are passed); Flux.1-schnell has no
  guidance embedding. Nothing here assumes a CFG pair.
- **the objective** (diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py``, the same in
  ``train_dreambooth_flux.py``): flow matching on ``x_t = (1 - σ) x_0 + σ n`` with the velocity target
  ``n - x_0``. The script draws ``u`` by ``compute_density_for_timestep_sampling`` (default weighting scheme
  ``none``: uniform), takes ``index = int(u * 1000)`` into the *unshifted* construction-time tables of a copy of
  the pipeline's ``FlowMatchEulerDiscreteScheduler`` (Flux.1-dev's ``use_dynamic_shifting`` leaves them at
  ``σ = t / 1000``), so the trainer's uniform integer step index is that index as it is; the loss weight of
  ``none`` is 1 (``compute_loss_weighting_for_sd3``). The transformer reads ``timestep / 1000`` and the guidance
  embedding reads the script's ``--guidance_scale`` default, 3.5, at every step (where ``guidance_embeds``).
- **latents**: the VAE's ``(z - shift_factor) * scaling_factor`` (``training/cache.py``), cached unpacked
  (B, C, h, w); ``predict`` packs them (``FluxPipeline._pack_latents``, image position ids from
  ``_prepare_latent_image_ids``) and unpacks the prediction back (``_unpack_latents``).
- **sizes**: the native size is the VAE's ``sample_size`` (1,024 on Flux.1-dev and schnell; the stock pipeline's
  default height is ``default_sample_size * vae_scale_factor``, also 1,024 there); sides are multiples of
  ``vae_scale_factor * 2`` (the packing's 2x2 patches: 16 px).

The built-in random test base ``tiny-flux`` is Flux.1-dev in miniature (classes and shapes of diffusers' own
Flux pipeline tests, a little wider): a 2-joint-block, 1-single-block transformer 32 wide (2 heads of 16, RoPE
axes 4/6/6) with the guidance embedding, a 2-layer 32-wide CLIP-L (the real CLIP vocabulary and, as FLUX.1's,
the legacy ``eos_token_id`` 2 that pools at a row's highest id), a 2-layer 32-wide
T5 encoder (gated GELU, relative attention) over the small offline T5 tokenizer (77 ids: a training step is four
times faster than at 512), the tiny bases' two-level VAE
with 4 latent channels (16 packed) and Flux's shift/scaling factors, and Flux.1-dev's scheduler config.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .dit import DiffusionTransformer
from .family import Encoding, Noised
from .sd import tiny_clip_config, tiny_vae

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s max_sequence_length and train_dreambooth_lora_flux.py's default
TINY_SEQUENCE_LENGTH = 77  # tiny-flux's T5 length (train_dreambooth_flux.py's --max_sequence_length): see max_length
GUIDANCE_SCALE = 3.5  # train_dreambooth_lora_flux.py's --guidance_scale (the guidance embedding's input in training)
# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
# black-forest-labs/FLUX.1-dev vae/config.json, where the tiny VAE keeps it
_FLUX_VAE = dict(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)


class Flux(DiffusionTransformer):
    """Flux.1 (dev and schnell): CLIP-L pooled + T5 context, flow matching, packed latents."""

    name: ClassVar[str] = "flux"
    label: ClassVar[str] = "Flux.1"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    tiny: ClassVar[str] = "tiny-flux"
    denoiser_classes: ClassVar[tuple[str, ...]] = ("FluxTransformer2DModel",)
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    token_keys = ("clip_l", "t5")  # the layout of diffusers' advanced Flux script's pivotal-tuning embeddings
    prompt_tokenizer = "tokenizer_2"  # T5 reads the context; CLIP-L only the pooled vector (the stock pipeline cuts it)
    lora_text_encoders = ("text_encoder",)  # train_dreambooth_lora_flux.py --train_text_encoder: CLIP-L only
    pooled_encoders = (("tokenizer", "text_encoder"),)  # CLIP-L's pooler_output (pooled_projections)
    # textual inversion as the advanced Flux script's {"clip_l", "t5"} file, which FluxPipeline (a
    # TextualInversionLoaderMixin) loads with one load_textual_inversion call per encoder (export.json says how)
    # DreamBooth-LoRA also as kohya sd-scripts' Flux file (methods/dreambooth_lora.py kohya_flux_state)
    exports = {**DiffusionTransformer.exports, "textual-inversion": ("diffusers",),
               "dreambooth-lora": ("diffusers-lora", "kohya")}
    # train_dreambooth_lora_flux.py's default target modules (matched as peft matches them: the joint blocks'
    # attention both streams and feed-forwards, and the single blocks' to_q/k/v) plus proj_mlp, which later
    # versions of the script add (diffusers' train_dreambooth_lora_flux_kontext.py)
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2", "proj_mlp")

    context_tokenizers = (("tokenizer_2", None),)  # the context is T5's

    def token_grid(self, denoiser, args, kwargs) -> tuple[int, int]:
        """Rows and columns of the packed latents, from the image position ids (``(0, row, col)`` per token)."""
        ids = kwargs.get("img_ids")
        if ids is None:
            ids = args[4]  # FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled, timestep, img_ids)
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def matches(self, pipe) -> bool:
        """A pipeline whose denoiser is a Flux transformer (an img2img twin made with ``from_pipe`` too)."""
        from diffusers import FluxTransformer2DModel

        return isinstance(getattr(pipe, "transformer", None), FluxTransformer2DModel)

    def tiny_components(self) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        from ..tokenizer import build_clip_tokenizer, build_t5_tokenizer

        tokenizer_2 = build_t5_tokenizer(TINY_SEQUENCE_LENGTH)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
            layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        clip = tiny_clip_config(49407)  # CLIP-L's tokenizer pads with its end token
        # FLUX.1's text_encoder/config.json keeps CLIP's legacy eos_token_id 2, with which transformers pools at the
        # highest id of each row (an added token's, where a prompt holds one) instead of at the end token
        clip.eos_token_id = 2
        parts = dict(
            transformer=transformer,
            vae=tiny_vae(latent_channels=4, **_FLUX_VAE),
            text_encoder=CLIPTextModel(clip),
            tokenizer=build_clip_tokenizer(),
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        )
        for part in parts.values():  # in eval mode, as from_pretrained leaves them (T5 has dropout 0.1)
            if isinstance(part, torch.nn.Module):
                part.eval()
        return parts

    # -- text --------------------------------------------------------------------------------------------------
    def max_length(self, pipe, tokenizer_name: str) -> int:
        """CLIP's ``model_max_length`` (77); T5's is the stock pipeline's ``max_sequence_length`` default, 512
        (also ``train_dreambooth_lora_flux.py``'s), or the T5 tokenizer's ``model_max_length`` where that is
        shorter: 512 on Flux.1-dev and schnell, 77 on ``tiny-flux`` (``train_dreambooth_flux.py``'s default), where
        512 made a training step four times slower. A stock call matches with ``max_sequence_length`` = this."""
        if tokenizer_name == "tokenizer_2":
            return min(MAX_SEQUENCE_LENGTH, int(pipe.tokenizer_2.model_max_length))
        return super().max_length(pipe, tokenizer_name)

    def encode_ids(self, pipe, ids: list[torch.Tensor]) -> Encoding:
        """``FluxPipeline.encode_prompt``: T5's last hidden state is the context, CLIP's pooled output the pooled
        vector; ``extra["txt_ids"]``: the text position ids (zeros, one row per context row)."""
        clip, t5 = pipe.text_encoder, pipe.text_encoder_2
        pooled = clip(ids[0].to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
        context = t5(ids[1].to(t5.device), output_hidden_states=False)[0].to(t5.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=context.device, dtype=clip.dtype)
        return Encoding(context, pooled, ids[1], {"txt_ids": txt_ids})

    # -- the objective: flow matching, velocity target ---------------------------------------------------------
    def noise_schedule(self, pipe):
        """The script's ``noise_scheduler_copy``: a fresh ``FlowMatchEulerDiscreteScheduler`` from the pipeline's
        scheduler config, never given ``set_timesteps`` (its construction-time tables)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def noised(self, schedule, latents, noise, steps) -> Noised:
        """Index ``steps`` into the schedule's tables (the script's ``timesteps[indices]`` and ``get_sigmas``),
        ``x_t = (1 - σ) x_0 + σ n``, target ``n - x_0``; ``timesteps`` on the schedule's 0-1000 scale (the
        pipeline's ``t``: ``predict`` divides by 1000); weight 1 (the default scheme ``none``)."""
        at = steps.long().cpu()
        timesteps = schedule.timesteps[at].to(latents.device)
        sigmas = schedule.sigmas[at].to(latents.device, latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))
        return Noised((1.0 - sigmas) * latents + sigmas * noise, timesteps, noise - latents)

    def predict(self, pipe, denoiser, noised, context, pooled, time_ids=None):
        """The script's transformer call: packed latents, image ids on the (h/2, w/2) grid, zero text ids,
        ``timestep / 1000``, the guidance embedding at 3.5 where the transformer has one; unpacked to (B, C, h, w)."""
        from diffusers import FluxPipeline

        latents = noised.latents
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(context.shape[1], 3, device=context.device, dtype=context.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([GUIDANCE_SCALE], device=latents.device).expand(b)
        out = denoiser(hidden_states=packed, timestep=noised.timesteps / 1000, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0]
        scale = int(pipe.vae_scale_factor)
        return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)

    # -- image sizes -------------------------------------------------------------------------------------------
    def native_resolution(self, pipe) -> int:
        size = getattr(pipe.vae.config, "sample_size", None)
        return int(size) if size else int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def pixel_stride(self, pipe) -> int:
        return int(pipe.vae_scale_factor) * 2
