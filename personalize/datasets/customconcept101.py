"""CustomConcept101 reader: a user-provided folder into typed records. Never downloads.

Layout::

    <root>/dataset.json                list of concept dicts
    <root>/dataset_multiconcept.json   list of [concept, concept, {"prompt_filename_compose": ...}]
    <root>/prompts/<name>.txt          one prompt per line ({} or {0}/{1} slots)
    <root>/benchmark_dataset/<concept_dir>/*.jpg|png

Prompt slots are filled with "<token> <class>", e.g. "<new1> barn".

The public list of the 101 concepts (names, categories, class phrases, instance
prompts, prompt files; no images) ships as ``customconcept101_concepts.json``,
read by :func:`cc101_concepts`; it was built from the dataset's public
``customconcept101/dataset.json`` (adobe-research/custom-diffusion).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from ..errors import BadInputError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
CATEGORIES = ("transport", "plushie", "things", "pet", "scene", "wearable", "decoritems", "furniture", "toy",
              "luggage", "instrument", "actionfigure", "person", "flower", "jewelry", "dish")
_TOKEN_RE = re.compile(r"<[^<>\s]+>")


def read_prompt_file(path: Union[str, Path]) -> list[str]:
    """Non-empty lines, stripped (tolerates trailing spaces, CRLF, no final newline)."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"CustomConcept101: prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"CustomConcept101: prompt file {path} is not UTF-8 text (byte {exc.start}); save it "
                            "as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class CC101Concept:
    name: str                 # concept dir name, e.g. "scene_barn"
    category: str             # dir prefix, e.g. "scene"
    token: str                # e.g. "<new1>"
    class_word: str           # e.g. "barn"
    instance_prompt: str      # e.g. "photo of a <new1> barn"
    instance_dir: Path
    class_dir: Optional[Path]
    prompt_file: Path
    images: tuple[Path, ...]
    prompt_templates: tuple[str, ...]

    @property
    def subject(self) -> str:
        return f"{self.token} {self.class_word}"

    @property
    def prompts(self) -> list[str]:
        return [t.replace("{}", self.subject) for t in self.prompt_templates]

    @property
    def superclass_prompts(self) -> list[str]:
        """The prompts with the class word alone in the slot (Perfusion's normalisation)."""
        return [t.replace("{}", self.class_word) for t in self.prompt_templates]


@dataclass(frozen=True)
class CC101Composition:
    concepts: tuple[CC101Concept, CC101Concept]
    prompt_file: Path
    prompt_templates: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.concepts[0].name}+{self.concepts[1].name}"

    @property
    def prompts(self) -> list[str]:
        a, b = self.concepts
        return [t.replace("{0}", a.subject).replace("{1}", b.subject) for t in self.prompt_templates]


@dataclass
class CustomConcept101:
    root: Path
    concepts: list[CC101Concept] = field(default_factory=list)
    compositions: list[CC101Composition] = field(default_factory=list)

    def concept(self, name: str) -> CC101Concept:
        for c in self.concepts:
            if c.name == name:
                return c
        raise BadInputError(f"CustomConcept101: no concept named {name!r} in {self.root}")

    def by_category(self) -> dict[str, list[CC101Concept]]:
        out: dict[str, list[CC101Concept]] = {}
        for c in self.concepts:
            out.setdefault(c.category, []).append(c)
        return out


@dataclass(frozen=True)
class CC101Entry:
    """One concept of CustomConcept101's public list (no images)."""

    name: str             # its benchmark_dataset folder, e.g. "plushie_penguin"
    category: str         # the folder's prefix, e.g. "plushie"
    class_phrase: str     # the dataset's class_prompt, e.g. "penguin plushie" (one or several CLIP tokens)
    instance_prompt: str  # e.g. "photo of a <new1> penguin plushie"
    prompt_file: str      # e.g. "prompts/plushie.txt"


def cc101_concepts() -> list[CC101Entry]:
    """The 101 concepts of CustomConcept101 in ``dataset.json`` order, from the package data."""
    from importlib.resources import files

    data = json.loads(files(__package__).joinpath("customconcept101_concepts.json").read_text(encoding="utf-8"))
    return [CC101Entry(**entry) for entry in data["concepts"]]


