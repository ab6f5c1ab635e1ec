"""Living beside the stock loaders (issue 25 item 8), on tiny, tiny-sd2 and tiny-sdxl, with stock diffusers on the
other side: a stock ``load_textual_inversion`` / ``unload_lora_weights`` / ``from_pipe`` twin while a concept is
attached, fp16/bf16 copies of a DreamBooth pipeline, a LoRA fused into the text encoder, and the files other
tools read and write (A1111 ``.pt``, DreamBooth-LoRA export, diffusers' SDXL textual-inversion pair, kohya SDXL)."""
from __future__ import annotations

import copy
import pickle
import re
import zipfile

import pytest
import torch

from personalize import attach, load_base, load_concept, text_stack
from personalize.errors import PersonalizeError
from personalize.interop import export_concept, import_file

FAMILIES = ["tiny", "tiny-sd2", "tiny-sdxl"]
PROMPT = "a photo of a <c> ball"


_BASES: dict = {}


def _base(request, name):
    """Each tiny base loaded once (tiny: the session's own copy)."""
    if name not in _BASES:
        _BASES[name] = request.getfixturevalue("_tiny_master") if name == "tiny" else load_base(name)
    return _BASES[name]


@pytest.fixture(params=FAMILIES)
def master(request):
    """Every family: the token seam differs on each (SD 2.x pads with '!', SDXL has two tables)."""
    return _base(request, request.param)


@pytest.fixture(params=["tiny", "tiny-sdxl"])
def one_and_two_encoders(request):
    """One text encoder and two (what the UNet-side checks depend on)."""
    return _base(request, request.param)


def _sdxl(pipe) -> bool:
    return text_stack.family(pipe) == "sdxl"


def _seeded(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ti_state(pipe, seed, token="<c>", n=1):
    """A textual-inversion file's tensors for this base: ``{token: (n, d)}``, on SDXL ``{clip_l, clip_g}``."""
    widths = text_stack.widths(pipe)
    if len(widths) == 1:
        return {token: _seeded((n, widths[0]), seed)}
    return {"clip_l": _seeded((n, widths[0]), seed), "clip_g": _seeded((n, widths[1]), seed + 1)}


def _stock_ti(pipe, state, token):
    """diffusers' documented loading of a textual-inversion state (SDXL: one call per encoder)."""
    if "clip_l" not in state:
        pipe.load_textual_inversion(state[token], token=token)
        return
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def _ti_concept(pipe, tmp_path, seed=1, token="<c>"):
    from safetensors.torch import save_file

    state = _ti_state(pipe, seed, token)
    file = tmp_path / f"ti{seed}.safetensors"
    save_file(state, str(file))
    path = import_file(pipe, file, method="textual-inversion", superclass="ball", token=token,
                       out=tmp_path / f"c{seed}.safetensors")
    return load_concept(path), state


@torch.no_grad()
def _encode(pipe, prompt=PROMPT):
    """What the stock pipeline hands the UNet for ``prompt`` (SDXL: the pooled vector too)."""
    out = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    return [t for t in out if t is not None]


@torch.no_grad()
def _unet(pipe, prompt=PROMPT):
    enc = _encode(pipe, prompt)
    latents = _seeded((1, pipe.unet.config.in_channels, 8, 8), 2).to(enc[0].dtype)
    extra = {}
    if _sdxl(pipe):
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=enc[0].dtype)
        extra["added_cond_kwargs"] = {"text_embeds": enc[1], "time_ids": time_ids}
    return [*enc, pipe.unet(latents, torch.tensor([10]), enc[0], **extra).sample]


def _same(a, b, atol=0.0):
    return len(a) == len(b) and all(torch.allclose(x, y, atol=atol, rtol=0) for x, y in zip(a, b))


