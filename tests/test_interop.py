"""Export to, and import from, the formats other tools load: each round-trips through a stock diffusers pipeline
(the stock loader's images equal ours, same seed) and back into an equal concept."""
import copy

import numpy as np
import pytest
import torch

from personalize import Concept, attach, load_concept, train
from personalize.interop import export_concept, import_file

FAST = {"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none"}
PROMPT = "a photo of a {} ball on the grass"


@pytest.fixture(scope="module")
def concepts(tmp_path_factory, _tiny_master):
    """One concept per exportable method, trained one step, then pushed far from the base (so a loader that
    ignored a tensor would show)."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("interop")
    photos = make_photos(root / "photos", n=2)
    found = {}
    for method, extra, push in (("textual-inversion", {"num_vectors": 2}, 3.0),
                                ("dreambooth-lora", {"train_text_encoder": True}, 30.0),
                                ("custom-diffusion", {"prior_loss_weight": 0}, 3.0)):
        path = train(copy.deepcopy(_tiny_master), photos, token="<disc>", superclass="ball",
                     out=root / f"{method}.safetensors", method=method, settings={**FAST, **extra}, progress=False)
        concept = load_concept(path)
        g = torch.Generator().manual_seed(0)
        tensors = {k: v + push * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=g)
                   for k, v in concept.tensors.items()}
        found[method] = Concept(concept.header, tensors, concept.path)
    return found


def _image(pipe, prompt):
    return pipe(prompt, num_inference_steps=3, guidance_scale=6.0, output_type="np",
                generator=torch.Generator().manual_seed(1)).images


def _ours(tiny, concept, word="<disc>"):
    with attach(tiny, concept):
        return _image(tiny, PROMPT.format(word))


def _assert_same(ours, theirs, base, atol=0.0):
    assert np.abs(ours - theirs).max() <= atol, f"stock loader differs by {np.abs(ours - theirs).max()}"
    assert np.abs(ours - base).max() > 0.01, "the concept did not change the image"


@pytest.mark.parametrize("fmt,load", [
    ("diffusers", lambda pipe, d: pipe.load_textual_inversion(str(d))),
    ("a1111", lambda pipe, d: pipe.load_textual_inversion(str(d / "<disc>.pt"))),
])
def test_textual_inversion_round_trip(concepts, tiny, tmp_path, fmt, load):
    concept = concepts["textual-inversion"]
    folder = export_concept(concept, tmp_path / fmt, fmt)
    stock = copy.deepcopy(tiny)
    load(stock, folder)
    _assert_same(_ours(tiny, concept), _image(stock, PROMPT.format("<disc>")), _image(tiny, PROMPT.format("ball")))
    file = folder / ("learned_embeds.safetensors" if fmt == "diffusers" else "<disc>.pt")
    back = load_concept(import_file(tiny, file, method="textual-inversion", superclass="ball",
                                    out=tmp_path / "back.safetensors", allow_pickle=fmt == "a1111"))
    assert torch.equal(back.tensors["embedding"], concept.tensors["embedding"])
    assert back.token == "<disc>" and back.config["num_vectors"] == 2


@pytest.mark.parametrize("fmt,weight_name", [("diffusers-lora", None), ("kohya", "lora_kohya.safetensors")])
def test_dreambooth_lora_round_trip(concepts, tiny, tmp_path, fmt, weight_name):
    concept = concepts["dreambooth-lora"]
    folder = export_concept(concept, tmp_path / fmt, fmt)
    stock = copy.deepcopy(tiny)
    stock.load_lora_weights(str(folder), **({"weight_name": weight_name} if weight_name else {}))
    # the concept token is DreamBooth's identifier: "sks" in a stock pipeline
    _assert_same(_ours(tiny, concept), _image(stock, PROMPT.format("sks")), _image(tiny, PROMPT.format("sks")))
    file = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    back = load_concept(import_file(tiny, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                                    out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    for k, v in concept.tensors.items():
        assert torch.allclose(back.tensors[k], v, atol=1e-6), k
    assert back.config["train_text_encoder"] is True


def test_custom_diffusion_round_trip(concepts, tiny, tmp_path):
    concept = concepts["custom-diffusion"]
    folder = export_concept(concept, tmp_path / "cd", base=tiny)
    stock = copy.deepcopy(tiny)
    # the documented stock path: without _pipeline, load_attn_procs reads the weights but never sets them
    stock.unet.load_attn_procs(str(folder), weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=stock)
    stock.load_textual_inversion(str(folder), weight_name="<disc>.safetensors")
    # diffusers' Custom Diffusion processor computes attention without SDPA and (W + dW) e in one product
    _assert_same(_ours(tiny, concept), _image(stock, PROMPT.format("<disc>")), _image(tiny, PROMPT.format("ball")),
                 atol=1e-4)
    back = load_concept(import_file(tiny, folder / "pytorch_custom_diffusion_weights.safetensors",
                                    method="custom-diffusion", superclass="ball",
                                    embeddings=[folder / "<disc>.safetensors"], out=tmp_path / "back.safetensors"))
    assert back.tensors.keys() == concept.tensors.keys()
    for k, v in concept.tensors.items():
        assert torch.allclose(back.tensors[k], v, atol=1e-5), k


def test_dreambooth_folder_is_a_stock_pipeline(tiny, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "db.safetensors", method="dreambooth",
                 settings={**FAST, "lr": 1e-3, "prior_loss_weight": 0}, progress=False)
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "db.pipeline"))
    stock.set_progress_bar_config(disable=True)
    _assert_same(_ours(tiny, load_concept(path)), _image(stock, PROMPT.format("sks")), _image(tiny, PROMPT.format("sks")))


class Payload:
    """Stands for an object a malicious pickle would bring along."""


def test_pickles_need_allow_pickle_and_load_weights_only(tiny, tmp_path):
    from personalize.errors import BadInputError

    path = tmp_path / "emb.pt"
    torch.save({"<cat>": torch.randn(1, 32)}, path)
    with pytest.raises(BadInputError, match="allow-pickle"):
        import_file(tiny, path, method="textual-inversion", superclass="ball", out=tmp_path / "a.safetensors")
    assert import_file(tiny, path, method="textual-inversion", superclass="ball", out=tmp_path / "a.safetensors",
                       allow_pickle=True).is_file()

    # anything beyond tensors and plain containers is refused even with --allow-pickle
    torch.save({"<cat>": torch.randn(1, 32), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(BadInputError, match="weights-only"):
        import_file(tiny, tmp_path / "evil.pt", method="textual-inversion", superclass="ball",
                    out=tmp_path / "b.safetensors", allow_pickle=True)
    assert not (tmp_path / "b.safetensors").exists()


def test_lora_scale_knob(concepts, tiny):
    """scale=0 is the base model exactly; the default (1) is the trained LoRA."""
    concept = concepts["dreambooth-lora"]
    base = _image(tiny, PROMPT.format("sks"))
    with attach(tiny, concept, scale=0.0):
        off = _image(tiny, PROMPT.format("<disc>"))
    assert np.array_equal(off, base)
    assert np.abs(_ours(tiny, concept) - base).max() > 0.01


# --------------------------------------------------------------------------- files other tools wrote
LATENTS = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _outputs(pipe, prompt="a photo of a ball"):
    """The text encoding of ``prompt`` and the UNet's output on fixed latents: what every LoRA layer acts on."""
    emb = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    return emb, pipe.unet(LATENTS.to(emb.dtype), torch.tensor([10]), emb).sample


