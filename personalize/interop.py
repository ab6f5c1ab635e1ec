"""Files other tools read and write: export a concept to them, import them as concepts.

Each method lists its formats (``Method.export_formats``) and converts its own
tensors (``Method.export`` / ``Method.import_state``); this module does the file
handling around them:

- foreign files are read as ``.safetensors``; a ``.bin``/``.pt``/``.ckpt`` only
  with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``
  (plain tensors and containers only, no code);
- every file is written atomically (temp file + rename);
- an imported concept is built by the method itself on the base (so it
  attaches exactly like a trained one) and records where it came from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from . import families
from . import methods as method_registry
from .concept import Concept, load_concept, save_concept
from .errors import BadInputError
from .paths import atomic_path, inside, staged_folder
from .templates import check_token

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_state(path: str | Path, allow_pickle: bool = False) -> dict[str, Any]:
    """A foreign weights file as a dict (safetensors; pickles only when allowed, weights-only)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"'{path}' does not exist; pass the weights file to import")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise BadInputError(f"'{path}' is not a readable safetensors file ({type(exc).__name__})") from exc
        check_finite(state, path.name)
        return state
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise BadInputError(f"'{path.name}' is a pickle, which can run code when loaded; convert it to safetensors, "
                                "or pass --allow-pickle if you trust it (it is then read weights-only)")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadInputError(f"'{path.name}' could not be read weights-only ({type(exc).__name__}); "
                                "it holds more than tensors, so it is refused") from exc
        if not isinstance(state, dict):
            raise BadInputError(f"'{path.name}' holds a {type(state).__name__}, not a dict of tensors")
        check_finite(state, path.name)
        return state
    raise BadInputError(f"'{path.name}': unknown file type; import .safetensors (or .bin/.pt with --allow-pickle)")


