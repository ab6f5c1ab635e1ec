"""Interop on the diffusion transformers (``tiny-flux`` = Flux.1-dev, ``tiny-sd3`` = SD3.5 in miniature), checked
against stock diffusers on the other side:

- DreamBooth-LoRA (with ``train_text_encoder``: Flux CLIP-L, SD3 both CLIPs) exports ``diffusers-lora``, which
  stock ``FluxPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights(DIR)`` read to the image ``attach`` gives;
- LoRA files as diffusers' training scripts save them (peft adapter metadata, alpha != rank), ai-toolkit's /
  TheLastBen's diffusers keys with ``.alpha`` (Flux) and kohya sd-scripts' Flux names (``lora_unet_double_blocks_*``,
  through diffusers' own converter) import through the family's ``lora_state_dict``: the imported concept gives
  the stock loader's image; what the stock loader refuses (a kohya single-block ``linear1`` at tiny widths,
  ``.alpha`` keys on SD3) is refused in one line;
- Textual Inversion on Flux: the advanced Flux script's ``{"clip_l", "t5"}`` file, loaded by two stock
  ``load_textual_inversion`` calls (T5 through ``tokenizer_2`` / ``text_encoder_2``), same image; SD3 (no stock
  loader) refuses the export in one line saying so;
- DreamBooth: the pipeline folder loads with the stock class's ``from_pretrained`` to the attach image; its
  SD-layout ``single-file`` export is refused.

Prompts: personalize says the concept's token ``<disc>``, the stock side "sks" (DreamBooth's identifier word).
Flux.1's CLIP-L keeps the legacy ``eos_token_id`` 2, so transformers pools its output at a row's highest id: at
an added token, were the encoders to read ``<disc>``'s own id. The token seam gives them the identifier's id
there (``TokenSite`` aliases), so the pooled vector is the one "sks" gives, bit for bit.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from personalize import Concept, attach, families, load_concept, train
from personalize.errors import BadInputError
from personalize.interop import export_concept, import_file

FAST = {"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
PROMPT = "a photo of a {} ball"
BASES = ("tiny-flux", "tiny-sd3")
WORD = {"tiny-flux": "<disc>", "tiny-sd3": "<disc>"}  # the word personalize prompts with (module docstring)


@pytest.fixture(scope="module")
def masters():
    from personalize.base import load_base

    return {name: load_base(name) for name in BASES}


def _pushed(path, scale):
    """The trained concept pushed far from the base, so a loader that dropped a tensor would show."""
    concept = load_concept(path)
    g = torch.Generator().manual_seed(0)
    tensors = {k: v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
               for k, v in concept.tensors.items()}
    return Concept(concept.header, tensors, concept.path)


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, masters):
    """``{(method, base): concept}`` trained one step through the real trainer (the header is what training
    writes). Training and attaching leave the base as it was (the method contract), so one pipeline per base is
    shared; the stock loaders change theirs for good, so they get copies."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("dit")
    photos = make_photos(root / "photos", n=1)
    runs = [("dreambooth-lora", base, {"train_text_encoder": True}, 30.0) for base in BASES]
    runs += [("textual-inversion", "tiny-flux", {"num_vectors": 2}, 3.0)]
    runs += [("dreambooth", base, {"prior_loss_weight": 0.0}, None) for base in BASES]
    runs += [("residuals", base, {"train_token": True}, 30.0) for base in BASES]
    runs += [("custom-diffusion", base, {"prior_loss_weight": 0.0}, 300.0) for base in BASES]
    found = {}
    for method, base, extra, push in runs:
        path = train(masters[base], photos, token="<disc>", superclass="ball", out=root / f"{method}-{base}.safetensors",
                     method=method, settings={**FAST, **extra}, progress=False)
        found[method, base] = _pushed(path, push) if push else load_concept(path)
    return found


def _image(pipe, word):
    """Flux: its guidance embedding at 6 (one pass per step); SD3: guidance 1, one pass (the CFG batch is the
    SD families' tested path and not what a LoRA file changes)."""
    fam = families.of(pipe)
    size = fam.native_resolution(pipe)
    extra = {"max_sequence_length": fam.max_length(pipe, "tokenizer_2")} if fam.name == "flux" else {}
    return pipe(PROMPT.format(word), num_inference_steps=2, guidance_scale=6.0 if fam.name == "flux" else 1.0,
                output_type="np", height=size, width=size, generator=torch.Generator().manual_seed(1), **extra).images


_BASE_IMAGES = {}


