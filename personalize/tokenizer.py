"""The Stable Diffusion 1.x CLIP tokenizer, built offline from open_clip's BPE file.

SD 1.x uses OpenAI CLIP's byte-level BPE (49,408 tokens). ``open_clip_torch``
ships the same merges as ``bpe_simple_vocab_16e6.txt.gz``; rebuilding the
vocabulary from it in the order CLIP does gives identical ids, e.g.
"a photo of a dog" -> 49406 320 1125 539 320 1929 49407.
"""
from __future__ import annotations

import functools
import gzip

SD_VOCAB_SIZE = 49408
MAX_LENGTH = 77


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != SD_VOCAB_SIZE:  # pragma: no cover - guards against a changed open_clip file
        raise RuntimeError(f"open_clip BPE file gave {len(vocab)} tokens, expected {SD_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer():
    """Return a fresh ``transformers.CLIPTokenizer`` identical to SD 1.x's, with no network access."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)


def token_pieces(tokenizer, text: str) -> list[str]:
    """The BPE pieces ``text`` splits into (no BOS/EOS)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.convert_ids_to_tokens(ids)


#: DreamBooth's default identifier, one piece in the tiny T5 vocabulary as in CLIP's (the identifier must be one
#: token in every tokenizer of a base: ``methods/identifier.py``)
T5_TINY_IDENTIFIERS = ("sks",)
T5_TINY_WORDS = 4000  # whole words of the tiny T5 vocabulary (the real T5 has 32,000 pieces and 100 extra ids)


@functools.lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """A small SentencePiece-style unigram vocabulary: T5's special tokens at T5's ids (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2), then the ``T5_TINY_WORDS`` most frequent whole English words of the CLIP BPE file as ``▁word``
    pieces (scored by rank), then single characters (scored low), so every ASCII text tokenizes."""
    vocab, _ = _vocab_and_merges()
    words = [tok[:-4] for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])
             if tok.endswith("</w>") and tok[:-4].isascii() and tok[:-4].isalpha() and len(tok) > 5]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in T5_TINY_IDENTIFIERS]
    seen = {p for p, _ in pieces}
    for rank, word in enumerate(words[:T5_TINY_WORDS]):
        piece = "▁" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -3.0 - rank * 1e-3))
    for c in (chr(i) for i in range(33, 127)):
        for piece in (c, "▁" + c):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -20.0))
    return tuple(pieces)


def build_t5_tokenizer(model_max_length: int = 512):
    """A small T5 tokenizer (``transformers.T5TokenizerFast``, unigram, ``▁`` word marks, ``</s>`` appended) for
    the built-in random test bases: the real bases load the hub's own T5 tokenizer from their folder."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length)
