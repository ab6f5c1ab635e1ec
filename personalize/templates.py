"""Neutral training prompts and token bookkeeping.

The neutral context templates follow the style of the CLIP ImageNet templates
the Perfusion paper samples from (§4.5): they name the object and nothing else
about the scene, so the concept absorbs appearance, not context.
"""
from __future__ import annotations

import unicodedata

from .errors import BadInputError

TOKEN_MAX = 64
TOKEN_RULE = (f"a token is 1-{TOKEN_MAX} characters without spaces, control characters, '/', '\\' or '..', "
              "e.g. '<my-teddy>'")

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


def shown(text, limit: int = 70) -> str:
    """``text`` for an error line: quoted, control characters escaped, cut to ``limit`` characters."""
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def token_problem(token) -> str | None:
    """What is wrong with ``token`` as a placeholder string (None: nothing).

    Tokens become prompt words and file names (``personalize export``: ``<token>.pt``), so one rule holds
    wherever they enter (train, import, a concept file's header, ``token=`` renames): 1-64 characters, no
    whitespace, no control or invisible format characters, no path separators, no ``..``.
    """
    if not isinstance(token, str):
        return f"it is a {type(token).__name__}, not text"
    if not token:
        return "it is empty"
    if len(token) > TOKEN_MAX:
        return f"it is {len(token)} characters long"
    if any(c.isspace() for c in token):
        return "it has whitespace"
    if any(unicodedata.category(c).startswith("C") for c in token):
        return "it has control characters"
    if "/" in token or "\\" in token:
        return "it has a path separator"
    if ".." in token:
        return "it has '..'"
    return None


def check_token(token, where: str = "token", fix: str = "") -> str:
    """``token`` if it follows the token rule (:func:`token_problem`), else a one-line BadInputError.

    ``where`` names the source in the message (``--token``, a concept file ...); ``fix`` is appended."""
    problem = token_problem(token)
    if problem:
        raise BadInputError(f"{where}: {shown(token)} is not a valid token ({problem}); {TOKEN_RULE}"
                            + (f"; {fix}" if fix else ""))
    return token


def check_new_token(tokenizer, token: str) -> None:
    """Refuse a placeholder that breaks the token rule or already means something to the tokenizer."""
    check_token(token)
    vocab = tokenizer.get_vocab()
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if token.lower() in vocab or token.lower() + "</w>" in vocab or len(ids) == 1:
        raise BadInputError(
            f"token '{token}' is already in the vocabulary (id {ids[0] if ids else vocab.get(token.lower())}); "
            f"pick a new string such as '<{token.strip('<>')}-1>'"
        )
