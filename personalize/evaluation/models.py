"""Feature extractors for the image/text scores: OpenAI CLIP ViT-B/32 (open_clip) and DINO ViT-S/16 (timm).

The networks are CustomConcept101's (its ``evaluate.py``): OpenAI CLIP ViT-B/32 as OpenAI trained it, with
QuickGELU (``x * sigmoid(1.702 x)``) in every MLP of both towers (open_clip's ``ViT-B-32-quickgelu`` config; plain
``ViT-B-32`` is nn.GELU, another network), and DINO ViT-S/16 (``dino_vits16``, timm ``vit_small_patch16_224.dino``).
Weights come from the normal loaders (hub names, ``pretrained="openai"`` / timm hub), from a local
file (``weights=``), or nowhere (``random_weights=True``: same architecture, random init, for offline
tests). Preprocessing follows CustomConcept101: CLIP = resize 224 bicubic, center crop 224, CLIP
mean/std; DINO = resize 256 bicubic, center crop 224, ImageNet mean/std; DINO feature = CLS token.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..errors import BadInputError, BaseModelError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[str, Path, Image.Image, np.ndarray]

CLIP_MODEL = "ViT-B-32-quickgelu"  # open_clip's config of OpenAI's ViT-B/32 (QuickGELU), on every open_clip >= 2.24
CLIP_LABEL = "OpenAI CLIP ViT-B/32"
# The names CustomConcept101's evaluate.py scores in a folder: these endings, case as written (no .PNG, .webp).
CC101_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".tiff", ".JPG")


def load_image(item: ImageLike) -> Image.Image:
    """A PIL RGB image from a path, a PIL image or an HxWx3 uint8 array.

    A path is opened as training opens photos (:func:`personalize.images.open_rgb`: EXIF orientation applied,
    transparency onto white; a file that does not decode or claims too many pixels is a one-line error)."""
    from ..images import open_rgb, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return to_rgb(Image.fromarray(item))
    path = Path(item)
    if not path.is_file():
        raise BadInputError(f"image not found: {path}")
    return open_rgb(path)


def list_images(folder: Union[str, Path]) -> list[Path]:
    """Sorted image files directly inside ``folder``: the ones CustomConcept101's evaluate.py scores, names ending
    .png .jpg .jpeg .tiff .JPG exactly (a .webp, .PNG or .JPEG file is skipped, as there)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.name.endswith(CC101_IMAGE_ENDINGS) and p.is_file())


def make_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float]):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


#: (resize, crop, mean, std) of each encoder: :func:`make_transform`'s arguments; the file path
#: (:func:`.decode.encode_files`) splits them into :func:`pixel_transform` in workers and :func:`normalize_pixels`
CLIP_PREPROCESS = (224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = (256, 224, IMAGENET_MEAN, IMAGENET_STD)


def clip_transform():
    return make_transform(*CLIP_PREPROCESS)


def dino_transform():
    return make_transform(*DINO_PREPROCESS)


def pixel_transform(resize: int, crop: int):
    """The geometric half of :func:`make_transform` (PIL -> uint8 CHW tensor): a quarter of the bytes to move
    between processes; :func:`normalize_pixels` finishes it on any device."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.PILToTensor()])


def normalize_pixels(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float32, exactly as ToTensor + Normalize."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - m) / s


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _first_line(exc: BaseException, limit: int = 120) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip logs download failures and 'no pretrained weights' on the root logger; we report our own line."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _load_state(model: torch.nn.Module, weights: Union[str, Path]) -> None:
    path = Path(weights)
    if not path.is_file():
        raise BaseModelError(f"weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise BaseModelError(f"weights {path} are not a .safetensors file; pickles are never loaded: convert it "
                             "(safetensors.torch.save_file(torch.load(f, weights_only=True), 'weights.safetensors'))")
    try:
        from safetensors.torch import load_file

        state = load_file(str(path))
    except Exception as exc:
        raise BaseModelError(f"could not read weights {path}: {_first_line(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise BaseModelError(f"weights {path} do not fit the model (another architecture?): {_first_line(exc)}") from exc
    if missing:
        raise BaseModelError(f"weights {path} do not fit the model: {len(missing)} missing keys, e.g. {missing[0]}")


class ClipEncoder:
    """Unit-norm CLIP image and text features (open_clip): OpenAI CLIP ViT-B/32 with QuickGELU on every path
    (hub ``pretrained``, local ``weights``, ``random_weights``)."""

    def __init__(self, model_name: str = CLIP_MODEL, pretrained: Optional[str] = "openai",
                 weights: Union[None, str, Path] = None, random_weights: bool = False,
                 device: Union[str, torch.device] = "cpu", batch_size: int = 32):
        import open_clip

        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            with _quiet_root_logger():
                model = open_clip.create_model(model_name, pretrained=None if random_weights or weights is not None else pretrained)
        except Exception as exc:  # hub/network problems -> one line
            label = CLIP_LABEL if model_name == CLIP_MODEL else f"CLIP {model_name}"
            raise BaseModelError(f"could not load {label} ({pretrained} weights; offline?): {_first_line(exc)}; "
                                 "pass a local weights file (--clip-weights PATH, clip_weights=)") from exc
        if weights is not None:
            _load_state(model, weights)
        self.model = model.eval().to(self.device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.preprocess = CLIP_PREPROCESS
        self.transform = make_transform(*self.preprocess)
        self.features = self.model.encode_image

    def encode_images(self, images: Iterable[ImageLike]) -> np.ndarray:
        return _encode_in_batches(self, images)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _normalize(self.model.encode_text(tokens).float()).cpu().numpy()


@torch.no_grad()
def _encode_in_batches(encoder, images: Iterable[ImageLike]) -> np.ndarray:
    """Unit-norm ``encoder.features(batch)`` of ``images`` after ``encoder.transform``, ``encoder.batch_size`` at a
    time (the file path, :func:`.decode.encode_files`, cuts the same batches)."""
    pics = [load_image(i) for i in images]
    out = []
    for s in range(0, len(pics), encoder.batch_size):
        batch = torch.stack([encoder.transform(p) for p in pics[s:s + encoder.batch_size]]).to(encoder.device)
        out.append(_normalize(encoder.features(batch).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


class DinoEncoder:
    """Unit-norm DINO CLS features (timm ``vit_small_patch16_224.dino``)."""

    def __init__(self, model_name: str = "vit_small_patch16_224.dino", weights: Union[None, str, Path] = None,
                 random_weights: bool = False, device: Union[str, torch.device] = "cpu", batch_size: int = 32):
        import timm

        self.device = torch.device(device)
        self.batch_size = batch_size
        pretrained = not random_weights and weights is None
        try:
            model = timm.create_model(model_name, pretrained=pretrained, num_classes=0)
        except Exception as exc:
            raise BaseModelError(f"could not load DINO {model_name} (offline?): {_first_line(exc)}; "
                                 "pass a local weights file (--dino-weights PATH, dino_weights=)") from exc
        if weights is not None:
            _load_state(model, weights)
        self.model = model.eval().to(self.device)
        self.preprocess = DINO_PREPROCESS
        self.transform = make_transform(*self.preprocess)
        self.features = self.cls_features

    @torch.no_grad()
    def cls_features(self, batch: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(batch)
        return tokens[:, 0]

    def encode_images(self, images: Iterable[ImageLike]) -> np.ndarray:
        return _encode_in_batches(self, images)