# --------------------------------------------------------------------------- the token seam and stock loaders
def test_stock_load_textual_inversion_while_attached(master, tmp_path):
    """A stock ``load_textual_inversion`` on a pipeline with a concept attached: both tokens work (equal to stock
    diffusers holding both embeddings); detach keeps the stock token, as if loaded on the bare pipeline."""
    pipe = copy.deepcopy(master)
    concept, ours = _ti_concept(pipe, tmp_path)
    theirs = _ti_state(pipe, 7, "<x>")
    both, only = copy.deepcopy(master), copy.deepcopy(master)
    _stock_ti(both, ours, "<c>")
    _stock_ti(both, theirs, "<x>")
    _stock_ti(only, theirs, "<x>")
    prompt = "a <c> ball next to a <x> cup"

    handle = attach(pipe, concept)
    _stock_ti(pipe, theirs, "<x>")
    assert _same(_encode(pipe, prompt), _encode(both, prompt))
    handle.detach()
    assert "<c>" not in pipe.tokenizer.get_vocab() and "<x>" in pipe.tokenizer.get_vocab()
    assert _same(_encode(pipe, prompt), _encode(only, prompt))
    again = attach(pipe, concept)  # and a concept attaches next to it again
    assert _same(_encode(pipe, prompt), _encode(both, prompt))
    again.detach()


def test_img2img_twin_made_while_attached_follows_detach(master, tmp_path):
    """``from_pipe`` twins share the text encoder and UNet: one made while a concept is attached reads the concept
    and, after detach, reads the base (no index error from the tokenizer copy it holds)."""
    from diffusers import AutoPipelineForImage2Image

    pipe = copy.deepcopy(master)
    concept, _ = _ti_concept(pipe, tmp_path)
    base = _encode(pipe)
    handle = attach(pipe, concept)
    twin = AutoPipelineForImage2Image.from_pipe(pipe)
    assert _same(_encode(twin), _encode(pipe)) and not _same(_encode(twin), base)
    handle.detach()
    assert _same(_encode(twin), base)


def test_unload_lora_weights_with_a_concept_attached(one_and_two_encoders, tmp_path):
    """``pipe.unload_lora_weights()`` removes the whole stock LoRA (UNet and text encoder) and leaves the attached
    concept; detach then gives the base back bit for bit."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = copy.deepcopy(one_and_two_encoders)
    concept, _ = _ti_concept(pipe, tmp_path)
    base = _unet(pipe)
    handle = attach(pipe, concept)
    attached = _unet(pipe)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
        for _, te in text_stack.pairs(pipe):
            inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
                                    getattr(pipe, te))
    assert not _same(_unet(pipe), attached)
    pipe.unload_lora_weights()
    assert not any("lora" in n for part in (pipe.unet, *text_stack.encoders(pipe)) for n, _ in part.named_modules())
    assert _same(_unet(pipe), attached)
    handle.detach()
    assert _same(_unet(pipe), base)


def test_fused_text_encoder_lora_needs_the_explicit_override(one_and_two_encoders, tmp_path):
    """After a stock ``fuse_lora`` on the text encoder the weights differ: refused in one line naming the override;
    ``attach(..., check_base_weights=False)`` attaches with a warning and equals a stock pipeline holding both."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = copy.deepcopy(one_and_two_encoders)
    concept, state = _ti_concept(pipe, tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), pipe.text_encoder)
    pipe.fuse_lora(components=["text_encoder"])
    stock = copy.deepcopy(pipe)
    _stock_ti(stock, state, "<c>")
    with pytest.raises(PersonalizeError, match="check_base_weights=False") as info:
        attach(pipe, concept)
    assert "\n" not in str(info.value)
    with pytest.warns(UserWarning, match="text-encoder weights differ"):
        handle = attach(pipe, concept, check_base_weights=False)
    assert _same(_encode(pipe), _encode(stock))
    handle.detach()


# --------------------------------------------------------------------------- DreamBooth on fp16/bf16 copies
def test_dreambooth_digest_accepts_half_precision_copies(one_and_two_encoders):
    """The DreamBooth folder digest is taken at fp16 and bf16 (``fingerprint.weights_digest``): fp16 and bf16 copies
    of the trained weights (what ``DreamBooth.rebuild`` loads into an fp16/bf16 pipeline) match it, a changed
    weight does not."""
    from personalize.methods.dreambooth import _digest, _same_digest

    unet, te = one_and_two_encoders.unet, {"text_encoder": one_and_two_encoders.text_encoder}
    recorded = _digest(unet, te)
    for dtype in (torch.float16, torch.bfloat16):
        assert _same_digest(recorded, copy.deepcopy(unet).to(dtype), {k: copy.deepcopy(v).to(dtype)
                                                                       for k, v in te.items()})
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1.0
    assert not _same_digest(recorded, changed, te)


