"""Reading a folder of training photos (and optional masks) into tensors.

Odd files are normalised, not rejected: EXIF orientation is applied, RGBA/LA/P
images are composited onto white, grayscale/CMYK/16-bit become RGB, and
non-square or tiny images are centre-cropped and resized to the base's
resolution. A file with an image extension that cannot be decoded is an error
naming the file, and so is one whose header claims more pixels than Pillow's
decompression-bomb limit. Scoring opens images with the same :func:`open_rgb`,
so a photo is oriented the same way for training and for the scores.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import BadInputError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    """The image files of ``folder`` (sorted), or a BadInputError saying what is wrong."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInputError(f"image folder '{folder}' does not exist; pass --images DIR with 3-15 photos of your concept")
    if not folder.is_dir():
        raise BadInputError(f"'{folder}' is a file, not a folder; pass --images DIR with the photos inside")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise BadInputError(
            f"image folder '{folder}' has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); add 3-15 photos of your concept"
        )
    return files


CAPTION_MAX = 300


def load_captions(image_paths: list[Path], token: str | tuple[str, ...] | list[str]) -> list[str | None]:
    """Per-image caption templates from ``IMAGE.txt`` sidecars (None where an image has none).

    A caption names the concept with ``{}`` (or with its token, which becomes ``{}``), e.g.
    ``a {} on the left, on a green background``: the run trains on it instead of the method's neutral
    templates, so the concept absorbs its appearance and the caption explains the rest of the scene.
    An image with a caption is never mirrored (a caption may say "left"). Refused in one line naming the file:
    an unreadable or empty caption, one over CAPTION_MAX characters or holding a control character (line breaks
    and tabs count as spaces); one longer than the text encoder reads (75 CLIP tokens) is refused by the trainer
    once the tokens are known (``prompts.check_captions``), never cut.
    """
    tokens = [token] if isinstance(token, str) else list(token)
    out: list[str | None] = []
    for path in image_paths:
        side = path.with_suffix(".txt")
        if not side.is_file():
            out.append(None)
            continue
        try:
            text = " ".join(side.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"caption '{side}' is unreadable ({e.__class__.__name__}); save it as UTF-8 text") from None
        if not text or len(text) > CAPTION_MAX:
            raise BadInputError(f"caption '{side}' must hold 1-{CAPTION_MAX} characters; it has {len(text)}")
        control = next((c for c in text if unicodedata.category(c) == "Cc"), None)  # tabs and newlines are folded
        if control is not None:
            raise BadInputError(f"caption '{side}' holds the control character U+{ord(control):04X} at position "
                                f"{text.index(control)}; save it as plain text")
        if "{}" not in text:
            for t in tokens:
                if t in text:
                    text = text.replace(t, "{}")
                    break
        if text.count("{}") != 1 or "{" in text.replace("{}", "") or "}" in text.replace("{}", ""):
            raise BadInputError(f"caption '{side}' must name the concept exactly once, as {{}} or as the token "
                                f"(e.g. 'a {{}} on a beach'); it reads {text[:60]!r}")
        out.append(text)
    return out


def open_image(path: str | Path):
    """The image at ``path``, decoded and turned upright by its EXIF orientation (any mode).

    The one way images are opened, for training and for scoring alike. Refused (one-line BadInputError naming the
    file): a file that does not decode, and one whose header claims more pixels than Pillow's decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``), which could exhaust memory."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # over the limit: refused, not warned
            with Image.open(path) as img:
                img.load()
                return ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise BadInputError(f"'{path}' claims {size}, over the {Image.MAX_IMAGE_PIXELS:,} an image may have "
                            "(a decompression bomb or a huge scan); downscale it or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInputError(
            f"'{path}' is not a readable image ({type(exc).__name__}); remove it from the folder or re-save it as PNG/JPEG"
        ) from exc


def open_rgb(path: str | Path):
    """:func:`open_image` as 8-bit RGB (:func:`to_rgb`)."""
    return to_rgb(open_image(path))


def to_rgb(img):
    """8-bit RGB: 16-bit and float images scaled, transparency composited onto white, every other mode converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        full = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(255 * arr / full, 0, 255).astype(np.uint8))
    if img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _square(img, size: int, resample):
    from PIL import ImageOps

    return ImageOps.fit(img, (size, size), method=resample, centering=(0.5, 0.5))


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]."""
    from PIL import Image

    arrays = [np.asarray(_square(open_rgb(p), size, Image.Resampling.BICUBIC), dtype=np.float32) for p in paths]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def load_masks(folder: str | Path, image_paths: list[Path], size: int) -> torch.Tensor:
    """(N, 1, size, size) soft masks in [0, 1], one per image with the same stem, each normalised by its max."""
    return stack_masks(find_masks(folder, image_paths), size)


def find_masks(folder: str | Path, image_paths: list[Path]) -> list[Path]:
    """The mask file of each image in ``folder`` (same stem, any image extension), or a one-line BadInputError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInputError(f"mask folder '{folder}' does not exist; pass --masks DIR with one mask per image (same file "
                            "name), --masks auto (segmented from the photos) or --masks none")
    by_stem = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    found = []
    for path in image_paths:
        mask_path = by_stem.get(path.stem)
        if mask_path is None:
            raise BadInputError(f"no mask for image '{path.name}' in '{folder}'; add '{path.stem}.png' or pass --masks none")
        found.append(mask_path)
    return found


