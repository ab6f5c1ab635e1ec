"""The toy world: renderer, captions, held-out split, concepts, base-model recipe and shipped weights."""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from personalize.datasets.toyworld import concepts, world  # noqa: E402
from personalize.datasets.toyworld.captions import parse_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from personalize.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def test_attribute_words_are_single_clip_tokens(tokenizer):
    words = list(world.VOCABULARY) + [c["superclass"] for c in concepts.list_concepts()]
    for w in words:
        assert len(tokenizer(w, add_special_tokens=False).input_ids) == 1, w


def test_render_is_deterministic_antialiased_32px():
    a = [world.render_array(world.sample_scene(random.Random(3))) for _ in range(2)]
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], a[1])
    b = world.render_array(world.sample_scene(random.Random(4)))
    assert not np.array_equal(a[0], b)
    # antialiased: edge pixels take colours between the palette colours
    palette = {tuple(c) for c in world.COLORS.values()}
    pixels = {tuple(p) for p in a[0].reshape(-1, 3)}
    assert len(pixels - palette) > 0


def test_caption_states_every_attribute_and_parses_back():
    rng = random.Random(0)
    n_two = 0
    for _ in range(200):
        scene = world.sample_scene(rng, held_out=None)
        cap = world.caption(scene)
        parsed = parse_prompt(cap)
        assert parsed.background == scene.background
        got = sorted((o.shape, o.color, o.size, o.position) for o in parsed.objects)
        want = sorted((o.shape, o.color, o.size, o.position) for o in scene.objects)
        assert got == want, cap
        assert all(o.color != scene.background for o in scene.objects)
        n_two += len(scene.objects) == 2
    assert 60 < n_two < 140  # one and two objects both occur
    example = world.caption(world.Scene("yellow", (
        world.SceneObject("star", "red", "small", "left"), world.SceneObject("circle", "blue", "large", "right"))))
    assert example == "a small red star on the left and a large blue circle on the right, on a yellow background"


def test_prompt_changes_the_scene():
    """Every attribute value is used, so prompts can change what is drawn."""
    rng = random.Random(1)
    seen = {k: set() for k in ("shape", "color", "size", "position", "background")}
    for _ in range(400):
        s = world.sample_scene(rng)
        seen["background"].add(s.background)
        for o in s.objects:
            for k in ("shape", "color", "size", "position"):
                seen[k].add(getattr(o, k))
    assert seen["shape"] == set(world.SHAPES)
    assert seen["color"] == seen["background"] == set(world.COLORS)
    assert seen["size"] == set(world.SIZES) and seen["position"] == set(world.POSITIONS)


def test_held_out_split():
    rng = random.Random(2)
    train = [world.sample_scene(rng, held_out=False) for _ in range(300)]
    assert not any(world.is_held_out(s) for s in train)
    held = world.heldout_scenes(50)
    assert all(world.is_held_out(s) for s in held)
    frac = np.mean([world.is_held_out(world.sample_scene(rng, held_out=None)) for _ in range(2000)])
    assert 0.05 < frac < 0.15


def test_training_captions_only_state_true_attributes():
    rng = random.Random(3)
    for _ in range(200):
        s = world.sample_scene(rng)
        parsed = parse_prompt(world.training_caption(s, rng))
        truth = {(o.shape, o.color, o.size, o.position) for o in s.objects}
        assert len(parsed.objects) == len(s.objects)
        for o in parsed.objects:
            assert any(all(v is None or v == t[i] for i, v in enumerate((o.shape, o.color, o.size, o.position)))
                       for t in truth)
        assert parsed.background in (None, s.background)


