"""The one-line / exit 2 / nothing-written promise at the training edges added last (issue 25, item 7): the
segmenter and the masks, captions and class phrases, --device, the data-parallel launcher, token and file-name
lengths, all-or-nothing exports, --concept FILE:knobs, and Perfusion's beta."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_photos
from test_bad_input import (TOKEN, assert_no_images, assert_no_train_output, assert_one_line, check_error,  # noqa: F401
                            concept, gen_args, out, run_cli, train_args)  # concept, out: the same fixtures


# ------------------------------------------------------------------------------------------- segmenter and masks
def _segmenter_with(tmp_path, source: Path, name: str, change) -> Path:
    """A copy of the segmenter folder ``source`` whose weights are ``change(state dict)``."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in change(state).items()}, folder / "model.safetensors")
    return folder


def _drop_decoder(state):
    return {k: v for k, v in state.items() if not k.startswith("decoder.")}


def _add_stray(state):
    return {**state, "stray.weight": torch.zeros(3, 3)}


def _reshape_one(state):
    key = next(k for k, v in state.items() if v.ndim == 2)
    return {**state, key: state[key][:, :-1].clone()}


@pytest.mark.parametrize("change, words", [(_drop_decoder, "missing"), (_add_stray, "unexpected"),
                                           (_reshape_one, ("mismatch", "could not load"))],
                         ids=["missing", "unexpected", "mismatched"])
def test_segmenter_weights_that_do_not_fit_are_refused(capsys, photos, out, tmp_path, tiny_segmenter, change, words):
    """transformers would fill the gaps with random values: a random CLIPSeg would make the masks, silently."""
    folder = _segmenter_with(tmp_path, tiny_segmenter, "clipseg", change)
    code, _, err = run_cli(capsys, train_args(photos, out, "--masks", "auto", "--segmenter", folder))
    check_error(code, err, "segmenter", words, "--masks none")
    assert_no_train_output(out)


def test_a_black_mask_in_a_mask_folder_is_refused_naming_its_photo(capsys, photos, out, tmp_path):
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for i, photo in enumerate(sorted(photos.iterdir())):
        Image.new("L", (40, 40), 0 if i == 2 else 255).save(masks / photo.name)
    code, _, err = run_cli(capsys, train_args(photos, out, "--masks", masks))
    check_error(code, err, "photo_2.png", "no foreground", "--masks none")
    assert_no_train_output(out)


def test_a_segmenter_that_finds_nothing_is_refused_before_training(capsys, photos, out, tmp_path, tiny_segmenter):
    """--masks auto whose every mask is zero (the decoder's logits all far below 0) would train on a loss of 0."""
    def silence(state):
        return {**state, "decoder.transposed_convolution.weight": torch.zeros_like(
            state["decoder.transposed_convolution.weight"]), "decoder.transposed_convolution.bias": torch.full_like(
            state["decoder.transposed_convolution.bias"], -1e4)}

    folder = _segmenter_with(tmp_path, tiny_segmenter, "blind", silence)
    code, _, err = run_cli(capsys, train_args(photos, out, "--masks", "auto", "--segmenter", folder))
    check_error(code, err, "photo_0.png", "segmenter", "no foreground")
    assert_no_train_output(out)


# ------------------------------------------------------------------------------------- captions and class phrases
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_caption_longer_than_the_encoder_reads_is_refused(capsys, photos, out, where):
    """Cut at 77 tokens, a caption would lose its end: with {} there, the photo trains without the concept."""
    filler = ",".join(["red"] * 45)  # 89 tokens in 179 characters (the caption's 300-character cap holds)
    caption = f"a {{}} {filler}" if where == "before" else f"a photo {filler} with a {{}}"
    (photos / "photo_1.txt").write_text(caption)
    code, _, err = run_cli(capsys, train_args(photos, out))
    line = check_error(code, err, "photo_1.txt", "tokens", "75")
    assert ("would be lost" in line) == (where == "after")  # the message says when the concept is past the cut
    assert_no_train_output(out)


