"""Exceptions the CLI turns into one-line messages with exit code 2.

Library code raises these (never prints or exits); each message names the
problem and what to do about it.
"""


class PersonalizeError(Exception):
    """Base class for user-facing errors (bad input, incompatible files)."""


class BadInputError(PersonalizeError):
    """An argument, image folder or word the user gave cannot be used."""


class BaseModelError(PersonalizeError):
    """A base model could not be loaded."""


class ConceptFileError(PersonalizeError):
    """A concept file is unreadable, tampered with or made for another base."""


class CheckpointError(PersonalizeError):
    """A training checkpoint is missing or does not match the run."""
