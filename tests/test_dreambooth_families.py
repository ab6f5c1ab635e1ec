"""DreamBooth (full) and Custom Diffusion on SD 2.x and SDXL (``tiny-sd2``, ``tiny-sdxl``).

- DreamBooth writes a folder of the base's own stock pipeline class (SDXL: both tokenizers and text encoders) that
  gives the image ``attach`` gives, and ``train_text_encoder`` trains (and saves) both SDXL text encoders;
- Custom Diffusion's K/V deltas read the whole (concatenated) context, its token is one vector per encoder, and its
  diffusers export loads in the stock pipeline of each family with the same image.
Each base trains each method once (2 steps, batch 1), shared by the module's tests.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from personalize import Concept, attach, load_base, load_concept, train
from personalize.interop import export_concept, import_file

BASES = ("tiny-sd2", "tiny-sdxl")
PROMPT = "a photo of a {} ball on the grass"
SETTINGS = {"steps": 2, "batch_size": 1, "checkpoint_every": 0, "masks": "none", "prior_loss_weight": 0.0}
DREAMBOOTH = {"tiny-sd2": {"lr": 1e-3}, "tiny-sdxl": {"lr": 1e-3, "train_text_encoder": True}}
STOCK = {"tiny-sd2": "StableDiffusionPipeline", "tiny-sdxl": "StableDiffusionXLPipeline"}


def _image(pipe, word):
    return pipe(PROMPT.format(word), num_inference_steps=2, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(5)).images


def _params(pipe, parts):
    return {f"{part}.{n}": p.detach().clone() for part in parts for n, p in getattr(pipe, part).named_parameters()}


@pytest.fixture(scope="module")
def bases():
    return {name: load_base(name) for name in BASES}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bases):
    """(base, method) -> (concept path, state after step 1, image of the live pipeline after the last step)."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("families")
    photos = make_photos(root / "photos", n=2, size=24)
    found = {}
    for base, pipe in bases.items():
        for method, extra in (("dreambooth", DREAMBOOTH[base]), ("custom-diffusion", {})):
            seen = {}

            def record(step, loss, m, seen=seen):
                if step == 1:
                    seen["state"] = m.state_tensors()
                if step == SETTINGS["steps"]:
                    with torch.no_grad():
                        seen["image"] = _image(m.pipe, "<disc>")

            live = copy.deepcopy(pipe)
            path = train(live, photos, token="<disc>", superclass="ball", out=root / base / f"{method}.safetensors",
                         method=method, settings={**SETTINGS, **extra}, callbacks=[record], progress=False)
            parts = ("unet", "vae", "text_encoder", "text_encoder_2")[: 4 if base == "tiny-sdxl" else 3]
            before, after = _params(pipe, parts), _params(live, parts)
            assert all(torch.equal(before[k], after[k]) for k in before), "training changed a base weight"
            found[base, method] = (path, seen["state"], seen["image"])
    return found


# ----------------------------------------------------------------------------------------------- DreamBooth
@pytest.mark.parametrize("base", BASES)
def test_dreambooth_folder_loads_in_the_stock_pipeline_of_its_family(trained, bases, base):
    import diffusers

    path, _, trained_image = trained[base, "dreambooth"]
    folder = path.with_suffix(".pipeline")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == STOCK[base]
    stock = getattr(diffusers, STOCK[base]).from_pretrained(str(folder))
    stock.set_progress_bar_config(disable=True)
    pipe = copy.deepcopy(bases[base])
    plain = _image(pipe, "sks")
    concept = load_concept(path)
    modules = {name: getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")}
    weights = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items() if m is not None}
    with attach(pipe, concept):
        ours = _image(pipe, "<disc>")
        if base == "tiny-sdxl":  # both trained text encoders are swapped in, and both were saved
            for name in ("text_encoder", "text_encoder_2"):
                assert getattr(pipe, name) is not modules[name]
                saved, live = getattr(stock, name).state_dict(), getattr(pipe, name).state_dict()
                assert all(torch.equal(saved[k], live[k]) for k in saved if ".embeddings." not in f".{k}"), name
    # the identifier: "<disc>" here is "sks" in the stock pipeline (export_notes)
    assert concept.config.get("identifier", "sks") == "sks"
    assert np.array_equal(ours, _image(stock, "sks")), "the stock pipeline of the folder differs from attach"
    assert np.array_equal(ours, trained_image), "save -> load -> attach does not reproduce the trained image"
    assert np.abs(ours - plain).max() > 0.01, "the concept did not change the image"
    assert np.array_equal(plain, _image(pipe, "sks")), "detach did not restore the base"
    assert all(getattr(pipe, name, None) is m for name, m in modules.items()), "detach did not put the base back"
    for name, state in weights.items():
        assert state.keys() == modules[name].state_dict().keys()
        assert all(torch.equal(v, modules[name].state_dict()[k]) for k, v in state.items()), name