def test_a_caption_of_75_tokens_trains(capsys, photos, out, _tiny_master):
    """The limit is the encoder's, not lower: a caption filling it exactly is used."""
    tok = _tiny_master.tokenizer  # without the token added: '<disc>' is 3 pieces here, 1 token when training
    words = "a {} " + ",".join(["red"] * 45)
    while len(tok(words.replace("{}", "dog")).input_ids) - 2 > 75:
        words = words[:-4]
    assert len(tok(words.replace("{}", "dog")).input_ids) - 2 == 75
    (photos / "photo_0.txt").write_text(words)
    code, _, err = run_cli(capsys, train_args(photos, out))
    assert code == 0, err


def test_a_caption_with_a_control_character_is_refused(capsys, photos, out):
    (photos / "photo_0.txt").write_text("a {} on a\x1b[31m beach\n")
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "photo_0.txt", "control character", "U+001B")
    assert_no_train_output(out)


@pytest.mark.parametrize("superclass", [f"{TOKEN} toy", f"plush {TOKEN.upper()}"])
def test_a_class_phrase_holding_the_token_is_refused(capsys, photos, out, superclass):
    code, _, err = run_cli(capsys, train_args(photos, out, superclass=superclass))
    check_error(code, err, "superclass", "contains the concept token", TOKEN)
    assert_no_train_output(out)


def test_training_prompts_too_long_for_many_vectors_are_refused(capsys, photos, out):
    """Textual Inversion's n vectors take n tokens of every training prompt: too many would be cut silently."""
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "textual-inversion", "--num-vectors", "80"))
    check_error(code, err, "training prompt", "tokens", "75")
    assert_no_train_output(out)


@pytest.mark.parametrize("prompt", ["{}{}", "a photo", "a {0} photo", "a {} in {style}"])
def test_a_bad_preview_prompt_is_refused_before_training(capsys, photos, out, prompt):
    code, _, err = run_cli(capsys, train_args(photos, out, "--preview-every", "1", "--set", f"preview_prompt={prompt}"))
    check_error(code, err, "preview_prompt", "{}")
    assert_no_train_output(out)


# ----------------------------------------------------------------------------------------------------- --device
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize("device, words", [
    pytest.param("cuda", "no CUDA GPU", marks=NO_CUDA), pytest.param("cuda:0", "no CUDA GPU", marks=NO_CUDA),
    ("cuda:99", ("no CUDA GPU", "cuda:0..")), ("tpu", "not a device"), ("gpu", "not a device"),
    ("cpu:1", "no index"), ("", None),
    pytest.param("mps", "Apple", marks=pytest.mark.skipif(
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(), reason="mps here"))])
def test_train_refuses_a_device_this_machine_lacks(capsys, photos, out, device, words):
    code, _, err = run_cli(capsys, train_args(photos, out, "--device", device))
    if words is None:  # an empty --device is the default
        assert code == 0, err
        return
    check_error(code, err, "--device", words)
    assert_no_train_output(out)


@NO_CUDA
def test_every_verb_refuses_device_cuda_without_a_gpu(capsys, concept, tmp_path, photos):
    samples = tmp_path / "samples"
    code, _, err = run_cli(capsys, gen_args(concept, samples, "--device", "cuda"))
    check_error(code, err, "--device cuda", "no CUDA GPU")
    assert_no_images(samples)
    code, _, err = run_cli(capsys, ["covariance", "--base", "tiny", "--device", "cuda"])
    check_error(code, err, "--device cuda")
    code, _, err = run_cli(capsys, ["evaluate", "--samples", samples, "--reference", photos, "--token", TOKEN,
                                    "--device", "cuda"])
    check_error(code, err, "--device cuda")


def test_the_api_refuses_a_bad_device_too(photos, tmp_path):
    from personalize import train
    from personalize.errors import BadInputError

    with pytest.raises(BadInputError, match="not a device"):
        train("tiny", photos, token=TOKEN, superclass="ball", out=tmp_path / "c.safetensors", device="tpu",
              settings={"steps": 1, "batch_size": 1}, progress=False)
    assert not (tmp_path / "c.safetensors").exists()