def test_concepts_listed_and_rendered(tmp_path):
    listed = concepts.list_concepts()
    assert 6 <= len(listed) <= 8
    for c in listed:
        assert set(c) == {"name", "superclass", "description"}
        assert c["superclass"] in world.SHAPES
        paths = concepts.render_concept_examples(c["name"], tmp_path / c["name"])
        assert 4 <= len(paths) <= 6
        from PIL import Image

        ims = [Image.open(p) for p in paths]
        assert all(p.suffix == ".png" and im.size == (32, 32) and im.mode == "RGB" for p, im in zip(paths, ims))
        scenes = concepts.concept_scenes(c["name"])
        assert len({s.objects[0].position for s in scenes}) >= 3  # varied positions
        assert len({s.background for s in scenes}) >= 2  # varied backgrounds
        assert len({round(s.objects[0].extent) for s in scenes}) >= 2  # varied sizes
        # the texture is not a flat colour: more distinct colours than a flat object of any palette colour
        arr = np.asarray(ims[0]).reshape(-1, 3)
        flat = world.render_array(world.Scene(scenes[0].background, (
            world.SceneObject(c["superclass"], "white", "large", scenes[0].objects[0].position,
                              scenes[0].objects[0].extent, scenes[0].objects[0].center),)))
        assert np.abs(arr.reshape(32, 32, 3).astype(int) - flat.astype(int)).mean() > 5
    with pytest.raises(KeyError):
        concepts.get_concept("nope")