# --------------------------------------------------------------------------- files for other tools
# AUTOMATIC1111 modules/safe.py accepts only these zip entries (read there, written here from its description):
# '<one folder>/data.pkl', '<folder>/version' and '<folder>/data/<number>'
A1111_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
A1111_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                 ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
                 ("torch", "BFloat16Storage"), ("torch", "float32")}


class _A1111Unpickler(pickle.Unpickler):
    """A1111's restricted unpickler, as far as an embedding file needs: only the globals it lists."""

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name)


def a1111_check(path):
    """AUTOMATIC1111's safe-loading check of a ``.pt`` file: entry names, exactly one data.pkl, allowed globals."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        bad = [n for n in names if not A1111_NAMES.match(n)]
        assert not bad, f"A1111 refuses entries {bad}"
        pkl = [n for n in names if n.endswith("/data.pkl")]
        assert len(pkl) == 1
        with z.open(pkl[0]) as f:
            _A1111Unpickler(f).load()
    return names


def test_a1111_pt_passes_a1111s_safe_loader(_tiny_master, tmp_path):
    """The ``a1111`` export: entries A1111's check accepts, under a fixed, clean top folder (not the temp file's name
    with host and pid), read back by torch (weights_only) and by stock ``load_textual_inversion``."""
    pipe = copy.deepcopy(_tiny_master)
    concept, state = _ti_concept(pipe, tmp_path)
    folder = export_concept(concept, tmp_path / "a1111", "a1111")
    file = folder / "<c>.pt"
    names = a1111_check(file)
    assert {n.split("/")[0] for n in names} == {"archive"}
    data = torch.load(file, weights_only=True)
    assert torch.equal(data["string_to_param"]["*"], state["<c>"]) and data["name"] == "<c>"
    again = export_concept(concept, tmp_path / "again", "a1111") / "<c>.pt"
    assert again.read_bytes() == file.read_bytes()  # nothing of the writing process in the file
    stock = copy.deepcopy(pipe)
    stock.load_textual_inversion(str(file))
    with attach(pipe, concept):
        assert _same(_encode(pipe), _encode(stock))


def _peft_lora_file(pipe, folder, seed=5):
    """A LoRA written by diffusers' own save path: UNet attention and every text encoder's q/v."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    src = copy.deepcopy(pipe)
    unet_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False)
    te_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        src.unet.add_adapter(unet_cfg)
        layers["unet_lora_layers"] = get_peft_model_state_dict(src.unet)
        for k, (_, te) in enumerate(text_stack.pairs(src)):
            inject_adapter_in_model(te_cfg, getattr(src, te))
            layers[f"{te}_lora_layers"] = get_peft_model_state_dict(getattr(src, te))
    type(src).save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def test_dreambooth_lora_export_names_text_model_keys(one_and_two_encoders, tmp_path):
    """The diffusers-lora export names text-encoder keys ``text_encoder.text_model.*`` (what ComfyUI and older
    stacks read), and stock ``load_lora_weights`` reads it back equal to the attached concept."""
    from safetensors.torch import load_file

    pipe = copy.deepcopy(one_and_two_encoders)
    file = _peft_lora_file(pipe, tmp_path / "src")
    concept = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<c>",
                                       out=tmp_path / "lora.safetensors"))
    out = export_concept(concept, tmp_path / "out", "diffusers-lora")
    keys = list(load_file(str(out / "pytorch_lora_weights.safetensors")))
    te_keys = [k for k in keys if k.startswith("text_encoder")]
    assert te_keys and all(k.split(".")[1] == "text_model" for k in te_keys)
    stock = copy.deepcopy(one_and_two_encoders)
    stock.load_lora_weights(str(out))
    with attach(pipe, concept):
        ours = _unet(pipe, "a photo of a <c> ball")
    assert _same(ours, _unet(stock, "a photo of a sks ball"), atol=1e-5)


