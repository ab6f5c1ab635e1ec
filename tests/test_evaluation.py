"""Evaluator: metric arithmetic vs. an independent numpy computation on random-weight CLIP/DINO."""
import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import BadInputError
from personalize.evaluation import (ClipEncoder, ClipImageScore, ClipTextScore, DinoEncoder, DinoImageScore,
                                    LeakageScore, ToyWorldScore, best_h, class_balanced_mean, harmonic_mean,
                                    normalized_text_similarity, remove_token)

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
IN_MEAN = np.array([0.485, 0.456, 0.406])
IN_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return ClipEncoder(random_weights=True)


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return DinoEncoder(random_weights=True)


def _images(n, seed, h=40, w=50):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(n)]


def _manual_tensor(img, resize, crop, mean, std):
    """Independent preprocessing: shorter side -> resize (PIL bicubic), center crop, scale, normalise."""
    w, h = img.size
    if w <= h:
        nw, nh = resize, int(resize * h / w)
    else:
        nw, nh = int(resize * w / h), resize
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
    arr = np.asarray(img, dtype=np.float64)[top:top + crop, left:left + crop] / 255.0
    arr = (arr - mean) / std
    return torch.tensor(arr.transpose(2, 0, 1)[None], dtype=torch.float32)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clip_img_feats(clip, imgs):
    with torch.no_grad():
        return _unit(np.concatenate([clip.model.encode_image(_manual_tensor(i, 224, 224, CLIP_MEAN, CLIP_STD)).numpy()
                                     for i in imgs]))


def _dino_feats(dino, imgs):
    with torch.no_grad():
        return _unit(np.concatenate([dino.model.forward_features(_manual_tensor(i, 256, 224, IN_MEAN, IN_STD))[:, 0]
                                     .numpy() for i in imgs]))


def test_remove_token():
    assert remove_token("photo of a <new1> barn") == "photo of a barn"
    assert remove_token("<new1> barn in snowy ice.", "<new1>") == "barn in snowy ice."
    assert remove_token("a <new1> cat and a <new2> dog", ["<new1>", "<new2>"]) == "a cat and a dog"
    assert remove_token("photo of a sks dog", "sks") == "photo of a dog"


def test_clip_text_matches_independent_computation(clip):
    imgs = _images(3, 1)
    prompts = ["photo of a <new1> barn", "a <new1> barn in snow", "photo of a <new1> barn"]
    metric = ClipTextScore(clip)
    assert metric.higher_is_better
    metric.update(imgs, prompts, token="<new1>")
    feats = _clip_img_feats(clip, imgs)
    with torch.no_grad():
        texts = _unit(clip.model.encode_text(clip.tokenizer(["photo of a barn", "a barn in snow",
                                                             "photo of a barn"])).numpy())
    expected = np.mean(2.5 * np.maximum(np.sum(feats * texts, axis=1), 0.0))
    assert metric.compute() == pytest.approx(expected, abs=1e-4)


def test_clip_image_all_pairs_matches_independent_computation(clip):
    gen, ref = _images(3, 2), _images(2, 3, h=60, w=44)
    metric = ClipImageScore(clip)
    metric.update(generated=gen[:2], reference=ref)
    metric.update(generated=gen[2:])
    expected = (_clip_img_feats(clip, gen) @ _clip_img_feats(clip, ref).T).mean()
    assert metric.matrix().shape == (3, 2)
    assert metric.compute() == pytest.approx(expected, abs=1e-4)


def test_dino_image_all_pairs_matches_independent_computation(dino):
    gen, ref = _images(2, 4), _images(3, 5, h=50, w=40)
    metric = DinoImageScore(dino)
    metric.update(generated=gen, reference=ref)
    expected = (_dino_feats(dino, gen) @ _dino_feats(dino, ref).T).mean()
    assert metric.compute() == pytest.approx(expected, abs=1e-4)
    assert metric.higher_is_better


class _FakeEncoder:
    """Returns given unit features so the arithmetic can be checked on hand-made numbers."""

    def __init__(self, image_feats, text_feats=None):
        self.image_feats, self.text_feats = {}, text_feats or {}
        self.image_feats = image_feats

    def encode_images(self, images):
        return np.array([self.image_feats[i] for i in images], dtype=np.float64)

    def encode_texts(self, texts):
        return np.array([self.text_feats[t] for t in texts], dtype=np.float64)


