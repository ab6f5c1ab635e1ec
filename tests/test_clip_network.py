"""The evaluator is CustomConcept101's network, and scores as CustomConcept101's evaluate.py does.

- CLIP is OpenAI's ViT-B/32 with QuickGELU (x * sigmoid(1.702 x)) in every MLP of both towers, on the hub,
  local-weights and random paths, with the architecture of an independent open_clip build (the plain 'ViT-B-32'
  config, quick_gelu forced): same modules, same parameter shapes, same features from the same weights.
- DINO is DINO's ViT-S/16 (``dino_vits16``): its state dict, LayerNorm eps, exact GELU, and its forward pass.
- CC101's evaluate.py code path, re-implemented here from its logic (its file filter, Image.open, its transforms
  with the RGB conversion after the crop, clip.tokenize, numpy normalisation, 2.5 * clip(cos, 0), all-pairs
  means, DINO's CLS), on the independent CLIP and a written-out DINO holding our random weights, gives our
  CLIP-T / CLIP-I / DINO-I to float rounding.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import BaseModelError
from personalize.evaluation import (ClipEncoder, ClipImageScore, ClipTextScore, DinoEncoder, DinoImageScore,
                                    list_images, score_concept)

TOL = 1e-5
CC101_ENDINGS = (".png", ".jpg", ".jpeg", ".tiff", ".JPG")  # evaluate.py: os.listdir names, path.endswith((...))
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IN_MEAN, IN_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Our prompts, and prompts.json as evaluate.py reads them (the token removed). With the seed-0 weights s0's cosine
# is positive and s1's negative, so CLIP-T exercises both the factor 2.5 and the clipping at 0.
PROMPTS = {"s0": "<new1> barn", "s1": "a <new1> barn at night, oil painting"}
WITHOUT_TOKEN = {"s0": "barn", "s1": "a barn at night, oil painting"}


def _mlps(model):
    return [b.mlp for tower in (model.visual.transformer, model.transformer) for b in tower.resblocks]


def assert_quick_gelu(model):
    """Every MLP of both towers (12 + 12) applies x * sigmoid(1.702 x) between c_fc and c_proj, not GELU."""
    x = torch.linspace(-6, 6, 1201)
    mlps = _mlps(model)
    assert len(mlps) == 24
    for mlp in mlps:
        assert list(dict(mlp.named_children())) == ["c_fc", "gelu", "c_proj"]
        y = mlp.gelu(x)
        torch.testing.assert_close(y, x * torch.sigmoid(1.702 * x), rtol=0, atol=1e-6)
        assert (y - torch.nn.functional.gelu(x)).abs().max() > 1e-2  # exact GELU is another function
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())


@pytest.fixture(scope="module")
def clip():
    """Ours on the random-weights path; the hub and --clip-weights paths ask open_clip for the same network (below)
    and a weights file only fills its parameters (an activation has none)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ClipEncoder(random_weights=True)


