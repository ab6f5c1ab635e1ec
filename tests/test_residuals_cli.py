"""The CLI with --method residuals: train, inspect, generate (with and without --lag), export."""
import json

from safetensors import safe_open

from personalize import load_concept
from personalize.cli import main


def run(args, capsys):
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_generate_lag_export(photos, tmp_path, capsys):
    out = tmp_path / "disc.safetensors"
    code, _, err = run(["train", "--method", "residuals", "--base", "tiny", "--images", photos, "--superclass", "ball",
                        "--token", "<disc>", "--out", out, "--steps", "2", "--batch-size", "2", "--rank", "2",
                        "--train-token", "--checkpoint-every", "0"], capsys)
    assert code == 0 and out.is_file(), err
    concept = load_concept(out)
    assert concept.method == "residuals" and concept.config["rank"] == 2 and concept.config["train_token"]
    assert concept.header["provenance"]["batch_size"] == 2
    code, stdout, _ = run(["inspect", out, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["header"]["inference_defaults"] == {"lag": False}
    for flags, folder in (([], "plain"), (["--lag"], "lag")):
        code, _, err = run(["generate", "--base", "tiny", "--concept", out, "--prompt", "a <disc> ball on the beach",
                            "--num-images", "1", "--steps", "2", "--out", tmp_path / folder, *flags], capsys)
        assert code == 0, err
        assert len(list((tmp_path / folder).glob("*.png"))) == 1
    code, _, err = run(["generate", "--base", "tiny", "--concept", f"{out}:lag=true", "--prompt", "a <disc> ball",
                        "--num-images", "1", "--steps", "1", "--out", tmp_path / "knob"], capsys)
    assert code == 0, err
    lora = tmp_path / "lora"
    code, stdout, err = run(["export", out, "--format", "diffusers-lora", "--out", lora], capsys)
    assert code == 0, err
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys == {k for k in concept.tensors if k.startswith("unet.")}
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 2
    info = json.loads((lora / "export.json").read_text())
    assert info["token"] == "<disc>" and info["prompt"] == "a photo of a <disc> ball"


def test_methods_lists_residuals(capsys):
    code, stdout, _ = run(["methods"], capsys)
    assert code == 0 and "residuals" in stdout and "rank_fraction" in stdout