def test_clip_text_factor_and_clipping():
    enc = _FakeEncoder({"a": [1.0, 0.0], "b": [-1.0, 0.0], "c": [0.6, 0.8]}, {"photo of a dog": [1.0, 0.0]})
    m = ClipTextScore(enc)
    scores = m.update(["a", "b", "c"], "photo of a <new1> dog")
    np.testing.assert_allclose(scores, [2.5, 0.0, 1.5])  # negative cosine clipped to 0 before averaging
    assert m.compute() == pytest.approx(4.0 / 3)
    with pytest.raises(BadInputError):
        m.update(["a"], ["x", "y"])


def test_all_pairs_mean_on_hand_made_features():
    enc = _FakeEncoder({"g1": [1.0, 0.0], "g2": [0.0, 1.0], "r1": [1.0, 0.0], "r2": [0.6, 0.8]})
    m = ClipImageScore(enc)
    m.update(generated=["g1", "g2"], reference=["r1", "r2"])
    # pairs: 1, 0.6, 0, 0.8 -> 0.6 (not the diagonal mean, not max)
    assert m.compute() == pytest.approx(0.6)
    with pytest.raises(BadInputError):
        ClipImageScore(enc).compute()


def test_leakage(dino):
    same = _images(2, 6)
    m = LeakageScore(dino)
    m.update(same, [im.copy() for im in same])
    assert m.compute() == pytest.approx(1.0, abs=1e-5)
    enc = _FakeEncoder({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]})
    m = LeakageScore(enc)
    np.testing.assert_allclose(m.update(["a", "a"], ["c", "b"]), [0.6, 0.0])
    assert m.compute() == pytest.approx(0.3)
    with pytest.raises(BadInputError):
        m.update(["a"], [])


def test_harmonic_mean_and_normalisation():
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2)
    assert harmonic_mean(0.0, 0.9) == 0.0
    assert normalized_text_similarity(0.6, 0.8) == pytest.approx(0.75)
    with pytest.raises(BadInputError):
        normalized_text_similarity(0.6, 0.0)


def test_class_balanced_mean():
    scores = {"dog1": 1.0, "dog2": 0.0, "dog3": 0.5, "cat1": 0.9}
    classes = {"dog1": "dog", "dog2": "dog", "dog3": "dog", "cat1": "cat"}
    assert class_balanced_mean(scores, classes) == pytest.approx((0.5 + 0.9) / 2)  # not the plain mean 0.6
    with pytest.raises(BadInputError):
        class_balanced_mean({"x": 1.0}, {})


def test_best_h_picks_per_class_setting():
    rows = [
        # class dog: setting A H = 2*.8*.4/1.2 = .5333; setting B: image .6, text .6 -> .6 (best)
        {"class": "dog", "setting": "A", "image": 0.8, "text": 0.4},
        {"class": "dog", "setting": "B", "image": 0.7, "text": 0.5},
        {"class": "dog", "setting": "B", "image": 0.5, "text": 0.7},
        # class cat: A: image .9 text .1 -> .18; B: .3/.3 -> .3 (best)
        {"class": "cat", "setting": "A", "image": 0.9, "text": 0.1},
        {"class": "cat", "setting": "B", "image": 0.3, "text": 0.3},
        {"class": "car", "setting": "A", "image": 0.5, "text": 0.5},
        {"class": "car", "setting": "B", "image": 0.1, "text": 0.9},
    ]
    res = best_h(rows)
    assert res["per_class"]["dog"]["setting"] == "B"
    assert res["per_class"]["dog"]["h"] == pytest.approx(0.6)
    assert res["per_class"]["cat"]["setting"] == "B"
    assert res["per_class"]["car"]["setting"] == "A"
    assert res["h"] == pytest.approx((0.6 + 0.3 + 0.5) / 3)
    assert res["image"] == pytest.approx((0.6 + 0.3 + 0.5) / 3)


