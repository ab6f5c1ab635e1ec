"""The CLI on the tiny base: train, inspect, generate, resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from personalize import train
from personalize.cli import main
from personalize.checkpoints import checkpoint_dir


def run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_train_inspect_generate(photos, tmp_path, capsys):
    out = tmp_path / "disc.safetensors"
    code, stdout, _ = run(["train", "--method", "perfusion", "--base", "tiny", "--images", str(photos),
                           "--superclass", "ball", "--token", "<disc>", "--out", str(out), "--steps", "3",
                           "--batch-size", "2", "--seed", "1", "--masks", "none"], capsys)
    assert code == 0 and out.is_file(), stdout
    code, stdout, _ = run(["inspect", str(out), "--json"], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["header"]["method"] == "perfusion" and info["header"]["token"] == "<disc>"
    assert info["header"]["provenance"]["steps"] == 3 and info["header"]["provenance"]["seed"] == 1
    assert info["file_bytes"] == out.stat().st_size
    assert {"embedding", "i_star"} <= set(info["tensors"])
    code, stdout, _ = run(["inspect", str(out)], capsys)
    assert code == 0 and "perfusion" in stdout and "o_v." in stdout
    samples = tmp_path / "samples"
    code, stdout, _ = run(["generate", "--base", "tiny", "--concept", f"{out}:beta=0.6", "--prompt",
                           "a <disc> on the beach", "--num-images", "2", "--steps", "2", "--out", str(samples)],
                          capsys)
    assert code == 0, stdout
    pngs = sorted(samples.glob("*.png"))
    assert len(pngs) == 2
    prompts = json.loads((samples / "prompts.json").read_text())
    assert prompts == {p.stem: "a <disc> on the beach" for p in pngs}


def test_same_token_twice_gives_a_clear_message(trained_concept, tmp_path, capsys):
    code, _, err = run(["generate", "--concept", str(trained_concept), "--concept", str(trained_concept),
                        "--prompt", "x", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "both use the token <disc>" in err and ":token=" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_resume_after_interruption_equals_uninterrupted(tiny, photos, tmp_path, capsys):
    settings = {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "seed": 5, "masks": "none"}
    straight = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "a.safetensors",
                     settings=settings, progress=False)

    def crash(step, loss, method):
        if step == 5:  # after the checkpoint at step 4, before the end
            raise KeyboardInterrupt

    interrupted = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train(tiny, photos, token="<disc>", superclass="ball", out=interrupted, settings=settings,
              progress=False, callbacks=[crash])
    assert not interrupted.exists() and (checkpoint_dir(interrupted) / "state.safetensors").is_file()
    tiny_tokens = len(tiny.tokenizer)
    assert tiny_tokens == 49408, "an interrupted run must not leave its token attached"
    code, _, err = run(["train", "--base", "tiny", "--images", str(photos), "--superclass", "ball", "--token",
                        "<disc>", "--out", str(interrupted), "--steps", "6", "--batch-size", "2",
                        "--checkpoint-every", "2", "--seed", "5", "--masks", "none", "--resume"], capsys)
    assert code == 0, err
    a, b = load_file(str(straight)), load_file(str(interrupted))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(photos, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    code, _, _ = run(["train", "--base", "tiny", "--images", str(photos), "--superclass", "ball", "--token", "<disc>", "--out",
                      str(out), "--steps", "2", "--batch-size", "1", "--checkpoint-every", "1", "--masks", "none"], capsys)
    assert code == 0
    code, _, err = run(["train", "--base", "tiny", "--images", str(photos), "--superclass", "cup", "--token", "<disc>", "--out",
                        str(out), "--steps", "3", "--batch-size", "1", "--masks", "none", "--resume"], capsys)
    assert code == 2 and "different run" in err and "superclass" in err
