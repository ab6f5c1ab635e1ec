"""What a concept must match in the base it is attached to: architecture, tokenizer, text-encoder weights.

With two text encoders (SDXL), each of the three covers both: the second encoder's config, the second
tokenizer's vocabulary and padding token, and the second encoder's weights (names prefixed ``text_encoder_2.``).

Only the *base* counts. Attached concepts (our token rows and site wrappers),
peft adapters (a stock ``load_lora_weights``) and tokens added by a stock
``load_textual_inversion`` (which grows the tokenizer, the embedding table and
``config.vocab_size``, and leaves ``vocab_size`` grown after
``unload_textual_inversion``) are left out: the base vocabulary is the
tokenizer's own (``tokenizer.vocab_size``, ids of added tokens above it not
counted), and only its embedding rows are hashed.

The text-encoder weights must match whatever dtype either pipeline runs in. No
exact hash of rounded values can make fp32, fp16 and bf16 copies agree in
general (an fp16 and a bf16 rounding of one fp32 weight round again to
different bf16 values about 1 time in 16), so the fingerprint keeps:

- ``text_encoder``: the weights rounded to fp16, hashed (the original field;
  ``digest`` still covers only architecture, tokenizer and this, so digests and
  old concept files are unchanged for fp32/fp16 pipelines);
- ``text_encoder_bf16``: the weights rounded to bf16, hashed;
- ``precision``: the coarsest dtype of the weights hashed (fp32, fp16, bf16);
- ``text_encoder_sample``: 256 weights at fixed positions (float32 bits, hex).

Two fingerprints compare at the coarser of their precisions: fp32/fp16 by the
fp16 hash, anything with bf16 by the bf16 hash (exact: rounding an fp32 or a
bf16 copy to bf16 gives the same bits). Only an fp16 copy against a bf16 copy
of fp32 weights can disagree in those hashes; it passes if the 256 sampled
weights agree within bf16 rounding (so a change of only a few weights can go
unseen in that one case). A concept written before these fields existed is
checked by the fp16 hash, which a bf16 pipeline cannot reproduce.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass

import torch

from . import families

COARSENESS = {"fp32": 0, "fp16": 1, "bf16": 2}
SAMPLES = 256
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Fingerprint:
    """What a concept must match in the base it is attached to (see the module docstring)."""

    architecture: str
    tokenizer: str
    text_encoder: str
    text_encoder_bf16: str = ""
    precision: str = ""
    text_encoder_sample: str = ""
    family: str = ""  # sd1 | sd2 | sdxl (text_stack.family); absent in older files

    @property
    def digest(self) -> str:
        legacy = {"architecture": self.architecture, "tokenizer": self.tokenizer, "text_encoder": self.text_encoder}
        return hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v}

    def differences(self, other: "Fingerprint") -> list[str]:
        """Names of the parts that differ from ``other`` (``architecture``, ``tokenizer``, ``text_encoder``)."""
        found = [k for k in ("architecture", "tokenizer") if getattr(self, k) != getattr(other, k)]
        return found + ([] if self.same_text_encoder(other) else ["text_encoder"])

    def same_text_encoder(self, other: "Fingerprint") -> bool:
        precisions = {self.precision or "fp32", other.precision or "fp32"}
        if "bf16" not in precisions:
            return self.text_encoder == other.text_encoder
        if not (self.text_encoder_bf16 and other.text_encoder_bf16):
            return False  # an old fingerprint: fp16-rounded weights only
        if self.text_encoder_bf16 == other.text_encoder_bf16:
            return True
        return precisions == {"fp16", "bf16"} and _samples_close(self.text_encoder_sample, other.text_encoder_sample)


def _samples_close(a: str, b: str) -> bool:
    """The sampled weights agree within the rounding of a bf16 copy and an fp16 copy of one value."""
    try:
        xs, ys = _floats(a), _floats(b)
    except (ValueError, struct.error):
        return False
    if not xs or len(xs) != len(ys):
        return False
    return all(abs(x - y) <= 2.0 ** -7 * max(abs(x), abs(y)) + 2.0 ** -24 for x, y in zip(xs, ys))


def _floats(text: str) -> list[float]:
    raw = bytes.fromhex(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw)) if len(raw) % 4 == 0 else []


def _hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# keys that change when a model is saved/loaded or converted, not when its architecture does
_VOLATILE_CONFIG_KEYS = ("transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path")


def _config_dict(config) -> dict:
    data = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def base_vocab_size(pipe, tokenizer, text_encoder: str = "text_encoder") -> int:
    """Rows of a text encoder's embedding table that belong to the base vocabulary (tokens added to the tokenizer
    after its own vocabulary, e.g. by ``load_textual_inversion``, are not counted)."""
    from .edits.sites import inner_layer

    te = getattr(pipe, text_encoder)
    rows = min(te.config.vocab_size, inner_layer(te.get_input_embeddings()).num_embeddings)
    added = sum(1 for i in tokenizer.get_added_vocab().values() if i >= tokenizer.vocab_size)
    return rows - added


def base_text_encoder_tensors(pipe, vocab_sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
    """The text encoders' own weights by canonical name (sorted): no wrappers, adapters or added token rows
    (``vocab_sizes``: each encoder's base rows). A second encoder's (SDXL) names start with ``text_encoder_2.``;
    the first's carry no prefix."""
    from .edits.sites import inner_layer
    from .text_stack import pairs

    found = {}
    for k, (_, te_name) in enumerate(pairs(pipe)):
        te = getattr(pipe, te_name)
        prefix = "" if k == 0 else f"{te_name}."
        table = inner_layer(te.get_input_embeddings()).weight
        for name, tensor in te.state_dict().items():
            parts = name.split(".")
            if "personalize_" in name or any(p.startswith("lora_") for p in parts):
                continue
            if tensor.data_ptr() == table.data_ptr() and tensor.shape == table.shape:
                tensor = tensor[:vocab_sizes[k]]
            found[prefix + ".".join(p for p in parts if p != "base_layer")] = tensor
    return sorted(found.items())


def fingerprint(pipe) -> Fingerprint:
    """Fingerprint of the parts of ``pipe`` a concept depends on.

    Attached concepts do not change it: their extra token rows and wrappers are
    skipped, so a pipeline fingerprints the same before and after ``attach``.
    """
    from .edits.tokens import base_tokenizer
    from .text_stack import pairs

    names = pairs(pipe)
    sizes = [base_vocab_size(pipe, base_tokenizer(pipe, tok), te) for tok, te in names]
    te_config = dict(_config_dict(pipe.text_encoder.config), vocab_size=sizes[0])
    family = families.of(pipe)  # its denoiser's config under its attribute name ("unet": SD hashes unchanged)
    parts = {family.denoiser: _config_dict(family.denoiser_of(pipe).config), "text_encoder": te_config}
    vocab = _vocab(base_tokenizer(pipe), sizes[0])
    if len(names) > 1:  # SDXL, SD3, Flux: the other encoders and tokenizers count too (SD 1.x/2.x hashes unchanged)
        vocab = {"tokenizer": vocab}
        for (tok_name, te_name), size in zip(names[1:], sizes[1:]):
            tokenizer = base_tokenizer(pipe, tok_name)
            parts[te_name] = dict(_config_dict(getattr(pipe, te_name).config), vocab_size=size)
            vocab[tok_name] = _vocab(tokenizer, size)
            vocab["pad_" + tok_name.rsplit("_", 1)[-1]] = tokenizer.pad_token
    architecture = _hash_json(parts)
    tokenizer = _hash_json(vocab)
    tensors = base_text_encoder_tensors(pipe, sizes)
    fp16, bf16 = rounded_hashes(tensors)
    return Fingerprint(architecture=architecture, tokenizer=tokenizer, text_encoder=fp16, text_encoder_bf16=bf16,
                       precision=precision_of(tensors), text_encoder_sample=_sample(tensors), family=family.name)


def _vocab(tokenizer, size: int) -> list[tuple[int, str]]:
    return sorted((i, t) for t, i in tokenizer.get_vocab().items() if i < size)


def rounded_hashes(tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, str]:
    """The named tensors rounded to fp16 and to bf16, each hashed (16 hex digits): an fp32, fp16 or bf16 copy of the
    same weights gives the same hash at its own precision or coarser (see the module docstring)."""
    fp16, bf16 = hashlib.sha256(), hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu")
        for digest, dtype in ((fp16, torch.float16), (bf16, torch.bfloat16)):
            t = tensor.to(dtype).contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(t.shape)).encode())
            digest.update(memoryview(t.view(torch.int16).numpy()))  # the bytes, without a copy
    return fp16.hexdigest()[:16], bf16.hexdigest()[:16]


