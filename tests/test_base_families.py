"""The base families (SD 1.x, SD 2.x, SDXL): built-in tiny bases, folders recognised by their ``model_index.json``,
the text side (``text_stack``) checked against the stock pipelines' own ``encode_prompt`` / time ids, the SDXL
fingerprint over both encoders and tokenizers, and ``--resolution``."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from personalize import text_stack
from personalize.base import fingerprint, load_base, resolution
from personalize.errors import BadInputError
from personalize.families.sd import square_time_ids

FAMILY_OF = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


@pytest.fixture(scope="module")
def sdxl():
    return load_base("tiny-sdxl")


@pytest.fixture(scope="module")
def sd2():
    return load_base("tiny-sd2")


def test_tiny_sdxl_has_sdxl_classes_and_shapes(sdxl):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert isinstance(sdxl, StableDiffusionXLPipeline)
    assert type(sdxl.text_encoder) is CLIPTextModel and type(sdxl.text_encoder_2) is CLIPTextModelWithProjection
    assert sdxl.unet.config.addition_embed_type == "text_time"
    # the UNet's context is the two encoders side by side; the pooled text and 6 time ids feed its added embedding
    assert sdxl.unet.config.cross_attention_dim == sum(text_stack.widths(sdxl)) == 64
    assert sdxl.unet.config.projection_class_embeddings_input_dim == \
        6 * sdxl.unet.config.addition_time_embed_dim + sdxl.text_encoder_2.config.projection_dim
    assert sdxl.tokenizer.pad_token_id == 49407 and sdxl.tokenizer_2.pad_token == "!"
    assert len(sdxl.tokenizer) == len(sdxl.tokenizer_2) == 49408


@pytest.mark.parametrize("spec", sorted(FAMILY_OF))
def test_family_of_each_builtin_base(spec):
    assert text_stack.family(load_base(spec)) == FAMILY_OF[spec]


def test_tiny_sdxl_is_deterministic(sdxl):
    again = load_base("tiny-sdxl")
    for a, b in ((sdxl.unet, again.unet), (sdxl.text_encoder_2, again.text_encoder_2)):
        for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), n
    assert fingerprint(again) == fingerprint(sdxl)


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_encoding_equals_the_stock_encode_prompt(name, sd2, sdxl):
    """An independent computation: the stock pipeline's own encode_prompt gives the same context (and pooled)."""
    pipe = {"sd2": sd2, "sdxl": sdxl}[name]
    prompts = ["a photo of a dog", "a red cube on a table, studio light"]
    ours = text_stack.encode(pipe, prompts)
    stock = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(ours.context, stock[0])
    if name == "sdxl":
        assert torch.equal(ours.pooled, stock[2])  # SDXL returns (embeds, neg, pooled, neg pooled)
    else:
        assert ours.pooled is None


def test_time_ids_equal_the_stock_pipeline(sdxl):
    size = 48
    stock = sdxl._get_add_time_ids((size, size), (0, 0), (size, size), dtype=torch.float32,
                                   text_encoder_projection_dim=sdxl.text_encoder_2.config.projection_dim)
    assert torch.equal(square_time_ids(size, size, 1), stock)


def test_training_step_feeds_the_unet_what_the_pipeline_does(sdxl):
    """The trainer's UNet call carries SDXL's added conditioning (pooled text + time ids at the training size)."""
    from personalize.training.cache import Batch
    from personalize.training.step import denoising_step

    pipe = copy.deepcopy(sdxl)
    seen = {}
    pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)

    class Method:
        def on_text_encoded(self, ids, hidden):
            seen["hidden"] = hidden

    latents = torch.randn(2, 4, 8, 8)
    batch = Batch(latents, None, torch.randn_like(latents), torch.tensor([10, 500]), ["a photo of a dog"] * 2)
    from diffusers import DDPMScheduler

    denoising_step(pipe, DDPMScheduler.from_config(pipe.scheduler.config), Method(), batch)
    added = seen["added_cond_kwargs"]
    encoding = text_stack.encode(pipe, ["a photo of a dog"] * 2)
    assert torch.equal(seen["hidden"], encoding.context)
    assert torch.equal(added["text_embeds"], encoding.pooled)
    side = 8 * pipe.vae_scale_factor
    assert added["time_ids"].tolist() == [[side, side, 0, 0, side, side]] * 2


@pytest.mark.parametrize("spec", ["tiny-sd2", "tiny-sdxl"])
def test_a_saved_folder_loads_as_its_family(tmp_path, spec, sd2, sdxl):
    pipe = {"tiny-sd2": sd2, "tiny-sdxl": sdxl}[spec]
    pipe.save_pretrained(tmp_path / "base", safe_serialization=True)
    loaded = load_base(str(tmp_path / "base"))
    assert type(loaded) is type(pipe)
    assert text_stack.family(loaded) == FAMILY_OF[spec]
    assert fingerprint(loaded) == fingerprint(pipe)
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


def test_a_folder_of_another_pipeline_class_is_refused(tmp_path, sdxl):
    folder = tmp_path / "base"
    sdxl.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "HunyuanDiTPipeline"}))
    with pytest.raises(BadInputError) as err:
        load_base(str(folder))
    message = str(err.value)
    assert "HunyuanDiTPipeline" in message and "SDXL" in message and "FluxPipeline" in message
    assert "\n" not in message


def test_sdxl_fingerprint_covers_the_second_encoder_and_tokenizer(sdxl):
    here = fingerprint(sdxl)
    assert here.family == "sdxl"
    changed = copy.deepcopy(sdxl)
    with torch.no_grad():
        changed.text_encoder_2.text_model.encoder.layers[0].mlp.fc1.weight[0, 0] += 0.5
    assert here.differences(fingerprint(changed)) == ["text_encoder"]
    other_pad = copy.deepcopy(sdxl)
    other_pad.tokenizer_2.pad_token = "<|endoftext|>"
    assert "tokenizer" in here.differences(fingerprint(other_pad))


def test_resolution_default_is_native_and_bad_sizes_are_refused(sdxl):
    native = text_stack.native_resolution(sdxl)
    assert resolution(sdxl, 0) == resolution(sdxl, None) == native == 32
    assert resolution(sdxl, 64) == 64
    for bad in (30, -8, 10_000, 2.5, True):
        with pytest.raises(BadInputError, match="--resolution"):
            resolution(sdxl, bad)


def test_generate_at_another_resolution(sdxl):
    from personalize.generation import generate

    (image,) = generate(copy.deepcopy(sdxl), "a photo of a dog", steps=1, resolution=48)
    assert image.size == (48, 48)