def test_dreambooth_one_step_on_sdxl_trains_unet_and_both_text_encoders_but_no_embedding_table(trained, bases):
    base = bases["tiny-sdxl"]
    _, state, _ = trained["tiny-sdxl", "dreambooth"]
    parts = ("unet", "text_encoder", "text_encoder_2")
    initial = {k: v for k, v in _params(base, parts).items() if ".embeddings." not in k}
    assert state.keys() == initial.keys(), "declared tensors: the UNet and both text encoders minus their tables"
    unchanged = {k for k in state if torch.equal(state[k], initial[k].float())}
    # SDXL reads the first encoder's penultimate layer: its last layer and final norm get no gradient
    last = base.text_encoder.config.num_hidden_layers - 1
    unread = (f"encoder.layers.{last}.", "final_layer_norm.")
    assert unchanged == {k for k in state if k.startswith("text_encoder.") and any(u in k for u in unread)}
    assert any(k.startswith("text_encoder_2.") for k in set(state) - unchanged)


# -------------------------------------------------------------------------------------------- Custom Diffusion
def test_custom_diffusion_kv_deltas_read_sdxl_concatenated_context():
    """On SDXL's real shapes (meta device): a (d_out, 2,048) delta on every cross-attention to_k / to_v."""
    from diffusers import UNet2DConditionModel

    from personalize.methods.custom_diffusion import CustomDiffusion

    sdxl = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl)
    shapes = CustomDiffusion.concept_shapes(unet, 768 + 1280)
    deltas = {k: v for k, v in shapes.items() if k.startswith("delta.")}
    assert len(deltas) == 2 * 70 and all(s[1] == 2048 for s in deltas.values())
    assert shapes["embedding"] == (1, 2048)


def test_custom_diffusion_on_tiny_sdxl_edits_the_64_wide_kv_and_both_token_tables(trained, bases):
    from personalize.edits.placement import site_names
    from personalize.methods.shared import word_vector

    base = bases["tiny-sdxl"]
    path, state, _ = trained["tiny-sdxl", "custom-diffusion"]
    concept = load_concept(path)
    sites = site_names(base.unet, "kv")
    assert sites and all(n.split(".")[-2] == "attn2" for n in sites)
    assert set(concept.tensors) == {"embedding", *(f"delta.{n}" for n in sites)}
    for n in sites:
        assert concept.tensors[f"delta.{n}"].shape == base.unet.get_submodule(n).weight.shape
        assert base.unet.get_submodule(n).in_features == 64
    # one step trains exactly the declared tensors: every K/V delta (from 0) and the token vector
    assert state.keys() == concept.tensors.keys()
    assert all(state[k].abs().max() > 0 for k in state if k.startswith("delta."))
    pipe = copy.deepcopy(base)
    with attach(pipe, concept):
        ids = [getattr(pipe, tok)("<disc>", add_special_tokens=False).input_ids for tok in ("tokenizer", "tokenizer_2")]
        assert ids[0] == ids[1] and len(ids[0]) == 1
        rows = [te.get_input_embeddings()(torch.tensor(ids[0]))[0] for te in (pipe.text_encoder, pipe.text_encoder_2)]
    assert torch.equal(torch.cat(rows).detach(), concept.tensors["embedding"][0])
    assert not torch.equal(state["embedding"][0], word_vector(base, "ktn")), "the token vector did not train"


