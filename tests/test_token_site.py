"""The token seam on one and two text encoders: ids after the base vocabulary, each table reading its slice of a
token vector, the tokenizer copy grown while concepts are only added, and a removal renumbering the rest."""
from __future__ import annotations

import copy

import pytest
import torch

from personalize import load_base, text_stack
from personalize.edits.tokens import token_site


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def master(request):
    return load_base(request.param)


def vectors(pipe, n: int, fill: float) -> torch.Tensor:
    return torch.full((n, sum(text_stack.widths(pipe))), fill) + torch.arange(sum(text_stack.widths(pipe)))


def embed(pipe, k: int, word: str) -> torch.Tensor:
    tok, te = text_stack.pairs(pipe)[k]
    ids = getattr(pipe, tok)(word, add_special_tokens=False, return_tensors="pt").input_ids
    return getattr(pipe, te).get_input_embeddings()(ids)[0]


def test_add_grow_remove_and_restore(master):
    pipe = copy.deepcopy(master)
    originals = [getattr(pipe, tok) for tok, _ in text_stack.pairs(pipe)]
    site = token_site(pipe)
    size = len(originals[0])
    a, b, c = vectors(pipe, 1, 1.0), vectors(pipe, 2, 2.0), vectors(pipe, 1, 3.0)
    assert site.add("A", ["<a>"], a) == [size]
    grown = [getattr(pipe, tok) for tok, _ in text_stack.pairs(pipe)]
    assert site.add("B", ["<b>", "<b>_1"], b) == [size + 1, size + 2]
    # only added to: the same copies grew (no new copy); the originals were never touched
    assert [getattr(pipe, tok) for tok, _ in text_stack.pairs(pipe)] == grown
    assert all(len(o) == size for o in originals)
    start = 0
    for k, width in enumerate(text_stack.widths(pipe)):  # each encoder reads its own columns of the vector
        columns = slice(start, start + width)
        assert torch.equal(embed(pipe, k, "<a>"), a[:, columns])
        assert torch.equal(embed(pipe, k, "<b> <b>_1"), b[:, columns])
        same_ids = getattr(pipe, text_stack.pairs(pipe)[k][0])("<a> <b>", add_special_tokens=False).input_ids
        assert same_ids == [size, size + 1]  # the same ids in both SDXL tokenizers
        start += width
    site.remove("A")  # a removal renumbers what is left, in a fresh copy
    assert site.ids("B") == [size, size + 1]
    assert all(getattr(pipe, tok) is not g for (tok, _), g in zip(text_stack.pairs(pipe), grown))
    assert site.add("C", ["<c>"], c) == [size + 2]
    assert torch.equal(embed(pipe, 0, "<c>"), c[:, :text_stack.widths(pipe)[0]])
    assert pipe.tokenizer("<a>", add_special_tokens=False).input_ids != [size]  # gone
    site.remove("B")
    site.remove("C")
    assert [getattr(pipe, tok) for tok, _ in text_stack.pairs(pipe)] == originals
    for (_, te), table in zip(text_stack.pairs(pipe), [o for _, o in site.originals]):
        assert getattr(pipe, te).get_input_embeddings() is table


def test_a_token_vector_of_another_width_is_refused(master):
    pipe = copy.deepcopy(master)
    with pytest.raises(ValueError, match="wide"):
        token_site(pipe).add("A", ["<a>"], torch.zeros(1, sum(text_stack.widths(pipe)) + 1))