def test_training_data_never_contains_concept_appearances():
    from personalize.toybase.data import unet_batch

    rng = random.Random(4)
    assert all(o.appearance is None for _ in range(200) for o in world.sample_scene(rng).objects)
    x, caps = unet_batch(0, 0, 8, 0.1)
    assert x.shape == (8, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert not any("<" in c for c in caps)


def _tiny_recipe(steps):
    from personalize.toybase.recipe import BaseRecipe

    return BaseRecipe(vae_steps=2, vae_batch=4, steps=steps, batch=4, warmup=1, ckpt_every=1, log_every=1,
                      unet_channels="32,32", unet_attn="0,1", vae_channels="16,16", scale_images=16)


def test_train_base_resume_is_exact_and_exports_sd_pipeline(tmp_path):
    """Few-step run: resume continues from the checkpoint exactly; the export is an fp16 SD pipeline."""
    import torch
    from safetensors.torch import load_file

    from personalize.toybase import checkpoint
    from personalize.toybase.train import train_base

    straight = train_base(_tiny_recipe(2), out=tmp_path / "a")
    train_base(_tiny_recipe(1), out=tmp_path / "b")
    state = checkpoint.read(tmp_path / "b")  # safetensors + a JSON sidecar: nothing pickled
    assert state["phase"] == "unet" and state["step"] == 1
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint").iterdir()) == ["state.json", "state.safetensors"]
    resumed = train_base(_tiny_recipe(2), out=tmp_path / "b", resume=True)
    assert "resuming from" in (tmp_path / "b" / "train.log").read_text()
    wa = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(v.dtype == torch.float16 for v in wa.values())

    index = json.loads((straight / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"][1] == "UNet2DConditionModel" and index["vae"][1] == "AutoencoderKL"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["scheduler"][1] == "DDIMScheduler"
    sched = json.loads((straight / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "v_prediction"
    assert sched["beta_start"] == 0.00085 and sched["beta_end"] == 0.012 and sched["steps_offset"] == 1
    assert sched["clip_sample"] is False and sched["set_alpha_to_one"] is False
    te = json.loads((straight / "text_encoder" / "config.json").read_text())
    assert te["vocab_size"] == 49408
    unet = json.loads((straight / "unet" / "config.json").read_text())
    assert unet["use_linear_projection"] is False and unet["cross_attention_dim"] == te["hidden_size"]
    info = json.loads((straight / "TRAINING.json").read_text())
    assert {"command", "seed", "git_commit", "train_seconds"} <= set(info)

    # a plain from_pretrained (no dtype) gives a consistent float32 pipeline that samples 32x32 images
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(straight))
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red star", num_inference_steps=2).images[0].size == (32, 32)


def test_train_base_cli_resumes_inside_the_vae_phase_and_exports_an_unfinished_run(tmp_path, capsys):
    """'personalize toyworld train-base' (the recipe's options) stopped inside phase 1 and resumed gives the VAE of
    an uninterrupted run; 'evaluate-base --export-from' exports a run's checkpoint."""
    import torch
    from safetensors.torch import load_file

    from personalize.cli import main
    from personalize.toybase import checkpoint

    def cli(out, vae_steps, *extra):
        main(["toyworld", "train-base", "--out", str(out), "--vae-steps", str(vae_steps), "--vae-batch", "4",
              "--steps", "0", "--batch", "4", "--warmup", "1", "--ckpt-every", "1", "--log-every", "1",
              "--unet-channels", "32,32", "--unet-attn", "0,1", "--vae-channels", "16,16", "--scale-images", "16",
              *extra])

    cli(tmp_path / "a", 3)
    with pytest.raises(StopIteration):  # stop the run inside phase 1, after its step-2 checkpoint
        from personalize.toybase import train as T

        real = T.step_loader

        def two_batches(dataset, start, workers):
            batches = real(dataset, start, workers)
            return iter([next(batches) for _ in range(2)])

        mp = pytest.MonkeyPatch()
        mp.setattr(T, "step_loader", two_batches)
        try:
            cli(tmp_path / "b", 3)
        finally:
            mp.undo()
    assert checkpoint.read(tmp_path / "b")["phase"] == "vae" and checkpoint.read(tmp_path / "b")["step"] == 2
    cli(tmp_path / "b", 3, "--resume")
    assert "[vae] step 3/3" in capsys.readouterr().out  # the CLI prints the log lines
    a, b = checkpoint.read(tmp_path / "a"), checkpoint.read(tmp_path / "b")
    assert a["scaling"] == b["scaling"] and all(torch.equal(a["vae"][k], b["vae"][k]) for k in a["vae"])

    main(["toyworld", "evaluate-base", "--export-from", str(tmp_path / "b"), "--to", str(tmp_path / "exported")])
    info = json.loads((tmp_path / "exported" / "TRAINING.json").read_text())
    assert info["phase"] == "unet" and info["exported_from"] == str(tmp_path / "b")
    vae = load_file(tmp_path / "exported" / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, b["vae"][k].half()) for k, v in vae.items())


WEIGHTS = Path(__file__).resolve().parents[1] / "personalize" / "toybase" / "weights"


@pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="toy-world weights not exported yet")
def test_shipped_weights_load_and_follow_real_token_ids(tokenizer):
    import torch
    from diffusers import StableDiffusionPipeline

    size = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert size <= 25e6
    pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS))
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert pipe.tokenizer("a photo of a dog").input_ids[:6] == [49406, 320, 1125, 539, 320, 1929]
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a large red circle in the center, on a blue background", num_inference_steps=10,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)
    info = json.loads((WEIGHTS / "TRAINING.json").read_text())
    assert "git_commit" in info and "seed" in info


def test_every_concept_survives_the_shipped_vae():
    """Each held-out concept's example images decode from their own latents at fidelity >= 0.9 (issue 14):
    a method can only learn what the VAE can draw. A flat object of the superclass scores <= 0.43."""
    import torch
    from diffusers import AutoencoderKL

    from personalize.datasets.toyworld.measure import concept_fidelity, detect_scene

    vae = AutoencoderKL.from_pretrained(str(WEIGHTS / "vae"), torch_dtype=torch.float32)
    for name in concepts.CONCEPTS:
        arrays = [np.asarray(world.render_scene(s)) for s in concepts.concept_scenes(name)]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        decoded = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        scores = []
        for arr in decoded:
            scene = detect_scene(arr)
            scores.append(max(concept_fidelity(arr, o, name, scene) for o in scene.objects))
        assert np.mean(scores) >= 0.9, (name, scores)
    shared = {}
    for spec in concepts.CONCEPTS.values():
        shared.setdefault(spec.superclass, []).append(spec.name)
    assert max(len(v) for v in shared.values()) >= 3  # at least three concepts share a superclass
