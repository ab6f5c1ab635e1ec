"""Zero-shot masks (``--masks auto``, personalize/segment.py) and the mask-weighted loss.

A tiny random CLIPSeg built from a config (conftest ``make_segmenter``) stands in for CIDAS/clipseg-rd64-refined:
its masks are arbitrary but deterministic, which is all these tests need."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from conftest import make_photos, make_segmenter
from test_bad_input import assert_no_train_output, check_error, run_cli

from personalize import load_concept, train
from personalize.errors import BaseModelError
from personalize.images import list_images, open_rgb, stack_masks
from personalize.paths import cache_dir
from personalize.segment import GET_WEIGHTS, auto_mask_paths

WORDS = {"token": "<disc>", "superclass": "ball"}
FAST = {"steps": 2, "batch_size": 2, "checkpoint_every": 0, "flip_p": 0.0}


@pytest.fixture
def forwards(monkeypatch):
    """Counts CLIPSeg forward passes (and model loads)."""
    from transformers import CLIPSegForImageSegmentation

    seen = {"forward": 0, "load": 0}
    forward, load = CLIPSegForImageSegmentation.forward, CLIPSegForImageSegmentation.from_pretrained.__func__

    def counted_forward(self, *args, **kwargs):
        seen["forward"] += 1
        return forward(self, *args, **kwargs)

    def counted_load(cls, *args, **kwargs):
        seen["load"] += 1
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(CLIPSegForImageSegmentation, "forward", counted_forward)
    monkeypatch.setattr(CLIPSegForImageSegmentation, "from_pretrained", classmethod(counted_load))
    return seen


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONALIZE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _independent(folder, paths, phrase):
    """Perfusion §4.4 written out directly on transformers: sigmoid(logits), bilinear to the photo, / max."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    processor = CLIPSegProcessor.from_pretrained(folder)
    out = []
    for path in paths:
        img = open_rgb(path)
        with torch.no_grad():
            logits = model(**processor(text=[phrase], images=[img], return_tensors="pt")).logits
        prob = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]))
        m = torch.nn.functional.interpolate(prob, size=(img.height, img.width), mode="bilinear")[0, 0]
        out.append((m / m.max()).numpy())
    return out


