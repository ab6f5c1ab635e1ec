"""Trainer options: previews, --config YAML, mixed precision."""
import torch
from safetensors.torch import load_file

from personalize import train
from personalize.cli import main
from personalize.training import preview_dir

FAST = {"steps": 3, "batch_size": 2, "checkpoint_every": 0, "seed": 2, "masks": "none"}


def test_previews_do_not_change_the_training_trajectory(tiny, photos, tmp_path):
    plain = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "a.safetensors",
                  settings=FAST, progress=False)
    with_previews = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "b.safetensors",
                          settings={**FAST, "preview_every": 1}, progress=False)
    previews = sorted(preview_dir(with_previews).glob("*.png"))
    assert [p.name for p in previews] == ["step_000001.png", "step_000002.png", "step_000003.png"]
    a, b = load_file(str(plain)), load_file(str(with_previews))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_yaml_sets_method_and_trainer_settings(photos, tmp_path, capsys):
    config = tmp_path / "settings.yaml"
    config.write_text("steps: 2\nbatch_size: 1\ncheckpoint_every: 0\nperfusion:\n  lock: trained\n  beta: 0.65\n")
    out = tmp_path / "c.safetensors"
    main(["train", "--base", "tiny", "--images", str(photos), "--superclass", "ball", "--token", "<disc>",
          "--out", str(out),
          "--config", str(config), "--steps", "1", "--masks", "none"])  # returns normally on success
    from personalize import load_concept

    concept = load_concept(out)
    assert concept.config["lock"] == "trained" and concept.inference_defaults["beta"] == 0.65
    assert concept.header["provenance"]["steps"] == 1  # the flag wins over the file
    assert any(k.startswith("o_k.") for k in concept.tensors)


def test_bf16_mixed_precision_trains_on_cpu(tiny, photos, tmp_path):
    out = train(tiny, photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
                settings={**FAST, "steps": 1, "mixed_precision": "bf16"}, progress=False, device="cpu")
    tensors = load_file(str(out))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert tensors["embedding"].dtype == torch.float32  # trainables stay fp32 under autocast
