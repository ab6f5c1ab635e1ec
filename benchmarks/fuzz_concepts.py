"""Fuzz the concept loader: every mutant of a real concept file loads, or is a one-line ConceptFileError.

Three small concept files are written with the real writer (``save_concept``, headers from the trainer's
``concept_header`` and each method's real config): a Perfusion file, a two-concept Custom Diffusion file
(one fp16 tensor) and a header-only DreamBooth file. Each mutant is one of:

- byte-level damage, checksum left alone (bit flips anywhere or in the safetensors header, truncation,
  byte insertion/deletion/overwrite, a copied span, a rewritten length prefix): it must load the same
  content as the original or be refused;
- a forged header with the checksum recomputed (the checksum is unkeyed, so a forger can): wrong types,
  dropped or added keys, deep nesting, NaN/Infinity, huge numbers, duplicate keys, unicode and lone
  surrogates, text-level edits; plus the exact cases an adversarial tester reported (``""``, ``null``, a
  list, ``format_version: "1"``, no ``method``, 100,000 nested brackets), which must be refused;
- the same header reformatted (indentation, key order, escaping): it must load the same content;
- tensor edits with the checksum recomputed: dtype/shape/offset/name edits in the safetensors header,
  NaN/inf values, casts, reshapes, dropped/renamed/extra tensors.

A forged mutant may load (the loader cannot tell a forged header from a real one when it is well-formed),
but what loads must be sound: a header that matches the schema and floating-point, finite tensors.
Anything else -- another exception type, an unsound load, a load taking longer than ``--timeout`` seconds,
a refusal whose message is not one line naming the file -- is a failure.

    python benchmarks/fuzz_concepts.py [--n 100000] [--seed 0] [--timeout 5]

Prints one JSON line per mutation kind ({"kind", "n", "same", "different", "refused", "failed"}), then a
total line with the run's seconds, the failures counted by type ("crash: KeyError", "unsound: method", ...)
and the first 20 failures (each with the seed and index that rebuild it: ``mutant(samples, seed, index)``).
Exit code 1 when anything failed. ``tests/test_concept_fuzz.py`` runs the same generator on 4,000 mutants.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import signal
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from personalize.concept import Concept, _checksum, load_concept, save_concept
from personalize.errors import ConceptFileError

EXACT_CASES = {  # the header texts the adversarial tester reported (checksum recomputed)
    "empty string": lambda h: "",
    "null": lambda h: "null",
    "a list": lambda h: json.dumps([h]),
    "format_version as a string": lambda h: json.dumps(dict(h, format_version="1")),
    "no method": lambda h: json.dumps({k: v for k, v in h.items() if k != "method"}),
    "100,000 nested brackets": lambda h: "[" * 100_000 + "]" * 100_000,
}

BYTE_KINDS = ("bit-flip", "header-bit-flip", "truncate", "insert", "delete", "overwrite", "copy-span", "length-prefix")
FORGED_KINDS = ("header-value", "header-drop", "header-add", "header-text", "tensor-meta", "tensor-values")
KINDS = ("header-exact", "header-reformat") + BYTE_KINDS + FORGED_KINDS
#: how often each random kind is drawn (the exact cases are always all included)
WEIGHTS = {"bit-flip": 2, "header-bit-flip": 2, "truncate": 1, "insert": 1, "delete": 1, "overwrite": 1, "copy-span": 1,
           "length-prefix": 1, "header-reformat": 1, "header-value": 4, "header-drop": 2, "header-add": 1,
           "header-text": 4, "tensor-meta": 4, "tensor-values": 3}
OK = {"same": {"same"}, "refused": {"refused"}, "same-or-refused": {"same", "refused"},
      "any": {"same", "different", "refused"}}


# ----------------------------------------------------------------------------- the originals
@dataclass
class Sample:
    name: str
    path: Path
    data: bytes  # the file's bytes
    header: dict  # the header as load_concept returns it
    header_text: str  # the header JSON as stored
    tensors: dict[str, torch.Tensor]
    st_header: dict  # the safetensors header (tensor entries and __metadata__)


def sample_concepts(folder: Path) -> list[Sample]:
    """Three small concept files written by the real writer, with real headers; loaded back as samples."""
    from personalize.base import Fingerprint
    from personalize.methods import get
    from personalize.training import concept_header

    fp = Fingerprint("a" * 16, "b" * 16, "c" * 16)
    prov = {"base": "tiny", "steps": 1, "batch_size": 2, "seed": 0, "mixed_precision": "no", "images": ["0" * 64] * 2,
            "package_version": "0.1.0", "torch": torch.__version__, "created": "2026-11-30T00:00:00+00:00",
            "seconds": 0.5, "best_step": 1, "validation": [{"step": 1, "h": 0.25, "clip_t": None}]}
    g = torch.Generator().manual_seed(0)
    specs = {
        "perfusion": (concept_header("perfusion", "<disc>", "ball", get("perfusion").make_config(),
                                     {"beta": 0.7, "beta_global": 0.5, "tau": 0.15}, fp, {"covariance": "builtin"}, prov),
                      {"embedding": torch.randn(1, 32, generator=g), "i_star": torch.randn(32, generator=g),
                       "o_v.down_blocks.0.attentions.0.transformer_blocks.0.attn2": torch.randn(32, generator=g),
                       "o_v.up_blocks.1.attentions.0.transformer_blocks.0.attn2": torch.randn(64, generator=g)}),
        "custom-diffusion": (concept_header("custom-diffusion", ["<cat>", "<chair>"], ["cat", "chair"],
                                            get("custom-diffusion").make_config(), {}, fp,
                                            {"tokens": ["<cat>", "<chair>"], "superclasses": ["cat", "chair"]}, prov),
                             {"embedding": torch.randn(2, 32, generator=g),
                              "dW_k.mid_block.attentions.0.transformer_blocks.0.attn2": torch.randn(4, 8, generator=g).half()}),
        "dreambooth": (concept_header("dreambooth", "sks", "dog", get("dreambooth").make_config(), {}, fp,
                                      {"pipeline": "dog.pipeline", "pipeline_digest": "d" * 16, "composable": False}, prov),
                       {}),
    }
    samples = []
    for name, (header, tensors) in specs.items():
        path = save_concept(Path(folder) / f"{name}.safetensors", Concept(header, tensors))
        written = load_concept(path)
        # safetensors writes its metadata map in a per-process random order; the byte-level mutants need the
        # same bytes in every run, so the file is rewritten with its header's keys sorted (same content)
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        st_header = json.loads(assemble(json.loads(raw[8:8 + n]), b"")[8:])
        data = assemble(st_header, raw[8 + n:])
        path.write_bytes(data)
        concept = load_concept(path)
        assert concept.header == written.header and concept.tensors.keys() == written.tensors.keys()
        samples.append(Sample(name, path, data, concept.header, st_header["__metadata__"]["personalize"],
                              concept.tensors, st_header))
    return samples


# ----------------------------------------------------------------------------- building files
def signed(header_text: str, tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file with this header text and the checksum recomputed (what a forger can do)."""
    from safetensors.torch import save

    return save(tensors, metadata={"personalize": header_text, "checksum": _checksum(header_text, tensors)})