# ------------------------------------------------------------------------------------- the data-parallel launcher
@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, "not RANK"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1 is out of range"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, "not MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"}, "MASTER_PORT='x'"),
    ({"RANK": "1"}, "not WORLD_SIZE"),
], ids=["no-rank", "rank-too-big", "world-not-int", "negative-rank", "no-master", "port-range", "port-text",
        "no-world"])
def test_a_bad_launcher_environment_is_one_line(capsys, photos, out, monkeypatch, env, words):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "launcher environment", words, "torchrun")
    assert_no_train_output(out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def test_an_unreachable_master_is_one_line_within_the_init_timeout(photos, out):
    """Nobody listens on the port: the process gives up after init_timeout (not torch's 30 minutes), in one line
    (c10d's native retry logs on file descriptor 2 are kept out of it)."""
    env = _clean_env(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    args = [str(a) for a in train_args(photos, out, "--set", "init_timeout=0.5")]
    result = subprocess.run([sys.executable, "-m", "personalize.cli", *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line(result.stderr)
    assert "could not join the process group" in result.stderr and "init_timeout" in result.stderr
    assert_no_train_output(out)


def _torchrun(args: list) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "personalize.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=600)


def _dp_args(photos, out, batch: int) -> list:
    """No --device: the CPU is the default here, and CPU processes must still train data-parallel (Textual
    Inversion: the lightest method; tests/test_data_parallel.py runs Perfusion and Residuals with --device cpu)."""
    return ["train", "--base", "tiny", "--method", "textual-inversion", "--images", photos, "--token", TOKEN,
            "--superclass", "ball", "--steps", "2",
            "--batch-size", str(batch), "--checkpoint-every", "0", "--masks", "none", "--out", out]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default device is a GPU here")
def test_torchrun_on_cpu_splits_the_batch_without_device_flag(photos, tmp_path):
    """Two CPU processes through the CLI (no --device) train what one process trains with that global batch: one
    process writes, and only two processes that each took half the batch and averaged their gradients give the
    same tensors (alone, each would write, and train on its own rows). A global batch that does not split is
    refused by tests/test_data_parallel.py (the same check, with --device cpu)."""
    from personalize import train
    from personalize.concept import load_concept

    one = train("tiny", photos, token=TOKEN, superclass="ball", out=tmp_path / "one.safetensors", progress=False,
                method="textual-inversion",
                settings={"steps": 2, "batch_size": 2, "checkpoint_every": 0, "masks": "none"})
    two = tmp_path / "two.safetensors"
    result = _torchrun(_dp_args(photos, two, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote concept") == 1
    a, b = load_concept(one).tensors, load_concept(two).tensors
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


# -------------------------------------------------------------------------------- token bytes, file names, exports
@pytest.mark.parametrize("char", ["\U0001F600", "漢"])
def test_a_token_of_wide_characters_over_the_byte_limit_is_refused(capsys, photos, out, char):
    token = char * (129 // len(char.encode()) + 1)  # under 64 characters, over 128 UTF-8 bytes
    assert len(token) <= 64
    code, _, err = run_cli(capsys, train_args(photos, out, token=token))
    check_error(code, err, "not a valid token", "bytes long in UTF-8", "128 UTF-8 bytes")
    assert_no_train_output(out)


def test_a_file_name_too_long_is_one_line(capsys, photos, tmp_path, residuals_copy):
    out = tmp_path / "out" / ("c" * 240 + ".safetensors")
    code, _, err = run_cli(capsys, train_args(photos, out))
    check_error(code, err, "file name", "bytes")
    assert not out.parent.exists() or not list(out.parent.iterdir())
    code, _, err = run_cli(capsys, ["export", residuals_copy, "--out", tmp_path / ("e" * 250)])
    check_error(code, err, "file name", "bytes")


def test_an_export_that_fails_half_way_leaves_nothing(tmp_path, residuals_copy, monkeypatch):
    """The method's files are written, then the last one fails: none of them may stay in --out."""
    from personalize import interop

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "keep.txt").write_text("the user's own file")

    def broken(where, info):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(interop, "write_info", broken)
    with pytest.raises(OSError):
        interop.export_concept(residuals_copy, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]  # no staging folder left
    monkeypatch.undo()
    interop.export_concept(residuals_copy, folder)  # and the same export works whole
    assert {"export.json", "keep.txt"} < {p.name for p in folder.iterdir()}


# ------------------------------------------------------------------------------------------- --concept and beta
def test_renaming_a_token_to_a_vocabulary_word_is_one_line(capsys, concept, tmp_path):
    samples = tmp_path / "samples"
    code, _, err = run_cli(capsys, gen_args(f"{concept}:token=dog", samples, "--prompt", "a dog on a table"))
    check_error(code, err, "'dog'", "already in the vocabulary")
    assert_no_images(samples)


def test_a_concept_path_holding_colons_is_usable(capsys, concept, tmp_path):
    folder = tmp_path / "runs" / "12:30"
    folder.mkdir(parents=True)
    odd = folder / "disc:v1.safetensors"
    shutil.copyfile(concept, odd)
    for arg in (odd, f"{odd}:beta=0.6", f"{odd}:beta=0.6,token=<d:2>"):
        samples = tmp_path / "samples"
        shutil.rmtree(samples, ignore_errors=True)
        prompt = "a <d:2> on a table" if "token" in str(arg) else f"a {TOKEN} on a table"
        code, _, err = run_cli(capsys, [*gen_args(arg, samples), "--prompt", prompt])
        assert code == 0, err
        assert len(list(samples.glob("*.png"))) == 1


def test_knobs_without_values_after_an_existing_file_are_refused(capsys, concept, tmp_path):
    code, _, err = run_cli(capsys, gen_args(f"{concept}:beta", tmp_path / "samples"))
    check_error(code, err, "knobs must look like", "beta=0.6")


def test_negative_beta_is_refused_everywhere(capsys, concept, tmp_path, photos, out):
    samples = tmp_path / "samples"
    for args in (gen_args(concept, samples, "--beta", "-0.5"), gen_args(f"{concept}:beta=-1", samples)):
        code, _, err = run_cli(capsys, args)
        check_error(code, err, "beta", ">= 0")
        assert_no_images(samples)
    for key in ("beta", "beta_train", "beta_global"):
        code, _, err = run_cli(capsys, train_args(photos, out, "--set", f"{key}=-0.1"))
        check_error(code, err, key, ">= 0")
        assert_no_train_output(out)
    from personalize import attach, load_base
    from personalize.errors import BadInputError

    with pytest.raises(BadInputError, match="beta"):
        attach(load_base("tiny"), concept, beta=-0.2)


# --------------------------------------------------------------------------------------------------- tiny-sdxl
def test_sdxl_refuses_the_same_edges(capsys, photos, out):
    """The checks sit before the family matters; SDXL's two tokenizers see the same caption rule."""
    (photos / "photo_0.txt").write_text("a {} " + ",".join(["red"] * 45))
    code, _, err = run_cli(capsys, train_args(photos, out, "--method", "textual-inversion", base="tiny-sdxl"))
    check_error(code, err, "photo_0.txt", "tokens")
    (photos / "photo_0.txt").unlink()
    code, _, err = run_cli(capsys, train_args(photos, out, "--device", "tpu", base="tiny-sdxl"))
    check_error(code, err, "--device")
    code, _, err = run_cli(capsys, train_args(photos, out, superclass=f"{TOKEN} dog", base="tiny-sdxl"))
    check_error(code, err, "contains the concept token")
    assert_no_train_output(out)


# ------------------------------------------------------------------------------ found by trying, on generate
def test_more_sampling_steps_than_the_scheduler_has_is_one_line(capsys, concept, tmp_path):
    samples = tmp_path / "samples"
    code, _, err = run_cli(capsys, gen_args(concept, samples, "--steps", "1001"))
    check_error(code, err, "--steps 1001", "1 to 1000")
    assert_no_images(samples)


def test_a_knob_given_twice_is_refused(capsys, concept, tmp_path):
    samples = tmp_path / "samples"
    code, _, err = run_cli(capsys, gen_args(f"{concept}:token=<a>,token=<b>", samples))
    check_error(code, err, "knobs must look like", "once")
    assert_no_images(samples)
