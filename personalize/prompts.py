"""The prompt rules, checked wherever a prompt is given, and a generation folder's ``prompts.json``.

- A prompt must say something: an empty (or blank) one is refused.
- The text encoder reads 77 CLIP tokens, the start and end markers included, so 75 of the prompt's own (Flux:
  its T5 reads ``max_sequence_length``; the family's ``prompt_tokenizer`` decides). Cut silently, a longer prompt would lose its last words, a concept's token among them; it is refused instead,
  whether or not a concept's token is past the cut (the message says when one is).
- A prompt naming none of the attached concepts' tokens is allowed (the base alone, for comparison), but the
  CLI warns: the concept would not show.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import BadInputError

MAX_TOKENS = 77  # CLIP's context, start and end markers included


def check_prompt_text(prompt: str, flag: str = "--prompt") -> str:
    """Refuse an empty or blank prompt."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadInputError(f"{flag} is empty; describe the image, e.g. 'a photo of a <my-teddy> on the beach'")
    return prompt


def missing_tokens(prompt: str, tokens: Sequence[str]) -> list[str]:
    """The concept ``tokens`` the prompt does not contain (added tokens match case-insensitively)."""
    lowered = prompt.lower()
    return [t for t in tokens if t.lower() not in lowered]


def check_prompt_length(pipe, prompt: str, flag: str = "--prompt", convert: bool = True) -> None:
    """Refuse a prompt longer than the text encoder reads (as the pipeline tokenizes it, concepts attached).

    ``convert=False``: the prompt already spells out multi-vector tokens (a training prompt)."""
    from .families import of

    family = of(pipe)
    name = family.prompt_tokenizer
    tokenizer = getattr(pipe, name)
    if convert and hasattr(pipe, "maybe_convert_prompt"):  # a multi-vector token <t> becomes '<t> <t>_1 ...', as when sampling
        prompt = pipe.maybe_convert_prompt(prompt, tokenizer)
    limit = family.max_length(pipe, name)
    if name == "tokenizer":  # CLIP reads 77 whatever the tokenizer file says
        limit = min(int(limit or MAX_TOKENS), MAX_TOKENS)
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    if len(ids) <= limit:
        return
    marks = len(tokenizer("", verbose=False).input_ids)  # start and end markers (CLIP 2, T5 only the end: 1)
    dropped = ids[limit - 1:-1]  # what a cut to ``limit`` would lose (the end marker stays)
    concepts = _added_tokens(pipe, dropped, tokenizer)
    lost = f", so the concept token {', '.join(concepts)} would be lost" if concepts else ""
    raise BadInputError(f"{flag} is {len(ids) - marks} tokens, more than the {limit - marks} the text encoder reads; "
                        f"the words after '{tokenizer.decode(ids[limit - 3:limit - 1]).strip()}' would be cut{lost}; "
                        f"shorten {'the prompt' if flag.startswith('--') else 'it'}")


def check_captions(pipe, captions: Sequence[str | None], image_paths: Sequence[Path], words: Sequence[str],
                   labels: Sequence[int], templates: Sequence[str] = ()) -> None:
    """Each photo's caption, and each training template (``{}`` filled with each concept's training words, the
    tokens in the tokenizer), within what the text encoder reads: a longer one is refused, never cut
    (:func:`check_prompt_length`), naming the caption file (or the template) and its token count. Cut, a caption
    with ``{}`` after the cut would train that photo without the concept."""
    from .templates import fill

    for caption, path, label in zip(captions, image_paths, labels):
        if caption is not None:
            check_prompt_length(pipe, fill(caption, words[label]), flag=f"caption '{Path(path).with_suffix('.txt')}'",
                                convert=False)
    for template in templates:
        for word in dict.fromkeys(words):
            check_prompt_length(pipe, fill(template, word), flag=f"the training prompt {template!r} for {word!r}",
                                convert=False)


def _added_tokens(pipe, ids: Sequence[int], tokenizer) -> list[str]:
    """The attached concepts' tokens among ``ids`` of ``tokenizer`` (ids past its base vocabulary)."""
    from .edits.tokens import base_tokenizer

    name = next(n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if getattr(pipe, n, None) is tokenizer)
    base_size = len(base_tokenizer(pipe, name))
    return sorted({t for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))) if i >= base_size})


def read_prompts(path: str | Path) -> dict[str, str]:
    """A ``prompts.json`` (image stem -> prompt), or a one-line BadInputError saying what is wrong with it."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"'{path}' is not valid JSON ({type(exc).__name__}); it maps image stems to prompts, "
                            "as 'personalize generate' writes it") from exc
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        kind = type(table).__name__ if not isinstance(table, dict) else "mapping with values that are not text"
        raise BadInputError(f"'{path}' is a {kind}; it must map image stems to prompts "
                            '({"stem": "a photo of ..."}), as \'personalize generate\' writes it')
    return table
