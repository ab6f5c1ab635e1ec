"""Interop on SD 2.x and SDXL: every export loads in a stock diffusers pipeline of the family (``load_base``'s
``tiny-sd2`` / ``tiny-sdxl``, a StableDiffusionPipeline / StableDiffusionXLPipeline) and gives the image
``attach`` gives, bit for bit; every import reads back the exported tensors exactly.

- Textual Inversion: SDXL in the two-key layout (``clip_l`` for text_encoder, ``clip_g`` for text_encoder_2, loaded
  with two ``load_textual_inversion`` calls), also as AUTOMATIC1111's ``<token>.safetensors``; SD 2.x in
  diffusers' single-key file and A1111's ``.pt``.
- DreamBooth-LoRA with ``train_text_encoder`` (SDXL: LoRA on both text encoders) as a diffusers LoRA
  (``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``) and a kohya one (``lora_unet_``, ``lora_te1_``/``lora_te2_``
  on SDXL, ``lora_te_`` on SD 2.x), both read by ``load_lora_weights``.
- Personalized Residuals' diffusers-LoRA export on SDXL (its V* as a two-key embedding).
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personalize import Concept, attach, load_concept, train
from personalize.errors import BadInputError
from personalize.interop import export_concept, import_file

FAST = {"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
PROMPT = "a photo of a {} ball on the grass"
FAMILIES = ("tiny-sd2", "tiny-sdxl")


@pytest.fixture(scope="module")
def masters():
    from personalize.base import load_base

    return {name: load_base(name) for name in FAMILIES}


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, masters):
    """``{(method, base): concept}``: trained one step through the real trainer (so the header is what training
    writes), then pushed far from the base so a loader that dropped a tensor would show. Training and attaching
    leave the base as it was (the method contract), so the tests share one pipeline per base and copy it only for
    the stock loaders, which change it for good."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("families")
    photos = make_photos(root / "photos", n=2)
    found = {}
    for base in FAMILIES:
        for method, extra, push in (("textual-inversion", {"num_vectors": 2}, 3.0),
                                    ("dreambooth-lora", {"train_text_encoder": True}, 30.0),
                                    ("residuals", {}, 3.0)):
            path = train(masters[base], photos, token="<disc>", superclass="ball",
                         out=root / f"{method}-{base}.safetensors", method=method, settings={**FAST, **extra},
                         progress=False)
            concept = load_concept(path)
            g = torch.Generator().manual_seed(0)
            tensors = {k: v + push * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
                       for k, v in concept.tensors.items()}
            found[method, base] = Concept(concept.header, tensors, concept.path)
    return found


def _image(pipe, prompt):
    return pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(1)).images


_IMAGES = {}  # (pipeline, concept or None, word) -> image: each is made once per module


def _ours(pipe, concept, word="<disc>"):
    """The image with ``concept`` attached (detached again after)."""
    key = (id(pipe), id(concept), word)
    if key not in _IMAGES:
        with attach(pipe, concept):
            _IMAGES[key] = _image(pipe, PROMPT.format(word))
    return _IMAGES[key]


def _base_image(pipe, word):
    key = (id(pipe), None, word)
    if key not in _IMAGES:
        _IMAGES[key] = _image(pipe, PROMPT.format(word))
    return _IMAGES[key]


def _assert_same(ours, theirs, base):
    assert np.array_equal(ours, theirs), f"stock loader differs by {np.abs(ours - theirs).max()}"
    assert np.abs(ours - base).max() > 0.01, "the concept did not change the image"


def _load_two_key(pipe, file, token="<disc>"):
    """The stock SDXL way to load a clip_l / clip_g embedding (diffusers' textual-inversion docs)."""
    state = load_file(str(file))
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