def _assert_outputs_close(ours, theirs, base, atol=1e-5):
    for a, b, c, what in zip(ours, theirs, base, ("text encoding", "UNet output")):
        assert torch.allclose(a, b, rtol=1e-4, atol=atol), f"{what}: stock loader differs by {(a - b).abs().max()}"
        assert (b - c).abs().max() > 0.01, f"the concept did not change the {what}"


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory, _tiny_master):
    """A LoRA written by diffusers' own save path from peft layers, alpha != rank: UNet attention r=4 alpha=1,
    text-encoder q/v r=2 alpha=3 (the configs go into the file's lora_adapter_metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    src = copy.deepcopy(_tiny_master)
    unet_cfg = LoraConfig(r=4, lora_alpha=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                          init_lora_weights=False)
    te_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        src.unet.add_adapter(unet_cfg)
        inject_adapter_in_model(te_cfg, src.text_encoder)
    folder = tmp_path_factory.mktemp("peft-lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(src.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(src.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


KOHYA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def kohya_lora(tmp_path_factory, _tiny_master):
    """A kohya sd-scripts LoRA (rank 4, alpha 1) on every layer its SD 1.x network covers: attention, proj_in /
    proj_out (1x1 convs here), feed-forward, and the text encoder's attention and MLP."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(4)
    tensors = {}
    for prefix, module in (("lora_unet_", _tiny_master.unet), ("lora_te_", _tiny_master.text_encoder)):
        for name, layer in module.named_modules():
            if not name.endswith(KOHYA_LAYERS):
                continue
            if prefix == "lora_te_" and not name.startswith("text_model."):
                name = "text_model." + name  # kohya's names; diffusers drops the prefix for a flattened CLIPTextModel
            stem = prefix + name.replace(".", "_")
            conv = isinstance(layer, torch.nn.Conv2d)
            n_in, n_out = (layer.in_channels, layer.out_channels) if conv else (layer.in_features, layer.out_features)
            tail = (1, 1) if conv else ()
            tensors[f"{stem}.lora_down.weight"] = 0.3 * torch.randn(4, n_in, *tail, generator=g)
            tensors[f"{stem}.lora_up.weight"] = 0.3 * torch.randn(n_out, 4, *tail, generator=g)
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    path = tmp_path_factory.mktemp("kohya") / "kohya_lora.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": "1"})
    return path