def test_toyworld_backend(monkeypatch, tmp_path):
    import personalize.datasets.toyworld.measure as measure

    fake = iter([{"alignment": 1.0, "fidelity": None, "leakage": 0.1, "n_images": 1},
                 {"alignment": 0.4, "fidelity": 0.5, "leakage": None, "n_images": 3}])
    monkeypatch.setattr(measure, "score_folder", lambda folder, **kw: next(fake))
    m = ToyWorldScore()
    m.update(tmp_path)
    m.update(tmp_path, concept="x")
    out = m.compute()
    assert out["alignment"] == pytest.approx((1.0 + 3 * 0.4) / 4)
    assert out["fidelity"] == pytest.approx(0.5)
    assert out["leakage"] == pytest.approx(0.1)
    assert out["n_images"] == 4
    assert ToyWorldScore("leakage").higher_is_better is False


def test_local_weights_path(tmp_path, dino):
    from safetensors.torch import save_file

    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in dino.model.state_dict().items()}, str(path))
    loaded = DinoEncoder(weights=path)
    imgs = _images(1, 7)
    np.testing.assert_allclose(loaded.encode_images(imgs), dino.encode_images(imgs), atol=1e-5)
    from personalize.errors import BaseModelError
    with pytest.raises(BaseModelError):
        DinoEncoder(weights=tmp_path / "missing.pt")
    pickled = tmp_path / "dino.pt"
    torch.save(dict(dino.model.state_dict()), pickled)
    with pytest.raises(BaseModelError, match="pickles are never loaded"):
        DinoEncoder(weights=pickled)


def test_toyworld_backend_real_folder(tmp_path):
    """The toy world's measurers through the metric interface, on fresh renders (no mocks)."""
    import json
    import random

    from personalize.datasets.toyworld import world

    rng = random.Random(5)
    folder = tmp_path / "gen"
    folder.mkdir()
    prompts = {}
    for i in range(3):
        s = world.sample_scene(rng)
        world.render_scene(s).save(folder / f"p{i}.png")
        prompts[f"p{i}"] = world.caption(s)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    m = ToyWorldScore("alignment")
    res = m.update(folder)
    assert res["n_images"] == 3
    assert m.compute() == pytest.approx(1.0)
    assert ToyWorldScore().higher_is_better


def test_score_concept_single_and_multi():
    from personalize.evaluation import score_concept

    clip = _FakeEncoder({"g1": [1.0, 0.0], "g2": [0.0, 1.0], "r1": [1.0, 0.0], "r2": [0.6, 0.8], "s1": [0.0, 1.0]},
                        {"a cat": [1.0, 0.0], "a cat and a dog": [0.0, 1.0]})
    dino = _FakeEncoder({"g1": [1.0, 0.0], "g2": [1.0, 0.0], "r1": [0.0, 1.0], "r2": [0.6, 0.8], "s1": [1.0, 0.0]})
    single = score_concept(clip, dino, ["g1", "g2"], "a <new1> cat", ["r1", "r2"], token="<new1>")
    assert single["clip_text"] == pytest.approx((2.5 + 0.0) / 2)
    assert single["clip_image"] == pytest.approx(0.6)
    assert single["dino_image"] == pytest.approx(0.3)
    multi = score_concept(clip, dino, ["g1", "g2"], "a <new1> cat and a <new2> dog",
                          {"cat": ["r1", "r2"], "dog": ["s1"]})
    assert multi["clip_text"] == pytest.approx(1.25)
    assert multi["clip_image"] == {"cat": pytest.approx(0.6), "dog": pytest.approx(0.5)}
    assert multi["dino_image"] == {"cat": pytest.approx(0.3), "dog": pytest.approx(1.0)}


