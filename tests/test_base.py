"""Loading base pipelines (tiny / local folder / hub id) and fingerprinting them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from personalize.base import Fingerprint, build_tiny, fingerprint, load_base
from personalize.errors import BadInputError, BaseModelError, PersonalizeError

REPO = Path(__file__).resolve().parents[1]


def _state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        for name, t in getattr(pipe, part).state_dict().items():
            out[f"{part}.{name}"] = t
    return out


def assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


# --------------------------------------------------------------------------- tiny
def test_tiny_is_deterministic(_tiny_master):
    again = load_base("tiny")
    assert_same_weights(_tiny_master, again)
    assert fingerprint(again) == fingerprint(_tiny_master)
    assert fingerprint(again).digest == fingerprint(_tiny_master).digest
    # the weights are random, not constant: determinism comes from a seed
    w = again.unet.conv_in.weight
    assert w.std() > 0


def test_tiny_ignores_and_keeps_the_global_rng():
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    a = load_base("tiny")
    after = torch.rand(5)
    assert torch.equal(after, expected)  # building tiny did not consume the caller's RNG
    torch.manual_seed(999)  # a different global seed still gives the same tiny
    b = build_tiny()
    assert_same_weights(a, b)


def test_tiny_fingerprint_equal_in_a_fresh_process(_tiny_master):
    code = (
        "import torch; torch.manual_seed(7); torch.rand(3)\n"
        "from personalize.base import load_base, fingerprint\n"
        "import json; fp = fingerprint(load_base('tiny'))\n"
        "print(json.dumps(dict(fp.to_dict(), digest=fp.digest)))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    other = json.loads(proc.stdout.strip().splitlines()[-1])
    here = fingerprint(_tiny_master)
    assert other["digest"] == here.digest
    assert other == dict(here.to_dict(), digest=here.digest)


def test_tiny_has_sd1_classes_and_shapes(_tiny_master):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = _tiny_master
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.text_encoder.get_input_embeddings().num_embeddings == 49408
    assert pipe.text_encoder.config.max_position_embeddings == 77

    # cross-attention from the UNet to the text encoder's hidden states
    hidden = pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    blocks = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks, "no transformer blocks in the UNet"
    for block in blocks:
        assert block.attn2 is not None and block.attn2.is_cross_attention
        assert block.attn2.to_k.in_features == hidden and block.attn2.to_v.in_features == hidden
        assert block.attn2.to_k.out_features == block.attn2.to_v.out_features

    # SD 1.x: transformer proj_in / proj_out are 1x1 convolutions (not linear projections)
    transformers = [m for name, m in pipe.unet.named_modules() if name.endswith("attentions.0")]
    assert transformers
    for t in transformers:
        for proj in (t.proj_in, t.proj_out):
            assert isinstance(proj, torch.nn.Conv2d)
            assert proj.kernel_size == (1, 1)

    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.scheduler.config.prediction_type == "epsilon"

    # it runs: text -> hidden states -> one UNet step
    ids = pipe.tokenizer(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        size = pipe.unet.config.sample_size
        out = pipe.unet(torch.zeros(1, 4, size, size), torch.tensor([10]), states).sample
    assert states.shape == (1, 77, hidden)
    assert out.shape == (1, 4, size, size)


def test_load_base_moves_and_casts(_tiny_master):
    pipe = load_base("tiny", device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.unet.device.type == "cpu"


# --------------------------------------------------------------------------- local folders
@pytest.fixture
def saved_tiny(tmp_path, tiny):
    folder = tmp_path / "saved-tiny"
    tiny.save_pretrained(folder)
    return folder


def test_saved_folder_loads_with_same_weights(saved_tiny, _tiny_master):
    pipe = load_base(str(saved_tiny))
    assert_same_weights(_tiny_master, pipe)
    from diffusers import DDIMScheduler

    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert len(pipe.tokenizer) == 49408


def test_saved_folder_has_same_fingerprint(saved_tiny, _tiny_master):
    here = fingerprint(_tiny_master)
    loaded = fingerprint(load_base(saved_tiny))  # a Path works as well as a str
    assert loaded.differences(here) == []
    assert loaded == here
    assert loaded.digest == here.digest


def test_folder_without_model_index_is_bad_input(tmp_path, saved_tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="model_index.json") as info:
        load_base(str(empty))
    assert "\n" not in str(info.value)
    (saved_tiny / "model_index.json").unlink()
    with pytest.raises(BadInputError, match="model_index.json"):
        load_base(str(saved_tiny))


def test_a_file_is_not_a_base(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x00" * 16)
    with pytest.raises(BadInputError):
        load_base(str(f))


def test_broken_folder_is_one_line_base_model_error(saved_tiny):
    (saved_tiny / "model_index.json").write_text("{ this is not json")
    with pytest.raises(BaseModelError) as info:
        load_base(str(saved_tiny))
    message = str(info.value)
    assert "\n" not in message
    assert str(saved_tiny) in message


def test_folder_with_missing_weights_is_base_model_error(saved_tiny):
    import shutil

    shutil.rmtree(saved_tiny / "unet")
    with pytest.raises(BaseModelError) as info:
        load_base(str(saved_tiny))
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- hub ids and nonsense
def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelError) as info:
        load_base("someone/some-model")
    message = str(info.value)
    assert "\n" not in message
    assert "someone/some-model" in message
    assert "offline" in message.lower()
    assert "local folder" in message
    assert isinstance(info.value, PersonalizeError)


@pytest.mark.parametrize("spec", ["definitely not a model!", "no_such_model", "/no/such/folder/sd15", "a/b/c", ""])
def test_nonsense_spec_is_bad_input(spec):
    with pytest.raises(BadInputError) as info:
        load_base(spec)
    message = str(info.value)
    assert "\n" not in message
    assert "tiny" in message and "hub id" in message  # says what would work


# --------------------------------------------------------------------------- fingerprints
def _param(module, suffix):
    """The one parameter whose name ends with ``suffix`` (works across transformers versions)."""
    found = [p for name, p in module.named_parameters() if name.endswith(suffix)]
    assert len(found) == 1, suffix
    return found[0]


def test_text_encoder_change_is_named(tiny, _tiny_master):
    before = fingerprint(_tiny_master)
    with torch.no_grad():
        _param(tiny.text_encoder, "layers.0.mlp.fc1.weight")[0, 0] += 0.5
    after = fingerprint(tiny)
    assert after.differences(before) == ["text_encoder"]
    assert before.differences(after) == ["text_encoder"]
    assert after.digest != before.digest
    assert after.architecture == before.architecture and after.tokenizer == before.tokenizer


def test_token_embedding_change_is_named(tiny, _tiny_master):
    with torch.no_grad():
        tiny.text_encoder.get_input_embeddings().weight[1929] *= -1
    assert fingerprint(tiny).differences(fingerprint(_tiny_master)) == ["text_encoder"]


def test_unet_and_vae_changes_are_not_part_of_the_fingerprint(tiny, _tiny_master):
    with torch.no_grad():
        tiny.unet.conv_in.weight[0, 0, 0, 0] += 0.5
        for name, p in tiny.unet.named_parameters():
            if "attn2.to_v" in name:
                p.add_(0.1)
        tiny.vae.decoder.conv_out.weight.mul_(2)
    before, after = fingerprint(_tiny_master), fingerprint(tiny)
    assert after.differences(before) == []
    assert after == before and after.digest == before.digest


def test_unet_architecture_change_is_named(_tiny_master):
    from diffusers import UNet2DConditionModel

    pipe = build_tiny()
    config = dict(pipe.unet.config)
    config["layers_per_block"] = 2
    pipe.unet = UNet2DConditionModel.from_config(config)
    assert fingerprint(pipe).differences(fingerprint(_tiny_master)) == ["architecture"]


def test_fingerprint_round_trips_through_a_dict(_tiny_master):
    fp = fingerprint(_tiny_master)
    again = Fingerprint(**fp.to_dict())
    assert again == fp and again.digest == fp.digest
    assert set(fp.to_dict()) == {"architecture", "tokenizer", "text_encoder", "text_encoder_bf16", "precision",
                                 "text_encoder_sample", "family"}
    assert len(fp.digest) == 16 and int(fp.digest, 16) >= 0
    # the digest covers the original three fields only, so it did not change when the others were added
    assert Fingerprint(fp.architecture, fp.tokenizer, fp.text_encoder).digest == fp.digest
    other = Fingerprint(fp.architecture, "0" * 16, "1" * 16)
    assert fp.differences(other) == ["tokenizer", "text_encoder"]


def _copies(pipe) -> dict[str, object]:
    import copy

    return {"fp32": pipe, "fp16": copy.deepcopy(pipe).to(dtype=torch.float16),
            "bf16": copy.deepcopy(pipe).to(dtype=torch.bfloat16)}


def test_fp32_fp16_and_bf16_copies_have_one_fingerprint(_tiny_master):
    """fp16 and bf16 copies of fp32 weights round apart (so their bf16 hashes differ), yet every pair matches;
    fp32/fp16 pipelines keep the fingerprint (and digest) they always had."""
    fps = {k: fingerprint(p) for k, p in _copies(_tiny_master).items()}
    assert {fp.precision for fp in fps.values()} == {"fp32", "fp16", "bf16"}
    for a in fps.values():
        for b in fps.values():
            assert a.differences(b) == []
    assert fps["fp16"].text_encoder == fps["fp32"].text_encoder and fps["fp16"].digest == fps["fp32"].digest
    assert fps["bf16"].text_encoder_bf16 == fps["fp32"].text_encoder_bf16 != fps["fp16"].text_encoder_bf16


def test_changed_weights_are_seen_at_every_precision(_tiny_master):
    copies = _copies(_tiny_master)
    fp32 = fingerprint(copies["fp32"])
    for dtype in ("fp16", "bf16"):  # one weight, by more than the precision
        with torch.no_grad():
            _param(copies[dtype].text_encoder, "layers.0.mlp.fc1.weight")[0, 0] += 0.5
        assert fingerprint(copies[dtype]).differences(fp32) == ["text_encoder"], dtype
    fp16, bf16 = _copies(_tiny_master)["fp16"], copies["bf16"]
    with torch.no_grad():  # fp16 against bf16 compares 256 sampled weights: a change of many weights shows
        for p in fp16.text_encoder.parameters():
            p.mul_(1.05)
    assert fingerprint(fp16).differences(fingerprint(bf16)) == ["text_encoder"]


def test_old_fingerprints_match_fp32_and_fp16_but_not_bf16(_tiny_master):
    """A concept file written before the bf16 fields existed: checked by its fp16 hash as before; a bf16 pipeline
    cannot reproduce that hash, and says so."""
    from personalize import Concept
    from personalize.concept import check_base
    from personalize.errors import ConceptFileError

    fp = fingerprint(_tiny_master)
    old = Fingerprint(fp.architecture, fp.tokenizer, fp.text_encoder)
    header = {"method": "textual-inversion", "token": "<t>", "superclass": "ball", "config": {},
              "base_fingerprint": dict(old.to_dict(), digest=old.digest)}
    concept = Concept(header, {})
    copies = _copies(_tiny_master)
    for dtype in ("fp32", "fp16"):
        check_base(concept, copies[dtype])
    with pytest.raises(ConceptFileError, match="older personalize.*fp32 or fp16 copy"):
        check_base(concept, copies["bf16"])


def test_stock_textual_inversion_and_lora_leave_the_fingerprint(tiny, _tiny_master):
    """Tokens a stock load_textual_inversion adds (it grows the tokenizer, the table and config.vocab_size, which
    stays grown after unloading) and a stock text-encoder LoRA are not the base."""
    from peft import LoraConfig, inject_adapter_in_model

    fp = fingerprint(_tiny_master)
    tiny.load_textual_inversion(torch.randn(1, 32), token="<x>")
    assert tiny.text_encoder.config.vocab_size == 49409
    assert fingerprint(tiny) == fp
    tiny.unload_textual_inversion()
    assert fingerprint(tiny) == fp
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), tiny.text_encoder)
    assert fingerprint(tiny) == fp
