"""``personalize evaluate`` and ``personalize train --validate-every`` end to end, offline (local weights files)."""
import json

import pytest

from personalize import load_concept
from personalize.cli import main


def run(args, capsys):
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _train_args(photos, out, *extra):
    return ["train", "--base", "tiny", "--method", "textual-inversion", "--images", photos, "--superclass", "ball",
            "--token", "<disc>", "--out", out, "--steps", "2", "--batch-size", "1", "--checkpoint-every", "0", *extra]


@pytest.fixture(scope="module")
def samples(tmp_path_factory, _tiny_master):
    from personalize.generation import generate, write_images

    folder = tmp_path_factory.mktemp("samples")
    for prompt in ("a photo of a <disc> ball", "a <disc> ball on the beach"):
        write_images(generate(_tiny_master, prompt, num_images=2, steps=2), prompt, folder, 0)
    return folder


def test_train_validates_with_local_clip_weights(photos, tmp_path, capsys, clip_weights_file):
    out = tmp_path / "v.safetensors"
    code, stdout, err = run(_train_args(photos, out, "--validate-every", "2", "--evaluator", "clip",
                                        "--clip-weights", clip_weights_file, "--validation-prompt", "a {} in the snow"),
                            capsys)
    assert code == 0, err
    provenance = load_concept(out).header["provenance"]
    assert provenance["best_step"] == 2
    (result,) = provenance["validation"]
    assert result["step"] == 2 and {"h", "clip_image", "clip_text"} <= set(result) and result["h"] >= 0


@pytest.mark.parametrize("extra, words", [
    (["--validate-every", "1", "--evaluator", "foo"], ["--evaluator 'foo'", "clip", "toyworld:"]),
    (["--validate-every", "1", "--evaluator", "toyworld:nope"], ["unknown toy-world concept 'nope'"]),
    (["--validate-every", "1", "--validation-prompt", "no placeholder"], ["no {}"]),
    (["--validate-every", "1", "--clip-weights", "missing.safetensors"], ["--clip-weights", "not a file"]),
    (["--validate-every", "0", "--evaluator", "clip"], ["--validate-every 0", "drop --evaluator"]),
])
def test_train_refuses_bad_validation_flags(photos, tmp_path, capsys, extra, words):
    out = tmp_path / "bad.safetensors"
    code, _, err = run(_train_args(photos, out, *extra), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists() and not list(tmp_path.glob("bad.safetensors*"))


def test_evaluate_matches_score_concept(samples, photos, capsys, clip_weights_file, dino_weights_file):
    from personalize.evaluation import ClipEncoder, DinoEncoder, score_concept

    args = ["evaluate", "--samples", samples, "--reference", photos, "--token", "<disc>",
            "--clip-weights", clip_weights_file, "--dino-weights", dino_weights_file]
    code, stdout, err = run(args + ["--json", "--workers", "1"], capsys)  # files decoded once, in a worker
    assert code == 0, err
    got = json.loads(stdout)
    prompts = json.loads((samples / "prompts.json").read_text())
    stems = sorted(prompts)
    direct = score_concept(ClipEncoder(weights=clip_weights_file), DinoEncoder(weights=dino_weights_file),
                           [samples / f"{s}.png" for s in stems], [prompts[s] for s in stems],
                           sorted(photos.glob("*.png")), token="<disc>")
    assert got["n_images"] == direct["n_images"] == 4
    for key in ("clip_text", "clip_image", "dino_image"):
        assert got[key] == direct[key]  # each encoder decoding every file itself: the same to the bit
    code, stdout, err = run(args, capsys)  # the table (the default workers)
    assert code == 0 and "CLIP-T" in stdout and "DINO-I" in stdout and f"{direct['clip_text']:.4f}" in stdout


@pytest.mark.parametrize("which", ["samples", "reference", "prompts", "clip"])
def test_evaluate_bad_input_is_one_line(samples, photos, tmp_path, capsys, which, clip_weights_file):
    args = {"--samples": samples, "--reference": photos, "--clip-weights": clip_weights_file}
    if which == "samples":
        args["--samples"] = tmp_path / "missing"
    elif which == "reference":
        args["--reference"] = tmp_path / "missing"
    elif which == "prompts":
        args["--samples"] = photos  # images but no prompts.json
    else:
        args["--clip-weights"] = tmp_path / "missing.safetensors"
    code, stdout, err = run(["evaluate", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert str(args["--samples"] if which in ("samples", "prompts") else args[f"--{which}" if which != "clip"
                                                                           else "--clip-weights"]) in err


@pytest.mark.parametrize("workers", ["-1", "1.5", "two"])
def test_evaluate_refuses_bad_workers(samples, photos, capsys, workers):
    code, stdout, err = run(["evaluate", "--samples", samples, "--reference", photos, "--workers", workers], capsys)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, err
    assert "--workers" in err, err