@pytest.fixture(scope="module")
def independent_clip(clip):
    """open_clip's plain 'ViT-B-32' config with QuickGELU forced, holding our weights: OpenAI's ViT-B/32 as
    clip.load("ViT-B/32", jit=False) builds it on the CPU (QuickGELU, fp32)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True)
    model.load_state_dict(clip.model.state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def dino():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return DinoEncoder(random_weights=True)


@pytest.mark.parametrize("path", ["hub", "weights", "random"])
def test_clip_every_path_asks_open_clip_for_the_quick_gelu_network(path, monkeypatch, tmp_path):
    import open_clip

    asked = []

    def offline(name, pretrained=None, **kwargs):
        asked.append((name, pretrained, kwargs))
        raise RuntimeError("no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    options = {"hub": {}, "weights": {"weights": tmp_path / "clip.safetensors"}, "random": {"random_weights": True}}
    with pytest.raises(BaseModelError, match="OpenAI CLIP ViT-B/32"):
        ClipEncoder(**options[path])
    ((name, pretrained, kwargs),) = asked
    assert open_clip.get_model_config(name).get("quick_gelu") is True or kwargs.get("force_quick_gelu") is True
    assert pretrained == ("openai" if path == "hub" else None)
    if path == "hub":  # open_clip knows OpenAI's weights for that network (and, >= 3.0, says they are QuickGELU)
        assert open_clip.get_pretrained_cfg(name, "openai").get("quick_gelu", True) is True


def test_clip_is_quick_gelu(clip):
    assert_quick_gelu(clip.model)


def test_clip_architecture_and_features_match_an_independent_build(clip, independent_clip):
    import open_clip

    ours, other = clip.model, independent_clip
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in other.named_modules()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in other.state_dict().items()}
    assert_quick_gelu(other)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.tokenize(list(WITHOUT_TOKEN.values()))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), other.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.encode_text(tokens), other.encode_text(tokens), rtol=0, atol=1e-6)


def _dino_keys(depth=12):
    """dino_vits16's state dict (facebookresearch/dino VisionTransformer, num_classes=0)."""
    block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    return keys | {f"blocks.{i}.{b}.{w}" for i in range(depth) for b in block for w in ("weight", "bias")}


