"""Neutral training prompts and token bookkeeping.

The neutral context templates follow the style of the CLIP ImageNet templates
the Perfusion paper samples from (§4.5): they name the object and nothing else
about the scene, so the concept absorbs appearance, not context.
"""
from __future__ import annotations

from .errors import BadInputError

NEUTRAL_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def fill(template: str, words: str) -> str:
    return template.replace("{}", words)


def word_position(tokenizer, template: str, word: str) -> int:
    """Index (BOS counted) of the first token of ``word`` in ``fill(template, word)``."""
    prefix = template.split("{}")[0].strip()
    n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
    return 1 + n_prefix


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` if it is exactly one token, else a BadInputError with alternatives."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise BadInputError(f"superclass '{word}' is empty; give a single common word such as 'dog' or 'teapot'")
    pieces = [p.replace("</w>", "") for p in tokenizer.convert_ids_to_tokens(ids)]
    options = [p for p in dict.fromkeys(pieces) if p.isalpha() and len(tokenizer(p, add_special_tokens=False).input_ids) == 1]
    hint = f"try {' or '.join(repr(o) for o in options)}" if options else "use a shorter, common word"
    raise BadInputError(
        f"superclass '{word}' is {len(ids)} tokens ({' + '.join(pieces)}), it must be one token; {hint}"
    )


def check_new_token(tokenizer, token: str) -> None:
    """Refuse a placeholder that already means something to the tokenizer."""
    if not token or any(c.isspace() for c in token):
        raise BadInputError(f"token '{token}' must be one word without spaces, e.g. '<my-teddy>'")
    vocab = tokenizer.get_vocab()
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if token.lower() in vocab or token.lower() + "</w>" in vocab or len(ids) == 1:
        raise BadInputError(
            f"token '{token}' is already in the vocabulary (id {ids[0] if ids else vocab.get(token.lower())}); "
            f"pick a new string such as '<{token.strip('<>')}-1>'"
        )
