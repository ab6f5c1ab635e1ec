"""Zero-shot foreground masks for the mask-weighted loss (``--masks auto``).

The Perfusion paper (Tewel et al., SIGGRAPH 2023, §4.4) weights the denoising loss with a soft mask of the
concept, obtained from a zero-shot segmentation model prompted with the superclass word and divided by its
maximum; §5.3 reports that it raises text similarity. Here the model is CLIPSeg (Lüddecke & Ecker, CVPR 2022)
through transformers (``CLIPSegForImageSegmentation`` + ``CLIPSegProcessor``), by default the public
``CIDAS/clipseg-rd64-refined``, or any local folder saved with ``save_pretrained``. A mask is
``sigmoid(logits)`` resized to the photo, divided by its maximum, and kept as a 16-bit PNG in the package
cache (``masks/``), keyed by the photo's sha256, the segmenter's files and the prompt, so a second run
segments nothing. Weights load from safetensors only (no pickle). Without reachable weights
:func:`resolve_segmenter` refuses at once, in one line saying how to get them; there is no silent fallback.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .errors import BaseModelError, BadInputError
from .paths import atomic_path, cache_dir

if TYPE_CHECKING:  # numpy, torch and the image readers load where they are used: --help reads DEFAULT_SEGMENTER
    import numpy as np
    import torch

DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
RECIPE = "clipseg sigmoid, bilinear to the photo, / max; v1"  # part of every cache key
BATCH = 8
GET_WEIGHTS = (f"download {DEFAULT_SEGMENTER} to a folder (hf download {DEFAULT_SEGMENTER} "
               "--local-dir clipseg) and pass --segmenter clipseg, or pass --masks none")
_FILES = (".json", ".txt", ".safetensors")  # what a segmenter folder's identity and download cover


def resolve_segmenter(spec: str | os.PathLike = DEFAULT_SEGMENTER) -> Path:
    """The local folder of segmenter ``spec`` (a folder, or a hub id fetched or found in the hub cache).

    Refused in one line (BaseModelError) when the weights cannot be reached, and when the folder holds no
    ``config.json`` or no ``.safetensors`` weights: before any training work."""
    from .base import _HUB_ID, _first_line

    spec = str(spec)
    folder = Path(spec)
    if not folder.is_dir():
        if not _HUB_ID.match(spec):
            raise BadInputError(f"--segmenter '{spec}' is neither a folder nor a hub id; {GET_WEIGHTS}")
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, allow_patterns=[f"*{s}" for s in _FILES]))
        except Exception as exc:  # offline, unknown id, network: one line for the user
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            why = "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline else _first_line(exc)[:100]
            raise BaseModelError(f"segmenter '{spec}' is not reachable ({why}); {GET_WEIGHTS}") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise BaseModelError(f"segmenter '{spec}' has no config.json and .safetensors weights in '{folder}' "
                             f"(pickled weights are never loaded); {GET_WEIGHTS}")
    return folder


def segmenter_identity(folder: Path) -> str:
    """sha256 over the segmenter folder's config, tokenizer, processor and weight files (names and contents)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in _FILES and p.is_file())
    return _identity(tuple((p.name, str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=8)
def _identity(files: tuple) -> str:
    from .images import file_sha256

    h = hashlib.sha256()
    for name, path, _, _ in files:
        h.update(f"{name}\0{file_sha256(Path(path))}\n".encode())
    return h.hexdigest()


def cache_key(image_sha256: str, identity: str, phrase: str) -> str:
    return hashlib.sha256(f"{RECIPE}\n{identity}\n{phrase}\n{image_sha256}".encode()).hexdigest()


def auto_mask_paths(image_paths: Sequence[Path], phrases: Sequence[str], segmenter: str | os.PathLike,
                    device: str | torch.device = "cpu") -> list[Path]:
    """One cached mask PNG per photo (``phrases[i]`` prompts photo i), segmenting only those not cached yet."""
    from .images import file_sha256, open_rgb

    folder = resolve_segmenter(segmenter)
    identity = segmenter_identity(folder)
    targets = [cache_dir("masks") / f"{cache_key(file_sha256(p), identity, phrase)}.png"
               for p, phrase in zip(image_paths, phrases)]
    todo = [i for i, t in enumerate(targets) if not t.is_file()]
    if todo:
        model, processor = load_segmenter(folder, device)
        for start in range(0, len(todo), BATCH):
            part = todo[start:start + BATCH]
            masks = soft_masks(model, processor, [open_rgb(image_paths[i]) for i in part], [phrases[i] for i in part])
            for i, mask in zip(part, masks):
                write_mask(targets[i], mask)
    return targets


def load_segmenter(folder: Path, device: str | torch.device = "cpu"):
    """``(CLIPSegForImageSegmentation, CLIPSegProcessor)`` from ``folder`` (safetensors only), in eval mode."""
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from transformers.utils import logging as tlog

    from .base import _first_line

    tlog.disable_progress_bar()  # library code prints nothing
    try:
        model, info = CLIPSegForImageSegmentation.from_pretrained(str(folder), use_safetensors=True,
                                                                  output_loading_info=True)
        processor = CLIPSegProcessor.from_pretrained(str(folder))
    except Exception as exc:
        raise BaseModelError(f"could not load the segmenter from '{folder}': {_first_line(exc)[:120]}; "
                             f"{GET_WEIGHTS}") from None
    check_loading_info(folder, info)
    return model.to(device).eval(), processor


def check_loading_info(folder, info: dict) -> None:
    """Refuse weights that do not fit the model (transformers would fill the gaps with random values and go on):
    one line naming how many tensors are missing, unexpected or of another shape, and the first of them."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = list(info.get(kind) or ())
        if found:
            first = found[0][0] if isinstance(found[0], tuple) else found[0]
            problems.append(f"{len(found)} {kind.replace('_keys', '').replace('_msgs', '')} (e.g. {str(first)[:60]})")
    if problems:
        raise BaseModelError(f"the segmenter weights in '{folder}' do not fit its config.json ({'; '.join(problems)}): "
                             f"they would load as a random CLIPSeg; {GET_WEIGHTS}")


def soft_masks(model, processor, images: list, phrases: list[str]) -> list[np.ndarray]:
    """Perfusion §4.4's soft masks: ``sigmoid(logits)`` resized (bilinear) to each photo, divided by its max."""
    import torch

    inputs = processor(text=list(phrases), images=images, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
        logits = logits.reshape(len(images), 1, *logits.shape[-2:])  # CLIPSeg drops the batch axis for one image
        out = []
        for prob, img in zip(torch.sigmoid(logits), images):
            m = torch.nn.functional.interpolate(prob[None], size=(img.height, img.width), mode="bilinear",
                                                align_corners=False)[0, 0]
            out.append((m / m.max().clamp_min(1e-6)).clamp(0, 1).cpu().numpy())
    return out


def write_mask(target: Path, mask: np.ndarray) -> None:
    """A [0, 1] mask as a 16-bit grayscale PNG, written atomically."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.round(mask * 65535).astype(np.uint16))
    with atomic_path(target) as tmp:
        img.save(tmp, format="PNG")


def mask_files(masks: str | os.PathLike | None, image_paths: Sequence[Path], phrases: Sequence[str],
               segmenter: str | os.PathLike = DEFAULT_SEGMENTER,
               device: str | torch.device = "cpu") -> tuple[list[Path] | None, dict]:
    """A run's ``masks`` setting resolved to one mask file per photo (None: no masks) and what the concept's
    provenance records. ``masks``: ``"none"``/None, ``"auto"`` (segmented, ``phrases[i]`` prompting photo i),
    or a folder of masks named like the photos (a ``Path`` is always a folder, even one named ``auto``)."""
    from .images import check_foreground, find_masks

    if masks is None or (isinstance(masks, str) and masks.strip().lower() in ("none", "")):
        return None, {}
    if isinstance(masks, str) and masks.strip().lower() == "auto":
        files = auto_mask_paths(image_paths, phrases, segmenter, device)
        check_foreground(files, list(image_paths), f"the segmenter '{segmenter}' (prompted with its superclass)")
        return files, {"masks": "auto", "segmenter": str(segmenter)}
    files = find_masks(masks, list(image_paths))
    check_foreground(files, list(image_paths), f"the mask folder '{masks}'")
    return files, {"masks": "folder"}