def _read16(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.mode == "I;16"
        return np.asarray(img, dtype=np.float64) / 65535


def test_auto_masks_are_the_papers_soft_masks_and_cached(tmp_path, tiny_segmenter, fresh_cache, forwards):
    paths = list_images(make_photos(tmp_path / "photos", n=3))  # non-square photos of several sizes
    files = auto_mask_paths(paths, ["ball"] * 3, tiny_segmenter)
    assert forwards == {"forward": 1, "load": 1}  # one batch
    assert all(f.parent == cache_dir("masks") for f in files)
    for f, want, photo in zip(files, _independent(tiny_segmenter, paths, "ball"), paths):
        got = _read16(f)
        assert got.shape == (open_rgb(photo).height, open_rgb(photo).width)
        np.testing.assert_allclose(got, want, atol=1 / 65535 + 1e-6)
        assert got.max() == 1.0
    forwards.update(forward=0, load=0)
    assert auto_mask_paths(paths, ["ball"] * 3, tiny_segmenter) == files
    assert forwards == {"forward": 0, "load": 0}, "a cached mask was segmented again"
    # the key holds the prompt and the segmenter's files
    assert set(auto_mask_paths(paths[:1], ["cup"], tiny_segmenter)).isdisjoint(files)
    other = make_segmenter(tmp_path / "other", seed=1)
    assert set(auto_mask_paths(paths[:1], ["ball"], other)).isdisjoint(files)
    assert forwards["forward"] == 2
    assert not [p for p in cache_dir("masks").iterdir() if p.suffix != ".png"], "temp files left in the cache"


def test_the_mask_weights_the_loss(tiny):
    """A zero mask gives its photo zero gradient; the other photo's gradient is that of its own masked loss."""
    from personalize.training.cache import Batch
    from personalize.training.step import denoising_step

    class Plain:
        def on_text_encoded(self, ids, hidden):
            pass

    g = torch.Generator().manual_seed(0)
    c, s = tiny.unet.config.in_channels, tiny.unet.config.sample_size
    latents, noise = torch.randn(2, c, s, s, generator=g), torch.randn(2, c, s, s, generator=g)
    t = torch.tensor([10, 500])
    mask = torch.rand(2, 1, s, s, generator=g)
    mask[0] = 0
    prompts = ["a photo of a ball", "a ball on the beach"]
    x = latents.clone().requires_grad_(True)
    loss = denoising_step(tiny, tiny.scheduler, Plain(), Batch(x, mask, noise, t, prompts))
    loss.backward()
    assert torch.count_nonzero(x.grad[0]) == 0
    assert torch.count_nonzero(x.grad[1]) > 0
    # independently: photo 1 alone through the UNet, its squared error weighted by its mask
    y = latents[1:].clone().requires_grad_(True)
    ids = tiny.tokenizer(prompts[1:], padding="max_length", max_length=tiny.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    noisy = tiny.scheduler.add_noise(y, noise[1:], t[1:])
    pred = tiny.unet(noisy, t[1:], tiny.text_encoder(ids)[0]).sample
    w = mask[1:].expand_as(pred)
    alone = (((pred - noise[1:]) ** 2) * w).sum() / w.sum()
    alone.backward()
    torch.testing.assert_close(loss, alone, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(x.grad[1:], y.grad, rtol=1e-3, atol=1e-7)


def _capture_masks(monkeypatch):
    import personalize.training.step as step

    seen, real = [], step.denoising_loss

    def record(pred, target, mask):
        seen.append(None if mask is None else mask.detach().clone())
        return real(pred, target, mask)

    monkeypatch.setattr(step, "denoising_loss", record)
    return seen


def test_perfusion_trains_with_auto_masks_by_default_and_a_folder_of_them_is_the_same(
        tmp_path, _tiny_master, tiny_segmenter, fresh_cache, monkeypatch):
    photos = make_photos(tmp_path / "photos", n=2)
    seen = _capture_masks(monkeypatch)
    auto = train(copy.deepcopy(_tiny_master), photos, **WORDS, out=tmp_path / "auto.safetensors",
                 settings={**FAST, "segmenter": str(tiny_segmenter)}, progress=False)
    assert load_concept(auto).header["provenance"]["masks"] == "auto"
    # the batch masks are the cached soft masks, cropped like the photos and resized to the latents
    files = auto_mask_paths(list_images(photos), ["ball"] * 2, tiny_segmenter)
    size = _tiny_master.unet.config.sample_size
    pixels = _tiny_master.unet.config.sample_size * _tiny_master.vae_scale_factor
    want = torch.nn.functional.interpolate(stack_masks(files, pixels), size=(size, size), mode="bilinear")
    assert seen and all(any(torch.equal(row, w) for w in want) for m in seen for row in m)
    # --masks DIR with those very files trains bit for bit the same concept
    folder = tmp_path / "masks"
    folder.mkdir()
    for photo, f in zip(list_images(photos), files):
        (folder / f"{photo.stem}.png").write_bytes(f.read_bytes())
    by_dir = train(copy.deepcopy(_tiny_master), photos, **WORDS, out=tmp_path / "dir.safetensors", masks=folder,
                   settings=FAST, progress=False)
    assert load_concept(by_dir).header["provenance"]["masks"] == "folder"
    a, b = load_concept(auto).tensors, load_concept(by_dir).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and differently from no masks at all
    plain = train(copy.deepcopy(_tiny_master), photos, **WORDS, out=tmp_path / "none.safetensors", masks=None,
                  settings=FAST, progress=False)
    assert "masks" not in load_concept(plain).header["provenance"]
    assert not all(torch.equal(a[k], load_concept(plain).tensors[k]) for k in a)


def test_other_methods_default_to_no_masks(tmp_path, _tiny_master, monkeypatch):
    seen = _capture_masks(monkeypatch)
    train(copy.deepcopy(_tiny_master), make_photos(tmp_path / "photos", n=2), **WORDS,
          out=tmp_path / "ti.safetensors", method="textual-inversion", settings=FAST, progress=False)
    assert seen and all(m is None for m in seen)


def test_unreachable_segmenter_stops_before_any_work(tmp_path, monkeypatch, fresh_cache):
    import personalize.training.loop as loop

    def no_base(*a, **k):
        raise AssertionError("the base was loaded before the segmenter was checked")

    monkeypatch.setattr(loop, "load_base", no_base)
    photos = make_photos(tmp_path / "photos", n=2)
    with pytest.raises(BaseModelError) as info:
        train("tiny", photos, **WORDS, out=tmp_path / "out" / "c.safetensors", settings=FAST, progress=False)
    assert GET_WEIGHTS in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cli_offline_segmenter_is_one_line_and_exit_2(tmp_path, capsys, fresh_cache):
    photos = make_photos(tmp_path / "photos", n=2)
    out = tmp_path / "out" / "c.safetensors"
    args = ["train", "--base", "tiny", "--images", photos, "--superclass", "ball", "--token", "<disc>", "--out", out,
            "--steps", "1", "--device", "cpu"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    code, _, err = run_cli(capsys, args)  # Perfusion: --masks auto by default, CIDAS/clipseg-rd64-refined
    check_error(code, err, "clipseg-rd64-refined", "--segmenter", "--masks none")
    assert_no_train_output(out)
    code, _, err = run_cli(capsys, [*args, "--segmenter", tmp_path / "missing"])
    check_error(code, err, "missing", "--masks none")
    assert_no_train_output(out)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    (weightless / "pytorch_model.bin").write_bytes(b"pickle")
    code, _, err = run_cli(capsys, [*args, "--segmenter", weightless])
    check_error(code, err, "safetensors", "--masks none")
    assert_no_train_output(out)
    assert not any(fresh_cache.rglob("*.png")), "masks were written by a refused run"


def test_cli_masks_auto_and_dir(tmp_path, capsys, tiny_segmenter, fresh_cache):
    photos = make_photos(tmp_path / "photos", n=2)
    base = ["train", "--base", "tiny", "--images", photos, "--superclass", "ball", "--token", "<disc>",
            "--steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--device", "cpu"]
    code, _, err = run_cli(capsys, [*base, "--out", tmp_path / "a.safetensors", "--method", "textual-inversion",
                                    "--masks", "auto", "--segmenter", tiny_segmenter])
    assert code == 0, err
    assert load_concept(tmp_path / "a.safetensors").header["provenance"]["masks"] == "auto"
    masks = tmp_path / "masks"
    masks.mkdir()
    for p in list_images(photos):
        (masks / f"{p.stem}.png").write_bytes(p.read_bytes())
    code, _, err = run_cli(capsys, [*base, "--out", tmp_path / "b.safetensors", "--masks", str(masks)])
    assert code == 0, err
    assert load_concept(tmp_path / "b.safetensors").header["provenance"]["masks"] == "folder"
    code, _, err = run_cli(capsys, [*base, "--out", tmp_path / "c.safetensors", "--masks", str(tmp_path / "nope")])
    check_error(code, err, "nope", "--masks none")


def test_methods_lists_each_methods_mask_default(capsys):
    from personalize import methods as registry
    from personalize.cli.flags import trainer_defaults

    assert trainer_defaults(registry.get("perfusion"))["masks"] == "auto"
    assert {trainer_defaults(registry.get(n))["masks"] for n in registry.names() if n != "perfusion"} == {"none"}
    code, out, _ = run_cli(capsys, ["methods", "perfusion"])
    assert code == 0 and "auto" in out and "masks" in out


def test_16_bit_masks_keep_their_values(tmp_path):
    from PIL import Image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(ramp).save(tmp_path / "m.png")
    got = stack_masks([tmp_path / "m.png"], 8)[0, 0].numpy()
    np.testing.assert_allclose(got, ramp / ramp.max(), atol=1e-6)


def test_toy_world_masks_are_the_renderers_own(tmp_path):
    from PIL import Image

    from personalize.datasets.toyworld.concepts import concept_scenes, render_concept_examples
    from personalize.datasets.toyworld.world import COLORS

    paths = render_concept_examples("split_triangle", tmp_path / "photos", masks_dir=tmp_path / "masks")
    for path, scene in zip(paths, concept_scenes("split_triangle")):
        image = np.asarray(Image.open(path), dtype=np.int16)
        mask = np.asarray(Image.open(tmp_path / "masks" / path.name))
        background = (image == COLORS[scene.background]).all(-1)
        assert mask.shape == image.shape[:2] and mask.max() == 255
        assert background[mask == 0].all(), "mask says background where the concept was drawn"
        assert not background[mask == 255].any(), "mask says concept where only background was drawn"


@pytest.mark.parametrize("method, masks", [("perfusion", "folder"), ("textual-inversion", None)])
def test_toy_concepts_train_with_exact_masks_where_the_method_masks(tmp_path, _tiny_master, method, masks):
    from personalize.claims import train_toy_concept

    out = train_toy_concept(copy.deepcopy(_tiny_master), "split_triangle", tmp_path / "c.safetensors", method=method,
                            steps=1, batch_size=1)
    assert load_concept(out).header["provenance"].get("masks") == masks  # no segmenter needed: the renderer's
    assert (tmp_path / "c.masks").is_dir() == (masks is not None)