@pytest.mark.parametrize("which", ["peft_lora", "kohya_lora"])
def test_imported_lora_equals_the_stock_loader(request, tiny, tmp_path, which):
    """alpha != rank is kept (diffusers' adapter metadata, kohya's .alpha), and kohya's proj_in/proj_out/feed-forward
    and text-encoder MLP layers import: the imported concept's text encoding and UNet output equal
    pipe.load_lora_weights' on the same file."""
    file = request.getfixturevalue(which)
    stock = copy.deepcopy(tiny)
    stock.load_lora_weights(str(file.parent), weight_name=file.name)
    path = import_file(tiny, file, method="dreambooth-lora", superclass="ball", token="<disc>",
                       out=tmp_path / "lora.safetensors")
    concept = load_concept(path)
    if which == "kohya_lora":
        assert any(".proj_in." in k for k in concept.tensors) and any(".ff.net.2." in k for k in concept.tensors)
        assert any(".fc1." in k for k in concept.tensors)
    base = _outputs(tiny)
    with attach(tiny, concept):
        ours = _outputs(tiny)
    _assert_outputs_close(ours, _outputs(stock), base)


def test_stock_lora_loads_over_an_attached_lora_concept(concepts, peft_lora, tiny, tmp_path):
    """pipe.load_lora_weights on a pipeline with a dreambooth-lora concept attached (UNet and text encoder):
    peft wraps our site wrappers, both deltas apply (equal to loading both LoRAs with stock diffusers), and
    detaching leaves exactly the stock LoRA."""
    concept = concepts["dreambooth-lora"]
    both = copy.deepcopy(tiny)
    both.load_lora_weights(str(export_concept(concept, tmp_path / "lora")), adapter_name="concept")
    both.load_lora_weights(str(peft_lora.parent), adapter_name="other")
    both.set_adapters(["concept", "other"])
    stock_only = copy.deepcopy(tiny)
    stock_only.load_lora_weights(str(peft_lora.parent), adapter_name="other")

    handle = attach(tiny, concept)
    tiny.load_lora_weights(str(peft_lora.parent), adapter_name="other")
    _assert_outputs_close(_outputs(tiny), _outputs(both), _outputs(stock_only))
    handle.detach()
    after = _outputs(tiny)
    for a, b in zip(after, _outputs(stock_only)):
        assert torch.equal(a, b)


