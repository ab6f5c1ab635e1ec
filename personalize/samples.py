"""A samples folder, as ``personalize generate`` writes it: ``<stem>.png`` files and ``prompts.json`` (stem -> prompt).

:func:`read_samples` (and :func:`prompt_table` under it) is the one reader: the CLI's ``evaluate`` and ``toyworld score``, the toy world's measurers
and its base-model grid all list a folder's images and prompts through it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

from .errors import BadInputError
from .prompts import read_prompts

PROMPTS_FILE = "prompts.json"
PathLike = Union[str, Path]


def prompt_table(folder: PathLike, prompts: Union[None, PathLike, Mapping[str, str]] = None, *,
                 flag: Optional[str] = None) -> dict[str, str]:
    """The stem -> prompt table of a samples folder: ``prompts`` itself (a mapping), the JSON file ``prompts``
    names, or (None) ``folder/prompts.json``. Errors are one-line BadInputErrors naming ``flag`` (the option
    the folder came from, e.g. ``--samples``): a folder that is not one or has no ``prompts.json`` (when the
    table is read from it), a table that is not a stem -> prompt mapping (:func:`~personalize.prompts.read_prompts`).
    """
    if isinstance(prompts, Mapping):
        return dict(prompts)
    if prompts is not None:
        return read_prompts(Path(prompts))
    folder = Path(folder)
    where = f"{flag} '{folder}'" if flag else f"'{folder}'"
    if not folder.is_dir():
        raise BadInputError(f"{where} is not a folder; pass the folder 'personalize generate --out' wrote")
    if not (folder / PROMPTS_FILE).is_file():
        raise BadInputError(f"{where} has no {PROMPTS_FILE}; point it at a folder written by 'personalize generate'")
    return read_prompts(folder / PROMPTS_FILE)


def read_samples(folder: PathLike, prompts: Union[None, PathLike, Mapping[str, str]] = None, *,
                 flag: Optional[str] = None, need_images: bool = False) -> list[tuple[Path, str]]:
    """(``folder/<stem>.png``, prompt) for each stem of the :func:`prompt_table` whose PNG is there, sorted by
    stem. With ``need_images``, a table none of whose images is in the folder is a one-line BadInputError."""
    folder = Path(folder)
    table = prompt_table(folder, prompts, flag=flag)
    found = [(folder / f"{stem}.png", prompt) for stem, prompt in sorted(table.items())
             if (folder / f"{stem}.png").is_file()]
    if need_images and not found:
        where = f"{flag} '{folder}'" if flag else f"'{folder}'"
        raise BadInputError(f"{where}: none of the {len(table)} images {PROMPTS_FILE} names is there")
    return found


__all__ = ["PROMPTS_FILE", "prompt_table", "read_samples"]