# --------------------------------------------------------------------------- textual inversion
@pytest.mark.parametrize("fmt,file", [("diffusers", "learned_embeds.safetensors"), ("a1111", "<disc>.safetensors")])
def test_sdxl_textual_inversion_two_key_round_trip(concepts, masters, tmp_path, fmt, file):
    concept = concepts["textual-inversion", "tiny-sdxl"]
    assert concept.header["text_widths"] == [32, 32]
    folder = export_concept(concept, tmp_path / fmt, fmt)
    state = load_file(str(folder / file))
    vectors = concept.tensors["embedding"]
    assert set(state) == {"clip_l", "clip_g"}
    assert torch.equal(state["clip_l"], vectors[:, :32]) and torch.equal(state["clip_g"], vectors[:, 32:])

    stock = copy.deepcopy(masters["tiny-sdxl"])
    _load_two_key(stock, folder / file)
    pipe = masters["tiny-sdxl"]
    _assert_same(_ours(pipe, concept), _image(stock, PROMPT.format("<disc>")), _base_image(pipe, "ball"))

    with pytest.raises(BadInputError, match="does not name its token"):  # the two-key file holds no token name
        import_file(pipe, folder / file, method="textual-inversion", superclass="ball", out=tmp_path / "x.safetensors")
    back = load_concept(import_file(pipe, folder / file, method="textual-inversion", superclass="ball",
                                    token="<disc>", out=tmp_path / "back.safetensors"))
    assert torch.equal(back.tensors["embedding"], vectors)
    assert back.config["num_vectors"] == 2 and back.header["text_widths"] == [32, 32]


@pytest.mark.parametrize("fmt", ["diffusers", "a1111"])
def test_sd2_textual_inversion_round_trip(concepts, masters, tmp_path, fmt):
    concept = concepts["textual-inversion", "tiny-sd2"]
    assert "text_widths" not in concept.header
    folder = export_concept(concept, tmp_path / fmt, fmt)
    file = folder / ("learned_embeds.safetensors" if fmt == "diffusers" else "<disc>.pt")
    stock = copy.deepcopy(masters["tiny-sd2"])
    stock.load_textual_inversion(str(folder) if fmt == "diffusers" else str(file))
    pipe = masters["tiny-sd2"]
    _assert_same(_ours(pipe, concept), _image(stock, PROMPT.format("<disc>")), _base_image(pipe, "ball"))
    back = load_concept(import_file(pipe, file, method="textual-inversion", superclass="ball",
                                    out=tmp_path / "back.safetensors", allow_pickle=fmt == "a1111"))
    assert torch.equal(back.tensors["embedding"], concept.tensors["embedding"]) and back.token == "<disc>"


def test_textual_inversion_of_another_family_is_refused(concepts, masters, tmp_path, capsys):
    """An SDXL embedding onto an SD base (through the CLI: one line, exit 2) and a single-key one onto SDXL;
    nothing written."""
    from test_bad_input import check_error, run_cli

    sdxl = export_concept(concepts["textual-inversion", "tiny-sdxl"], tmp_path / "xl") / "learned_embeds.safetensors"
    sd2 = export_concept(concepts["textual-inversion", "tiny-sd2"], tmp_path / "sd2") / "learned_embeds.safetensors"
    out = tmp_path / "bad.safetensors"
    code, _, err = run_cli(capsys, ["import", sdxl, "--method", "textual-inversion", "--superclass", "ball",
                                    "--token", "<d>", "--base", "tiny-sd2", "--out", out])
    check_error(code, err, "SD 2.x base", "needs an SDXL base")
    with pytest.raises(BadInputError, match="an SDXL base needs an SDXL embedding"):
        import_file(masters["tiny-sdxl"], sd2, method="textual-inversion", superclass="ball", out=out)
    assert not out.exists()


# --------------------------------------------------------------------------- LoRA
KOHYA_PREFIXES = {"tiny-sdxl": {"lora_unet_", "lora_te1_", "lora_te2_"}, "tiny-sd2": {"lora_unet_", "lora_te_"}}


@pytest.mark.parametrize("base", FAMILIES)
@pytest.mark.parametrize("fmt,weight_name", [("diffusers-lora", None), ("kohya", "lora_kohya.safetensors")])
def test_dreambooth_lora_round_trip(concepts, masters, tmp_path, base, fmt, weight_name):
    concept = concepts["dreambooth-lora", base]
    parts = {k.split(".", 1)[0] for k in concept.tensors}
    assert parts == ({"unet", "text_encoder", "text_encoder_2"} if base == "tiny-sdxl" else {"unet", "text_encoder"})
    folder = export_concept(concept, tmp_path / fmt, fmt)
    file = folder / (weight_name or "pytorch_lora_weights.safetensors")
    if fmt == "kohya":
        assert {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] + "_" for k in load_file(str(file))} == KOHYA_PREFIXES[base]
    stock = copy.deepcopy(masters[base])
    stock.load_lora_weights(str(folder), **({"weight_name": weight_name} if weight_name else {}))
    pipe = masters[base]
    # the concept token is DreamBooth's identifier: "sks" in a stock pipeline
    _assert_same(_ours(pipe, concept), _image(stock, PROMPT.format("sks")), _base_image(pipe, "sks"))
    back = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                    out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    for k, v in concept.tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.config["train_text_encoder"] is True


