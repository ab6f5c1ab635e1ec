"""Files from the browser, checked before anything is stored: how many, how large (bytes and pixels), of which
image type, and stored under the app folder with names the app makes (``00.png``, ``01.jpg`` ...), never with
the browser's file names, so no name from the browser becomes a path.

Captions (``photo.txt``) and masks are matched to their photo by the uploaded file's stem, as the CLI matches
``photo.txt`` beside ``photo.jpg`` and ``--masks DIR/photo.png``.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import BadInputError
from ..paths import atomic_path, inside

#: Pillow's decoded formats the app stores, and the suffix each is stored under
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass(frozen=True)
class Limits:
    """What one upload may hold (the page says them; gradio's own ``max_file_size`` is set to ``max_bytes``)."""

    max_photos: int = 30  # the CLI asks for 3-15 photos; a few more for datasets with captions
    max_bytes: int = 20 * 2**20  # per file
    max_total_bytes: int = 200 * 2**20
    max_pixels: int = 40_000_000  # per image (a 40-megapixel photo; Pillow's bomb limit is 89 million)
    max_caption_bytes: int = 4096

    def text(self) -> str:
        return (f"up to {self.max_photos} photos ({', '.join(f.lower() for f in FORMATS)}), "
                f"{self.max_bytes // 2**20} MB and {self.max_pixels // 1_000_000} megapixels each")


LIMITS = Limits()


def _shown(name: str) -> str:
    """The browser's file name as a message shows it: its last part, printable, at most 60 characters."""
    name = os.path.basename(str(name).replace("\\", "/")) or "file"
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


def _check_image(path: Path, name: str, limits: Limits) -> str:
    """The stored suffix of the image at ``path`` (uploaded as ``name``), or a one-line BadInputError."""
    import warnings

    from PIL import Image

    size = path.stat().st_size
    if size > limits.max_bytes:
        raise BadInputError(f"'{_shown(name)}' is {size / 2**20:.1f} MB, over the {limits.max_bytes // 2**20} MB "
                            "an uploaded image may have; downscale it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # the header only: size and format, nothing decoded yet
                fmt, (w, h) = img.format, img.size
                if w * h > limits.max_pixels:
                    raise BadInputError(f"'{_shown(name)}' is {w}x{h} = {w * h:,} pixels, over the "
                                        f"{limits.max_pixels:,} an uploaded image may have; downscale it")
                if fmt not in FORMATS:
                    raise BadInputError(f"'{_shown(name)}' is a {fmt} image; upload {', '.join(FORMATS)}")
                img.load()  # the whole file decodes
    except BadInputError:
        raise
    except Exception as exc:  # not an image, truncated, a bomb: one line naming the upload, not the temp path
        raise BadInputError(f"'{_shown(name)}' is not a readable image ({type(exc).__name__}); upload "
                            f"{', '.join(FORMATS)} photos") from None
    return FORMATS[fmt]


def _source(item) -> tuple[Path, str]:
    """(where gradio put it, the name the browser gave): a path, or an object with ``.name`` / ``orig_name``."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item), Path(item).name
    path = Path(getattr(item, "path", None) or getattr(item, "name"))
    return path, str(getattr(item, "orig_name", None) or path.name)


def store_photos(files: Sequence, dest: str | Path, masks: Sequence = (), limits: Limits = LIMITS) -> list[Path]:
    """Check every upload, then store the photos as ``dest/photos/NN.ext`` (captions ``NN.txt`` beside them,
    masks ``dest/masks/NN.png``); returns the photos' paths. Nothing is stored when any file is refused, and
    ``dest`` is replaced whole (it is written as a temp folder, then renamed)."""
    from ..paths import atomic_dir

    items = [_source(f) for f in files or ()]
    photos = [(p, n) for p, n in items if Path(n).suffix.lower() != ".txt"]
    captions = {Path(n).stem: p for p, n in items if Path(n).suffix.lower() == ".txt"}
    if not photos:
        raise BadInputError(f"no photos uploaded; add {limits.text()}")
    if len(photos) > limits.max_photos:
        raise BadInputError(f"{len(photos)} photos uploaded; upload at most {limits.max_photos}")
    total = sum(p.stat().st_size for p, _ in items) + sum(_source(m)[0].stat().st_size for m in masks or ())
    if total > limits.max_total_bytes:
        raise BadInputError(f"the upload is {total / 2**20:.0f} MB, over the {limits.max_total_bytes // 2**20} MB "
                            "one training set may have")
    stems = [Path(n).stem for _, n in photos]
    if len(set(stems)) != len(stems):
        raise BadInputError("two photos share a file name; rename one (captions and masks are matched by name)")
    suffixes = [_check_image(p, n, limits) for p, n in photos]
    for stem, path in captions.items():
        if stem not in stems:
            raise BadInputError(f"caption '{_shown(stem)}.txt' has no photo named '{_shown(stem)}.*'; name it like its photo")
        if path.stat().st_size > limits.max_caption_bytes:
            raise BadInputError(f"caption '{_shown(stem)}.txt' is over {limits.max_caption_bytes} bytes; keep it to a line")
    mask_of = {}
    for item in masks or ():
        path, name = _source(item)
        stem = Path(name).stem
        if stem not in stems:
            raise BadInputError(f"mask '{_shown(name)}' has no photo of the same name; name each mask like its photo")
        _check_image(path, name, limits)
        mask_of[stem] = path
    if mask_of and len(mask_of) != len(stems):
        missing = [s for s in stems if s not in mask_of]
        raise BadInputError(f"{len(missing)} photo(s) have no mask (e.g. '{_shown(missing[0])}'); give one mask per "
                            "photo, or none")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:
        (tmp / "photos").mkdir()
        if mask_of:
            (tmp / "masks").mkdir()
        for i, ((path, _), stem, suffix) in enumerate(zip(photos, stems, suffixes)):
            shutil.copyfile(path, inside(tmp / "photos", f"{i:02d}{suffix}"))
            if stem in captions:
                text = captions[stem].read_bytes().decode("utf-8", "replace")
                inside(tmp / "photos", f"{i:02d}.txt").write_text(text)
            if stem in mask_of:
                from ..images import open_image

                open_image(mask_of[stem]).save(inside(tmp / "masks", f"{i:02d}.png"), format="PNG")
    return sorted(p for p in (dest / "photos").iterdir() if p.suffix != ".txt")


def save_json(path: Path, data) -> Path:
    """``data`` as JSON at ``path``, written atomically (temp + rename)."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    return path
