"""The Flux.1 family (``personalize/families/flux.py``) against stock diffusers: the built-in ``tiny-flux`` base
(seeded, saved and loaded back as a FluxPipeline), the text encoding against ``FluxPipeline.encode_prompt``, the
transformer call against one built from the pipeline's own packing helpers and against the stock pipeline's own
call, the noising against ``train_dreambooth_lora_flux.py``'s formulas written out here, two stock sampling steps
(one guidance-embedded pass each, no CFG batch) and a trainer step through a real latent cache."""
from __future__ import annotations

import copy

import pytest
import torch

from personalize import families, text_stack
from personalize.base import load_base, resolution

from family_checks import PROMPTS, same_weights, saved_folder_loads_as_the_family



@pytest.fixture(scope="module")
def pipe():
    return load_base("tiny-flux")


@pytest.fixture(scope="module")
def family():
    return families.get("flux")


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux") / "base"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_tiny_flux_is_flux_dev_in_miniature(pipe, family):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    assert type(pipe) is FluxPipeline and type(pipe.transformer) is FluxTransformer2DModel
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is T5EncoderModel
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.use_dynamic_shifting
    assert pipe.transformer.config.guidance_embeds  # Flux.1-dev's guidance embedding
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packing
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.shift_factor and pipe.vae.config.scaling_factor != 1
    # CLIP-L pools as FLUX.1's (legacy eos_token_id 2): at a row's highest id, i.e. an added token where there is one
    tok = pipe.tokenizer
    ids = tok(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    clip = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        out = clip(ids)
        end = int((ids[0] == tok.eos_token_id).nonzero()[0])
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, end])
        ids[0, 2] = len(tok)  # a token id above the base vocabulary (as textual inversion adds)
        clip.resize_token_embeddings(len(tok) + 1)
        out = clip(ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 2])
    assert families.of(pipe) is family and text_stack.family(pipe) == "flux"
    assert family.denoiser_of(pipe) is pipe.transformer and families.denoiser(pipe) is pipe.transformer
    assert not any(f.matches(pipe) for f in families.FAMILIES.values() if f is not family)
    assert not family.matches(load_base("tiny"))


def test_tiny_flux_builds_the_same_weights_twice(pipe):
    same_weights(pipe, load_base("tiny-flux"))


def test_a_saved_folder_loads_as_flux(pipe, folder):
    loaded = saved_folder_loads_as_the_family(pipe, folder, "FluxPipeline")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    for a, b in zip(text_stack.tokenize(loaded, PROMPTS), text_stack.tokenize(pipe, PROMPTS)):
        assert torch.equal(a, b)
    # an img2img twin made with from_pipe is of its base's family
    from diffusers import FluxImg2ImgPipeline

    assert text_stack.family(FluxImg2ImgPipeline.from_pipe(loaded)) == "flux"


def test_encoding_equals_the_stock_encode_prompt(pipe, family):
    length = family.max_length(pipe, "tokenizer_2")
    ours = text_stack.encode(pipe, PROMPTS)
    context, pooled, txt_ids = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=length)
    assert torch.equal(ours.context, context) and torch.equal(ours.pooled, pooled)
    assert torch.equal(ours.extra["txt_ids"], txt_ids)
    t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=length, truncation=True,
                              return_tensors="pt").input_ids
    assert torch.equal(ours.ids, t5_ids) and ours.ids.shape[1] == ours.context.shape[1]  # ids align with rows


def test_t5_length_is_the_stock_default_unless_the_tokenizer_is_shorter(pipe, family):
    """512 (FluxPipeline's max_sequence_length default) for the real T5 tokenizer (model_max_length 512) or one
    without a limit; tiny-flux's tokenizer stops at 77; CLIP's is its own 77."""
    import inspect

    from diffusers import FluxPipeline

    stock = inspect.signature(FluxPipeline.__call__).parameters["max_sequence_length"].default
    tok = pipe.tokenizer_2
    assert family.max_length(pipe, "tokenizer_2") == tok.model_max_length == 77
    assert family.max_length(pipe, "tokenizer") == pipe.tokenizer_max_length == 77
    try:
        for own in (512, int(1e30)):
            tok.model_max_length = own
            assert family.max_length(pipe, "tokenizer_2") == stock == 512
    finally:
        tok.model_max_length = 77


