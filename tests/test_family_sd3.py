"""The SD3 / SD3.5 family (``personalize/families/sd3.py``) against stock diffusers: the built-in ``tiny-sd3``
(deterministic, SD3.5's classes, a saved folder loads as the family), the text side bit for bit against
``StableDiffusion3Pipeline.encode_prompt``, the transformer call against the one the stock pipeline makes, and the
training objective against the formulas of diffusers' ``examples/dreambooth/train_dreambooth_lora_sd3.py`` written
out here (``noise_scheduler_copy``, ``get_sigmas``, logit-normal timesteps, ``precondition_outputs``,
``compute_loss_weighting_for_sd3``)."""
from __future__ import annotations

import copy
import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch

from personalize import families, text_stack
from personalize.base import load_base
from personalize.families.sd3 import CLIP_ROWS, T5_LENGTH, StableDiffusion3

from family_checks import PROMPTS, same_weights, saved_folder_loads_as_the_family



@pytest.fixture(scope="module")
def pipe():
    return load_base("tiny-sd3")


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "base"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# -- the built-in base and loading ---------------------------------------------------------------------------------
def test_tiny_sd3_has_sd35_classes_and_shapes(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    assert type(pipe) is StableDiffusion3Pipeline and type(pipe.transformer) is SD3Transformer2DModel
    assert type(pipe.text_encoder) is type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert type(pipe.text_encoder_3) is T5EncoderModel and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    cfg = pipe.transformer.config
    blocks = pipe.transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    assert blocks[-1].attn.to_add_out is None and blocks[0].attn.norm_added_k is not None  # rms_norm qk-norm
    # the CLIP features (side by side) are narrower than T5's and zero-padded to it, as 2,048 are to 4,096
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width < cfg.joint_attention_dim == pipe.text_encoder_3.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.projection_dim + \
        pipe.text_encoder_2.config.projection_dim
    assert pipe.vae.config.latent_channels == cfg.in_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.0609, 1.5305)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token_id == 49407


def test_the_family_is_recognised_and_no_sd_family_claims_it(pipe):
    from diffusers import StableDiffusion3Img2ImgPipeline

    assert isinstance(families.of(pipe), StableDiffusion3) and text_stack.family(pipe) == "sd3"
    assert [f.name for f in families.FAMILIES.values() if f.matches(pipe)] == ["sd3"]
    assert families.denoiser(pipe) is pipe.transformer
    twin = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    assert text_stack.family(twin) == "sd3"
    assert not families.get("sd3").matches(SimpleNamespace(unet=torch.nn.Linear(1, 1)))


def test_tiny_sd3_is_deterministic(pipe):
    same_weights(pipe, load_base("tiny-sd3"))


def test_a_saved_folder_loads_as_the_family(pipe, folder):
    saved_folder_loads_as_the_family(pipe, folder, "StableDiffusion3Pipeline")


# -- text ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_encoding_equals_the_stock_encode_prompt(pipe):
    ours = text_stack.encode(pipe, PROMPTS)
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert ours.context.shape[1] == CLIP_ROWS + T5_LENGTH  # the pipeline's default max_sequence_length
    # the ids are aligned with the context's rows: CLIP-L's, then T5's
    clip_l = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    t5 = pipe.tokenizer_3(PROMPTS, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt")
    assert torch.equal(ours.ids, torch.cat([clip_l.input_ids, t5.input_ids], dim=1))
    assert ours.ids.shape[1] == ours.context.shape[1]


@torch.no_grad()
def test_without_t5_the_context_has_the_stock_zeros(pipe):
    from diffusers import StableDiffusion3Pipeline

    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    ours = text_stack.encode(no_t5, PROMPTS)
    context, _, pooled, _ = no_t5.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert ours.ids.shape[1] == context.shape[1]


# -- the denoiser call and sampling --------------------------------------------------------------------------------
@torch.no_grad()
def test_predict_is_the_stock_pipelines_transformer_call_and_sampling_works(pipe):
    """A 2-step stock generation (default CFG: two rows per prompt) at the native size; the family's ``predict``
    on what the pipeline fed the transformer, with our encoding, gives what the transformer returned."""
    from personalize.families import Noised

    calls = []
    pre = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    post = pipe.transformer.register_forward_hook(lambda m, a, kw, out: calls[-1].update(out=out[0]),
                                                  with_kwargs=True)
    try:
        image = pipe(PROMPTS[0], num_inference_steps=2, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    finally:
        pre.remove()
        post.remove()
    native = text_stack.native_resolution(pipe)
    assert image.shape == (1, 3, native, native) and torch.isfinite(image).all()
    assert len(calls) == 2 and calls[0]["hidden_states"].shape[0] == 2  # classifier-free guidance
    family = families.of(pipe)
    # the rows the pipeline stacks: the negative prompt "", then the prompt (each encoded as a batch of its own)
    negative, positive = text_stack.encode(pipe, [""]), text_stack.encode(pipe, PROMPTS[:1])
    context = torch.cat([negative.context, positive.context])
    pooled = torch.cat([negative.pooled, positive.pooled])
    for call in calls:
        noised = Noised(call["hidden_states"], call["timestep"], target=None)
        out = family.predict(pipe, pipe.transformer, noised, context, pooled)
        assert torch.equal(out, call["out"])


def test_sizes(pipe):
    family = families.of(pipe)
    assert family.native_resolution(pipe) == pipe.default_sample_size * pipe.vae_scale_factor == 32
    assert family.pixel_stride(pipe) == pipe.vae_scale_factor * pipe.patch_size
    # SD3/3.5's published transformer and VAE configs: sample_size 128, patch 2, four VAE levels (x8)
    real = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(sample_size=128, patch_size=2)),
                           vae_scale_factor=2 ** 3)
    assert (family.native_resolution(real), family.pixel_stride(real)) == (1024, 16)


