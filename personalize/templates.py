"""Neutral training prompts, class phrases and token bookkeeping.

The neutral context templates follow the style of the CLIP ImageNet templates
the Perfusion paper samples from (§4.5): they name the object and nothing else
about the scene, so the concept absorbs appearance, not context.
"""
from __future__ import annotations

import unicodedata

from .errors import BadInputError

TOKEN_MAX = 64
TOKEN_BYTES_MAX = 128  # UTF-8: file names are built from tokens (<token>.safetensors), 255 bytes per name on Linux
TOKEN_RULE = (f"a token is 1-{TOKEN_MAX} characters ({TOKEN_BYTES_MAX} UTF-8 bytes) without spaces, control "
              "characters, '/', '\\' or '..', e.g. '<my-teddy>'")

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


def check_template(text, what: str) -> str:
    """``text`` if it is a prompt template naming the concept exactly once as ``{}`` (no other braces), else a
    one-line BadInputError naming ``what``."""
    if not isinstance(text, str) or text.count("{}") != 1 or "{" in text.replace("{}", "") \
            or "}" in text.replace("{}", ""):
        raise BadInputError(f"{what} must name the concept exactly once as {{}} and hold no other braces, e.g. "
                            f"'a photo of a {{}}'; it reads {shown(text)}")
    return text


def word_position(tokenizer, template: str, word: str) -> int:
    """Index (BOS counted) of the first token of ``word`` in ``fill(template, word)``."""
    prefix = template.split("{}")[0].strip()
    n_prefix = len(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else 0
    return 1 + n_prefix


PHRASE_MAX = 16  # tokens: every method's prompts ("a photo of a V* <phrase>", the class prompts) keep room in CLIP's 75


def phrase_ids(tokenizer, phrase: str) -> list[int]:
    """The token ids of a class phrase ("dog", "penguin plushie", "teddybear" = teddy + bear), >= 1 of them.

    CLIP's BPE splits on whitespace first, so the phrase has the same ids alone and inside any prompt."""
    if not isinstance(phrase, str) or not phrase.strip():
        raise BadInputError(f"superclass {shown(phrase)} is empty; give the class in a few words, e.g. 'dog' or "
                            "'penguin plushie'")
    if any(unicodedata.category(c).startswith("C") for c in phrase):
        raise BadInputError(f"superclass {shown(phrase)} has control characters; give plain words, e.g. 'dog'")
    ids = tokenizer(phrase, add_special_tokens=False).input_ids
    if not ids:
        raise BadInputError(f"superclass {shown(phrase)} has no tokens; give the class in a few words, e.g. 'dog'")
    if len(ids) > PHRASE_MAX:
        raise BadInputError(f"superclass {shown(phrase)} is {len(ids)} tokens, at most {PHRASE_MAX} fit every "
                            "method's prompts; shorten it to the class, e.g. 'penguin plushie'")
    return ids


def check_phrases_without_tokens(tokens, phrases) -> None:
    """Refuse a class phrase that contains a concept token of the run (``--superclass '<x> toy'`` with
    ``--token '<x>'``): the "class" prompts would name the concept itself, and Perfusion's key lock would read the
    concept in place of its superclass. Tokens match case-insensitively, as the tokenizer matches added tokens."""
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    phrases = [phrases] if isinstance(phrases, str) else list(phrases)
    for phrase in phrases:
        for token in tokens:
            if isinstance(phrase, str) and isinstance(token, str) and token and token.lower() in phrase.lower():
                raise BadInputError(f"superclass {shown(phrase)} contains the concept token {shown(token)}; the "
                                    "superclass names what the concept is without it, e.g. 'teddy' for "
                                    f"{shown(token)}")


def phrase_last_position(tokenizer, template: str, phrase: str) -> int:
    """Index (BOS counted) of the *last* token of ``phrase`` in ``fill(template, phrase)`` (for a one-token phrase,
    :func:`word_position`)."""
    return word_position(tokenizer, template, phrase) + len(phrase_ids(tokenizer, phrase)) - 1


def shown(text, limit: int = 70) -> str:
    """``text`` for an error line: quoted, control characters escaped, cut to ``limit`` characters."""
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def token_problem(token) -> str | None:
    """What is wrong with ``token`` as a placeholder string (None: nothing).

    Tokens become prompt words and file names (``personalize export``: ``<token>.pt``), so one rule holds
    wherever they enter (train, import, a concept file's header, ``token=`` renames): 1-64 characters, no
    whitespace, no control or invisible format characters, no path separators, no ``..``, and at most
    TOKEN_BYTES_MAX UTF-8 bytes, so a file name made from it (plus its suffix and an atomic write's temp) fits
    the 255 bytes a file name may have.
    """
    if not isinstance(token, str):
        return f"it is a {type(token).__name__}, not text"
    if not token:
        return "it is empty"
    if len(token) > TOKEN_MAX:
        return f"it is {len(token)} characters long"
    if len(token.encode("utf-8", "surrogatepass")) > TOKEN_BYTES_MAX:  # wide characters: 3-4 bytes each
        return f"it is {len(token.encode('utf-8', 'surrogatepass'))} bytes long in UTF-8"
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
