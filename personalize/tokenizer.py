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
