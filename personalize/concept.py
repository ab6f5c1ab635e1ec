"""The concept file: one ``.safetensors`` with a JSON header.

Header (``__metadata__["personalize"]``): format version, method, method
config, token, superclass, inference defaults, base fingerprint, covariance
corpus, training provenance. ``__metadata__["checksum"]`` is a SHA-256 over the
header and every tensor, so a tampered file is refused. Files are written
atomically (temp file + rename) and never unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import Fingerprint, fingerprint
from .errors import ConceptFileError
from .paths import atomic_path
from .templates import check_token

FORMAT_VERSION = 1


@dataclass
class Concept:
    header: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    method = property(lambda self: self.header["method"])
    token = property(lambda self: self.header["token"])
    superclass = property(lambda self: self.header["superclass"])
    config = property(lambda self: self.header.get("config", {}))
    inference_defaults = property(lambda self: self.header.get("inference_defaults", {}))

    @property
    def base_fingerprint(self) -> Fingerprint:
        fp = self.header["base_fingerprint"]
        return Fingerprint(fp["architecture"], fp["tokenizer"], fp["text_encoder"])

    def with_token(self, token: str) -> "Concept":
        """A copy that uses another placeholder string (to resolve clashes)."""
        return Concept(dict(self.header, token=token), self.tensors, self.path)


def _checksum(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_concept(path: str | Path, concept: Concept) -> Path:
    """Write ``concept`` atomically; returns the path."""
    from safetensors.torch import save_file

    header = dict(concept.header, format_version=FORMAT_VERSION)
    header_json = json.dumps(header, sort_keys=True, separators=(",", ":"))
    tensors = {k: v.detach().cpu().contiguous() for k, v in concept.tensors.items()}
    metadata = {"personalize": header_json, "checksum": _checksum(header_json, tensors)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_concept(path: str | Path) -> Concept:
    """Read and verify a concept file (no pickle involved)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"concept file '{path}' does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ConceptFileError(
            f"concept file '{path}' is truncated or not a safetensors file ({type(exc).__name__}); re-train or re-copy it"
        ) from exc
    if "personalize" not in metadata:
        raise ConceptFileError(
            f"'{path}' is a safetensors file but not a personalize concept; import it with 'personalize import'"
        )
    if _checksum(metadata["personalize"], tensors) != metadata.get("checksum"):
        raise ConceptFileError(f"concept file '{path}' was modified after it was written (checksum mismatch); re-train or re-copy it")
    header = json.loads(metadata["personalize"])
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ConceptFileError(
            f"concept file '{path}' has format version {header['format_version']}; upgrade personalize to read it"
        )
    for token in [header.get("token"), *(header.get("tokens") or [])]:  # tokens become file names (export)
        check_token(token, f"concept file '{path}'", "re-train it, or re-import it with a valid --token")
    return Concept(header=header, tensors=tensors, path=path)


def check_base(concept: Concept, pipe) -> None:
    """Refuse a concept trained on another base, naming what differs."""
    here = fingerprint(pipe)
    differs = concept.base_fingerprint.differences(here)
    if differs:
        what = ", ".join({"architecture": "UNet/text-encoder architecture", "tokenizer": "tokenizer vocabulary",
                          "text_encoder": "text-encoder weights"}[d] for d in differs)
        base = concept.header.get("provenance", {}).get("base", "another base")
        raise ConceptFileError(
            f"concept '{concept.path or concept.token}' was trained on {base}, not this base ({what} differ); "
            "use the base it was trained on or re-train it"
        )


def file_summary(path: str | Path) -> dict[str, Any]:
    """Header, tensor shapes and sizes, for ``personalize inspect``."""
    concept = load_concept(path)
    tensors = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "bytes": v.numel() * v.element_size()}
               for k, v in sorted(concept.tensors.items())}
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "tensor_bytes": sum(t["bytes"] for t in tensors.values()),
        "header": concept.header,
        "tensors": tensors,
    }