def dino_vits16(sd, x, dim=384, heads=6, depth=12):
    """DINO's VisionTransformer.forward for vit_small/16 written out: patch conv, [CLS] + pos_embed, pre-norm blocks
    (LayerNorm eps 1e-6, softmax(q k^T / sqrt(d)) v, exact-GELU MLP), final norm, the CLS token."""
    F = torch.nn.functional

    def norm(t, name):
        return F.layer_norm(t, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def linear(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    n, t, _ = x.shape
    for i in range(depth):
        qkv = linear(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").reshape(n, t, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(dim=-1)
        x = x + linear((attn @ v).transpose(1, 2).reshape(n, t, dim), f"blocks.{i}.attn.proj")
        x = x + linear(F.gelu(linear(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
    return norm(x, "norm")[:, 0]


def test_dino_is_dino_vits16(dino):
    sd = dino.model.state_dict()
    assert set(sd) == _dino_keys()
    assert sd["pos_embed"].shape == (1, 197, 384) and sd["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384) and sd["blocks.0.mlp.fc1.weight"].shape == (1536, 384)
    norms = [m for m in dino.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 25 and all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in dino.model.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 12 and all(m.approximate == "none" for m in gelus)


# --- CustomConcept101's evaluate.py, its code path re-implemented ---------------------------------------------

def _cc101_files(folder):
    return [os.path.join(folder, p) for p in os.listdir(folder) if p.endswith(CC101_ENDINGS)]


def _cc101_transform(resize, mean, std):
    from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor

    return Compose([Resize(resize, interpolation=Image.BICUBIC), CenterCrop(224), lambda im: im.convert("RGB"),
                    ToTensor(), Normalize(mean, std)])


def _unit(feats):
    return feats / np.sqrt(np.sum(feats ** 2, axis=1, keepdims=True))


def _cc101_image_features(paths, forward, transform):
    batch = torch.stack([transform(Image.open(p)) for p in paths])  # what the DataLoader's default collate does
    with torch.no_grad():
        return _unit(forward(batch).cpu().numpy())


def cc101_scores(sample_root, target_path, clip_model, dino_state):
    """calmetrics() for one target: clipeval (CLIP-T), clipeval_image (CLIP-I), dinoeval_image (DINO-I)."""
    import open_clip

    clip_tf, dino_tf = _cc101_transform(224, CLIP_MEAN, CLIP_STD), _cc101_transform(256, IN_MEAN, IN_STD)
    images = _cc101_files(os.path.join(sample_root, "samples"))
    ids = [os.path.splitext(os.path.basename(p))[0] for p in images]
    with open(os.path.join(sample_root, "prompts.json")) as f:
        captions = json.load(f)
    img = _cc101_image_features(images, clip_model.encode_image, clip_tf)
    with torch.no_grad():  # extract_all_captions: clip.tokenize(caption, truncate=True) per image, encode_text
        txt = _unit(clip_model.encode_text(torch.cat([open_clip.tokenize(captions[i]) for i in ids])).cpu().numpy())
    per_image = 2.5 * np.clip(np.sum(img * txt, axis=1), 0, None)
    refs = _cc101_files(target_path)
    clip_i = np.mean(img @ _cc101_image_features(refs, clip_model.encode_image, clip_tf).T)
    dino = [_cc101_image_features(paths, lambda b: dino_vits16(dino_state, b), dino_tf) for paths in (images, refs)]
    dino_i = np.mean(dino[0] @ dino[1].T)
    return {"clip_text": float(np.mean(per_image)), "per_image": dict(zip(ids, per_image.tolist())),
            "clip_image": float(clip_i), "dino_image": float(dino_i), "refs": sorted(map(os.path.basename, refs))}


def _picture(rng, size, mode="RGB"):
    w, h = size
    ramp = np.add.outer(np.linspace(0, 150, h), np.linspace(0, 100, w))[..., None] * rng.uniform(0.3, 1, 3)
    pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """sample_root/{samples/*.png, prompts.json} and a target folder of photos, as evaluate.py takes them: a
    non-square RGB JPEG, a grayscale .JPG, and files evaluate.py does not read (.webp, .txt)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("cc101")
    samples, target = root / "run" / "samples", root / "target"
    samples.mkdir(parents=True)
    target.mkdir()
    for name, size in zip(PROMPTS, [(64, 64), (72, 48)]):
        _picture(rng, size).save(samples / f"{name}.png")
    (root / "run" / "prompts.json").write_text(json.dumps(WITHOUT_TOKEN))
    _picture(rng, (80, 60)).save(target / "r0.jpg", quality=90)
    _picture(rng, (50, 70), "L").save(target / "r1.JPG", quality=90)
    _picture(rng, (60, 60)).save(target / "skipped.webp")
    (target / "notes.txt").write_text("not an image")
    return root / "run", target


class _Memo:
    """An encoder that encodes a list of files once (the metric objects below re-score the same files)."""

    def __init__(self, encoder):
        self.encoder, self.seen = encoder, {}

    def encode_images(self, images):
        key = tuple(map(str, images))
        if key not in self.seen:
            self.seen[key] = self.encoder.encode_images(images)
        return self.seen[key]

    def encode_texts(self, texts):
        return self.encoder.encode_texts(texts)


def test_scores_match_cc101_evaluate_py(folders, clip, independent_clip, dino):
    sample_root, target = folders
    theirs = cc101_scores(str(sample_root), str(target), independent_clip, dino.model.state_dict())
    assert theirs["per_image"]["s0"] > 0 and theirs["per_image"]["s1"] == 0  # the clipping is exercised

    generated, reference = list_images(sample_root / "samples"), list_images(target)
    assert [p.name for p in reference] == theirs["refs"] == ["r0.jpg", "r1.JPG"]
    clip, dino = _Memo(clip), _Memo(dino)
    prompts = [PROMPTS[p.stem] for p in generated]
    ours = score_concept(clip, dino, generated, prompts, reference, token="<new1>")
    for key in ("clip_text", "clip_image", "dino_image"):
        assert ours[key] == pytest.approx(theirs[key], abs=TOL), key
    per_image = dict(zip([p.stem for p in generated], ours["samples"]["clip_text"]))
    assert per_image == pytest.approx(theirs["per_image"], abs=TOL)

    text = ClipTextScore(clip)
    text.update(generated, prompts, token="<new1>")
    assert text.compute() == pytest.approx(theirs["clip_text"], abs=TOL)
    for metric, key in ((ClipImageScore(clip), "clip_image"), (DinoImageScore(dino), "dino_image")):
        metric.update(generated=generated, reference=reference)
        assert metric.compute() == pytest.approx(theirs[key], abs=TOL), key