def test_build_metrics_shares_models():
    from personalize.evaluation import build_metrics

    m = build_metrics(random_weights=True)
    assert set(m) == {"clip_text", "clip_image", "dino_image", "leakage_dino"}
    assert m["clip_text"].clip is m["clip_image"].encoder
    assert m["dino_image"].encoder is m["leakage_dino"].dino
    assert all(x.higher_is_better for x in m.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_preprocessed_batches_are_the_in_process_decode_in_file_order(tmp_path, workers):
    """Workers decode small chunks (``decode.CHUNK``) and the main process joins them into the caller's batches:
    the same tensors as decoding each file in this process, in file order, in full batches and then the rest."""
    from PIL import Image

    from personalize.evaluation import decode
    from personalize.evaluation.models import load_image, pixel_transform

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2 * decode.CHUNK + 5):  # chunks that straddle the batches
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i % 7, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    transforms = [pixel_transform(16, 16), pixel_transform(20, 12)]
    batches = list(decode.preprocessed_batches(paths, transforms, batch_size=10, num_workers=workers))
    assert [b[0].shape[0] for b in batches] == [10, 10, 10, 7]
    for k, t in enumerate(transforms):
        expected = torch.stack([t(load_image(p)) for p in paths])
        assert torch.equal(torch.cat([b[k] for b in batches]), expected)



def _pngs(folder, n, seed):
    """PNG files of different sizes and aspect ratios (both resize paths, several crops)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{seed}_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41 + 3 * (i % 3), 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class _TinyEncoder:
    """An encoder as the evaluator's (``preprocess``, ``transform``, ``features``, ``batch_size``, ``device``;
    ``encode_images`` is the real one) with a random linear map of every pixel for a network: fast, and any pixel
    decoded or normalised differently, or a batch cut differently, changes its features."""

    def __init__(self, preprocess, batch_size, seed):
        from personalize.evaluation.models import make_transform

        g = torch.Generator().manual_seed(seed)
        self.preprocess, self.batch_size, self.device = preprocess, batch_size, torch.device("cpu")
        self.transform = make_transform(*preprocess)
        self.weight = torch.randn(3 * preprocess[1] ** 2, 16, generator=g)

    def features(self, x):
        return x.flatten(1) @ self.weight

    def encode_images(self, images):
        from personalize.evaluation.models import _encode_in_batches

        return _encode_in_batches(self, images)

    def encode_texts(self, texts):
        return np.stack([_unit(np.random.default_rng(len(t)).normal(size=16)).astype(np.float32) for t in texts])


@pytest.fixture
def tiny():
    """CLIP-like and DINO-like (resize, crop) with batches that differ per encoder and straddle the groups."""
    from personalize.evaluation.models import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    return _TinyEncoder((24, 24, CLIP_MEAN, CLIP_STD), 4, 0), _TinyEncoder((28, 20, IMAGENET_MEAN, IMAGENET_STD), 3, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_score_concept_file_path_is_the_per_encoder_path_to_the_bit(tiny, tmp_path, monkeypatch, workers):
    """Files decoded once for both encoders (in worker processes or here) score exactly as each encoder decoding
    every file itself, per image and in order, single concept and composition; each file is decoded once."""
    from personalize.evaluation import models, score_concept

    clip, dino = tiny
    gen, cat, dog = _pngs(tmp_path, 9, 1), _pngs(tmp_path, 5, 2), _pngs(tmp_path, 2, 3)
    prompts = [f"a <new1> cat {'very ' * i}far away" for i in range(len(gen))]
    opened = []
    real = models.load_image
    monkeypatch.setattr(models, "load_image", lambda item: opened.append(item) or real(item))
    for refs in (cat, {"cat": cat, "dog": dog}):
        today = score_concept(clip, dino, gen, prompts, refs, token="<new1>")
        assert len(opened) == 3 * len(gen) + 2 * (len(cat) + (len(dog) if refs is not cat else 0))  # for contrast
        opened.clear()
        files = score_concept(clip, dino, gen, prompts, refs, token="<new1>", workers=workers)
        assert files == today  # every score and every per-image sample, bit for bit
        per_image = files["samples"]["clip_image"]
        per_image = per_image if refs is cat else per_image["cat"]
        assert len(set(per_image)) == len(gen)  # distinct per image: an order change shows
        if workers == 0:  # decoding in this process: count it
            assert sorted(opened) == sorted(gen + cat + (dog if refs is not cat else []))  # once each
        opened.clear()
    back = score_concept(clip, dino, gen[::-1], prompts[::-1], {"cat": cat, "dog": dog}, workers=workers)
    # other batches: the same values to float rounding, in the new order
    for key, name in (("clip_text", None), ("clip_image", "cat"), ("dino_image", "dog")):
        got, want = back["samples"][key], today["samples"][key]
        got, want = (got, want) if name is None else (got[name], want[name])
        assert got == pytest.approx(want[::-1], abs=1e-5)


def test_leakage_from_files_decodes_each_once_and_scores_to_the_bit(tiny, tmp_path, monkeypatch):
    """The benchmark's leakage pairs are files: with ``workers`` each is decoded once (encode_files), and the
    scores are the per-encoder path's exactly."""
    from personalize.evaluation import models

    _, dino = tiny
    a, b = _pngs(tmp_path, 4, 11), _pngs(tmp_path, 4, 12)
    today = LeakageScore(dino).update(a, b)
    opened = []
    real = models.load_image
    monkeypatch.setattr(models, "load_image", lambda item: opened.append(item) or real(item))
    files = LeakageScore(dino).update(a, b, workers=0)
    assert np.array_equal(files, today) and len(set(today.tolist())) == 4
    assert sorted(opened) == sorted(a + b)


