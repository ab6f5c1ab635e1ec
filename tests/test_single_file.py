"""Single-file checkpoints (the original LDM layout of A1111, ComfyUI and model sites) as bases, and DreamBooth
results written as one: each tiny base written as a single file reads back by STOCK diffusers ``from_single_file``
(with the offline config folder) and by ``load_base`` to the same weights and images; the family and config are
read from the keys and shapes; files that are no checkpoint are refused in one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from personalize import attach, load_concept, train
from personalize.base import build_tiny, load_base
from personalize.errors import BadInputError
from personalize.fingerprint import fingerprint
from personalize import single_file as sf
from personalize import families
from personalize.text_stack import encode, family

FAMILIES = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
PROMPT = "a photo of a {} ball on the grass"


def _image(pipe, prompt, size=32):
    """2 steps at 32 px; guidance 1 (no unconditional half) keeps it cheap on a CPU."""
    return pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(1)).images


def _stock(name, path, folder):
    """The file read by stock diffusers ``from_single_file`` with the offline config folder. SDXL: diffusers tells
    the two text encoders apart by width (768 vs 1280), the miniature's are both 32, so the second one is read by
    diffusers' own OpenCLIP converter and passed in (as ``load_single_file`` does)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if FAMILIES[name] != "sdxl":
        pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    else:
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        te2.load_state_dict(convert_open_clip_checkpoint(te2, load_file(str(path)), prefix=sf.OPENCLIP_XL),
                            strict=True)
        pipe = diffusers.StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, text_encoder_2=te2.eval(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory, _tiny_master):
    """(name, original pipeline, its single file, the config folder)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"single-{name}")
    original = _tiny_master if name == "tiny" else load_base(name)  # read only
    path = sf.save_single_file(original, root / f"{name}.safetensors")
    return name, original, path, sf.write_config_folder(name, root / "config")


def _parts(pipe):
    return [p for p in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, p, None) is not None]


def test_stock_and_load_base_read_the_file_back(written):
    name, original, path, folder = written
    assert sf.identify(path) == {"family": FAMILIES[name], "config": name,
                                "prediction_type": original.scheduler.config.prediction_type}
    ours, stock = load_base(str(path)), _stock(name, path, folder)
    assert fingerprint(ours) == fingerprint(original)  # a concept of the base attaches to its single file
    for pipe in (ours, stock):
        assert type(pipe) is type(original)
        for part in _parts(original):
            a, b = getattr(original, part).state_dict(), getattr(pipe, part).state_dict()
            assert a.keys() == b.keys(), part
            assert all(torch.equal(a[k], b[k]) for k in a), part
        assert pipe.scheduler.config.prediction_type == original.scheduler.config.prediction_type
        assert pipe.tokenizer.pad_token == original.tokenizer.pad_token
    # the outputs: text encoding, one UNet call, a 2-step generation
    assert family(ours) == FAMILIES[name]
    with torch.no_grad():
        ctx = encode(original, ["a photo of a dog"])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        want = original.unet(x, 10, ctx.context, **families.of(original).unet_kwargs(original, ctx.pooled, x)).sample
        for pipe in (ours, stock):
            got = encode(pipe, ["a photo of a dog"])
            assert torch.equal(got.context, ctx.context)
            assert got.pooled is None if ctx.pooled is None else torch.equal(got.pooled, ctx.pooled)
            assert torch.equal(pipe.unet(x, 10, got.context, **families.of(pipe).unet_kwargs(pipe, got.pooled, x)).sample, want)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(ours.scheduler) is type(original.scheduler)
    assert public(ours.scheduler.config) == public(original.scheduler.config)
    assert np.array_equal(_image(stock, "a dog"), _image(original, "a dog"))


def test_real_size_layouts_are_what_diffusers_reads():
    """On the meta device (shapes only): SD 1.5, SD 2.1 and SDXL written by ``to_original`` carry the keys
    diffusers detects each model by, and diffusers' own converters map them back onto every tensor of the model
    at its shape."""
    from diffusers.loaders import single_file_utils as su

    for name, kind in (("sd15", "v1"), ("sd21", "v2"), ("sdxl", "xl_base")):
        pipe = sf.config_pipeline(name)
        ldm = sf.to_original(pipe)
        assert su.infer_diffusers_model_type(ldm) == kind
        layout = sf.Layout(Path(f"{name}.safetensors"), {k: tuple(v.shape) for k, v in ldm.items()})
        assert sf.family_of(layout) == family(pipe)
        assert sf.match_config(layout, sf.family_of(layout)) == name
        back = {"unet": su.convert_ldm_unet_checkpoint(ldm, pipe.unet.config),
                "vae": su.convert_ldm_vae_checkpoint(ldm, pipe.vae.config)}
        if name == "sd15":
            back["text_encoder"] = su.convert_ldm_clip_checkpoint(ldm)
        elif name == "sd21":
            back["text_encoder"] = su.convert_open_clip_checkpoint(pipe.text_encoder, ldm)
        else:
            back["text_encoder"] = su.convert_ldm_clip_checkpoint(ldm)
            back["text_encoder_2"] = su.convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, sf.OPENCLIP_XL)
        for part, state in back.items():
            model = getattr(pipe, part)
            if not hasattr(model, "text_model"):
                state = {k.removeprefix("text_model."): v for k, v in state.items()}
            want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            assert {k: tuple(v.shape) for k, v in state.items()} == want, (name, part)


def test_prediction_type(tmp_path):
    """SD 2.x is v-prediction (SD 2.1) unless the file or an A1111 YAML beside it says otherwise."""
    path = tmp_path / "m.safetensors"
    layout = sf.Layout(path, {})
    assert sf.prediction_of(layout, "sd2") == "v_prediction"
    assert sf.prediction_of(layout, "sd1") == sf.prediction_of(layout, "sdxl") == "epsilon"
    assert sf.prediction_of(sf.Layout(path, {}, {"modelspec.prediction_type": "epsilon"}), "sd2") == "epsilon"
    assert sf.prediction_of(sf.Layout(path, {"v_pred": ()}), "sdxl") == "v_prediction"
    assert sf.prediction_of(layout, "sd2", "epsilon") == "epsilon"
    with pytest.raises(BadInputError, match="prediction type"):
        sf.prediction_of(layout, "sd2", "sample")
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert sf.prediction_of(layout, "sd1") == "v_prediction"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    denoiser_config:\n      params:\n        scaling_config:\n"
                                     "          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n")
    assert sf.prediction_of(layout, "sdxl") == "v_prediction"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert sf.prediction_of(sf.Layout(path, {}, {"modelspec.prediction_type": "v"}), "sd2") == "epsilon"


def test_sd2_without_metadata_is_v_prediction_and_a_yaml_overrides(tmp_path):
    pipe = build_tiny("sd2")
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sf.to_original(pipe).items()}, str(path))  # no metadata
    assert sf.identify(path)["prediction_type"] == "v_prediction"
    (tmp_path / "m.yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params: {}\n")
    assert load_base(str(path)).scheduler.config.prediction_type == "epsilon"


def test_an_fp16_file_runs_in_fp32_unless_asked(tmp_path):
    """Files are mostly shared in fp16; like stock ``from_single_file`` (and the toy base), the pipeline runs in
    fp32 unless a dtype is asked for -- SDXL's second encoder, which is read apart, included."""
    original = build_tiny("sdxl")
    path = sf.save_single_file(original, tmp_path / "half.safetensors", dtype=torch.float16)
    pipe = load_base(str(path))
    for part in _parts(original):
        assert getattr(pipe, part).dtype == torch.float32, part
        a, b = getattr(original, part).state_dict(), getattr(pipe, part).state_dict()
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), part