@pytest.mark.parametrize("base", BASES)
def test_custom_diffusion_export_loads_in_the_stock_pipeline(trained, bases, base, tmp_path):
    path, _, _ = trained[base, "custom-diffusion"]
    concept = load_concept(path)
    g = torch.Generator().manual_seed(0)  # pushed far from the base, so a tensor a loader ignored would show
    concept = Concept(concept.header, {k: v + 3.0 * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
                                       for k, v in concept.tensors.items()}, concept.path)
    pipe = copy.deepcopy(bases[base])
    folder = export_concept(concept, tmp_path / "cd", base=pipe)
    stock = copy.deepcopy(bases[base])
    stock.unet.load_attn_procs(str(folder), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=stock)
    if base == "tiny-sdxl":  # diffusers' SDXL textual inversion: one entry per tokenizer / text encoder
        from safetensors.torch import load_file

        state = load_file(str(folder / "<disc>.safetensors"))
        assert set(state) == {"clip_l", "clip_g"}
        stock.load_textual_inversion(state["clip_l"], token="<disc>", text_encoder=stock.text_encoder,
                                     tokenizer=stock.tokenizer)
        stock.load_textual_inversion(state["clip_g"], token="<disc>", text_encoder=stock.text_encoder_2,
                                     tokenizer=stock.tokenizer_2)
    else:
        stock.load_textual_inversion(str(folder), weight_name="<disc>.safetensors")
    with attach(pipe, concept):
        ours = _image(pipe, "<disc>")
    # diffusers' Custom Diffusion processor computes attention without SDPA and (W + dW) e in one product
    assert np.abs(ours - _image(stock, "<disc>")).max() <= 1e-4
    assert np.abs(ours - _image(pipe, "ball")).max() > 0.01, "the concept did not change the image"
    back = load_concept(import_file(pipe, folder / "pytorch_custom_diffusion_weights.safetensors",
                                    method="custom-diffusion", superclass="ball", token="<disc>",
                                    embeddings=[folder / "<disc>.safetensors"], out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    for k, v in concept.tensors.items():
        assert torch.allclose(back.tensors[k], v, atol=1e-5), k


def test_custom_diffusion_export_refuses_a_base_of_another_width(trained, bases, tmp_path):
    from personalize.errors import ConceptFileError

    path, _, _ = trained["tiny-sdxl", "custom-diffusion"]
    with pytest.raises(ConceptFileError, match="pass the base it was trained on"):
        export_concept(load_concept(path), tmp_path / "cd", base=bases["tiny-sd2"])
    assert not (tmp_path / "cd").exists() or not any((tmp_path / "cd").iterdir())


def test_custom_diffusion_sdxl_import_of_two_unnamed_token_files_is_refused(trained, bases, tmp_path):
    """diffusers' SDXL token layout (clip_l, clip_g) carries no token name: several at once cannot be told apart."""
    from personalize.errors import BadInputError

    path, _, _ = trained["tiny-sdxl", "custom-diffusion"]
    folder = export_concept(load_concept(path), tmp_path / "cd", base=bases["tiny-sdxl"])
    with pytest.raises(BadInputError, match="does not name its token"):
        import_file(bases["tiny-sdxl"], folder / "pytorch_custom_diffusion_weights.safetensors",
                    method="custom-diffusion", superclass=["ball", "cup"], out=tmp_path / "two.safetensors",
                    embeddings=[folder / "<disc>.safetensors"] * 2)
    assert not (tmp_path / "two.safetensors").exists()
