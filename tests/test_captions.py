"""Per-image captions (IMAGE.txt beside a training photo): parsing, bad captions, and what a step trains on."""
from __future__ import annotations

import pytest
import torch

from conftest import make_photos
from personalize.errors import BadInputError
from personalize.images import list_images, load_captions
from personalize.training import LatentCache, draw_batch
from test_bad_input import check_error, run_cli


def test_sidecars_are_read_as_templates(tmp_path):
    photos = make_photos(tmp_path / "p", n=3)
    (photos / "photo_0.txt").write_text("a {} on the left,\n  on a green   background\n")
    (photos / "photo_2.txt").write_text("a photo of <disc> at the top")
    assert load_captions(list_images(photos), "<disc>") == [
        "a {} on the left, on a green background", None, "a photo of {} at the top"]


@pytest.mark.parametrize("text, words", [
    ("a photo of a dog", ("exactly once", "{}")),
    ("a {} and another {}", ("exactly once",)),
    ("a {} with {braces}", ("exactly once",)),
    ("x" * 301, ("1-300",)),
    ("   \n", ("1-300",)),
])
def test_bad_captions_stop_the_run_in_one_line(capsys, tmp_path, text, words):
    photos = make_photos(tmp_path / "p", n=3)
    (photos / "photo_1.txt").write_text(text)
    out = tmp_path / "c.safetensors"
    code, _, err = run_cli(capsys, ["train", "--method", "textual-inversion", "--base", "tiny", "--images", photos,
                                    "--token", "<disc>", "--superclass", "disc", "--out", out, "--steps", "1"])
    check_error(code, err, "photo_1.txt", *words)
    assert not out.exists()


def test_undecodable_caption_is_a_bad_input(tmp_path):
    photos = make_photos(tmp_path / "p", n=2)
    (photos / "photo_0.txt").write_bytes(b"a \xff\xfe {}")
    with pytest.raises(BadInputError, match="UTF-8"):
        load_captions(list_images(photos), "<disc>")


def _cache(captions):
    cache = LatentCache.__new__(LatentCache)
    n = len(captions)
    cache.n, cache.masks = n, None
    cache.mean = torch.arange(2 * n, dtype=torch.float32).view(2 * n, 1, 1, 1).expand(2 * n, 4, 2, 2).clone()
    cache.std = torch.zeros_like(cache.mean)
    cache.labels = torch.zeros(n, dtype=torch.long)
    cache.captions = list(captions) if any(c is not None for c in captions) else None
    return cache


def test_a_step_trains_captioned_images_on_their_caption_and_never_mirrored():
    captions = ["a {} on the left, on a red background", None, "a {} at the top, on a blue background", None]
    batch = draw_batch(_cache(captions), 64, 1.0, 1000, "<tok>", torch.Generator().manual_seed(0), "cpu",
                       ("a photo of a {}",))
    rows = batch.latents[:, 0, 0, 0].long().tolist()  # row r of the cache (r >= n: the mirror of r - n)
    seen = set()
    for row, prompt in zip(rows, batch.prompts):
        image, mirrored = row % 4, row >= 4
        seen.add(image)
        if captions[image] is None:
            assert prompt == "a photo of a <tok>" and mirrored  # flip_p = 1 mirrors every uncaptioned image
        else:
            assert prompt == captions[image].format("<tok>") and not mirrored
    assert seen == {0, 1, 2, 3}


def test_without_captions_the_draw_is_unchanged():
    """Same generator, no sidecars: exactly the batch the trainer drew before captions existed."""
    plain = _cache([None] * 3)
    a = draw_batch(plain, 8, 0.5, 1000, "<tok>", torch.Generator().manual_seed(5), "cpu")
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(3, (8,), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    assert torch.equal(a.latents[:, 0, 0, 0].long(), idx + 3 * flip.long())


def test_toy_examples_come_captioned(tmp_path):
    from personalize.datasets.toyworld.concepts import concept_scenes, render_concept_examples

    paths = render_concept_examples("striped_heart", tmp_path / "p")
    caps = load_captions(paths, "<tok>")
    for scene, cap in zip(concept_scenes("striped_heart"), caps):
        assert f"on a {scene.background} background" in cap and cap.startswith("a {} ")
    render_concept_examples("striped_heart", tmp_path / "p", captions=False)
    assert load_captions(paths, "<tok>") == [None] * len(paths)