def precision_of(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """The coarsest dtype among the tensors: fp32, fp16 or bf16."""
    return max((_DTYPES.get(t.dtype, "fp32") for _, t in tensors), key=COARSENESS.get, default="fp32")


def weights_digest(modules) -> str:
    """A digest of whole modules' weights (DreamBooth's trained UNet and text encoders) that an fp16 or bf16 copy of
    them reproduces: ``v2:<fp16 hash>:<bf16 hash>:<precision>`` (:func:`rounded_hashes`, names prefixed by the
    module's position)."""
    tensors = [(f"{k}.{n}", t) for k, m in enumerate(modules) for n, t in sorted(m.state_dict().items())
               if t.is_floating_point()]
    return "v2:{}:{}:{}".format(*rounded_hashes(tensors), precision_of(tensors))


def same_weights(recorded: str, found: str) -> bool:
    """Two :func:`weights_digest` values of one set of weights, compared at the coarser precision: fp32/fp16 copies
    by the fp16 hash, anything with bf16 by the bf16 hash (an fp16 copy against a bf16 copy of fp32 weights can
    round differently; it is refused)."""
    a, b = recorded.split(":"), found.split(":")
    if len(a) != 4 or len(b) != 4:
        return False
    return a[2] == b[2] if "bf16" in (a[3], b[3]) else a[1] == b[1]


def _sample(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """``SAMPLES`` weights evenly spaced over all tensors in canonical order, as little-endian float32 hex."""
    sizes = [t.numel() for _, t in tensors]
    total = sum(sizes)
    if not total:
        return ""
    picks, start, k = [], 0, 0
    positions = [(j * total) // SAMPLES for j in range(SAMPLES)]
    for (_, tensor), size in zip(tensors, sizes):
        local = [p - start for p in positions[k:] if p < start + size]
        if local:
            flat = tensor.detach().reshape(-1)
            picks.append(flat[torch.tensor(local, device=flat.device)].to("cpu", torch.float32))
            k += len(local)
        start += size
    return torch.cat(picks).numpy().astype("<f4").tobytes().hex()