# -------------------------------------------------------------------------- refusals through the CLI
def _run(capsys, args):
    from personalize.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def dreambooth(tmp_path_factory, _tiny_master):
    """A DreamBooth concept trained one step on the tiny base read from a single file."""
    from conftest import make_photos

    root = tmp_path_factory.mktemp("db-single")
    path = sf.save_single_file(_tiny_master, root / "tiny.safetensors")
    concept = train(load_base(str(path)), make_photos(root / "photos", n=2), token="<disc>", superclass="ball",
                    out=root / "db.safetensors", method="dreambooth", progress=False,
                    settings={"steps": 1, "batch_size": 1, "checkpoint_every": 0, "masks": "none", "lr": 1e-3,
                              "prior_loss_weight": 0})
    return path, concept


def _bad_files(tmp_path, dreambooth):
    g = torch.Generator().manual_seed(0)
    files = {
        "no sd": ({"weight": torch.randn(4, 4, generator=g)}, ("no sd 1.x",)),
        "kohya lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
                        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
                        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}, ("lora",)),
        "diffusers lora": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 32),
                            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(32, 4)}, ("lora",)),
        "embedding": ({"emb_params": torch.randn(1, 768)}, ("textual-inversion",)),
        "diffusers unet": ({"down_blocks.0.resnets.0.conv1.weight": torch.randn(4, 4, 3, 3)}, ("diffusers",)),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": torch.randn(4)}, ("another architecture", "flux")),
    }
    paths = {}
    for label, (tensors, words) in files.items():
        save_file(tensors, str(tmp_path / f"{label.replace(' ', '_')}.safetensors"))
        paths[label] = (tmp_path / f"{label.replace(' ', '_')}.safetensors", words)
    paths["concept"] = (dreambooth[1], ("concept file", "--concept"))
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    paths["pickle"] = (tmp_path / "model.ckpt", ("pickle",))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    paths["broken"] = (tmp_path / "broken.safetensors", ("not a readable safetensors",))
    return paths