def test_sdxl_text_encoder_lora_trains_both_encoders(concepts, masters):
    """train_text_encoder on SDXL: LoRA on every attention projection of both text encoders (as diffusers'
    train_dreambooth_lora_sdxl.py), and one step moves lora_B (zero at start) in each of them."""
    from personalize.edits.placement import site_names

    trained = load_concept(concepts["dreambooth-lora", "tiny-sdxl"].path)
    for part in ("text_encoder", "text_encoder_2"):
        b = {k: v for k, v in trained.tensors.items() if k.startswith(part + ".") and k.endswith(".lora_B.weight")}
        assert len(b) == len(site_names(getattr(masters["tiny-sdxl"], part), "text_attention"))
        assert any(v.abs().max() > 0 for v in b.values()), f"{part}'s LoRA did not train"


def test_sdxl_lora_onto_an_sd_base_is_refused(concepts, masters, tmp_path):
    folder = export_concept(concepts["dreambooth-lora", "tiny-sdxl"], tmp_path / "xl")
    with pytest.raises(BadInputError) as err:
        import_file(masters["tiny-sd2"], folder / "pytorch_lora_weights.safetensors", method="dreambooth-lora",
                    superclass="ball", token="<disc>", out=tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("base", FAMILIES)
def test_residuals_export_loads_in_a_stock_pipeline(concepts, masters, tmp_path, base):
    """Residuals (without LAG) = the stock LoRA loader on the Linear proj_out LoRA + V* as a textual inversion
    (SDXL: a clip_l / clip_g embedding)."""
    concept = concepts["residuals", base]
    folder = export_concept(concept, tmp_path / "res")
    stock = copy.deepcopy(masters[base])
    stock.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors")
    if base == "tiny-sdxl":
        _load_two_key(stock, folder / "token.safetensors")
    else:
        stock.load_textual_inversion(str(folder / "token.safetensors"))
    pipe = masters[base]
    _assert_same(_ours(pipe, concept), _image(stock, PROMPT.format("<disc>")), _base_image(pipe, "ball"))


def _sgm(name: str, layers_per_block: int) -> str:
    """A diffusers UNet attention name as kohya sd-scripts' SDXL network names it (the original SGM UNet's blocks):
    down_blocks.b.attentions.a = input_blocks.(1 + b (L + 1) + a).1, mid_block.attentions.0 = middle_block.1,
    up_blocks.b.attentions.a = output_blocks.(b (L + 1) + a).1."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    b, a = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(1 + b * (layers_per_block + 1) + a), "1", *parts[4:]])
    return ".".join(["output_blocks", str(b * (layers_per_block + 1) + a), "1", *parts[4:]])


def test_kohya_sdxl_file_with_sgm_block_names_imports_like_the_stock_loader(masters, tmp_path):
    """A LoRA as kohya sd-scripts writes it for SDXL (lora_unet_input_blocks_..., lora_te1_, lora_te2_, alpha 1 at
    rank 4): the imported concept's image equals StableDiffusionXLPipeline.load_lora_weights' on the same file."""
    from safetensors.torch import save_file

    from personalize.edits.placement import site_names

    pipe = masters["tiny-sdxl"]
    g = torch.Generator().manual_seed(4)
    tensors = {}
    names = [("lora_unet_", _sgm(n, pipe.unet.config.layers_per_block), pipe.unet.get_submodule(n))
             for n in site_names(pipe.unet, "attention")]
    for prefix, te in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for n in site_names(te, "text_attention"):
            names.append((prefix, n if n.startswith("text_model.") else "text_model." + n, te.get_submodule(n)))
    for prefix, name, layer in names:
        stem = prefix + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = 0.3 * torch.randn(4, layer.in_features, generator=g)
        tensors[f"{stem}.lora_up.weight"] = 0.3 * torch.randn(layer.out_features, 4, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    file = tmp_path / "kohya_sdxl.safetensors"
    save_file(tensors, str(file), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": "1"})

    stock = copy.deepcopy(pipe)
    stock.load_lora_weights(str(tmp_path), weight_name=file.name)
    concept = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                       out=tmp_path / "lora.safetensors"))
    assert {k.split(".", 1)[0] for k in concept.tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in concept.tensors)
    # alpha / rank = 1/4 folded into lora_B is exact in floating point, so this is bit for bit too
    _assert_same(_ours(pipe, concept, "sks"), _image(stock, PROMPT.format("sks")), _base_image(pipe, "sks"))
