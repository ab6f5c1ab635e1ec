"""Where edits go on the diffusion-transformer families (tiny-sd3, tiny-flux), checked against the models' own
structure and against peft's target matching; and a method a family lacks refused before any work."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from personalize import families, methods
from personalize.base import declared_families, load_base
from personalize.edits.placement import site_names
from personalize.errors import BadInputError

DIT = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module", params=DIT)
def pipe(request):
    return load_base(request.param)


def test_kv_sites_are_the_joint_blocks_text_stream_projections(pipe):
    """Custom Diffusion's ``kv`` = each joint block's ``add_k_proj`` / ``add_v_proj`` (the text tokens' keys and
    values), and only those: Flux's single blocks project text and image with one ``to_k`` and are not sites."""
    transformer = pipe.transformer
    want = [f"transformer_blocks.{i}.attn.add_{p}_proj" for i in range(len(transformer.transformer_blocks))
            for p in ("k", "v")]
    assert site_names(transformer, "kv") == want
    assert site_names(transformer, "cross_attention") == [f"transformer_blocks.{i}.attn"
                                                          for i in range(len(transformer.transformer_blocks))]
    assert all(isinstance(transformer.get_submodule(name), nn.Linear) for name in want)


def test_lora_targets_match_what_peft_targets(pipe):
    """DreamBooth-LoRA's ``attention`` sites are exactly the Linear modules peft's own matching picks for the
    family script's ``target_modules`` (``LoraConfig`` + ``check_target_module_exists``)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    family = families.of(pipe)
    config = LoraConfig(r=4, target_modules=list(family.lora_targets))
    peft_picks = [n for n, m in pipe.transformer.named_modules()
                  if n and isinstance(m, nn.Linear) and check_target_module_exists(config, n)]
    assert site_names(pipe.transformer, "attention") == peft_picks
    assert len(peft_picks) > len(site_names(pipe.transformer, "kv"))


def test_proj_out_sites_are_each_blocks_attention_output(pipe):
    transformer = pipe.transformer
    names = site_names(transformer, "proj_out")
    blocks = site_names(transformer, "transformer")
    assert len(names) == len(blocks) == len(transformer.transformer_blocks) + len(
        getattr(transformer, "single_transformer_blocks", None) or ())
    for block, name in zip(blocks, names):
        assert name in (f"{block}.attn.to_out.0", f"{block}.proj_out")


@pytest.mark.parametrize("spec", DIT)
def test_supported_methods_follow_the_family(spec):
    family = families.by_tiny(spec)
    assert methods.names_for(family) == ["custom-diffusion", "dreambooth", "dreambooth-lora", "perfusion",
                                         "residuals", "textual-inversion"]
    assert methods.refusal("perfusion", family) is None and methods.refusal("residuals", family) is None
    lacking = type("Lacking", (type(family),), {"edit_kinds": family.edit_kinds - {"proj_out"}})()
    assert "proj_out" in methods.refusal("residuals", lacking)  # a family without a site kind refuses its methods
    for sd in ("sd1", "sd2", "sdxl"):
        assert methods.names_for(families.get(sd)) == methods.names()


def test_declared_families_read_without_loading(tmp_path):
    assert declared_families("tiny-flux") == [families.get("flux")]
    assert declared_families("toy") == [families.get("sd1")]
    for cls, want in (("FluxPipeline", ["flux"]), ("StableDiffusion3Pipeline", ["sd3"]),
                      ("StableDiffusionPipeline", ["sd1", "sd2"]), ("HunyuanDiTPipeline", [])):
        folder = tmp_path / cls
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        assert [f.name for f in declared_families(folder)] == want
    assert declared_families("org/some-model") == []  # a hub id: never fetched here


def test_train_refuses_a_method_the_family_lacks_before_masks_or_weights(tmp_path, capsys, monkeypatch):
    """A method the family refuses (every method works on SD3 now: the refusal is patched in), with Perfusion's
    default ``--masks auto``: the family's refusal comes before the segmenter is looked for (offline, it would be
    the error) and before anything is written."""
    from conftest import make_photos

    from personalize.cli import main

    monkeypatch.setattr(type(families.get("sd3")), "refuses", {"perfusion": "a reason given by the family"})
    photos = make_photos(tmp_path / "photos", n=3)
    out = tmp_path / "p.safetensors"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--base", "tiny-sd3", "--images", str(photos), "--token", "<e>", "--superclass", "ball",
              "--method", "perfusion", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err and "Traceback" not in err
    assert "perfusion does not work on SD3 bases: a reason given by the family" in err and "segmenter" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_an_attached_token_reads_its_own_row_in_every_tokenizer(pipe):
    """A token added to a base with several vocabularies (CLIP's and T5's) gets each tokenizer's own next id, and
    each encoder's table returns that encoder's slice of the token vector there."""
    from personalize import text_stack
    from personalize.edits.tokens import token_site

    pipe = __import__("copy").deepcopy(pipe)
    widths = text_stack.widths(pipe)
    vector = torch.randn(1, sum(widths))
    site = token_site(pipe)
    site.add("k", ["<zz>"], vector)
    start = 0
    for (tok_name, te_name), width in zip(text_stack.pairs(pipe), widths):
        tokenizer, table = getattr(pipe, tok_name), getattr(pipe, te_name).get_input_embeddings()
        (token_id,) = tokenizer.convert_tokens_to_ids(["<zz>"])
        assert token_id == len(tokenizer) - 1  # this tokenizer's own next id
        assert torch.equal(table(torch.tensor([token_id])), vector[:, start:start + width])
        start += width
    site.remove("k")


def test_a_ddpm_sampler_is_refused_on_a_flow_matching_base():
    with pytest.raises(BadInputError) as err:
        load_base("tiny-flux", scheduler="euler")
    assert "flow-matching" in str(err.value) and "\n" not in str(err.value)


def test_an_aliased_token_encodes_as_its_word_where_clip_pools_at_the_highest_id():
    """FLUX.1's CLIP-L pools at a row's highest id (legacy ``eos_token_id`` 2): a new token's id would move the
    pooled vector. A token registered with an alias (DreamBooth's identifier) is read as the word itself: the
    encoding of "a <zz> dog" is that of "a sks dog", bit for bit; without the alias the pooled vector moves."""
    import copy

    from personalize import text_stack
    from personalize.edits.tokens import token_site
    from personalize.methods.shared import word_vector

    pipe = copy.deepcopy(load_base("tiny-flux"))
    assert pipe.text_encoder.config.eos_token_id == 2
    word = text_stack.encode(pipe, ["a sks dog"])
    site = token_site(pipe)
    for alias in ("sks", None):
        site.add("k", ["<zz>"], word_vector(pipe, "sks", single=True).unsqueeze(0), alias=alias)
        ours = text_stack.encode(pipe, ["a <zz> dog"])
        assert torch.equal(ours.context, word.context)  # the same rows either way (T5's context)
        assert torch.equal(ours.pooled, word.pooled) == (alias is not None)
        site.remove("k")
    assert not pipe.text_encoder._forward_pre_hooks and not pipe.text_encoder_2._forward_pre_hooks
