"""The token seam: new token vectors after the frozen vocabulary.

The text encoder's embedding table is never trained or modified. New tokens
get ids ``V, V+1, ...`` (V = base vocabulary size) in a *copy* of the
pipeline's tokenizer, and an :class:`ExtendedEmbedding` looks their vectors up
in Parameters owned by whoever registered them. When the last token is
removed, the original tokenizer and embedding objects are put back.

A base with two text encoders (SDXL) gets each token in both tokenizers (the
same ids: they share the vocabulary) and both embedding tables: a token's
vector is the two encoders' vectors side by side (``text_stack.widths``), and
each table reads its own slice of it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..text_stack import pairs
from .state import pipeline_state, release


class ExtendedEmbedding(nn.Module):
    """``base_layer`` for ids below its size; registered vectors for the ids after it."""

    def __init__(self, base_layer: nn.Embedding, columns: slice = slice(None)):
        super().__init__()
        self.base_layer = base_layer
        self.columns = columns  # this table's part of a token vector (SDXL: one encoder's)
        self.extra: list[tuple[int, torch.Tensor]] = []  # (first id, (n, d) tensor), set by TokenSite

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings + sum(t.shape[0] for _, t in self.extra)

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.base_layer.num_embeddings
        out = self.base_layer(ids.clamp(max=size - 1))
        for first, vectors in self.extra:
            offset = ids - first
            hit = (offset >= 0) & (offset < vectors.shape[0])
            # no `if hit.any()`: that would make the host wait for the device at every encoding
            rows = vectors[:, self.columns].to(out.dtype)[offset.clamp(0, vectors.shape[0] - 1)]
            out = torch.where(hit.unsqueeze(-1), rows, out)
        return out


class TokenSite:
    """All tokens added to one pipeline, in registration order."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.names = pairs(pipe)  # (tokenizer, text encoder) attributes
        self.originals = [(getattr(pipe, tok), getattr(pipe, te).get_input_embeddings()) for tok, te in self.names]
        self.entries: dict[str, tuple[list[str], torch.Tensor]] = {}
        self._copies: list = []  # the tokenizer copies in the pipeline now, holding the tokens of ``_applied``
        self._applied: list[str] = []
        start, self.embeddings = 0, []
        for _, table in self.originals:
            width = table.embedding_dim
            self.embeddings.append(ExtendedEmbedding(table, slice(start, start + width)))
            start += width
        self.width = start

    @property
    def original_tokenizer(self):
        return self.originals[0][0]

    @property
    def original_embedding(self) -> nn.Embedding:
        return self.originals[0][1]

    @property
    def embedding(self) -> ExtendedEmbedding:
        return self.embeddings[0]

    @property
    def base_vocab_size(self) -> int:
        return self.original_embedding.num_embeddings

    def owner_of(self, token: str) -> str | None:
        for key, (tokens, _) in self.entries.items():
            if token.lower() in (t.lower() for t in tokens):
                return key
        return None

    def add(self, key: str, tokens: list[str], vectors: torch.Tensor) -> list[int]:
        """Register ``tokens`` (one row of ``vectors`` each) under ``key``; returns their ids."""
        if vectors.shape[0] != len(tokens):
            raise ValueError("one vector per token")
        if vectors.shape[-1] != self.width:
            raise ValueError(f"token vectors are {vectors.shape[-1]} wide; this base's are {self.width}")
        for token in tokens:
            owner = self.owner_of(token)
            if owner is not None:
                raise ValueError(f"token {token!r} is already attached (by {owner})")
        self.entries[key] = (list(tokens), vectors)
        self._rebuild()
        return self.ids(key)

    def remove(self, key: str) -> None:
        self.entries.pop(key, None)
        self._rebuild()

    def ids(self, key: str) -> list[int]:
        tokens, _ = self.entries[key]
        return self.pipe.tokenizer.convert_tokens_to_ids(tokens)

    def _rebuild(self) -> None:
        if not self.entries:
            self._copies, self._applied = [], []
            for (tok_name, te_name), (tokenizer, table) in zip(self.names, self.originals):
                setattr(self.pipe, tok_name, tokenizer)
                getattr(self.pipe, te_name).set_input_embeddings(table)
            state = pipeline_state(self.pipe, create=False)
            if state is not None and state.tokens is self:
                state.tokens = None
                release(self.pipe)
            return
        keys = list(self.entries)
        # a tokenizer copy costs a good part of a second: while concepts are only added, the current copy gets
        # just the new tokens; a removal (or a copy someone else grew) starts again from the original
        grow = keys[:len(self._applied)] == self._applied and all(
            getattr(self.pipe, tok) is c and len(c) == len(o) + self._count(self._applied)
            for (tok, _), c, (o, _) in zip(self.names, self._copies, self.originals)) if self._copies else False
        copies = []
        for (tok_name, te_name), (original, _), embedding, k in zip(self.names, self.originals, self.embeddings,
                                                                    range(len(self.names))):
            tokenizer = self._copies[k] if grow else copy.deepcopy(original)
            for key in keys[len(self._applied):] if grow else keys:
                tokenizer.add_tokens(list(self.entries[key][0]))
            extra, next_id = [], len(original)
            for tokens, vectors in self.entries.values():
                extra.append((next_id, vectors))
                next_id += len(tokens)
            if len(tokenizer) != next_id:
                raise RuntimeError("tokenizer did not assign consecutive ids to the new tokens")
            embedding.extra = extra
            setattr(self.pipe, tok_name, tokenizer)
            getattr(self.pipe, te_name).set_input_embeddings(embedding)
            copies.append(tokenizer)
        self._copies, self._applied = copies, keys

    def _count(self, keys: list[str]) -> int:
        return sum(len(self.entries[k][0]) for k in keys if k in self.entries)


def token_site(pipe) -> TokenSite:
    """The pipeline's token site (created on first use)."""
    state = pipeline_state(pipe)
    if state.tokens is None:
        state.tokens = TokenSite(pipe)
    return state.tokens


def base_tokenizer(pipe, name: str = "tokenizer"):
    """The pipeline's tokenizer (``name``: SDXL's ``tokenizer_2``) without any attached tokens."""
    state = pipeline_state(pipe, create=False)
    site = state.tokens if state is not None else None
    if site is None:
        return getattr(pipe, name)
    return dict(zip((tok for tok, _ in site.names), (t for t, _ in site.originals)))[name]
