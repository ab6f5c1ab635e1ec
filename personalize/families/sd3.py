"""Stable Diffusion 3 / 3.5: an MMDiT (``SD3Transformer2DModel``, joint attention over image and text tokens), three
text encoders and rectified-flow (flow-matching) training.

**Text** (``StableDiffusion3Pipeline.encode_prompt``): CLIP-L and CLIP-G (both ``CLIPTextModelWithProjection``, 77
tokens each) give their penultimate hidden states side by side (768 + 1,280 = 2,048 wide on the real models),
zero-padded on the feature axis to T5's width (4,096) and followed, along the sequence, by T5-XXL's last hidden
states: the context is 77 + ``T5_LENGTH`` rows. The pooled vector is both CLIPs' projected outputs side by side
(2,048). ``T5_LENGTH`` is the pipeline's default ``max_sequence_length``, 256, so training sees the context that
sampling does (diffusers' training scripts default to 77 T5 tokens; their README allows up to 512). A pipeline
loaded without T5 (``text_encoder_3=None``) reads zeros in its place, as the stock pipeline does.

``Encoding.ids`` is aligned with the context's rows: CLIP-L's 77 ids, then T5's ids. The two halves are different
id spaces; an id a concept adds to the CLIP tokenizers (49,408 and above) never occurs among T5's 32,128 (real) or
about 4,200 (``tiny-sd3``) ids, so a search for it finds CLIP rows only. CLIP-G's ids are CLIP-L's except for
the padding (it pads with ``!``); ``Encoding.extra["ids"]`` holds each tokenizer's ids as given.

**Objective** (diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py``, also ``train_dreambooth_sd3.py``,
with their defaults): latents ``(z - shift_factor) * scaling_factor`` (the latent cache does this), a
``FlowMatchEulerDiscreteScheduler`` built from the pipeline's scheduler config and never given ``set_timesteps``
(the script's ``noise_scheduler_copy``: shift 3, so ``sigmas[k] = 3s / (1 + 2s)``, ``s = (1000 - k) / 1000``), the
timestep index ``int(u * 1000)`` with ``u = sigmoid(N(logit_mean, logit_std))`` (``--weighting_scheme
logit_normal``, mean 0, std 1, the script's default "following the SD3 paper"; its first version defaulted to
``sigma_sqrt``), ``x_t = (1 - σ) x_0 + σ n``, the raw ``timesteps[index]`` (0..1000, not divided) passed to the
transformer, and ``--precondition_outputs 1``: the loss compares ``x̂_0 = x_t - σ v̂`` with ``x_0`` (EDM,
section 5), weighted by ``compute_loss_weighting_for_sd3`` (1 for logit_normal).

Two departures, both exact in distribution or in real arithmetic:

- the trainer draws a uniform integer ``k`` in [0, 1000) per row (``training/cache.draw_batch``, one generator for
  every family). ``noised`` maps it through the inverse CDF of the script's draw: ``q = (k + 0.5) / 1000``, ``u =
  sigmoid(logit_mean + logit_std * Φ⁻¹(q))``, index ``int(u * 1000)``. The 1,000 equally likely ``k`` are the
  1,000 quantile midpoints of the logit-normal, so the index's distribution function is the script's to within
  1/1000 at every index (``tests/test_family_sd3.py`` checks this);
- preconditioning is written as its equal velocity loss: ``x̂_0 - x_0 = -σ (v̂ - (n - x_0))``, so ``predict``
  returns the transformer's raw output (the velocity, as the pipeline samples with), ``noised`` the target ``n -
  x_0`` and the per-row weight ``σ² · compute_loss_weighting_for_sd3(σ)``; ``step._predict``'s ``mean(weight *
  (pred - target)²)`` is then the script's loss (equal up to float rounding, not bit for bit).

The built-in random test base ``tiny-sd3`` is SD3.5-large in miniature: the three encoders' classes (CLIP-L 32
wide, CLIP-G 64 wide with GELU and ``!`` padding, a 2-layer gated-GELU T5 128 wide over the small offline T5
tokenizer), so the CLIP features are zero-padded from 96 to 128 as 2,048 are to 4,096; a transformer of two joint
blocks (the last ``context_pre_only``, as in every SD3) with RMS qk-norm, patch 2, 16 latent channels; a two-level
VAE with SD3's shift and scaling factors and no quant convs; the SD3 scheduler (shift 3). Its native size is 32 px.
Its CLIPs pool at the first end token (``eos_token_id`` 49407, as the other tiny bases); the real SD3 configs say
2, which transformers reads as "pool at the largest id" (the same place unless a prompt holds an added token).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .dit import DiffusionTransformer
from .family import Encoding, Noised

T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
CLIP_ROWS = 77
# the script's defaults: --weighting_scheme logit_normal --logit_mean 0.0 --logit_std 1.0 --mode_scale 1.29
# --precondition_outputs 1 (train_dreambooth_lora_sd3.py)
WEIGHTING = dict(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
PRECONDITION_OUTPUTS = True

# SD3.5-large in miniature (see the module docstring)
_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=32,
                    pooled_projection_dim=96, pos_embed_max_size=32, qk_norm="rms_norm")
_CLIP_G = dict(hidden_size=64, intermediate_size=128, projection_dim=64, hidden_act="gelu")
_T5 = dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
           relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def timestep_quantile(q: torch.Tensor, weighting_scheme: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                      mode_scale: float = 1.29) -> torch.Tensor:
    """``u`` of ``diffusers.training_utils.compute_density_for_timestep_sampling`` at the uniform quantile ``q``:
    the inverse CDF of its draw (logit_normal: ``sigmoid(mean + std * Φ⁻¹(q))``; mode: its formula of a uniform;
    any other scheme draws ``u`` uniformly)."""
    q = q.double()
    if weighting_scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(q))
    if weighting_scheme == "mode":
        return 1 - q - mode_scale * (torch.cos(torch.pi * q / 2) ** 2 - 1 + q)
    return q


class StableDiffusion3(DiffusionTransformer):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5 text, an MMDiT, flow matching with logit-normal timesteps."""

    name: ClassVar[str] = "sd3"
    label: ClassVar[str] = "SD3"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    tiny: ClassVar[str] = "tiny-sd3"
    denoiser_classes: ClassVar[tuple[str, ...]] = ("SD3Transformer2DModel",)
    token_keys = ("clip_l", "clip_g", "t5")
    # train_dreambooth_lora_sd3.py's default --lora_layers (README_sd3.md): both streams' attention projections
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    text_pairs = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
    pooled_encoders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))  # both text_embeds
    context_tokenizers = (("tokenizer", 77), ("tokenizer_3", None))  # both CLIPs' rows (CLIP-L's ids), then T5's
    export_refusals = {**DiffusionTransformer.export_refusals,
                       "textual-inversion": "StableDiffusion3Pipeline has no load_textual_inversion (diffusers "
                                            "0.42.1): no stock loader reads a token file for SD3"}

    def matches(self, pipe) -> bool:
        from diffusers import SD3Transformer2DModel

        return isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel)

    def tiny_components(self) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from ..tokenizer import build_clip_tokenizer, build_t5_tokenizer
        from .sd import tiny_clip_config, tiny_vae

        transformer = SD3Transformer2DModel(**_TRANSFORMER)
        clip_l = CLIPTextModelWithProjection(tiny_clip_config(49407))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_dict({**tiny_clip_config(0).to_dict(), **_CLIP_G}))
        tokenizer_3 = build_t5_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), **_T5))
        vae = tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                       use_post_quant_conv=False)
        tokenizer_2 = build_clip_tokenizer()
        tokenizer_2.pad_token = "!"  # OpenCLIP bigG pads with "!" (id 0), CLIP-L with the end token
        for module in (transformer, clip_l, clip_g, t5, vae):
            module.eval()  # as from_pretrained leaves them: T5's dropout (0.1) off
        return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                    text_encoder=clip_l, tokenizer=build_clip_tokenizer(), text_encoder_2=clip_g,
                    tokenizer_2=tokenizer_2, text_encoder_3=t5, tokenizer_3=tokenizer_3)

    # -- text --------------------------------------------------------------------------------------------------
    def max_length(self, pipe, tokenizer_name: str) -> int:
        return T5_LENGTH if tokenizer_name == "tokenizer_3" else super().max_length(pipe, tokenizer_name)

    def encode_ids(self, pipe, ids: list[torch.Tensor]) -> Encoding:
        """``StableDiffusion3Pipeline.encode_prompt`` (no ``clip_skip``, one image per prompt) from each present
        tokenizer's ids (CLIP-L, CLIP-G, then T5 where the pipeline has it)."""
        hidden, pooled = [], []
        for te_name, row_ids in zip(("text_encoder", "text_encoder_2"), ids):
            te = getattr(pipe, te_name)
            out = te(row_ids.to(te.device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected, pooled output
            hidden.append(out.hidden_states[-2].to(pipe.text_encoder.dtype))
        clip = torch.cat(hidden, dim=-1)
        t5 = getattr(pipe, "text_encoder_3", None)
        if t5 is not None:
            t5_ids = ids[2]
            t5_hidden = t5(t5_ids.to(t5.device))[0].to(t5.dtype)
        else:  # the stock pipeline's zeros for a missing T5
            t5_ids = torch.zeros(clip.shape[0], T5_LENGTH, dtype=ids[0].dtype, device=ids[0].device)
            t5_hidden = torch.zeros(clip.shape[0], T5_LENGTH, pipe.transformer.config.joint_attention_dim,
                                    device=clip.device, dtype=pipe.text_encoder.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        context = torch.cat([clip, t5_hidden], dim=-2)
        row_ids = torch.cat([ids[0], t5_ids.to(ids[0].device)], dim=-1)
        return Encoding(context, torch.cat(pooled, dim=-1), row_ids, {"ids": list(ids)})

    # -- the objective: flow matching, train_dreambooth_lora_sd3.py --------------------------------------------
    def noise_schedule(self, pipe):
        """The script's ``noise_scheduler_copy``: a flow-matching scheduler from the pipeline's scheduler config,
        with its construction-time tables (never ``set_timesteps``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def indices(self, schedule, steps: torch.Tensor) -> torch.Tensor:
        """The script's timestep index for each uniformly drawn ``steps`` (module docstring: the inverse CDF)."""
        n = self.num_train_steps(schedule)
        u = timestep_quantile((steps.double().cpu() + 0.5) / n, **WEIGHTING)
        return (u * n).long().clamp(0, n - 1)

    def noised(self, schedule, latents, noise, steps) -> Noised:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        # each drawn index's timestep and σ, looked up where the steps are (no wait for the device)
        index = self.indices(schedule, torch.arange(self.num_train_steps(schedule)))
        timesteps = schedule.timesteps[index].to(steps.device)[steps]
        sigmas = schedule.sigmas[index].to(steps.device, latents.dtype)[steps]
        sigmas = sigmas.to(latents.device).reshape(-1, *[1] * (latents.ndim - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weight = compute_loss_weighting_for_sd3(WEIGHTING["weighting_scheme"], sigmas).float()
        if PRECONDITION_OUTPUTS:  # (x_t - σ v̂) - x_0 = -σ (v̂ - (n - x_0)): the velocity loss weighted by σ²
            weight = weight * sigmas.float() ** 2
        return Noised(noisy, timesteps, noise - latents, weight)

    def predict(self, pipe, denoiser, noised, context, pooled, time_ids=None):
        return denoiser(hidden_states=noised.latents, timestep=noised.timesteps, encoder_hidden_states=context,
                        pooled_projections=pooled, return_dict=False)[0]

    # -- image sizes -------------------------------------------------------------------------------------------
    def native_resolution(self, pipe) -> int:
        """The pipeline's default size: the transformer's ``sample_size`` (latent pixels) x the VAE's factor."""
        return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)

    def pixel_stride(self, pipe) -> int:
        """What the pipeline requires sides to be multiples of: the VAE's factor x the patch size."""
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)