def check_foreground(mask_paths: list[Path], image_paths: list[Path], source: str) -> None:
    """Refuse a mask with no foreground (all zero): its photo's loss would be exactly 0, and an all-black set
    of masks would write an untrained concept. One line naming the photo; ``source`` says where the mask came
    from (``"the mask folder"``, ``"the segmenter"``)."""
    for mask_path, photo in zip(mask_paths, image_paths):
        img = open_image(mask_path)
        values = np.asarray(img, dtype=np.float32) if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") \
            else np.asarray(img.convert("L"))
        if not np.isfinite(values).all() or float(values.max()) <= 0:
            raise BadInputError(f"the mask of photo '{photo.name}' from {source} ('{Path(mask_path).name}') has no "
                                "foreground (all zero): that photo would train on a loss of 0; fix or remove it, or "
                                "pass --masks none")


def stack_masks(mask_paths: list[Path], size: int) -> torch.Tensor:
    """(N, 1, size, size): each mask file centre-cropped and resized as its photo is (:func:`load_images`), then
    divided by its maximum. 8-bit masks are read as 8-bit; 16-bit (``I;16``) and float masks keep their precision."""
    from PIL import Image

    masks = []
    for mask_path in mask_paths:
        arr = np.asarray(_square(_open_mask(mask_path), size, Image.Resampling.BILINEAR), dtype=np.float32)
        masks.append(arr / max(float(arr.max()), 1e-6))
    return torch.from_numpy(np.stack(masks)).unsqueeze(1)


def _open_mask(mask_path: Path):
    """A mask file as 8-bit ``L`` or, for 16-bit and float masks, as float ``F`` in [0, 1]."""
    from PIL import Image

    img = open_image(mask_path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        full = 65535.0 if img.mode != "F" else 1.0
        return Image.fromarray(np.asarray(img, dtype=np.float32) / full)  # mode F
    return img.convert("L")


@dataclass(frozen=True)
class Fitted:
    """One image resized to cover a ``height`` x ``width`` frame (aspect kept) and centre-cropped to it: the
    pixels, the size it was opened at and where the crop starts in the resized image (SDXL's micro-conditioning
    reads all three: ``original_size``, ``crops_coords_top_left``, ``target_size``)."""

    pixels: torch.Tensor  # (C, height, width)
    original: tuple[int, int]  # (height, width) as opened (EXIF applied)
    resized: tuple[int, int]  # (height, width) after the covering resize
    top_left: tuple[int, int]  # (top, left) of the crop in the resized image


def cover_crop(img, height: int, width: int, resample) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """``img`` scaled by one factor (no distortion) so it just covers ``height`` x ``width``, then centre-cropped:
    the array, the resized (height, width) and the crop's (top, left). kohya sd-scripts' bucket resize
    (``trim_and_resize_if_required``): the side that fits is scaled exactly, the other one is trimmed evenly."""
    w0, h0 = img.size
    scale = max(width / w0, height / h0)
    rw, rh = max(width, int(w0 * scale + 0.5)), max(height, int(h0 * scale + 0.5))
    top, left = (rh - height) // 2, (rw - width) // 2
    resized = img.resize((rw, rh), resample)
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32), (rh, rw), (top, left)


def load_fitted(paths: list[Path], frame: Callable[[int, int], tuple[int, int]]) -> list[Fitted]:
    """Each photo in [-1, 1] at the (height, width) ``frame(height, width)`` picks for its own size (an
    aspect-ratio bucket), by :func:`cover_crop`."""
    from PIL import Image

    out = []
    for path in paths:
        img = open_rgb(path)
        height, width = frame(img.height, img.width)
        arr, resized, top_left = cover_crop(img, height, width, Image.Resampling.BICUBIC)
        out.append(Fitted(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0, (img.height, img.width), resized,
                          top_left))
    return out


def load_fitted_masks(mask_paths: list[Path], photos: list[Fitted]) -> list[torch.Tensor]:
    """(1, height, width) masks in [0, 1] (divided by their max), each cropped exactly as its photo: a mask of
    another size is first resized to the photo's, then goes through the same :func:`cover_crop`."""
    from PIL import Image

    out = []
    for mask_path, photo in zip(mask_paths, photos):
        img = _open_mask(mask_path)
        if (img.height, img.width) != photo.original:
            img = img.resize(photo.original[::-1], Image.Resampling.BILINEAR)
        arr, _, _ = cover_crop(img, *photo.pixels.shape[-2:], Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(arr / max(float(arr.max()), 1e-6)).unsqueeze(0))
    return out


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
