"""Small pieces several methods share: knob checks, token vectors, tensor-set checks."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..edits.state import pipeline_state, release
from ..edits.tokens import base_tokenizer
from ..errors import BadInputError, ConceptFileError
from ..text_stack import pairs


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def vector_tokens(token: str, n: int) -> list[str]:
    """The strings of an ``n``-vector token, as diffusers names them: ``<t>``, ``<t>_1``, ... ``<t>_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


@torch.no_grad()
def word_vector(pipe, word: str, single: bool = False, what: str = "", clip_only: bool = False) -> torch.Tensor:
    """The base input embedding of ``word``: its row, or the mean of its pieces' rows (``single``: one token only;
    ``what`` names the setting in the error; ``clip_only``: ``single`` binds only CLIP's BPE tokenizers, and T5's
    SentencePiece, which has no rare whole-word piece to match a late BPE merge, takes the mean of the word's
    pieces). With several text encoders, each encoder's rows side by side (``edits/tokens.py``), each read with
    its own tokenizer's ids (SDXL's two share CLIP's; T5 has its own)."""
    rows = []
    for tok_name, te_name in pairs(pipe):
        tokenizer = base_tokenizer(pipe, tok_name)
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise BadInputError(f"'{word}' has no tokens; give a word such as 'sks' or the superclass")
        if single and len(ids) != 1 and not (clip_only and type(tokenizer).__name__.startswith("T5")):
            which = "" if tok_name == "tokenizer" else f" ({tok_name})"
            raise BadInputError(f"{what + ' ' if what else ''}'{word}' is {len(ids)} tokens in this base's "
                                f"tokenizer{which}; pick a single-token, rarely used word such as 'sks' or 'httr'")
        table = getattr(pipe, te_name).get_input_embeddings()
        table = getattr(table, "base_layer", table)
        rows.append(table.weight[ids].detach().float().mean(0).to(pipe.text_encoder.device))
    return torch.cat(rows).clone()


def expect_tensors(method: str, expected: Iterable[str], tensors: dict) -> None:
    """The concept's tensor names must be exactly ``expected`` (else: made for another base or another setting)."""
    expected = set(expected)
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ConceptFileError(
            f"{method} tensors do not match this base and config (missing {missing[:2]}, unexpected {extra[:2]}); "
            "use the base it was trained on"
        )


def load_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], method: str) -> None:
    """Copy ``tensors[name]`` into each ``params[name]`` in place, checking shapes."""
    expect_tensors(method, params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ConceptFileError(f"{method} tensor {name} is {tuple(t.shape)}, this base needs {tuple(p.shape)}; "
                                       "use the base it was trained on")
            p.copy_(t.to(p.device, p.dtype))


def cpu_float(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def words_of(token, superclass) -> tuple[list[str], list[str]]:
    """Tokens and superclasses of a run as two lists of the same length."""
    tokens, superclasses = as_list(token), as_list(superclass)
    if len(superclasses) == 1 and len(tokens) > 1:
        superclasses = superclasses * len(tokens)
    if len(tokens) != len(superclasses):
        raise BadInputError(f"{len(tokens)} tokens but {len(superclasses)} superclasses; give one superclass per token")
    return tokens, superclasses


def single_tokens(words: Sequence[str]) -> None:
    if len(set(w.lower() for w in words)) != len(words):
        raise BadInputError(f"tokens {', '.join(words)} repeat; give each concept its own token")


# ----------------------------------------------------------------------------- methods that replace the base
def mark_replaced(pipe, key: str | None) -> None:
    """Record (``key``) or clear (None) the concept that swapped the pipeline's UNet."""
    state = pipeline_state(pipe, create=key is not None)
    if state is not None:
        state.replaced_by = key
        release(pipe)


def replaced_by(pipe) -> str | None:
    state = pipeline_state(pipe, create=False)
    return state.replaced_by if state is not None else None


def has_attachments(pipe) -> bool:
    """Whether any concept is attached to ``pipe`` (every concept adds a token; the pipeline state knows)."""
    state = pipeline_state(pipe, create=False)
    return state is not None and not state.empty()


def check_composable(pipe, method_cls, count: int = 1) -> None:
    """Refuse to attach next to a concept that replaced the base, or such a concept next to anything."""
    if replaced_by(pipe):
        raise BadInputError(f"a DreamBooth concept ({replaced_by(pipe)}) is attached and replaces the UNet; "
                            "DreamBooth concepts cannot be composed: detach it first")
    if not method_cls.composable and (count > 1 or has_attachments(pipe)):
        raise BadInputError(f"{method_cls.name} concepts replace the UNet and cannot be composed with other concepts; "
                            "attach it alone (detach the others first)")