def test_sizes_are_the_stock_pipeline_s(pipe, family):
    assert family.pixel_stride(pipe) == pipe.image_processor.config.vae_scale_factor  # packing's 2x2 patches
    assert text_stack.native_resolution(pipe) == resolution(pipe, None) == pipe.vae.config.sample_size == 32


def _noised(pipe, family, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    steps = torch.randint(family.num_train_steps(family.noise_schedule(pipe)), (shape[0],), generator=g)
    return latents, noise, steps


def test_noised_follows_the_dreambooth_lora_flux_script(pipe, family, folder):
    """train_dreambooth_lora_flux.py: ``indices = (u * num_train_timesteps).long()`` with ``u`` uniform
    (weighting scheme ``none``), ``timesteps[indices]``, its ``get_sigmas`` lookup on the scheduler copy loaded
    from the pipeline's folder, ``(1 - σ) x + σ n``, target ``n - x``, ``compute_loss_weighting_for_sd3`` = 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheduler_copy = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=6, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=torch.Generator().manual_seed(1))
    indices = (u * scheduler_copy.config.num_train_timesteps).long()
    indices[0], indices[1] = 0, scheduler_copy.config.num_train_timesteps - 1  # both ends of the table
    timesteps = scheduler_copy.timesteps[indices]
    step_indices = [(scheduler_copy.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler_copy.sigmas.to(dtype=torch.float32)[step_indices].flatten().reshape(-1, 1, 1, 1)
    latents, noise, _ = _noised(pipe, family, (6, 4, 8, 12))

    schedule = family.noise_schedule(pipe)
    assert family.num_train_steps(schedule) == scheduler_copy.config.num_train_timesteps
    assert len(scheduler_copy.timesteps) == scheduler_copy.config.num_train_timesteps
    got = family.noised(schedule, latents, noise, indices)
    assert torch.equal(got.latents, (1.0 - sigmas) * latents + sigmas * noise)
    assert torch.equal(got.timesteps, timesteps)
    assert torch.equal(got.target, noise - latents)
    assert got.weight is None or torch.equal(got.weight, compute_loss_weighting_for_sd3("none", sigmas))
    assert torch.equal(compute_loss_weighting_for_sd3("none", sigmas), torch.ones_like(sigmas))


def test_predict_is_the_script_s_transformer_call(pipe, family):
    """Packing, image ids on the (h/2, w/2) grid, zero text ids, timestep / 1000, guidance 3.5, unpacking:
    written out with FluxPipeline's own helpers, on a non-square latent (so rows and columns cannot swap)."""
    from diffusers import FluxPipeline

    latents, noise, steps = _noised(pipe, family, (2, 4, 8, 12))
    noised = family.noised(family.noise_schedule(pipe), latents, noise, steps)
    enc = text_stack.encode(pipe, PROMPTS)
    with torch.no_grad():
        ours = family.predict(pipe, pipe.transformer, noised, enc.context, enc.pooled)
        b, c, h, w = noised.latents.shape
        packed = FluxPipeline._pack_latents(noised.latents, b, c, h, w)
        out = pipe.transformer(
            hidden_states=packed, timestep=noised.timesteps / 1000, guidance=torch.tensor([3.5]).expand(b),
            pooled_projections=enc.pooled, encoder_hidden_states=enc.context,
            txt_ids=torch.zeros(enc.context.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False)[0]
        theirs = FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                              pipe.vae_scale_factor)
    assert ours.shape == latents.shape and torch.equal(ours, theirs)


def test_stock_sampling_is_one_guidance_embedded_pass_per_step_and_predict_matches_it(pipe, family):
    """Two stock steps at the native size: one transformer pass per step (guidance-distilled: no CFG batch) with
    the guidance embedding fed; ``predict`` on the stock call's latents and timestep gives the stock output."""
    from diffusers import FluxPipeline

    calls = []

    def seen(module, args, kwargs, output):
        calls.append((kwargs, output[0].detach().clone()))

    handle = pipe.transformer.register_forward_hook(seen, with_kwargs=True)
    try:
        size = text_stack.native_resolution(pipe)
        image = pipe(PROMPTS[0], num_inference_steps=2, height=size, width=size, output_type="np",
                     max_sequence_length=family.max_length(pipe, "tokenizer_2"),
                     generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    assert image.shape == (1, size, size, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    assert len(calls) == 2 and all(kw["hidden_states"].shape[0] == 1 for kw, _ in calls)
    kwargs, out = calls[0]
    assert kwargs["guidance"].tolist() == [3.5]  # the pipeline's default = the training script's

    latent = size // pipe.vae_scale_factor
    unpacked = FluxPipeline._unpack_latents(kwargs["hidden_states"], size, size, pipe.vae_scale_factor)
    from personalize.families import Noised

    noised = Noised(unpacked, kwargs["timestep"] * 1000, unpacked)
    enc = text_stack.encode(pipe, PROMPTS[:1])
    with torch.no_grad():
        ours = family.predict(pipe, pipe.transformer, noised, enc.context, enc.pooled)
    stock = FluxPipeline._unpack_latents(out, size, size, pipe.vae_scale_factor)
    assert ours.shape == (1, 4, latent, latent)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)  # t * 1000 / 1000 may round by one ulp


def test_a_training_step_through_the_family(pipe, family):
    """The trainer's loss on a real latent cache (VAE shift and scale applied): finite, and its gradient reaches
    the transformer and both text encoders (T5 through the context, CLIP through the pooled vector)."""
    from personalize.training.cache import LatentCache, draw_batch
    from personalize.training.step import denoising_step

    model = copy.deepcopy(pipe)
    size = text_stack.native_resolution(model)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cache = LatentCache(model.vae, images, None)
    schedule = family.noise_schedule(model)
    batch = draw_batch(cache, 2, 0.5, family.num_train_steps(schedule), "sks dog", torch.Generator().manual_seed(4),
                       "cpu")
    params = [model.transformer.transformer_blocks[0].attn.add_k_proj.weight,
              model.text_encoder_2.get_input_embeddings().weight, model.text_encoder.get_input_embeddings().weight]
    for p in params:
        p.requires_grad_(True)

    class Method:
        def on_text_encoded(self, ids, hidden):
            assert ids.shape[1] == hidden.shape[1] == family.max_length(model, "tokenizer_2")

    loss = denoising_step(model, schedule, Method(), batch)
    loss.backward()
    assert torch.isfinite(loss)
    for p in params:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_schnell_has_no_guidance_embedding_and_gets_no_guidance(pipe, family):
    """Flux.1-schnell's transformer (``guidance_embeds=False``) is called without a guidance value."""
    from diffusers import FluxTransformer2DModel

    schnell = copy.copy(pipe)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    schnell.transformer = FluxTransformer2DModel(**{**config, "guidance_embeds": False}).eval()
    assert families.of(schnell) is family
    latents, noise, steps = _noised(pipe, family, (1, 4, 8, 8))
    noised = family.noised(family.noise_schedule(schnell), latents, noise, steps)
    enc = text_stack.encode(schnell, PROMPTS[:1])
    calls = []
    schnell.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    with torch.no_grad():
        out = family.predict(schnell, schnell.transformer, noised, enc.context, enc.pooled)
    assert calls[0]["guidance"] is None and out.shape == latents.shape and bool(torch.isfinite(out).all())