def test_files_that_are_no_checkpoint_are_refused_in_one_line(capsys, tmp_path, dreambooth):
    for label, (path, words) in _bad_files(tmp_path, dreambooth).items():
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        code, err = _run(capsys, ["generate", "--base", path, "--prompt", "a dog", "--out", out, "--steps", "1",
                                  "--num-images", "1"])
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (label, err)
        assert all(w in lines[0].lower() for w in words), (label, lines[0])
        assert not out.exists(), label


def test_inpainting_and_refiner_checkpoints_are_refused_by_name():
    ldm = {k: tuple(v.shape) for k, v in sf.to_original(sf.config_pipeline("tiny")).items()}
    inpainting = dict(ldm, **{sf.UNET + "input_blocks.0.0.weight": (32, 9, 3, 3)})
    with pytest.raises(BadInputError, match="inpainting"):
        sf.family_of(sf.Layout(Path("in.safetensors"), inpainting))
    refiner = {k.replace(sf.CLIP_SD1, "conditioner.embedders.0.model."): s for k, s in ldm.items()}
    with pytest.raises(BadInputError, match="refiner"):
        sf.family_of(sf.Layout(Path("refiner.safetensors"), refiner))


def test_a_checkpoint_of_unknown_shapes_is_refused(tmp_path):
    pipe = build_tiny("sd1")
    ldm = sf.to_original(pipe)
    ldm.pop(next(k for k in ldm if k.startswith(sf.UNET + "output_blocks.")))  # incomplete
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(BadInputError, match="fit none of the SD 1.x configs"):
        load_base(str(tmp_path / "cut.safetensors"))


# -------------------------------------------------------------------------- DreamBooth as a single file
def test_dreambooth_single_file_export(dreambooth, tmp_path, capsys):
    """Trained on a single-file base, the concept is accepted on the same file reloaded (fingerprint), and its
    single-file export (``personalize export --format single-file``) read by stock ``from_single_file`` gives the
    images the concept gives attached."""
    base_file, concept_path = dreambooth
    base = load_base(str(base_file))  # a fresh load of the same file
    concept = load_concept(concept_path)
    with attach(base, concept):
        ours = _image(base, PROMPT.format("<disc>"))
        trained = {k: v.clone() for k, v in base.unet.state_dict().items()}
    assert any(not torch.equal(v, trained[k]) for k, v in base.unet.state_dict().items()), "training changed nothing"

    code, err = _run(capsys, ["export", concept_path, "--format", "single-file", "--out", tmp_path / "export"])
    assert code == 0, err
    path = tmp_path / "export" / "checkpoint.safetensors"
    assert sf.identify(path) == {"family": "sd1", "config": "tiny", "prediction_type": "epsilon"}
    stock = _stock("tiny", path, sf.write_config_folder("tiny", tmp_path / "config"))
    assert np.array_equal(_image(stock, PROMPT.format("sks")), ours)
    assert all(torch.equal(v, trained[k]) for k, v in stock.unet.state_dict().items())