def check_finite(state: Any, source: str, where: str = "") -> None:
    """Every floating-point tensor in ``state`` (nested dicts and lists too, as in A1111's ``string_to_param``)
    holds only finite numbers: a NaN or Inf would be written into a concept that generates noise."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and state.numel() and not bool(torch.isfinite(state).all()):
            bad = int((~torch.isfinite(state)).sum())
            raise BadInputError(f"'{source}': tensor '{where}' holds {bad} NaN or infinite value(s) of "
                                f"{state.numel()}; the file is damaged (or was saved from a diverged run)")
        return
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        check_finite(value, source, f"{where}.{key}" if where else str(key))


def read_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (a diffusers LoRA keeps its peft config there); ``{}`` for pickles."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise BadInputError(f"'{path.name}' is not a readable safetensors file ({type(exc).__name__})") from None


def write_info(folder: Path, info: dict[str, Any]) -> Path:
    path = inside(folder, "export.json")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return path


def export_concept(concept: Concept | str | Path, out: str | Path, fmt: str | None = None, base=None) -> Path:
    """Write ``concept`` into the folder ``out`` in ``fmt`` (default: the method's first format); returns the folder.

    ``base`` (a spec or a pipeline) is used only by formats that store full weights (Custom Diffusion); ``None``
    loads the base the concept's header records (:func:`personalize.compose.load_base_for`).
    """
    concept = concept if isinstance(concept, Concept) else load_concept(Path(concept))
    method_cls = method_registry.get(concept.method)
    family = families.FAMILIES.get(concept.header.get("base_fingerprint", {}).get("family", "sd1"))
    formats = method_registry.export_formats_on(concept.method, family) if family else method_cls.export_formats
    if method_cls.export_formats and not formats:
        reason = getattr(family, "export_refusals", {}).get(concept.method)
        if reason:
            raise BadInputError(f"{concept.method} concepts of {family.label} bases have no export format: {reason}")
        elsewhere = [f.label for f in families.FAMILIES.values()
                     if method_registry.export_formats_on(concept.method, f)]
        raise BadInputError(f"{concept.method} concepts of {family.label} bases have no export format yet (its "
                            f"formats are for {', '.join(elsewhere)} bases); attach them with personalize")
    if not formats:
        name = concept.path.name if concept.path is not None else concept.token
        if method_cls.no_export_reason:
            raise BadInputError(f"'{name}' is a {concept.method} concept: {method_cls.no_export_reason}")
        exporting = [n for n in method_registry.names() if method_registry.get(n).export_formats]
        raise BadInputError(f"'{name}' is a {concept.method} concept, which has no export format; "
                            f"these methods export: {', '.join(exporting)}")
    fmt = fmt or next(iter(formats))
    if fmt not in formats:
        raise BadInputError(f"{concept.method} exports as {', '.join(formats)}, not '{fmt}'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out '{out}' is a file; pass a folder for the exported files")
    pipe = _pipe(base, concept) if method_cls.export_needs_base else None
    with staged_folder(out) as staging:  # all files or none: a failure half-way leaves OUT as it was
        files = method_cls.export(concept, fmt, staging, pipe)
        write_info(staging, {"format": fmt, "method": concept.method, "token": concept.token,
                             "superclass": concept.superclass, "files": [f.name for f in files],
                             "how_to_load": formats[fmt], "source": str(concept.path) if concept.path else None,
                             **method_cls.export_notes(concept, fmt)})
    return out


def import_file(base, path: str | Path, *, method: str, out: str | Path, token: str | None = None,
                superclass: str | Sequence[str] | None = None, embeddings: Sequence[str | Path] = (),
                allow_pickle: bool = False, settings: dict[str, Any] | None = None) -> Path:
    """Convert a foreign file (``method``'s export format) into a concept file for ``base``; returns ``out``.

    ``superclass``: one word or class phrase, or (multi-concept methods, e.g. Custom Diffusion) one per concept in the file."""
    from .base import base_name, fingerprint, load_base
    from .images import file_sha256
    from .methods.shared import as_list, words_of
    from .text_stack import widths
    from .training import _validate_words, concept_header

    method_cls = method_registry.get(method)
    if not hasattr(method_cls, "import_state"):
        raise BadInputError(f"{method} has no import format; importable methods: "
                            f"{', '.join(n for n in method_registry.names() if hasattr(method_registry.get(n), 'import_state'))}")
    out = Path(out)
    if out.suffix != ".safetensors" or out.is_dir():
        raise BadInputError(f"--out '{out}' must be a file path ending in .safetensors")
    superclasses = as_list(superclass) if superclass else []
    if not superclasses or not all(superclasses):
        raise BadInputError("--superclass is required: what the concept is, a word or class phrase, e.g. 'dog' or "
                            "'penguin plushie'")
    if len(superclasses) > 1 and not method_cls.multi_concept:
        raise BadInputError(f"{method} concepts have one superclass; pass --superclass once")
    if token is not None:
        check_token(token, "--token")
    state = read_state(path, allow_pickle)
    extra = [read_state(e, allow_pickle) for e in embeddings]
    pipe = load_base(base) if isinstance(base, (str, Path)) else base
    method_cls.check_base(pipe)  # a family without the method: refused before reading the file's tensors
    family = families.of(pipe)
    if not method_registry.import_formats_on(method, family):
        raise BadInputError(f"{method} files do not import into {family.label} bases yet; train on this base with "
                            "personalize train instead")
    found = method_cls.import_state(pipe, state, token=token, embeddings=extra, metadata=read_metadata(path),
                                    superclass=superclasses[0] if len(superclasses) == 1 else superclasses)
    check_finite(found["tensors"], Path(path).name)  # what the conversion made of them, before anything is written
    if not found["token"]:
        raise BadInputError(f"'{Path(path).name}' does not name its token; pass --token '<name>'")
    for tok in as_list(found["token"]):
        check_token(tok, f"the token in '{Path(path).name}'", "pass --token '<name>' to use another")
    config = method_cls.make_config({**found.get("config", {}), **(settings or {})})
    tokens, superclasses = found["token"], found["superclass"]
    for tok, sc in zip(*words_of(tokens, superclasses)):
        _validate_words(pipe, tok, sc)
    method_obj = method_cls.for_import(pipe, found, config)
    try:
        method_obj.load_state_tensors(found["tensors"])
        tensors = method_obj.concept_tensors()
        extras = method_obj.header_fields()
        defaults = method_obj.inference_defaults()
    finally:
        method_obj.remove()
    sources = [Path(path), *map(Path, embeddings)]
    provenance = {"imported_from": [p.name for p in sources], "sha256": [file_sha256(p) for p in sources],
                  "base": base_name(base)}
    header = concept_header(method, tokens, superclasses, config, defaults, fingerprint(pipe), extras, provenance,
                            widths(pipe))
    return save_concept(out, Concept(header, tensors))


def _pipe(base, concept: Concept):
    from .base import load_base

    if base is None:  # the base the concept's header records (one line when it records none)
        from .compose import load_base_for

        return load_base_for(concept)
    return load_base(base) if isinstance(base, (str, Path)) else base
