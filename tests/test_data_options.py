"""The data as practitioners prepare it: --repeats, caption dropout, tag shuffling, aspect-ratio buckets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from personalize.families.sd import StableDiffusionXL
from personalize.base import load_base
from personalize.errors import BadInputError
from personalize.images import load_fitted, load_fitted_masks
from personalize.training import (CaptionOptions, LatentCache, bucket_sizes, bucketed_cache, closest_bucket,
                                  draw_batch, shuffle_tags, train)
from personalize.training.buckets import settings as bucket_settings


@pytest.fixture(scope="module")
def sdxl():
    return load_base("tiny-sdxl")


def _save(folder, name, size, color=(200, 60, 60)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(folder / name)
    return folder / name


# -- the bucket list and the assignment -------------------------------------------------------------------------
def test_buckets_at_512_are_kohyas_list():
    """kohya's make_bucket_resolutions at 512 (steps 64, sides 256-1024), as (width, height), written out."""
    found = {(w, h) for h, w in bucket_sizes(512, 64, 256, 1024)}
    half = {(256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576)}
    assert found == half | {(h, w) for w, h in half} | {(512, 512)}


@pytest.mark.parametrize("target, step, low, high", [(512, 64, 256, 1024), (1024, 64, 512, 2048), (32, 4, 16, 64)])
def test_every_bucket_is_on_the_step_within_the_area_and_maximal(target, step, low, high):
    buckets = bucket_sizes(target, step, low, high)
    assert (target, target) in buckets
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and low <= min(h, w) and max(h, w) <= high
        assert h * w <= target * target
        # kohya's rule: for its width, a bucket has the largest height the area and the largest side allow
        assert any(a + step > high or (a + step) * b > target * target for a, b in ((h, w), (w, h)))
    for width in range(low, high + 1, step):  # and every width from the smallest side to the largest has one
        assert any(w == width for _, w in buckets)


@pytest.mark.parametrize("width, height, bucket", [
    (1000, 1000, (512, 512)),  # square
    (1000, 500, (320, 704)),  # 2:1 -> 704/320 = 2.2 (640/384 = 1.67 and 768/320 = 2.4 are further)
    (500, 1000, (704, 320)),  # 1:2 -> 320/704 = 0.45
    (800, 600, (448, 576)),  # 4:3 -> 576/448 = 1.29 (640/384 = 1.67)
    (3000, 300, (256, 1024)),  # 10:1 -> the widest bucket, 4:1
    (640, 480, (448, 576)),
])
def test_each_photo_goes_to_the_bucket_of_the_closest_aspect_ratio(width, height, bucket):
    assert closest_bucket(height, width, bucket_sizes(512, 64, 256, 1024)) == bucket


def test_bucket_steps_follow_the_base(sdxl, _tiny_master):
    """64 where the size allows it, the UNet's stride (4 px on the tiny bases) where 64 cannot divide it."""
    assert bucket_settings(_tiny_master, 32) == (4, 16, 64)
    assert bucket_settings(sdxl, 128) == (64, 64, 256)
    for bad in ({"step": 6}, {"step": 4, "min_side": 18}, {"step": 4, "min_side": 40}):
        with pytest.raises(BadInputError):
            bucket_settings(_tiny_master, 32, **bad)


# -- no distortion, masks and time ids ----------------------------------------------------------------------------
def _aspect_of_dark(pixels: torch.Tensor) -> float:
    dark = (pixels.mean(0) < 0).numpy()
    ys, xs = np.nonzero(dark)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


