"""The concept file: one ``.safetensors`` with a JSON header.

Header (``__metadata__["personalize"]``): format version, method, method
config, token, superclass, inference defaults, base fingerprint, covariance
corpus, training provenance. ``__metadata__["checksum"]`` is a SHA-256 over the
header and every tensor, so a corrupted (truncated, bit-flipped, partly
copied) file is refused. The checksum is unkeyed: it detects corruption, not
tampering -- anyone who edits a file can recompute it. What a forged file can
still do is bounded by the loader's checks: the header is strict JSON of
bounded size and depth and must match the schema in :func:`validate_header`,
and every tensor must be floating point with finite values; anything else is a
one-line :class:`ConceptFileError`. Files are written atomically (temp file +
rename) and never unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import Fingerprint, fingerprint
from .text_stack import FAMILIES
from .errors import ConceptFileError
from .paths import atomic_path
from .templates import TOKEN_RULE, shown, token_problem

FORMAT_VERSION = 1
#: a header is a few KB; anything near this is not one we wrote
MAX_HEADER_CHARS = 1 << 20
#: the deepest nesting a header may have (ours is 4 levels deep)
MAX_HEADER_DEPTH = 64
#: integers longer than this are refused (ours are steps, seeds, sizes)
MAX_INT_DIGITS = 100
#: the fields every header has, with the JSON type each must be
REQUIRED = {"format_version": "integer", "method": "string", "token": "string", "superclass": "string",
            "config": "object", "inference_defaults": "object", "base_fingerprint": "object", "provenance": "object"}
FINGERPRINT_FIELDS = ("architecture", "tokenizer", "text_encoder")
OPTIONAL_FINGERPRINT_FIELDS = ("text_encoder_bf16", "precision", "text_encoder_sample", "family")  # newer files; absent in older ones


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
        return Fingerprint(fp["architecture"], fp["tokenizer"], fp["text_encoder"],
                           **{k: fp[k] for k in OPTIONAL_FINGERPRINT_FIELDS if k in fp})

    def with_token(self, token: str) -> "Concept":
        """A copy that uses another placeholder string (to resolve clashes)."""
        return Concept(dict(self.header, token=token), self.tensors, self.path)


def _checksum(header_json: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(header_json.encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_concept(path: str | Path, concept: Concept) -> Path:
    """Write ``concept`` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    header = dict(concept.header, format_version=FORMAT_VERSION)
    try:
        header_json = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False)
        validate_header(parse_header(header_json))  # never write a file the loader would refuse
    except HeaderError as exc:
        raise ConceptFileError(f"refusing to write concept file '{path}': {exc}") from exc
    except (TypeError, ValueError) as exc:  # not JSON, or NaN/inf
        raise ConceptFileError(f"refusing to write concept file '{path}': its header is not strict JSON "
                               f"({_first_line(exc)})") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in concept.tensors.items()}
    metadata = {"personalize": header_json, "checksum": _checksum(header_json, tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_concept(path: str | Path) -> Concept:
    """Read and verify a concept file (no pickle involved).

    Every way a file can be unreadable -- missing, truncated, not safetensors, checksum mismatch, a header
    that is not strict JSON or does not match the schema, a tensor that is not floating point or holds
    NaN/inf -- is a one-line :class:`ConceptFileError` naming the file and what is wrong.
    """
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
    if not isinstance(metadata.get("personalize"), str):
        raise ConceptFileError(
            f"'{path}' is a safetensors file but not a personalize concept; import it with 'personalize import'"
        )
    try:
        checksum = _checksum(metadata["personalize"], tensors)
    except Exception as exc:  # a tensor torch cannot view as bytes (forged dtype or layout)
        raise ConceptFileError(
            f"concept file '{path}' holds tensors that cannot be read ({type(exc).__name__}); re-train or re-copy it"
        ) from exc
    if checksum != metadata.get("checksum"):
        raise ConceptFileError(f"concept file '{path}' was modified after it was written (checksum mismatch); re-train or re-copy it")
    try:
        header = parse_header(metadata["personalize"])
        validate_header(header)
    except NewerFormatError as exc:
        raise ConceptFileError(
            f"concept file '{path}' has format version {exc.version}; upgrade personalize to read it"
        ) from exc
    except HeaderError as exc:
        raise ConceptFileError(f"concept file '{path}': {exc}; re-train or re-copy it") from exc
    for name, t in sorted(tensors.items()):
        problem = _tensor_problem(t)
        if problem:
            raise ConceptFileError(f"concept file '{path}': tensor {_short(name)} {problem}; re-train or re-copy it")
    for token in [header.get("token"), *(header.get("tokens") or [])]:  # tokens become file names (export)
        problem = token_problem(token)
        if problem:
            raise ConceptFileError(f"concept file '{path}': token {shown(token)} is not a valid token ({problem}); "
                                   f"{TOKEN_RULE}; re-train it, or re-import it with a valid --token")
    return Concept(header=header, tensors=tensors, path=path)


# ----------------------------------------------------------------------------- the header schema
class HeaderError(ValueError):
    """What is wrong with a concept header (one line; :func:`load_concept` adds the file name)."""


class NewerFormatError(HeaderError):
    def __init__(self, version: int):
        super().__init__(f"the format version {version} is newer than this personalize reads ({FORMAT_VERSION})")
        self.version = version


def parse_header(text: str) -> Any:
    """The header JSON as Python values: strict JSON (no NaN/Infinity, no duplicate keys, no lone surrogates),
    at most ``MAX_HEADER_CHARS`` long and ``MAX_HEADER_DEPTH`` deep; else :class:`HeaderError`."""
    if len(text) > MAX_HEADER_CHARS:
        raise HeaderError(f"the header is {len(text):,} characters long (at most {MAX_HEADER_CHARS:,})")
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float,
                           parse_int=_int)
    except HeaderError:
        raise
    except RecursionError:
        raise HeaderError(f"the header is nested deeper than {MAX_HEADER_DEPTH} levels") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise HeaderError(f"the header is not valid JSON ({_first_line(exc)})") from None
    _check_values(value)
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise HeaderError(f"the header has the key {_short(key)} twice in one object")
        out[key] = value
    return out


def _constant(name: str):
    raise HeaderError(f"the header holds {name}, which is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HeaderError(f"the header holds the number {_short(text)}, which overflows a float")
    return value


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise HeaderError(f"the header holds an integer with {digits:,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _check_values(value: Any) -> None:
    """Depth at most MAX_HEADER_DEPTH and every string (keys too) valid Unicode (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_HEADER_DEPTH:
                raise HeaderError(f"the header is nested deeper than {MAX_HEADER_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                items = item.values()
            else:
                items = item
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list, str)))
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"the header holds the string {_short(text)}, "
                          "which is not valid Unicode (a lone surrogate)") from None


_PLAIN_NAME = re.compile(r"[^/\\\x00]+")  # a file or folder name beside the concept file, no path
_CORPUS = re.compile(r"builtin|sha256-[0-9a-f]{16}")


def validate_header(header: Any) -> None:
    """Check a parsed header against the schema; raise :class:`HeaderError` naming the first problem.

    Required: ``format_version`` (int, 1..FORMAT_VERSION; a newer one raises :class:`NewerFormatError`),
    ``method`` (a registered method), ``token`` (non-empty str), ``superclass`` (str), ``config``,
    ``inference_defaults``, ``provenance`` (objects), ``base_fingerprint`` (an object with the string fields
    architecture, tokenizer, text_encoder and optionally digest, text_encoder_bf16, precision,
    text_encoder_sample). Method extras, when present:
    ``covariance`` (``builtin`` or ``sha256-<16 hex>``), ``tokens``/``superclasses`` (lists of strings of
    one length, together), ``pipeline`` (a folder name, no path), ``pipeline_digest`` (str),
    ``composable`` (bool). Other keys may hold any JSON value.
    """
    from .methods import names

    if not isinstance(header, dict):
        raise HeaderError(f"the header is {_a(_json_type(header))}, not a JSON object")
    version = header.get("format_version")
    if type(version) is int and version > FORMAT_VERSION:  # checked first: a newer format may have another shape
        raise NewerFormatError(version)
    for key, kind in REQUIRED.items():
        if key not in header:
            raise HeaderError(f"the header has no '{key}' field")
        if _json_type(header[key]) != kind:
            raise HeaderError(f"header field '{key}' is {_json_type(header[key])} {_short(header[key])}, "
                              f"not {_a(kind)}")
    if version < 1:
        raise HeaderError(f"header field 'format_version' is {version}; versions start at 1")
    if header["method"] not in names():
        raise HeaderError(f"header field 'method' is {_short(header['method'])}, "
                          f"not a known method ({', '.join(names())})")
    if not header["token"]:
        raise HeaderError("header field 'token' is empty")
    fp = header["base_fingerprint"]
    for key in FINGERPRINT_FIELDS + tuple(k for k in ("digest",) + OPTIONAL_FINGERPRINT_FIELDS if k in fp):
        if not isinstance(fp.get(key), str):
            what = "missing" if key not in fp else f"{_json_type(fp[key])} {_short(fp[key])}, not a string"
            raise HeaderError(f"header field 'base_fingerprint.{key}' is {what}")
    _check_extras(header)


def _check_extras(header: dict[str, Any]) -> None:
    if "covariance" in header and not (isinstance(header["covariance"], str)
                                       and _CORPUS.fullmatch(header["covariance"])):
        raise HeaderError(f"header field 'covariance' is {_short(header['covariance'])}, "
                          "not 'builtin' or 'sha256-<16 hex>'")
    if ("tokens" in header) != ("superclasses" in header):
        raise HeaderError("the header has one of 'tokens' and 'superclasses' without the other")
    if "tokens" in header:
        for key in ("tokens", "superclasses"):
            words = header[key]
            if not (isinstance(words, list) and words and all(isinstance(w, str) and w for w in words)):
                raise HeaderError(f"header field '{key}' is {_short(words)}, not a list of non-empty strings")
        if len(header["tokens"]) != len(header["superclasses"]):
            raise HeaderError(f"the header has {len(header['tokens'])} tokens "
                              f"but {len(header['superclasses'])} superclasses")
    if "pipeline" in header:
        name = header["pipeline"]
        if not (isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and name not in (".", "..")):
            raise HeaderError(f"header field 'pipeline' is {_short(name)}, not a folder name beside the concept file")
    if "pipeline_digest" in header and not isinstance(header["pipeline_digest"], str):
        raise HeaderError(f"header field 'pipeline_digest' is {_short(header['pipeline_digest'])}, not a string")
    if "composable" in header and not isinstance(header["composable"], bool):
        raise HeaderError(f"header field 'composable' is {_short(header['composable'])}, not true or false")


def _tensor_problem(t: torch.Tensor) -> str | None:
    """Why a loaded tensor cannot be a concept's (None when it can)."""
    if not t.is_floating_point():
        return f"has dtype {str(t.dtype).replace('torch.', '')}, not a floating-point type"
    try:
        finite = bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())
    except Exception as exc:  # a dtype torch stores but cannot compute with
        return f"has dtype {str(t.dtype).replace('torch.', '')}, which cannot be checked ({type(exc).__name__})"
    return None if finite else "holds NaN or infinite values"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _a(kind: str) -> str:
    return kind if kind == "null" else ("an " if kind[0] in "aeiou" else "a ") + kind


def _short(value: Any, limit: int = 40) -> str:
    """A one-line, bounded, ASCII repr for error messages."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def check_base(concept: Concept, pipe, *, weights: bool = True) -> None:
    """Refuse a concept trained on another base, naming what differs. ``weights=False``: text-encoder weights that
    differ only warn (``attach(..., check_base_weights=False)``, e.g. a LoRA fused into the text encoder)."""
    here = fingerprint(pipe)
    theirs = concept.base_fingerprint
    if theirs.family and here.family and theirs.family != here.family:
        raise ConceptFileError(
            f"concept '{concept.path or concept.token}' was trained on an {FAMILIES.get(theirs.family, theirs.family)} base and this "
            f"base is {FAMILIES.get(here.family, here.family)}; a concept works only on the family (and base) it was trained on")
    differs = theirs.differences(here)
    if differs == ["text_encoder"] and not weights:
        import warnings

        warnings.warn(f"concept '{concept.path or concept.token}': this base's text-encoder weights differ from the "
                      "ones it was trained on (attached anyway: check_base_weights=False)", stacklevel=3)
        return
    if differs:
        what = ", ".join({"architecture": "UNet/text-encoder architecture", "tokenizer": "tokenizer vocabulary",
                          "text_encoder": "text-encoder weights"}[d] for d in differs)
        base = concept.header.get("provenance", {}).get("base", "another base")
        if differs == ["text_encoder"] and here.precision == "bf16" and not concept.base_fingerprint.text_encoder_bf16:
            raise ConceptFileError(
                f"concept '{concept.path or concept.token}' was written by an older personalize, whose fingerprint "
                "holds fp16-rounded text-encoder weights that a bf16 pipeline cannot reproduce; attach it to an "
                "fp32 or fp16 copy of the base (or re-save it: import/train it again)")
        hint = (" (a LoRA fused into the text encoder changes them: pipe.unfuse_lora(), or attach(..., "
                "check_base_weights=False) to accept it)") if differs == ["text_encoder"] else ""
        raise ConceptFileError(
            f"concept '{concept.path or concept.token}' was trained on {base}, not this base ({what} differ{hint}); "
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