def test_custom_diffusion_import_keeps_each_superclass(concepts, tiny, tmp_path, capsys):
    """Two modifier tokens imported with two --superclass flags keep one each, and the imported concept equals
    diffusers' own Custom Diffusion loader on the same files."""
    from test_bad_input import run_cli

    one = concepts["custom-diffusion"]
    g = torch.Generator().manual_seed(5)
    two = Concept(dict(one.header, tokens=["<disc>", "<mug>"], superclasses=["ball", "cup"]),
                  dict(one.tensors, embedding=torch.cat([one.tensors["embedding"], torch.randn(1, 32, generator=g)])))
    folder = export_concept(two, tmp_path / "cd", base=tiny)
    weights = folder / "pytorch_custom_diffusion_weights.safetensors"
    stock = copy.deepcopy(tiny)
    stock.unet.load_attn_procs(str(folder), weight_name=weights.name, _pipeline=stock)
    for token in ("<disc>", "<mug>"):
        stock.load_textual_inversion(str(folder), weight_name=f"{token}.safetensors")

    out = tmp_path / "back.safetensors"
    code, _, err = run_cli(capsys, ["import", weights, "--method", "custom-diffusion", "--base", "tiny",
                                    "--embeddings", folder / "<disc>.safetensors", "--superclass", "ball",
                                    "--embeddings", folder / "<mug>.safetensors", "--superclass", "cup", "--out", out])
    assert code == 0, err
    back = load_concept(out)
    assert back.header["tokens"] == ["<disc>", "<mug>"] and back.header["superclasses"] == ["ball", "cup"]
    assert back.superclass == "ball"
    prompt = "a <disc> ball next to a <mug> cup"
    base = _outputs(tiny, "a ball next to a cup")
    with attach(tiny, back):
        ours = _outputs(tiny, prompt)
    _assert_outputs_close(ours, _outputs(stock, prompt), base, atol=1e-4)  # diffusers' processor skips SDPA

    with pytest.raises(Exception, match="one --superclass per --embeddings"):
        import_file(tiny, weights, method="custom-diffusion", superclass=["ball", "cup", "hat"],
                    embeddings=[folder / "<disc>.safetensors", folder / "<mug>.safetensors"],
                    out=tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_concepts_attach_to_half_precision_copies(concepts, tiny, tmp_path, dtype):
    """A concept made on the fp32 base attaches to fp16/bf16 copies of it (the fingerprint compares at the coarser
    precision) and equals diffusers' own loader on the same copy."""
    concept = concepts["textual-inversion"]
    folder = export_concept(concept, tmp_path / "ti", "diffusers")
    stock = copy.deepcopy(tiny).to(dtype=dtype)
    stock.load_textual_inversion(str(folder))
    ours = copy.deepcopy(tiny).to(dtype=dtype)
    base = _outputs(ours, PROMPT.format("ball"))
    with attach(ours, concept):
        got = _outputs(ours, PROMPT.format("<disc>"))
    _assert_outputs_close(got, _outputs(stock, PROMPT.format("<disc>")), base)


def test_concepts_attach_next_to_a_stock_textual_inversion(concepts, tiny, tmp_path):
    """A pipeline holding a diffusers textual inversion (a grown vocabulary) takes concepts: a dreambooth-lora
    concept attached there equals the stock LoRA export loaded next to the same embedding."""
    concept = concepts["dreambooth-lora"]
    emb = torch.randn(1, 32, generator=torch.Generator().manual_seed(6))
    stock = copy.deepcopy(tiny)
    stock.load_textual_inversion(emb, token="<x>")
    stock.load_lora_weights(str(export_concept(concept, tmp_path / "lora")))
    tiny.load_textual_inversion(emb, token="<x>")
    base = _outputs(tiny, "a <x> ball")
    with attach(tiny, concept):
        ours = _outputs(tiny, "a <x> ball")
    _assert_outputs_close(ours, _outputs(stock, "a <x> ball"), base)
