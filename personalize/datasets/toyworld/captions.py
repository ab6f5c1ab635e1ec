"""Caption parser: prompt -> structured attributes of the toy world.

Handles the world's own captions ("a small red star on the left and a large
blue circle on the right, on a yellow background") and personalization prompts
("a photo of a <tok>", "a <tok> on the left, on a green background",
"a sks star at the top"). A concept placeholder stands for an object of the
concept's superclass shape; its own appearance (colour) is not a stated attribute.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .world import COLORS, SHAPES

POSITION_WORDS = {
    "left": "left", "right": "right", "top": "top", "bottom": "bottom",
    "center": "center", "centre": "center", "middle": "center",
}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_PLACEHOLDER_RE = re.compile(r"<[^<>\s]+>")
_BG_RE = re.compile(r",?\s*(?:on|against|with|over)\s+(?:an?\s+|the\s+)?(\w+)\s+background")
_PREFIX_RE = re.compile(r"^\s*(?:a|an)\s+(?:photo|picture|image|rendering|drawing)\s+of\s+(?=(?:a|an|the)\b)")


@dataclass
class ParsedObject:
    shape: Optional[str] = None
    color: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    concept: bool = False  # this object is the concept placeholder

    def stated(self) -> dict[str, str]:
        """Attributes the prompt states for this object (the concept's own colour is never one)."""
        out = {}
        for k in ("shape", "color", "size", "position"):
            v = getattr(self, k)
            if v is not None and not (self.concept and k == "color"):
                out[k] = v
        return out


@dataclass
class ParsedPrompt:
    background: Optional[str] = None
    objects: list[ParsedObject] = field(default_factory=list)

    @property
    def mentions_concept(self) -> bool:
        return any(o.concept for o in self.objects)

    def n_stated(self) -> int:
        return (self.background is not None) + sum(len(o.stated()) for o in self.objects)


def parse_prompt(prompt: str, placeholder: Optional[str] = None, superclass: Optional[str] = None) -> ParsedPrompt:
    """Parse a toy-world prompt.

    ``placeholder``: the concept token (e.g. "<tok>" or "sks"); by default any ``<...>`` word is one.
    ``superclass``: the concept's shape; given, the placeholder object gets that shape.
    """
    text = prompt.strip().lower().rstrip(".")
    ph = placeholder.lower() if placeholder else None
    if ph:
        text = text.replace(ph, " __concept__ ")
    text = _PLACEHOLDER_RE.sub(" __concept__ ", text)
    result = ParsedPrompt()
    m = _BG_RE.search(text)
    if m:
        word = m.group(1)
        result.background = word if word in COLORS else None
        text = text[: m.start()] + text[m.end():]
    text = _PREFIX_RE.sub("", text)
    for phrase in re.split(r"\band\b|,|;", text):
        words = re.findall(r"[a-z_]+", phrase)
        if not words:
            continue
        obj = ParsedObject()
        has_noun = False
        for w in words:
            if w == "__concept__":
                obj.concept = True
                has_noun = True
                if superclass and obj.shape is None:
                    obj.shape = superclass
            elif w in SHAPE_WORDS:
                obj.shape = SHAPE_WORDS[w]  # "a sks star": the word after the placeholder names its class
                has_noun = True
            elif w in SIZE_WORDS:
                obj.size = SIZE_WORDS[w]
            elif w in COLORS:
                obj.color = w
            elif w in POSITION_WORDS:
                obj.position = POSITION_WORDS[w]
        if has_noun:
            result.objects.append(obj)
        elif obj.position is not None and result.objects and result.objects[-1].position is None:
            result.objects[-1].position = obj.position  # "a star, on the left"
    return result


def parse_world_caption(caption: str) -> ParsedPrompt:
    return parse_prompt(caption)


__all__ = ["ParsedObject", "ParsedPrompt", "parse_prompt", "parse_world_caption"]