def test_a_circle_in_a_wide_photo_stays_round(tmp_path):
    img = Image.new("RGB", (1000, 500), "white")
    ImageDraw.Draw(img).ellipse((350, 100, 650, 400), fill="black")  # a 300 px circle
    img.save(tmp_path / "wide.png")
    buckets = bucket_sizes(512, 64, 256, 1024)
    (fitted,) = load_fitted([tmp_path / "wide.png"], lambda h, w: closest_bucket(h, w, buckets))
    assert tuple(fitted.pixels.shape) == (3, 320, 704)
    assert abs(_aspect_of_dark(fitted.pixels) - 1.0) < 0.02
    # what a square centre crop to 512 or a plain resize to the bucket would do instead: the circle squashed
    squashed = torch.from_numpy(np.asarray(img.resize((704, 320)), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert abs(_aspect_of_dark(squashed) - 1.0) > 0.05


def test_masks_follow_their_photos_crop_exactly(tmp_path):
    """A bright box in the photo and the same box in its mask (once at the photo's size, once at twice it) land on
    the same pixels after bucketing."""
    photo = Image.new("RGB", (90, 40), "black")
    ImageDraw.Draw(photo).rectangle((10, 5, 30, 34), fill="white")
    photo.save(tmp_path / "p.png")
    for scale, name in ((1, "m1.png"), (2, "m2.png")):
        mask = Image.new("L", (90 * scale, 40 * scale), 0)
        ImageDraw.Draw(mask).rectangle((10 * scale, 5 * scale, 31 * scale - 1, 35 * scale - 1), fill=255)
        mask.save(tmp_path / name)
    buckets = bucket_sizes(32, 4, 16, 64)
    (fitted,) = load_fitted([tmp_path / "p.png"], lambda h, w: closest_bucket(h, w, buckets))
    assert fitted.pixels.shape[-1] / fitted.pixels.shape[-2] > 1.8  # a wide bucket, not a square
    brightness = (fitted.pixels.mean(0) + 1) / 2
    for name in ("m1.png", "m2.png"):
        (mask,) = load_fitted_masks([tmp_path / name], [fitted])
        assert mask.shape[-2:] == fitted.pixels.shape[-2:]
        # the same pixels, up to the resampling filter at the edges (a crop one pixel off differs by ~1 there)
        diff = (mask[0] - brightness).abs()
        assert diff.max() < 0.25 and diff.mean() < 0.02, name


def test_sdxl_rows_carry_their_photos_size_and_crop(sdxl, tmp_path, monkeypatch):
    """Hand-computed: a 200 x 100 photo (W x H) goes to the 44 x 20 bucket at 32 px (ratio 2.2), is scaled by
    max(44/200, 20/100) = 0.22 to 44 x 22 and cropped 1 row from the top; a 95 x 190 one goes to 20 x 44, is scaled
    by max(20/95, 44/190) = 0.2316 to 22 x 44 (22.0 rounds to 22) and cropped 1 column from the left. A mirrored row
    crops the mirrored place (left = 22 - 20 - 1 = 1). End to end (``personalize train --buckets`` on tiny-sdxl,
    DreamBooth-LoRA with class images of the same two shapes, caption dropout): the UNet gets each row's own
    (original size, crop, target size), and every step's rows have one shape."""
    from personalize.cli import main

    folder, classes = tmp_path / "photos", tmp_path / "class"
    for where in (folder, classes):
        _save(where, "a.png", (200, 100))
        _save(where, "b.png", (95, 190))
    expected = {(100, 200, 1, 0, 20, 44), (190, 95, 0, 1, 44, 20)}
    buckets = bucket_sizes(32, *bucket_settings(sdxl, 32))
    cache = bucketed_cache(sdxl.vae, sorted(folder.glob("*.png")), buckets)
    assert {tuple(map(int, row)) for c in cache.caches for row in c.time_ids} == expected
    seen = []
    real = StableDiffusionXL.unet_kwargs

    def spy(self, pipe, pooled, latents, time_ids=None):
        out = real(self, pipe, pooled, latents, time_ids)
        seen.append(out["added_cond_kwargs"]["time_ids"].clone())
        return out

    monkeypatch.setattr(StableDiffusionXL, "unet_kwargs", spy)
    main(["train", "--base", "tiny-sdxl", "--images", str(folder), "--token", "<disc>", "--superclass", "ball",
          "--out", str(tmp_path / "c.safetensors"), "--method", "dreambooth-lora", "--class-images", str(classes),
          "--steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--masks", "none", "--buckets",
          "--caption-dropout", "0.2"])
    assert 2 <= len(seen) <= 4  # per step one pass, or one each for photos and class images of two shapes
    for ids in seen:
        rows = {tuple(map(int, row)) for row in ids}
        assert rows <= expected
        assert len({row[-2:] for row in rows}) == 1  # one shape per pass (photos and class images joint or not)
    from personalize import load_concept

    provenance = load_concept(tmp_path / "c.safetensors").header["provenance"]
    assert provenance["buckets"] == {"20x44": 1, "44x20": 1} and provenance["data"]["caption_dropout"] == 0.2


# -- prompts: dropout and tag shuffling ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_images(_tiny_master):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    return LatentCache(_tiny_master.vae, images, None, torch.tensor([0, 1]))


def _draws(cache, rounds, seed=0, words="<disc>", templates=("a photo of a {}",), captions=None):
    generator = torch.Generator().manual_seed(seed)
    return [draw_batch(cache, 16, 0.5, 1000, words, generator, "cpu", templates, captions) for _ in range(rounds)]


def test_caption_dropout_empties_prompts_at_its_rate(two_images):
    p, rounds = 0.3, 100
    prompts = [q for b in _draws(two_images, rounds, captions=CaptionOptions(dropout=p)) for q in b.prompts]
    empty = prompts.count("")
    n = len(prompts)
    assert abs(empty - p * n) < 4 * math.sqrt(n * p * (1 - p))  # binomial: 4 standard deviations
    assert set(prompts) == {"", "a photo of a <disc>"}


def test_default_caption_options_change_nothing(two_images):
    plain = _draws(two_images, 3)
    same = _draws(two_images, 3, captions=CaptionOptions())
    for a, b in zip(plain, same):
        assert a.prompts == b.prompts and torch.equal(a.latents, b.latents) and torch.equal(a.noise, b.noise)


def test_shuffle_keeps_the_first_tags_and_the_concept():
    template = "{}, red, on a beach, blurry, close-up, 35mm"
    generator = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(50):
        out = shuffle_tags(template, 1, generator)
        tags = out.split(", ")
        assert tags[0] == "{}" and sorted(tags) == sorted(template.split(", "))
        orders.add(out)
    assert len(orders) > 10
    kept = shuffle_tags("photo, red, {}, blurry", 2, generator)
    assert kept.startswith("photo, red, ") and "{}" in kept
    # the concept's tag is never dropped wherever it sits, and a caption template names it after shuffling
    for _ in range(20):
        out = shuffle_tags("a, b, c {} d, e", 0, generator)
        assert out.count("{}") == 1 and "c {} d" in out.split(", ")


def test_caption_dropout_is_refused_where_the_token_alone_trains(photos, tmp_path):
    with pytest.raises(BadInputError, match="textual-inversion"):
        train("tiny", photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
              method="textual-inversion", settings={"caption_dropout": 0.1}, progress=False)
    for bad in ({"caption_dropout": 1.0}, {"keep_tags": 1}, {"repeats": [1, 2]}, {"repeats": 0},
                {"bucket_min": 64}):
        with pytest.raises(BadInputError):
            train("tiny", photos, token="<disc>", superclass="ball", out=tmp_path / "c.safetensors",
                  settings=bad, progress=False)


# -- repeats ---------------------------------------------------------------------------------------------------------
def _frequencies(batches, words):
    counts = torch.tensor([[p.count(w) for w in words] for b in batches for p in b.prompts]).sum(0).float()
    return counts / counts.sum(), int(counts.sum())


def test_repeats_set_each_photos_share_of_the_rows(_tiny_master):
    words = ["<a>", "<b>"]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    weighted = LatentCache(_tiny_master.vae, images, None, torch.tensor([0, 1]), weights=torch.tensor([1.0, 3.0]))
    share, n = _frequencies(_draws(weighted, 100, words=words, templates=("{}",)), words)
    assert abs(share[1] - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    # the same repeats for every photo: exactly the unweighted draws
    even = LatentCache(_tiny_master.vae, images, None, torch.tensor([0, 1]), weights=torch.tensor([4.0, 4.0]))
    plain = LatentCache(_tiny_master.vae, images, None, torch.tensor([0, 1]))
    for a, b in zip(_draws(even, 3, words=words), _draws(plain, 3, words=words)):
        assert a.prompts == b.prompts and torch.equal(a.latents, b.latents)


def test_repeats_hold_across_buckets(_tiny_master, tmp_path):
    """Photos 0 and 1 share a bucket, photo 2 has its own; repeats 1, 1, 2 give shares 1/4, 1/4, 1/2, and each
    step's rows come from one bucket."""
    folder = tmp_path / "photos"
    paths = [_save(folder, "0.png", (40, 40)), _save(folder, "1.png", (44, 44)), _save(folder, "2.png", (80, 40))]
    cache = bucketed_cache(_tiny_master.vae, paths, bucket_sizes(32, 4, 16, 64), labels=torch.tensor([0, 1, 2]),
                           weights=torch.tensor([1.0, 1.0, 2.0]))
    assert sorted(cache.photos) == [[0, 1], [2]]
    words = ["<a>", "<b>", "<c>"]
    batches = _draws(cache, 150, words=words, templates=("{}",))
    assert all(len({p in ("<a>", "<b>") for p in b.prompts}) == 1 for b in batches)
    share, _ = _frequencies(batches, words)
    steps = len(batches)  # rows of a step are not independent: bound the bucket share by the steps drawn
    assert abs(share[2] - 0.5) < 4 * math.sqrt(0.25 / steps)
    assert abs(share[0] - share[1]) < 0.1


# -- end to end ----------------------------------------------------------------------------------------------------
def _mixed_folder(root):
    folder = root / "photos"
    masks = root / "masks"
    for i, size in enumerate([(64, 32), (32, 64), (40, 40)]):
        img = Image.new("RGB", size, (200, 40 * i, 60))
        ImageDraw.Draw(img).ellipse((4, 4, 24, 24), fill=(30, 200, 40))
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text("{}, green, round, on red" if i else "a {} on red")
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((4, 4, 24, 24), fill=255)
        masks.mkdir(exist_ok=True)
        mask.save(masks / f"p{i}.png")
    return folder, masks


def test_train_buckets_a_mixed_folder_end_to_end(tmp_path):
    """``personalize train --buckets`` on the tiny base: Perfusion, masks from a folder, tag captions shuffled,
    caption dropout, repeats."""
    from personalize import load_concept
    from personalize.cli import main

    folder, masks = _mixed_folder(tmp_path)
    out = tmp_path / "c.safetensors"
    main(["train", "--base", "tiny", "--images", str(folder), "--token", "<disc>", "--superclass", "ball",
          "--out", str(out), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--buckets",
          "--masks", str(masks), "--repeats", "3", "--shuffle-tags", "--keep-tags", "1", "--caption-dropout", "0.5"])
    provenance = load_concept(out).header["provenance"]
    assert len(provenance["buckets"]) == 3 and sum(provenance["buckets"].values()) == 3
    assert provenance["data"]["buckets"] is True


def test_photo_and_class_batches_of_two_shapes_take_one_pass_each(_tiny_master):
    """A photo batch and a class-image batch from different buckets: the loss is loss(photos) + w loss(class
    images), each part with its own prompts' encodings (same shapes share one pass, as before buckets)."""
    from diffusers import DDPMScheduler

    from personalize.training import Batch, denoising_step

    class NoMethod:
        def on_text_encoded(self, ids, hidden):
            pass

    scheduler = DDPMScheduler.from_config(_tiny_master.scheduler.config)
    g = torch.Generator().manual_seed(0)

    def batch(h, w, prompts):
        n = len(prompts)
        return Batch(torch.randn(n, 4, h, w, generator=g), None, torch.randn(n, 4, h, w, generator=g),
                     torch.randint(1000, (n,), generator=g), prompts)

    photos = batch(4, 8, ["a photo of a dog"])
    classes = batch(8, 4, ["a photo of a cat"])  # another bucket: two passes
    with torch.no_grad():
        joint = denoising_step(_tiny_master, scheduler, NoMethod(), photos, classes, 0.5)
        apart = denoising_step(_tiny_master, scheduler, NoMethod(), photos) + \
            0.5 * denoising_step(_tiny_master, scheduler, NoMethod(), classes)
    assert torch.allclose(joint, apart, rtol=1e-5)