def test_sdxl_textual_inversion_pair_imports(request, tmp_path, capsys):
    """diffusers' textual_inversion_sdxl.py writes learned_embeds.safetensors (text_encoder) and
    learned_embeds_2.safetensors (text_encoder_2), each {token: (n, d)}: FILE + --embeddings imports the pair,
    equal to the stock loading of both; one file alone is refused in one line naming the other."""
    from safetensors.torch import save_file

    from test_bad_input import run_cli

    pipe = copy.deepcopy(_base(request, "tiny-sdxl"))
    w1, w2 = text_stack.widths(pipe)
    first, second = _seeded((2, w1), 8), _seeded((2, w2), 9)
    save_file({"<c>": first}, str(tmp_path / "learned_embeds.safetensors"))
    save_file({"<c>": second}, str(tmp_path / "learned_embeds_2.safetensors"))
    out = tmp_path / "pair.safetensors"
    code, _, err = run_cli(capsys, ["import", tmp_path / "learned_embeds.safetensors", "--embeddings",
                                    tmp_path / "learned_embeds_2.safetensors", "--method", "textual-inversion",
                                    "--superclass", "ball", "--base", "tiny-sdxl", "--out", out])
    assert code == 0, err
    stock = copy.deepcopy(pipe)
    stock.load_textual_inversion(first, token="<c>", text_encoder=stock.text_encoder, tokenizer=stock.tokenizer)
    stock.load_textual_inversion(second, token="<c>", text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2)
    # diffusers spells a 2-vector token "<c> <c>_1" (maybe_convert_prompt); so does our concept
    with attach(pipe, load_concept(out)):
        assert _same(_encode(pipe, "a <c> <c>_1 ball"), _encode(stock, "a <c> <c>_1 ball"))
    code, _, err = run_cli(capsys, ["import", tmp_path / "learned_embeds.safetensors", "--method",
                                    "textual-inversion", "--superclass", "ball", "--base", "tiny-sdxl",
                                    "--out", tmp_path / "half.safetensors"])
    assert code == 2 and "learned_embeds_2.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "half.safetensors").exists()


def test_kohya_sdxl_lora_with_proj_in_and_feed_forward(request, tmp_path):
    """A kohya SDXL LoRA in its own (SGM) block names covering attention, proj_in/proj_out and the feed-forward
    layers imports and equals stock ``load_lora_weights`` on the same file."""
    from safetensors.torch import save_file

    pipe = copy.deepcopy(_base(request, "tiny-sdxl"))
    per_block = pipe.unet.config.layers_per_block

    def sgm(name):  # diffusers' block names -> kohya's SDXL ones (the mapping diffusers' loader undoes)
        if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
            return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + int(m[2])}.1.{m[3]}"
        if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
            return f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[2])}.1.{m[3]}"
        return re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", name)

    layers = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    g, tensors = torch.Generator().manual_seed(4), {}
    for name, layer in pipe.unet.named_modules():
        if name.endswith(layers) and isinstance(layer, torch.nn.Linear):
            stem = "lora_unet_" + sgm(name).replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = 0.3 * torch.randn(4, layer.in_features, generator=g)
            tensors[f"{stem}.lora_up.weight"] = 0.3 * torch.randn(layer.out_features, 4, generator=g)
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    assert any("input_blocks" in k and "proj_in" in k for k in tensors) and any("ff_net_2" in k for k in tensors)
    file = tmp_path / "kohya_sdxl.safetensors"
    save_file(tensors, str(file))
    stock = copy.deepcopy(pipe)
    stock.load_lora_weights(str(tmp_path), weight_name=file.name)
    concept = load_concept(import_file(pipe, file, method="dreambooth-lora", superclass="ball", token="<c>",
                                       out=tmp_path / "k.safetensors"))
    assert any(".proj_in." in k for k in concept.tensors) and any(".ff.net.2." in k for k in concept.tensors)
    with attach(pipe, concept):
        ours = _unet(pipe, "a photo of a <c> ball")
    assert _same(ours, _unet(stock, "a photo of a sks ball"), atol=1e-5)