def _base_image(pipe, word):
    """The base's image (made once per module: training and attaching leave the base as it was)."""
    key = (id(pipe), word)
    if key not in _BASE_IMAGES:
        _BASE_IMAGES[key] = _image(pipe, word)
    return _BASE_IMAGES[key]


def _stock(pipe, *changed):
    """A stock pipeline of the base's class sharing its parts, with its own copies of the ``changed`` ones (what
    the stock loader modifies; default the denoiser and the text encoders). Cheaper than a deep copy, whose
    tokenizers are slow to copy."""
    changed = changed or ("transformer", "text_encoder", "text_encoder_2")
    parts = {k: copy.deepcopy(v) if k in changed else v for k, v in pipe.components.items()}
    return type(pipe)(**parts)


def _ours(pipe, concept, word):
    with attach(pipe, concept):
        return _image(pipe, word)


def _assert_same(ours, theirs, base, changed=0.01):
    assert np.array_equal(ours, theirs), f"stock loader differs by {np.abs(ours - theirs).max()}"
    assert np.abs(ours - base).max() > changed, "the concept did not change the image"


def _one_line_refusal(call, *words):
    with pytest.raises(BadInputError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


# --------------------------------------------------------------------------- DreamBooth-LoRA
@pytest.mark.parametrize("base", BASES)
def test_lora_export_loads_in_the_stock_pipeline_and_imports_back(concepts, masters, tmp_path, base):
    concept, pipe = concepts["dreambooth-lora", base], masters[base]
    parts = {k.split(".", 1)[0] for k in concept.tensors}
    assert parts == {"transformer", *families.of(pipe).lora_text_encoders}  # Flux: CLIP-L; SD3: both CLIPs
    folder = export_concept(concept, tmp_path / "lora")
    stock = _stock(pipe)
    stock.load_lora_weights(str(folder))
    _assert_same(_ours(pipe, concept, WORD[base]), _image(stock, "sks"), _base_image(pipe, "sks"))

    back = load_concept(import_file(pipe, folder / "pytorch_lora_weights.safetensors", method="dreambooth-lora",
                                    superclass="ball", token="<disc>", out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in concept.tensors.items())
    assert back.config["train_text_encoder"] is True
    if base == "tiny-sd3":  # diffusers reads no kohya SD3 layout
        with pytest.raises(BadInputError, match="exports as diffusers-lora, not 'kohya'"):
            export_concept(concept, tmp_path / "kohya", "kohya")


def test_flux_kohya_export_loads_through_diffusers_converter(concepts, masters, tmp_path):
    """kohya sd-scripts' Flux names (fused img/txt qkv as one block-diagonal LoRA, CLIP-L as lora_te1_) read by the
    stock loader to the attach image, and imported back exactly. The joint blocks only: diffusers' converter splits
    a single block's linear1 at Flux.1's widths, so the whole tiny-flux concept is refused (next test)."""
    full, pipe = concepts["dreambooth-lora", "tiny-flux"], masters["tiny-flux"]
    concept = Concept(full.header, {k: v for k, v in full.tensors.items() if "single_transformer_blocks" not in k})
    folder = export_concept(concept, tmp_path / "kohya", "kohya")
    file = folder / "lora_kohya.safetensors"
    keys = load_file(str(file))
    assert {k.split(".")[0] for k in keys} >= {"lora_unet_double_blocks_0_img_attn_qkv",
                                                "lora_unet_double_blocks_0_txt_attn_qkv"}
    assert any(k.startswith("lora_te1_") for k in keys)
    stock = _stock(pipe)
    stock.load_lora_weights(str(folder), weight_name=file.name)
    _assert_same(_ours(pipe, concept, "<disc>"), _image(stock, "sks"), _base_image(pipe, "sks"))
    back = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                    out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in concept.tensors.items())

    _one_line_refusal(lambda: export_concept(full, tmp_path / "all", "kohya"), "linear1", "3072")
    assert not (tmp_path / "all").exists()


def test_flux_kohya_single_block_names_round_trip_at_flux_widths():
    """At Flux.1's widths (3,072; the mlp 12,288) a single block's q, k, v and proj_mlp written as one linear1 come
    back from diffusers' converter (``FluxPipeline.lora_state_dict``) as the same pairs, bit for bit; so do a joint
    block's fused qkv of unequal ranks (padded) and its output projection. Tensors only: no 12B model needed."""
    from diffusers import FluxPipeline

    from personalize.methods.dreambooth_lora import kohya_flux_state

    g = torch.Generator().manual_seed(5)
    shapes = {"single_transformer_blocks.0.attn.to_q": (3072, 2), "single_transformer_blocks.0.attn.to_k": (3072, 2),
              "single_transformer_blocks.0.attn.to_v": (3072, 2), "single_transformer_blocks.0.proj_mlp": (12288, 2),
              "transformer_blocks.3.attn.add_q_proj": (3072, 2), "transformer_blocks.3.attn.add_k_proj": (3072, 1),
              "transformer_blocks.3.attn.add_v_proj": (3072, 2), "transformer_blocks.3.attn.to_out.0": (3072, 2)}
    ours = {}
    for module, (n_out, rank) in shapes.items():
        ours[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, 3072, generator=g)
        ours[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=g)
    kohya = kohya_flux_state(ours)
    assert {k.split(".")[0] for k in kohya} == {"lora_unet_single_blocks_0_linear1",
                                                "lora_unet_double_blocks_3_txt_attn_qkv",
                                                "lora_unet_double_blocks_3_img_attn_proj"}
    back = FluxPipeline.lora_state_dict(dict(kohya))
    padded = {k: v for k, v in back.items() if "add_k_proj" in k}  # rank 1 padded to 2 with zeros
    back = {k: v for k, v in back.items() if "add_k_proj" not in k}
    assert back.keys() == {k for k in ours if "add_k_proj" not in k}
    assert all(torch.equal(v, ours[k]) for k, v in back.items())
    a, b = (padded[f"transformer.transformer_blocks.3.attn.add_k_proj.lora_{x}.weight"] for x in "AB")
    assert torch.equal(b @ a, ours["transformer.transformer_blocks.3.attn.add_k_proj.lora_B.weight"]
                       @ ours["transformer.transformer_blocks.3.attn.add_k_proj.lora_A.weight"])


def _script_lora(pipe, folder, alpha_keys=False):
    """A LoRA file as diffusers' train_dreambooth_lora_flux.py / _sd3.py save it: a peft adapter on the stock
    transformer with lora_alpha = 2 r, saved by the pipeline class's ``save_lora_weights`` with the adapter's
    metadata (the scripts' text-encoder adapters need transformers' ``add_adapter``, which wants peft >= 0.22);
    or (``alpha_keys``) the same pairs with kohya-style ``.alpha`` keys and no metadata (the ai-toolkit /
    TheLastBen Flux files diffusers reads). Returns the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    owner = copy.deepcopy(pipe.transformer)
    owner.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "add_k_proj"]))
    g = torch.Generator().manual_seed(3)
    for name, p in owner.named_parameters():
        if "lora_B" in name:
            p.data = 0.5 * torch.randn(p.shape, generator=g)
    layers = get_peft_model_state_dict(owner)
    if alpha_keys:
        state = {f"transformer.{k}": v for k, v in layers.items()}
        for key in [k for k in state if k.endswith(".lora_A.weight")]:
            state[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(4.0)
        save_file(state, str(folder / "lora.safetensors"))
    else:
        type(pipe).save_lora_weights(folder, transformer_lora_layers=layers, weight_name="lora.safetensors",
                                     transformer_lora_adapter_metadata=owner.peft_config["default"].to_dict())
    return folder / "lora.safetensors"


def _import_equals_stock(pipe, base, file, tmp_path):
    stock = _stock(pipe)
    stock.load_lora_weights(str(file.parent), weight_name=file.name)
    concept = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                       out=tmp_path / "imported.safetensors"))
    _assert_same(_ours(pipe, concept, WORD[base]), _image(stock, "sks"), _base_image(pipe, "sks"))
    return concept


@pytest.mark.parametrize("base", BASES)
def test_a_diffusers_script_lora_imports_to_the_stock_loaders_image(masters, tmp_path, base):
    pipe = masters[base]
    concept = _import_equals_stock(pipe, base, _script_lora(pipe, tmp_path), tmp_path)
    b = next(v for k, v in concept.tensors.items() if k.endswith(".lora_B.weight"))
    assert b.shape[1] == 2  # the file's rank; alpha / r = 2 folded into lora_B


def test_flux_alpha_keys_import_as_the_stock_loader_reads_them(masters, tmp_path):
    _import_equals_stock(masters["tiny-flux"], "tiny-flux", _script_lora(masters["tiny-flux"], tmp_path, True), tmp_path)


def test_sd3_alpha_keys_are_refused_as_the_stock_loader_refuses_them(masters, tmp_path):
    pipe = masters["tiny-sd3"]
    file = _script_lora(pipe, tmp_path, alpha_keys=True)
    with pytest.raises(ValueError):
        _stock(pipe).load_lora_weights(str(tmp_path), weight_name=file.name)
    _one_line_refusal(lambda: import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                          out=tmp_path / "x.safetensors"), "alpha")
    assert not (tmp_path / "x.safetensors").exists()


def _kohya_flux(pipe, single=False):
    """kohya sd-scripts' Flux LoRA names (BFL module names: fused qkv per stream, ``attn_proj``), alpha = r / 2."""
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    g = torch.Generator().manual_seed(4)
    state = {}
    for i in range(pipe.transformer.config.num_layers):
        for stream in ("img", "txt"):
            for name, n_out in (("attn_qkv", 3 * width), ("attn_proj", width)):
                key = f"lora_unet_double_blocks_{i}_{stream}_{name}"
                state[f"{key}.lora_down.weight"] = torch.randn(3, width, generator=g)
                state[f"{key}.lora_up.weight"] = torch.randn(n_out, 3, generator=g)
                state[f"{key}.alpha"] = torch.tensor(1.5)
    if single:  # the single block's fused linear1 (q, k, v, mlp): the converter splits it at Flux.1's widths
        state["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.randn(3, width, generator=g)
        state["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.randn(7 * width, 3, generator=g)
        state["lora_unet_single_blocks_0_linear1.alpha"] = torch.tensor(1.5)
    return state


def test_a_kohya_flux_lora_imports_through_diffusers_converter(masters, tmp_path):
    pipe = masters["tiny-flux"]
    save_file(_kohya_flux(pipe), str(tmp_path / "kohya.safetensors"))
    concept = _import_equals_stock(pipe, "tiny-flux", tmp_path / "kohya.safetensors", tmp_path)
    assert any(".attn.add_k_proj." in k for k in concept.tensors)  # txt qkv split into the add_*_proj layers


def test_a_kohya_single_block_at_tiny_width_is_refused_like_the_stock_loader(masters, tmp_path):
    """diffusers' converter splits ``linear1`` at Flux.1's 3,072 x 3 + 12,288: on other widths it asserts, in the
    stock loader too; personalize says so in one line and writes nothing."""
    pipe = masters["tiny-flux"]
    file = tmp_path / "kohya.safetensors"
    save_file(_kohya_flux(pipe, single=True), str(file))
    with pytest.raises(AssertionError):
        _stock(pipe).load_lora_weights(str(tmp_path), weight_name=file.name)
    _one_line_refusal(lambda: import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                          out=tmp_path / "x.safetensors"), "converter", "widths")
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------- Textual Inversion
def test_flux_textual_inversion_is_the_advanced_scripts_file_and_loads_in_stock_flux(concepts, masters, tmp_path):
    concept, pipe = concepts["textual-inversion", "tiny-flux"], masters["tiny-flux"]
    widths = concept.header["text_widths"]
    assert widths == [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.d_model]
    folder = export_concept(concept, tmp_path / "ti")
    state = load_file(str(folder / "learned_embeds.safetensors"))
    vectors = concept.tensors["embedding"]
    assert set(state) == {"clip_l", "t5"} and state["clip_l"].shape == (2, widths[0])
    assert torch.equal(torch.cat([state["clip_l"], state["t5"]], dim=1), vectors)

    # the advanced Flux script's model card: one call per encoder
    stock = _stock(pipe, "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    stock.load_textual_inversion(state["clip_l"], token="<disc>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(state["t5"], token="<disc>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    _assert_same(_ours(pipe, concept, "<disc>"), _image(stock, "<disc>"), _base_image(pipe, "ball"))
    import json

    how = json.loads((folder / "export.json").read_text())["how_to_load"]
    assert "state['t5']" in how and "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in how

    back = load_concept(import_file(pipe, folder / "learned_embeds.safetensors", method="textual-inversion",
                                    superclass="ball", token="<disc>", out=tmp_path / "back.safetensors"))
    assert torch.equal(back.tensors["embedding"], vectors) and back.header["text_widths"] == widths


def test_sd3_textual_inversion_export_is_refused_saying_why(concepts, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders import TextualInversionLoaderMixin

    assert not issubclass(StableDiffusion3Pipeline, TextualInversionLoaderMixin)
    header = {**concepts["dreambooth-lora", "tiny-sd3"].header, "method": "textual-inversion"}  # an SD3 header
    concept = Concept(header, {"embedding": torch.zeros(1, 8)})
    _one_line_refusal(lambda: export_concept(concept, tmp_path / "x"), "SD3", "load_textual_inversion")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- Personalized Residuals, Custom Diffusion
LORA_SITES = {  # the modules each method's diffusers-lora export covers on tiny-flux
    "residuals": {"transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_out.0",
                  "single_transformer_blocks.0.proj_out"},
    "custom-diffusion": {f"transformer_blocks.{i}.attn.add_{p}_proj" for i in (0, 1) for p in "kv"},
}
TOKEN_FILE = {"residuals": "token.safetensors", "custom-diffusion": "<disc>.safetensors"}


@pytest.mark.parametrize("method", ["residuals", "custom-diffusion"])
def test_flux_lora_exports_load_with_the_advanced_scripts_token_file(concepts, masters, tmp_path, method):
    """Residuals (LAG off: a LoRA on each block's attention output projection) and Custom Diffusion (its K/V deltas
    as a full-rank LoRA, A = identity) load with stock ``load_lora_weights``, their token as the advanced Flux
    script's ``clip_l``/``t5`` file, to the image ``attach`` gives."""
    import json

    concept, pipe = concepts[method, "tiny-flux"], masters["tiny-flux"]
    folder = export_concept(concept, tmp_path / "out", "diffusers-lora", base=pipe)
    lora = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert {k.rsplit(".lora_", 1)[0] for k in lora} == {f"transformer.{site}" for site in LORA_SITES[method]}
    state = load_file(str(folder / TOKEN_FILE[method]))
    stock = _stock(pipe, "transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    stock.load_lora_weights(str(folder))
    stock.load_textual_inversion(state["clip_l"], token="<disc>", text_encoder=stock.text_encoder,
                                 tokenizer=stock.tokenizer)
    stock.load_textual_inversion(state["t5"], token="<disc>", text_encoder=stock.text_encoder_2,
                                 tokenizer=stock.tokenizer_2)
    _assert_same(_ours(pipe, concept, "<disc>"), _image(stock, "<disc>"), _base_image(pipe, "ball"))
    how = json.loads((folder / "export.json").read_text())["how_to_load"]
    assert how.startswith("pipe.load_lora_weights(DIR)") and "state['t5']" in how


@pytest.mark.parametrize("method", ["residuals", "custom-diffusion"])
def test_sd3_lora_exports_load_given_the_prompt_embeddings(concepts, masters, tmp_path, method):
    """SD3 has no stock token loader: the LoRA file loads with ``load_lora_weights``, and with the prompt's
    embeddings made with the token added the stock pipeline gives the attach image."""
    import json

    concept, pipe = concepts[method, "tiny-sd3"], masters["tiny-sd3"]
    folder = export_concept(concept, tmp_path / "out", "diffusers-lora", base=pipe)
    stock = _stock(pipe, "transformer")
    stock.load_lora_weights(str(folder))

    def render(p, **embeds):
        size = families.of(p).native_resolution(p)
        return p(num_inference_steps=2, guidance_scale=1.0, output_type="np", height=size, width=size,
                 generator=torch.Generator().manual_seed(1), **embeds).images

    with attach(pipe, concept):
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT.format("<disc>"), None, None, do_classifier_free_guidance=False)
        ours = render(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    theirs = render(stock, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    _assert_same(ours, theirs, render(pipe, prompt_embeds=embeds, pooled_prompt_embeds=pooled))
    how = json.loads((folder / "export.json").read_text())["how_to_load"]
    assert "load_textual_inversion" in how and "\n" not in how


# --------------------------------------------------------------------------- DreamBooth
@pytest.mark.parametrize("base", BASES)
def test_dreambooth_pipeline_folder_loads_in_the_stock_class(concepts, masters, tmp_path, base):
    import diffusers

    from personalize.methods.dreambooth import pipeline_folder

    concept, pipe = concepts["dreambooth", base], masters[base]
    stock_class = getattr(diffusers, families.of(pipe).pipeline_classes[0])
    stock = stock_class.from_pretrained(str(pipeline_folder(concept)))
    assert type(stock) is stock_class
    # one step of full fine-tuning at the trainer's DreamBooth lr moves the image only a little
    _assert_same(_ours(pipe, concept, WORD[base]), _image(stock, "sks"), _base_image(pipe, "sks"), changed=0.0)
    _one_line_refusal(lambda: export_concept(concept, tmp_path / "x", "single-file"), "OUT.pipeline/")
    assert not (tmp_path / "x").exists()
