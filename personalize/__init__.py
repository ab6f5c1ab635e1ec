"""personalize: teach a text-to-image model your own concepts.

    from personalize import load_base, train, attach, generate
    pipe = load_base("tiny")
    path = train(pipe, "photos/", token="<teddy>", superclass="teddy", out="teddy.safetensors")
    with attach(pipe, path, beta=0.7):
        images = generate(pipe, "a <teddy> on the beach", num_images=4)
"""
from .base import fingerprint, load_base
from .compose import Attachment, attach, load_base_for
from .concept import Concept, load_concept, save_concept
from .errors import PersonalizeError
from .generation import generate
from .training import train

__all__ = [
    "Attachment",
    "Concept",
    "PersonalizeError",
    "attach",
    "fingerprint",
    "generate",
    "load_base",
    "load_base_for",
    "load_concept",
    "save_concept",
    "train",
]
__version__ = "0.1.0"