def _resolve(root: Path, rel: str) -> Path:
    return (root / rel).resolve() if not Path(rel).is_absolute() else Path(rel)


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise BadInputError(f"CustomConcept101: {what} not found: {path} (point at the folder holding it; "
                            "images and json are a separate download, we never fetch them)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"CustomConcept101: {path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(f"CustomConcept101: {path} is not UTF-8 JSON (byte {exc.start}); save it as UTF-8") from None


def _string(entry: dict, key: str, where: str, optional: bool = False):
    """``entry[key]`` as a non-empty string (``optional``: or absent / null), else one line naming the field."""
    value = entry.get(key)
    if optional and value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        found = "an empty string" if isinstance(value, str) else f"a {type(value).__name__}"
        raise BadInputError(f"CustomConcept101: {where} {key!r} must be a non-empty string, not {found}")
    if "\x00" in value:
        raise BadInputError(f"CustomConcept101: {where} {key!r} contains a NUL character")
    return value


_REQUIRED = ("instance_prompt", "class_prompt", "instance_data_dir", "prompt_filename")


def _parse_concept(root: Path, entry, where: str, check_images: bool) -> CC101Concept:
    if not isinstance(entry, dict):
        raise BadInputError(f"CustomConcept101: {where} is not an object")
    for key in _REQUIRED:
        if key not in entry:
            raise BadInputError(f"CustomConcept101: {where} lacks {key!r}")
        _string(entry, key, where)
    _string(entry, "class_data_dir", where, optional=True)
    tokens = _TOKEN_RE.findall(entry["instance_prompt"])
    if len(tokens) != 1:
        raise BadInputError(f"CustomConcept101: {where} instance_prompt {entry['instance_prompt']!r} "
                            "must contain exactly one <token>")
    instance_dir = _resolve(root, entry["instance_data_dir"])
    name = instance_dir.name
    images: tuple[Path, ...] = ()
    if check_images:
        if not instance_dir.is_dir():
            raise BadInputError(f"CustomConcept101: image folder missing for {name}: {instance_dir} "
                                f"(from {where} instance_data_dir)")
        images = tuple(sorted(p for p in instance_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise BadInputError(f"CustomConcept101: no .jpg/.png images in {instance_dir} ({name})")
    prompt_file = _resolve(root, entry["prompt_filename"])
    templates = tuple(read_prompt_file(prompt_file))
    if not templates:
        raise BadInputError(f"CustomConcept101: prompt file {prompt_file} is empty ({name})")
    class_dir = _resolve(root, entry["class_data_dir"]) if entry.get("class_data_dir") else None
    return CC101Concept(name=name, category=name.split("_", 1)[0], token=tokens[0],
                        class_word=entry["class_prompt"].strip(), instance_prompt=entry["instance_prompt"],
                        instance_dir=instance_dir, class_dir=class_dir, prompt_file=prompt_file,
                        images=images, prompt_templates=templates)


def load_customconcept101(root: Union[str, Path], multiconcept: bool = True,
                          check_images: bool = True) -> CustomConcept101:
    """Read and validate a CC101 folder. Errors are one-line BadInputErrors naming the missing path."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BadInputError(f"CustomConcept101: folder not found: {root}")
    root = root.resolve()
    for sub in ("prompts", "benchmark_dataset") if check_images else ("prompts",):
        if not (root / sub).is_dir():
            raise BadInputError(f"CustomConcept101: missing folder {root / sub}")
    entries = _load_json(root / "dataset.json", "dataset.json")
    if not isinstance(entries, list):
        raise BadInputError(f"CustomConcept101: {root / 'dataset.json'} must hold a list of concepts")
    data = CustomConcept101(root=root)
    for i, entry in enumerate(entries):
        data.concepts.append(_parse_concept(root, entry, f"dataset.json entry {i}", check_images))
    if multiconcept:
        multi = _load_json(root / "dataset_multiconcept.json", "dataset_multiconcept.json")
        if not isinstance(multi, list):
            raise BadInputError(f"CustomConcept101: {root / 'dataset_multiconcept.json'} must hold a list")
        for i, triple in enumerate(multi):
            where = f"dataset_multiconcept.json entry {i}"
            if not isinstance(triple, list) or len(triple) != 3 or not isinstance(triple[2], dict) \
                    or "prompt_filename_compose" not in triple[2]:
                raise BadInputError(f"CustomConcept101: {where} must be [concept, concept, "
                                    "{\"prompt_filename_compose\": ...}]")
            a = _parse_concept(root, triple[0], f"{where}[0]", check_images)
            b = _parse_concept(root, triple[1], f"{where}[1]", check_images)
            pf = _resolve(root, _string(triple[2], "prompt_filename_compose", where))
            templates = tuple(read_prompt_file(pf))
            if not templates:
                raise BadInputError(f"CustomConcept101: prompt file {pf} is empty ({where})")
            data.compositions.append(CC101Composition(concepts=(a, b), prompt_file=pf, prompt_templates=templates))
    return data


__all__ = ["CATEGORIES", "CC101Composition", "CC101Concept", "CC101Entry", "CustomConcept101", "cc101_concepts",
           "load_customconcept101", "read_prompt_file"]