def test_encode_files_is_encode_images_on_clip_and_dino(clip, dino, tmp_path, monkeypatch):
    """The real networks (random weights): ``encode_files`` gives ``encode_images``'s features exactly (which the
    tests above check against an independent computation), with batches that straddle groups."""
    from personalize.evaluation.decode import encode_files

    monkeypatch.setattr(clip, "batch_size", 2)
    monkeypatch.setattr(dino, "batch_size", 3)
    groups = [_pngs(tmp_path, 3, 4), [], _pngs(tmp_path, 1, 5)]
    out = encode_files((clip, dino), groups, workers=2)
    for group, (c, d) in zip(groups, out):
        for encoder, got in ((clip, c), (dino, d)):
            want = encoder.encode_images(group)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_score_concept_images_in_memory_keep_the_encoders_path(tiny, tmp_path, monkeypatch):
    from personalize.evaluation import decode, score_concept

    clip, dino = tiny
    gen, refs = _images(3, 7), _pngs(tmp_path, 2, 8)
    today = score_concept(clip, dino, gen, "a cat", refs)

    def refuse(*args, **kwargs):
        raise AssertionError("images in memory went to the file path")

    monkeypatch.setattr(decode, "encode_files", refuse)
    assert score_concept(clip, dino, gen, "a cat", refs, workers=2) == today


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == pytest.approx(b, abs=1e-5)


def test_score_concept_file_path_uses_and_fills_the_benchmark_feature_cache(tiny, tmp_path, monkeypatch):
    """The benchmark runner's FeatureCache: files it has encoded are not decoded again; the rest are decoded once
    and remembered; the scores are the uncached ones."""
    from personalize.benchmark.work import FeatureCache
    from personalize.evaluation import decode, score_concept

    clip, dino = tiny
    gen, refs = _pngs(tmp_path, 4, 9), _pngs(tmp_path, 3, 10)
    want = score_concept(clip, dino, gen, "a cat", refs)
    cclip, cdino = FeatureCache(clip), FeatureCache(dino)
    cdino.encode_images(refs[:1])  # one photo known to DINO only: still decoded, for CLIP
    cclip.encode_images(gen[1:2])
    cdino.encode_images(gen[1:2])  # known to both: not decoded
    asked = []
    real = decode.encode_files
    monkeypatch.setattr(decode, "encode_files", lambda enc, groups, workers: asked.append(groups) or
                        real(enc, groups, workers))
    first = score_concept(cclip, cdino, gen, "a cat", refs, workers=0)
    assert asked == [[[gen[0], *gen[2:]], refs]]
    assert _same(first, want)  # to float rounding: the files decoded together are other batches
    assert score_concept(cclip, cdino, gen, "a cat", refs, workers=0) == first
    assert len(asked) == 1  # everything cached: nothing decoded


def test_default_workers_leave_the_cpu_to_the_networks():
    from personalize.evaluation.decode import default_workers

    assert default_workers("cpu") == default_workers(torch.device("cpu")) == 0
    assert 0 <= default_workers("cuda") == default_workers() <= 8
