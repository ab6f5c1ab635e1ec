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

Stock code next to attached concepts: ``ExtendedEmbedding`` is an ``nn.Embedding`` whose ``weight`` is the whole
table, so a stock ``pipe.load_textual_inversion`` works while concepts are attached and its tokens stay after
the last detach (``TokenSite._adopt``); a ``from_pipe`` twin made while attached holds our tokenizer copy, which
follows every later change (``TokenSite._follow``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..text_stack import pairs
from .sites import WrapsBaseLayer
from .state import pipeline_state, release


class ExtendedEmbedding(WrapsBaseLayer, nn.Embedding):
    """``base_layer`` for ids below its size; registered vectors for the ids after it.

    To stock code it is the whole table, an ``nn.Embedding`` (like ``sites.LinearSite``, it never ran the
    Embedding constructor): ``weight`` is base rows + our rows, so ``text_encoder.resize_token_embeddings`` and a
    stock ``pipe.load_textual_inversion`` work while concepts are attached. transformers' resize keeps this module
    and swaps ``weight.data`` for a grown table; the rows after ours (the stock loader's tokens) are then read from
    it, and :class:`TokenSite` makes them part of the base on the next change (``_adopt``)."""

    def __init__(self, base_layer: nn.Embedding, columns: slice = slice(None)):
        nn.Module.__init__(self)  # not nn.Embedding's constructor: the table is base_layer's
        self.base_layer = base_layer
        self.columns = columns  # this table's part of a token vector (SDXL: one encoder's)
        self.extra: list[tuple[int, torch.Tensor]] = []  # (first id, (n, d) tensor), set by TokenSite
        self._table: torch.Tensor | None = None  # the whole table, built when stock code reads ``weight``
        self._rows: int | None = None  # rows of ``_table`` once a stock resize grew it

    @property
    def ours(self) -> int:
        """The ids ``base_layer`` has plus the ones registered after it."""
        return self.base_layer.num_embeddings + sum(t.shape[0] for _, t in self.extra)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (no gradient): base rows, then our tokens' vectors, then rows a stock loader added."""
        base = self.base_layer.weight
        with torch.no_grad():
            ours = [v[:, self.columns].to(base.device, base.dtype) for _, v in self.extra]
            if self._table is None:
                self._table = torch.cat([base.detach(), *ours]).requires_grad_(base.requires_grad)
            elif ours:  # our vectors may have trained since: refresh their rows
                self._table.data[base.shape[0]:self.ours] = torch.cat(ours)
        return self._table

    @property
    def num_embeddings(self) -> int:
        return self._rows if self._rows is not None else self.ours

    @num_embeddings.setter
    def num_embeddings(self, rows: int) -> None:  # transformers' resize_token_embeddings sets it
        self._rows = int(rows)

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
        if self._rows is not None and self._rows > self.ours:  # tokens a stock loader added after ours
            rows = self._table.to(out.device, out.dtype)[ids.clamp(max=self._rows - 1)]
            out = torch.where((ids >= self.ours).unsqueeze(-1), rows, out)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class TokenSite:
    """All tokens added to one pipeline, in registration order."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.names = pairs(pipe)  # (tokenizer, text encoder) attributes
        self.originals = [(getattr(pipe, tok), getattr(pipe, te).get_input_embeddings()) for tok, te in self.names]
        # modules that are other objects holding the same table (T5's encoder.embed_tokens next to ``shared``):
        # set_input_embeddings replaces them too, so the last removal puts each back where it was
        self._twins = [_tied_embeddings(getattr(pipe, te), table) for (_, te), (_, table) in zip(self.names,
                                                                                                   self.originals)]
        self.entries: dict[str, tuple[list[str], torch.Tensor]] = {}
        self.aliases: dict[str, list[list[int]]] = {}  # key -> each tokenizer's id of the word its token stands for
        self._alias_hooks: list = []
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

    def add(self, key: str, tokens: list[str], vectors: torch.Tensor, alias: str | None = None) -> list[int]:
        """Register ``tokens`` (one row of ``vectors`` each) under ``key``; returns their ids. ``alias``: a word of
        the base vocabulary (one token in every tokenizer) the single token stands for (DreamBooth's identifier):
        the text encoders then read the word's own id where the token's is (:meth:`_read_aliases`), so that a
        CLIP pooling at a row's highest id (the legacy ``eos_token_id`` 2 of FLUX.1's and the real SD configs)
        pools where the stock pipeline prompted with the word does."""
        if vectors.shape[0] != len(tokens):
            raise ValueError("one vector per token")
        if vectors.shape[-1] != self.width:
            raise ValueError(f"token vectors are {vectors.shape[-1]} wide; this base's are {self.width}")
        for token in tokens:
            owner = self.owner_of(token)
            if owner is not None:
                raise ValueError(f"token {token!r} is already attached (by {owner})")
        self.entries[key] = (list(tokens), vectors)
        if alias is not None:
            self.aliases[key] = [base(alias, add_special_tokens=False).input_ids for base, _ in self.originals]
            if any(len(ids) != 1 for ids in self.aliases[key]) or len(tokens) != 1:
                del self.entries[key], self.aliases[key]
                raise ValueError(f"alias {alias!r} must be one token in every tokenizer, for one token")
        self._rebuild()
        return self.ids(key)

    def remove(self, key: str) -> None:
        self.entries.pop(key, None)
        self.aliases.pop(key, None)
        self._rebuild()

    def ids(self, key: str, tokenizer: str = "tokenizer") -> list[int]:
        """The ids of ``key``'s tokens in one of the pipeline's tokenizers (``tokenizer``: its attribute name)."""
        tokens, _ = self.entries[key]
        return getattr(self.pipe, tokenizer).convert_tokens_to_ids(tokens)

    def _adopt(self) -> None:
        """Tokens a stock ``load_textual_inversion`` added while ours were attached (after our ids, in the tokenizer
        copy; their rows in the grown table, ``ExtendedEmbedding._rows``) become part of the base: a copy of the
        original tokenizer with those tokens and a table of the base rows and theirs, which ``remove`` of the last
        concept leaves in the pipeline (as if the user had loaded them there). Any other replacement of a tokenizer
        or table under attached concepts is undone by the next change (the pipeline gets ours back)."""
        if not self._copies:
            return
        for k, ((tok_name, te_name), (original, table)) in enumerate(zip(self.names, self.originals)):
            tokenizer, embedding = self._copies[k], self.embeddings[k]
            grown = embedding._rows
            end = len(original) + sum(v.shape[0] for _, v in embedding.extra)  # ids after ours
            if (getattr(self.pipe, tok_name) is tokenizer and getattr(self.pipe, te_name).get_input_embeddings()
                    is embedding and grown is not None and len(tokenizer) > end and grown >= len(tokenizer)):
                found = sorted((i, t) for t, i in tokenizer.get_added_vocab().items() if i >= end)
                with torch.no_grad():
                    rows = embedding.weight.detach()[[i for i, _ in found]].to(table.weight.dtype)
                    adopted = nn.Embedding(len(original) + len(found), table.embedding_dim,
                                           device=table.weight.device, dtype=table.weight.dtype)
                    adopted.weight.copy_(torch.cat([table.weight.detach(), rows]))
                adopted.requires_grad_(table.weight.requires_grad)
                base = copy.deepcopy(original)
                base.add_tokens([t for _, t in found])
                self.originals[k] = (base, adopted)
                embedding.base_layer = adopted
                self._applied = []  # start again from the new base
            embedding._table, embedding._rows = None, None

    def _follow(self, old: list, new: list) -> None:
        """Tokenizer copies handed out before (a twin made with ``from_pipe`` while attached holds one) take the
        state of their replacement, so the twin reads what its shared text encoder now reads."""
        for before, after in zip(old, new):
            if before is not after and all(before is not o for o, _ in self.originals):
                before.__dict__.clear()
                before.__dict__.update(after.__dict__)

    def _rebuild(self) -> None:
        handed_out = list(self._copies)
        self._adopt()
        if not self.entries:
            self._copies, self._applied = [], []
            for (tok_name, te_name), (tokenizer, table), twins in zip(self.names, self.originals, self._twins):
                setattr(self.pipe, tok_name, tokenizer)
                getattr(self.pipe, te_name).set_input_embeddings(table)
                for parent, attr, module in twins:
                    setattr(parent, attr, module)
            self._follow(handed_out, [tokenizer for tokenizer, _ in self.originals])
            self._read_aliases()
            state = pipeline_state(self.pipe, create=False)
            if state is not None and state.tokens is self:
                state.tokens = None
                release(self.pipe)
            return
        # ids in key order, not attach order: a composition's ids (and so a CLIP that pools at the highest id, as
        # FLUX.1's and the real SD configs' legacy eos_token_id 2 makes it) do not depend on the order of attaching
        keys = sorted(self.entries)
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
            for tokens, vectors in (self.entries[key] for key in keys):
                extra.append((next_id, vectors))
                next_id += len(tokens)
            if len(tokenizer) != next_id:
                raise RuntimeError("tokenizer did not assign consecutive ids to the new tokens")
            embedding.extra = extra
            setattr(self.pipe, tok_name, tokenizer)
            getattr(self.pipe, te_name).set_input_embeddings(embedding)
            copies.append(tokenizer)
        self._copies, self._applied = copies, keys
        self._follow(handed_out, copies)
        self._read_aliases()

    def _read_aliases(self) -> None:
        """One forward pre-hook per text encoder while an aliased token is attached: it gives the encoder the
        alias word's id in place of the token's (the same embedding row: the token's vector is a copy of the
        word's). Removed with the last aliased token."""
        for handle in self._alias_hooks:
            handle.remove()
        self._alias_hooks = []
        if not self.aliases:
            return
        for k, (tok_name, te_name) in enumerate(self.names):
            tokenizer = getattr(self.pipe, tok_name)
            swaps = [(tokenizer.convert_tokens_to_ids(self.entries[key][0][0]), ids[k][0])
                     for key, ids in self.aliases.items()]
            self._alias_hooks.append(getattr(self.pipe, te_name).register_forward_pre_hook(
                _alias_hook(swaps), with_kwargs=True))

    def _count(self, keys: list[str]) -> int:
        return sum(len(self.entries[k][0]) for k in keys if k in self.entries)


def _alias_hook(swaps: list[tuple[int, int]]):
    """A text encoder's forward pre-hook reading each ``(token id, word id)`` pair's word id for the token's."""
    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            ids, args = args[0], args[1:]
        elif isinstance(kwargs.get("input_ids"), torch.Tensor):
            ids = kwargs.pop("input_ids")
        else:
            return None
        for token_id, word_id in swaps:
            ids = torch.where(ids == token_id, torch.full_like(ids, word_id), ids)
        return (ids, *args), kwargs

    return hook


def _tied_embeddings(text_encoder: nn.Module, table: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, attribute, module)`` of every embedding module in ``text_encoder`` other than ``table`` that
    holds ``table``'s weight tensor (tied: e.g. ``T5EncoderModel.encoder.embed_tokens`` and ``shared``)."""
    weight = getattr(table, "weight", None)
    return [(parent, attr, child) for parent in text_encoder.modules() for attr, child in parent._modules.items()
            if isinstance(child, nn.Embedding) and child is not table and weight is not None
            and getattr(child, "weight", None) is weight]


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