def assemble(st_header: dict, body: bytes) -> bytes:
    """A safetensors file: the length prefix, the header JSON (keys sorted, space-padded to 8 bytes), the data."""
    text = json.dumps(st_header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def resigned(st_header: dict, body: bytes) -> bytes:
    """``st_header`` + ``body`` with the checksum recomputed over what safetensors reads (when it reads)."""
    from safetensors.torch import load

    data = assemble(st_header, body)
    meta = st_header.get("__metadata__")
    if not (isinstance(meta, dict) and isinstance(meta.get("personalize"), str) and "checksum" in meta):
        return data
    try:
        checksum = _checksum(meta["personalize"], load(data))
    except Exception:  # safetensors or torch cannot read it: the loader must refuse it anyway
        return data
    return assemble(dict(st_header, __metadata__=dict(meta, checksum=checksum)), body)


# ----------------------------------------------------------------------------- mutations
@dataclass
class Mutant:
    index: int  # -1 for the exact cases; else mutants(seed=...)'s index, which rebuilds it
    kind: str
    sample: Sample
    data: bytes
    expect: str  # a key of OK
    note: str


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path into a JSON value (dict keys and list indices)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield prefix + (key,)
        yield from _paths(item, prefix + (key,))


def _parent(root: Any, path: tuple) -> Any:
    for key in path[:-1]:
        root = root[key]
    return root


def _deep(n: int) -> Any:
    value: Any = 0
    for _ in range(n):
        value = [value]
    return value


ODD_VALUES = [None, True, False, 0, 1, -1, 2, 1.5, -0.0, 1e308, 10**30, 2**63, "", " ", "1", "x", "\u0000",
              "\u202e<disc>", "\U0001f600", "<disc>", "perfusion", "a" * 300, [], [1], ["a", "b"], [None], {},
              {"a": 1}, {"architecture": 1}, {"architecture": "a", "tokenizer": "b", "text_encoder": "c"},
              "builtin", "sha256-0123456789abcdef", "../../etc", "/abs/dir", ".", ".."]
KEY_VALUES = {
    "format_version": ["1", 1.0, True, 0, -1, 2, 10**30, None, [1], {"v": 1}],
    "method": ["Perfusion", "perfusion ", "", "dreambooth", "residuals", "textual-inversion", "nope", 1, None, ["perfusion"]],
    "token": ["", " ", "<disc> <disc>", "\u0000", 1, None, ["<disc>"], {"t": 1}],
    "superclass": ["", "cat", 1, None, []],
    "covariance": ["builtin", "sha256-0123456789abcdef", "sha256-XYZ", "../x", "", 1, None],
    "pipeline": ["dog.pipeline", "../dog.pipeline", "/tmp/x", "a/b", "a\\b", ".", "..", "", 1, None],
    "composable": [True, False, 0, "false", None],
    "tokens": [["<a>"], ["<a>", "<b>", "<c>"], [], [""], [1], "x", None],
    "superclasses": [["cat"], ["a", "b", "c"], [], [""], [1], "x", None],
}


def _header_value(rng: random.Random, header: dict) -> tuple[dict, str]:
    header = copy.deepcopy(header)
    if rng.random() < 0.5:
        key = rng.choice(sorted(set(header) | set(KEY_VALUES)))
        value = rng.choice(KEY_VALUES.get(key, []) + ODD_VALUES) if rng.random() < 0.7 else rng.choice(ODD_VALUES)
        header[key] = value
        return header, f"{key} = {ascii(value)[:40]}"
    path = rng.choice(list(_paths(header)))
    value = rng.choice(ODD_VALUES + [_deep(rng.choice([10, 62, 63, 64, 65, 200]))])
    _parent(header, path)[path[-1]] = value
    return header, f"{'.'.join(map(str, path))} = {ascii(value)[:40]}"


def _header_drop(rng: random.Random, header: dict) -> tuple[dict, str]:
    header = copy.deepcopy(header)
    path = (rng.choice(sorted(header)),) if rng.random() < 0.6 else rng.choice(list(_paths(header)))
    del _parent(header, path)[path[-1]]
    return header, f"drop {'.'.join(map(str, path))}"


def _header_add(rng: random.Random, header: dict) -> tuple[dict, str]:
    header = copy.deepcopy(header)
    objects = [()] + [p for p in _paths(header) if isinstance(_parent(header, p + (None,)), dict)]
    where = rng.choice(objects)
    key = rng.choice(["extra", "x" * 100, "", "\U0001f600", "tokens", "superclasses", "pipeline", "covariance",
                      "composable", "digest", "__proto__"])
    value = rng.choice(ODD_VALUES + [_deep(rng.choice([63, 64, 65]))])
    _parent(header, where + (None,))[key] = value
    return header, f"add {'.'.join(map(str, where + (key,)))} = {ascii(value)[:40]}"


def _header_text(rng: random.Random, text: str) -> tuple[str, str]:
    how = rng.choice(["nest", "nest", "constant", "number", "duplicate", "unicode", "escape", "char", "char",
                      "truncate", "wrap"])
    body = text[:-1]  # without the closing brace of the top-level object
    if how == "nest":
        k = rng.choice([1, 10, 62, 63, 64, 65, 500, 999, 1000, 5000, 100_000])
        open_, close = rng.choice([("[", "]"), ('{"a":', "}")])
        if rng.random() < 0.3:
            return open_ * k + text + close * k, f"{k} levels around the header"
        return body + ',"deep":' + open_ * k + "0" + close * k + "}", f"a value {k} levels deep"
    if how == "constant":
        word = rng.choice(["NaN", "Infinity", "-Infinity", "nan", "inf", "undefined"])
        return body + f',"x":{word}' + "}", f"x = {word}"
    if how == "number":
        number = rng.choice(["1e999", "-1e999", "1e308", "1e-999", "4.9e-324", "1" + "0" * rng.choice([20, 99, 100, 101, 5000]),
                             "-0", "0x10", "01", "1.", ".5", "1e", "+1"])
        key = rng.choice(["x", "format_version", "token"])
        return body + f',"{key}":{number}' + "}", f"{key} = {number[:20]}"
    if how == "duplicate":
        key = rng.choice(["token", "method", "format_version", "superclass", "config", "x"])
        value = json.dumps(rng.choice(ODD_VALUES + ["<disc>"]))
        if rng.random() < 0.5:
            return body + f',"{key}":{value}' + "}", f"{key} twice"
        return '{"' + key + '":' + value + "," + text[1:], f"{key} twice (first)"
    if how == "unicode":
        word = rng.choice(["<d\u00efsc>", "\U0001f600", "\u202e", "\u0000", "\ufeff", "\uffff", "a\u0301", "\u4e2d"])
        return text.replace('"token":"', '"token":"' + word, 1), f"unicode in token {ascii(word)}"
    if how == "escape":
        escape = rng.choice(["\\ud800", "\\udfff", "\\ud83d", "\\ud83d\\ude00", "\\u0000", "\\x41", "\\", "\\u12"])
        where = rng.choice(['"token":"', '"superclass":"', '"base":"', '"covariance":"', '"method":"'])
        return text.replace(where, where + escape, 1), f"{escape} in {where}"
    if how == "char":
        i = rng.randrange(len(text) + 1)
        c = rng.choice('{}[]":,\\ 0-e.' + "\u00e9\U0001f600\u0000\n")
        op = rng.choice(["insert", "delete", "replace"])
        out = text[:i] + c + text[i:] if op == "insert" else text[:i] + text[i + 1:] if op == "delete" else text[:i] + c + text[i + 1:]
        return out, f"{op} {ascii(c)} at {i}"
    if how == "truncate":
        k = rng.randrange(len(text))
        return text[:k], f"first {k} characters"
    wrapped = rng.choice([json.dumps(text), "[" + text + "]", '{"personalize":' + text + "}", "true", "1", "{}", "[]"])
    return wrapped, f"wrapped as {wrapped[:12]!r}"


def _reformat(rng: random.Random, header: dict) -> tuple[str, str]:
    def shuffled(value):
        if isinstance(value, dict):
            keys = list(value)
            rng.shuffle(keys)
            return {k: shuffled(value[k]) for k in keys}
        return [shuffled(v) for v in value] if isinstance(value, list) else value

    indent = rng.choice([None, 0, 1, 4, "\t"])
    ascii_ = rng.random() < 0.5
    return json.dumps(shuffled(header), indent=indent, ensure_ascii=ascii_), f"indent={indent!r} ascii={ascii_}"


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64", "C64", "X", "", 3, None]
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _tensor_meta(rng: random.Random, sample: Sample) -> tuple[bytes, str]:
    """An edit of the safetensors header's tensor entries (or its metadata), re-signed when readable."""
    n = struct.unpack("<Q", sample.data[:8])[0]
    body = sample.data[8 + n:]
    st = copy.deepcopy(sample.st_header)
    names = [k for k in st if k != "__metadata__"]
    how = rng.choice(["dtype", "dtype-resize", "dtype-resize", "shape", "shape", "offsets", "rename", "drop", "alias",
                      "metadata"] if names else ["metadata", "alias-empty"])
    name = rng.choice(names) if names else None
    if how == "dtype":
        st[name]["dtype"] = dtype = rng.choice(DTYPES)
        return resigned(st, body), f"{name} dtype {dtype}"
    if how == "dtype-resize":  # a new dtype, with the shape changed so the byte count still matches
        entry = st[name]
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        dtype = rng.choice(list(SIZES))
        if nbytes % SIZES[dtype]:
            dtype = "U8"
        entry["dtype"], entry["shape"] = dtype, [nbytes // SIZES[dtype]]
        return resigned(st, body), f"{name} as {dtype} {entry['shape']}"
    if how == "shape":
        shape = st[name]["shape"]
        count = math.prod(shape)
        new = rng.choice([[], [0], [count], [1, count], [count, 1], list(reversed(shape)), shape + [1], [1] + shape,
                          shape[:-1], [-1], [2**62], [count + 1], [count - 1], ["x"], None, [1.5], [2**64]])
        st[name]["shape"] = new
        return resigned(st, body), f"{name} shape {new}"
    if how == "offsets":
        a, b = st[name]["data_offsets"]
        new = rng.choice([[b, a], [a, a], [a + 1, b + 1], [a - 1, b - 1], [a, b + 4], [0, 0], [a, 2**64 - 1], [-1, b],
                          [a], [a, b, b], None, [str(a), str(b)]])
        st[name]["data_offsets"] = new
        return resigned(st, body), f"{name} offsets {new}"
    if how == "rename":
        new = rng.choice(["", "embedding", "i_star", name + "x", "__metadata__", "\U0001f600", "a" * 1000] + names)
        st[new] = st.pop(name)
        return resigned(st, body), f"{name} renamed {new[:20]!r}"
    if how == "drop":
        del st[name]
        return resigned(st, body), f"drop {name}"
    if how in ("alias", "alias-empty"):
        entry = copy.deepcopy(st[name]) if name else {"dtype": "F32", "shape": [0], "data_offsets": [len(body), len(body)]}
        st["extra"] = entry
        return resigned(st, body), "a second entry on the same bytes"
    meta = st.get("__metadata__", {})
    key = rng.choice(["checksum", "personalize", "other"])
    value = rng.choice([None, 1, "", ["x"], {"a": "b"}, "0" * 64])
    new_meta = dict(meta)
    if rng.random() < 0.3:
        new_meta.pop(key, None)
        note = f"metadata drop {key}"
    else:
        new_meta[key] = value
        note = f"metadata {key} = {value!r}"
    st["__metadata__"] = new_meta
    return resigned(st, body), note


def _tensor_values(rng: random.Random, sample: Sample) -> tuple[bytes, str]:
    """Tensors edited with the real writer's format and the checksum recomputed."""
    tensors = {k: v.clone() for k, v in sample.tensors.items()}
    how = rng.choice(["value", "value", "cast", "cast", "reshape", "drop", "rename", "add", "empty"] if tensors
                     else ["add", "add-scalar"])
    name = rng.choice(sorted(tensors)) if tensors else "extra"
    note = how
    if how == "value":
        value = rng.choice([float("nan"), float("inf"), float("-inf"), 1e38, -1e-38, 0.0, 123.0])
        flat = tensors[name].view(-1)
        flat[rng.randrange(flat.numel())] = value
        note = f"{name}[i] = {value}"
    elif how == "cast":
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
                            torch.int8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
        tensors[name] = tensors[name].to(dtype)
        note = f"{name} as {dtype}"
    elif how == "reshape":
        t = tensors[name]
        tensors[name] = rng.choice([t.reshape(-1), t.reshape(1, -1), t.reshape(-1, 1), t.reshape(-1)[:1].reshape(()),
                                    t.reshape(-1)[:-1], t.unsqueeze(0).unsqueeze(0)])
        note = f"{name} shape {list(tensors[name].shape)}"
    elif how == "drop":
        del tensors[name]
    elif how == "rename":
        tensors[name + ".renamed"] = tensors.pop(name)
    elif how == "empty":
        tensors[name] = torch.zeros(0)
    elif how in ("add", "add-scalar"):
        tensors["extra"] = torch.tensor(1.0) if how == "add-scalar" else torch.randn(3)
    try:
        return signed(sample.header_text, tensors), note
    except Exception as exc:  # a dtype safetensors cannot write: fall back to a value edit
        return signed(sample.header_text, sample.tensors), f"{note} (unwritable: {type(exc).__name__}; unchanged)"


def _bytes(rng: random.Random, kind: str, data: bytes) -> tuple[bytes, str]:
    n = struct.unpack("<Q", data[:8])[0]
    out = bytearray(data)
    if kind in ("bit-flip", "header-bit-flip"):
        end = min(len(data), 8 + n) if kind == "header-bit-flip" else len(data)
        flips = [(rng.randrange(end), rng.randrange(8)) for _ in range(rng.choice([1, 1, 2, 4]))]
        for i, bit in flips:
            out[i] ^= 1 << bit
        return bytes(out), "bits " + ", ".join(f"{i}.{b}" for i, b in flips)
    if kind == "truncate":
        k = rng.randrange(len(data))
        return data[:k], f"first {k} bytes"
    if kind == "insert":
        i, k = rng.randrange(len(data) + 1), rng.choice([1, 1, 2, 8, 16])
        return data[:i] + rng.randbytes(k) + data[i:], f"{k} bytes at {i}"
    if kind == "delete":
        i, k = rng.randrange(len(data)), rng.choice([1, 1, 2, 8, 16])
        return data[:i] + data[i + k:], f"{k} bytes at {i}"
    if kind == "overwrite":
        i, k = rng.randrange(len(data)), rng.choice([1, 2, 8, 64])
        out[i:i + k] = rng.randbytes(k)
        return bytes(out[:len(data)]), f"{k} bytes at {i}"
    if kind == "copy-span":
        i, j, k = rng.randrange(len(data)), rng.randrange(len(data)), rng.choice([4, 16, 64])
        out[j:j + k] = data[i:i + k]
        return bytes(out[:len(data)]), f"{k} bytes from {i} to {j}"
    new = rng.choice([0, 1, n - 8, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**63, 2**64 - 1, rng.randrange(2**64)])
    return struct.pack("<Q", new) + data[8:], f"header length {new}"


def exact_mutants(samples: list[Sample]) -> list[Mutant]:
    """The cases the adversarial tester reported, for every sample: all must be refused."""
    return [Mutant(-1, "header-exact", s, signed(make(s.header), s.tensors), "refused", case)
            for s in samples for case, make in EXACT_CASES.items()]


def mutant(samples: list[Sample], seed: int, index: int) -> Mutant:
    """Random mutant ``index`` of the run seeded ``seed`` (rebuilt alone from the two numbers)."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    sample = rng.choice(samples)
    if kind in BYTE_KINDS:
        data, note = _bytes(rng, kind, sample.data)
        return Mutant(index, kind, sample, data, "same-or-refused", note)
    if kind == "header-reformat":
        text, note = _reformat(rng, sample.header)
        return Mutant(index, kind, sample, signed(text, sample.tensors), "same", note)
    if kind == "header-text":
        text, note = _header_text(rng, sample.header_text)
        return Mutant(index, kind, sample, signed(text, sample.tensors), "any", note)
    if kind == "tensor-meta":
        data, note = _tensor_meta(rng, sample)
        return Mutant(index, kind, sample, data, "any", note)
    if kind == "tensor-values":
        data, note = _tensor_values(rng, sample)
        return Mutant(index, kind, sample, data, "any", note)
    header, note = {"header-value": _header_value, "header-drop": _header_drop, "header-add": _header_add}[kind](rng, sample.header)
    return Mutant(index, kind, sample, signed(json.dumps(header), sample.tensors), "any", note)


def mutants(samples: list[Sample], n: int, seed: int) -> Iterator[Mutant]:
    """The exact cases, then random mutants up to ``n`` in all."""
    exact = exact_mutants(samples)
    yield from exact
    for index in range(max(0, n - len(exact))):
        yield mutant(samples, seed, index)


# ----------------------------------------------------------------------------- judging a load
class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Hang` in the block after ``seconds`` (main thread on Unix; elsewhere no limit)."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def unsound(concept: Concept) -> str | None:
    """Why a loaded concept is not fit to use (None when it is): the test oracle, written apart from the loader."""
    from personalize.methods import names

    h = concept.header
    try:
        json.dumps(h, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except Exception as exc:
        return f"header not strict JSON ({type(exc).__name__})"
    if type(h.get("format_version")) is not int or h["format_version"] != 1:
        return "format_version"
    if h.get("method") not in names():
        return "method"
    if not isinstance(h.get("token"), str) or not h["token"] or not isinstance(h.get("superclass"), str):
        return "token/superclass"
    for key in ("config", "inference_defaults", "provenance", "base_fingerprint"):
        if not isinstance(h.get(key), dict):
            return key
    try:
        fp = concept.base_fingerprint
    except Exception as exc:
        return f"base_fingerprint ({type(exc).__name__})"
    if not all(isinstance(v, str) for v in (fp.architecture, fp.tokenizer, fp.text_encoder)):
        return "base_fingerprint fields"
    if "tokens" in h and not (isinstance(h["tokens"], list) and all(isinstance(t, str) and t for t in h["tokens"])
                              and isinstance(h.get("superclasses"), list) and len(h["superclasses"]) == len(h["tokens"])):
        return "tokens"
    if "pipeline" in h and (not isinstance(h["pipeline"], str) or Path(h["pipeline"]).name != h["pipeline"]
                            or h["pipeline"] in ("", ".", "..") or "\\" in h["pipeline"]):
        return "pipeline"
    if "covariance" in h and not isinstance(h["covariance"], str) or "/" in str(h.get("covariance", "")):
        return "covariance"
    for name, t in concept.tensors.items():
        if not isinstance(name, str) or not t.is_floating_point() or not bool(torch.isfinite(t.float()).all()):
            return f"tensor {name[:40]!r}"
    return None


def same_content(concept: Concept, sample: Sample) -> bool:
    if concept.header != sample.header or set(concept.tensors) != set(sample.tensors):
        return False
    return all(t.dtype == sample.tensors[k].dtype and t.shape == sample.tensors[k].shape
               and torch.equal(t, sample.tensors[k]) for k, t in concept.tensors.items())


def judge(path: Path, m: Mutant, timeout: float) -> str:
    """Load the mutant written at ``path``: 'same', 'different', 'refused', or a failure ('crash: ...', 'hang',
    'unsound: ...', 'bad message: ...', 'unexpected: ...')."""
    path.write_bytes(m.data)
    try:
        with time_limit(timeout):
            concept = load_concept(path)
    except ConceptFileError as exc:
        message = str(exc)
        if "\n" in message or str(path) not in message:
            return f"bad message: {message[:200]!r}"
        outcome = "refused"
    except Hang:
        return "hang"
    except Exception as exc:  # noqa: BLE001 -- exactly what the fuzzer looks for
        return f"crash: {type(exc).__name__}: {str(exc)[:120]}"
    else:
        if same_content(concept, m.sample):
            outcome = "same"
        else:
            problem = unsound(concept)
            if problem:
                return f"unsound: {problem}"
            outcome = "different"
    return outcome if outcome in OK[m.expect] else f"unexpected: {outcome} (expected {m.expect})"


def run(samples: list[Sample], n: int, seed: int, folder: Path, timeout: float = 5.0) -> dict:
    """Judge ``n`` mutants; counts per kind and outcome, and the failures (each with what rebuilds it)."""
    counts: dict[str, dict[str, int]] = {k: {"n": 0, "same": 0, "different": 0, "refused": 0, "failed": 0} for k in KINDS}
    failures = []
    path = Path(folder) / "mutant.safetensors"
    began = time.perf_counter()
    for m in mutants(samples, n, seed):
        outcome = judge(path, m, timeout)
        row = counts[m.kind]
        row["n"] += 1
        if outcome in ("same", "different", "refused"):
            row[outcome] += 1
        else:
            row["failed"] += 1
            failures.append({"index": m.index, "kind": m.kind, "sample": m.sample.name, "note": m.note,
                             "outcome": outcome})
    return {"counts": counts, "failures": failures, "seconds": round(time.perf_counter() - began, 1),
            "failure_types": dict(Counter(_failure_type(f["outcome"]) for f in failures).most_common())}


def _failure_type(outcome: str) -> str:
    """'crash: KeyError: ...' -> 'crash: KeyError'; 'unsound: method' stays."""
    return ":".join(outcome.split(":")[:2]) if outcome.startswith("crash") else outcome.split(" (")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="mutants in all, the exact cases included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds one load may take before it is a hang")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        samples = sample_concepts(Path(tmp))
        result = run(samples, args.n, args.seed, Path(tmp), args.timeout)
    for kind, row in result["counts"].items():
        print(json.dumps({"kind": kind, **row}))
    total = {k: sum(row[k] for row in result["counts"].values()) for k in ("n", "same", "different", "refused", "failed")}
    print(json.dumps({"kind": "total", **total, "seed": args.seed, "seconds": result["seconds"],
                      "failure_types": result["failure_types"], "failures": result["failures"][:20]}))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