# -- the objective: train_dreambooth_lora_sd3.py --------------------------------------------------------------------
@pytest.fixture(scope="module")
def script_scheduler(folder):
    """The script's ``noise_scheduler_copy``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return copy.deepcopy(FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"))


def _script_index(k: int) -> int:
    """``int(u * 1000)`` at the k-th of 1,000 quantile midpoints of ``u = sigmoid(N(0, 1))`` (the script's default
    ``--weighting_scheme logit_normal --logit_mean 0 --logit_std 1``)."""
    z = NormalDist(0.0, 1.0).inv_cdf((k + 0.5) / 1000)
    return int(1 / (1 + math.exp(-z)) * 1000)


def _script_noising(scheduler, model_input, noise, indices):
    timesteps = scheduler.timesteps[indices]

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = scheduler.sigmas.to(dtype=dtype)
        schedule_timesteps = scheduler.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    return timesteps, sigmas, (1.0 - sigmas) * model_input + sigmas * noise


def _script_loss(model_pred, model_input, noisy, sigmas):
    """The script's loss, ``--precondition_outputs 1``, per row."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    model_pred = model_pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme="logit_normal", sigmas=sigmas)
    target = model_input
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)


def test_the_drawn_index_follows_the_scripts_logit_normal(pipe, script_scheduler):
    """Every uniform index k maps to the script's index at the k-th quantile, and over all k the distribution
    function of the index is the script's, P(int(u * 1000) <= i) = Φ(logit((i + 1) / 1000)), within 1/1000."""
    family = families.of(pipe)
    ours = family.noise_schedule(pipe)
    assert torch.equal(ours.timesteps, script_scheduler.timesteps) and torch.equal(ours.sigmas, script_scheduler.sigmas)
    n = family.num_train_steps(script_scheduler)
    got = family.indices(script_scheduler, torch.arange(n))
    assert got.tolist() == [_script_index(k) for k in range(n)]
    counts = torch.bincount(got, minlength=n).cumsum(0).double() / n
    phi = NormalDist().cdf
    expected = torch.tensor([phi(math.log((i + 1) / (n - i - 1))) if i < n - 1 else 1.0 for i in range(n)])
    assert (counts - expected).abs().max() <= 1 / n + 1e-9
    assert got.double().mean().item() == pytest.approx(n / 2, abs=1)  # centred: σ = 0.75 at the middle


def test_noised_equals_the_scripts_formulas(pipe, script_scheduler):
    family = families.of(pipe)
    gen = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(4, 16, 8, 8, generator=gen), torch.randn(4, 16, 8, 8, generator=gen)
    steps = torch.tensor([0, 999, 500, 123])
    noised = family.noised(family.noise_schedule(pipe), latents, noise, steps)
    indices = torch.tensor([_script_index(k) for k in steps.tolist()])
    timesteps, sigmas, noisy = _script_noising(script_scheduler, latents, noise, indices)
    assert torch.equal(noised.latents, noisy) and torch.equal(noised.timesteps, timesteps)
    assert noised.timesteps.min() > 1 and noised.timesteps.max() <= 1000  # raw, not divided by 1000
    model_pred = torch.randn(latents.shape, generator=gen)
    ours = (noised.weight * (model_pred - noised.target) ** 2).reshape(4, -1).mean(1)
    torch.testing.assert_close(ours, _script_loss(model_pred, latents, noisy, sigmas), rtol=1e-5, atol=1e-7)


def test_a_training_step_on_a_latent_cache_is_the_scripts_loss(pipe):
    """``denoising_step`` through the family on a real ``LatentCache``: the loss of the script's formulas (stock
    ``encode_prompt``, the transformer, preconditioning) and gradients reaching a transformer weight."""
    from personalize.training.cache import LatentCache, draw_batch
    from personalize.training.step import denoising_step

    family = families.of(pipe)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cache = LatentCache(pipe.vae, images, None)
    schedule = family.noise_schedule(pipe)
    batch = draw_batch(cache, 2, 0.5, family.num_train_steps(schedule), "dog", torch.Generator().manual_seed(3),
                       "cpu")
    seen = {}

    class Method:
        def on_text_encoded(self, ids, hidden):
            seen.update(ids=ids, hidden=hidden)

    weight = pipe.transformer.transformer_blocks[-1].attn.add_k_proj.weight
    weight.requires_grad_(True)
    try:
        loss = denoising_step(pipe, schedule, Method(), batch)
        loss.backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    assert torch.isfinite(loss) and seen["ids"].shape == seen["hidden"].shape[:2]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(batch.prompts, None, None, device="cpu",
                                                   do_classifier_free_guidance=False)
        indices = torch.tensor([_script_index(k) for k in batch.timesteps.tolist()])
        timesteps, sigmas, noisy = _script_noising(family.noise_schedule(pipe), batch.latents, batch.noise, indices)
        model_pred = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=context,
                                      pooled_projections=pooled, return_dict=False)[0]
        script = _script_loss(model_pred, batch.latents, noisy, sigmas).mean()
    torch.testing.assert_close(loss.detach(), script, rtol=1e-5, atol=1e-8)
