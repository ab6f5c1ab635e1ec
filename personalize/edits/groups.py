"""Concepts that share one occupant per site, and the one join/leave lifecycle for them.

Some methods combine all their attached concepts in one computation per site:
Perfusion's J-concept edit of every ``to_k``/``to_v`` (one shared projection),
Personalized Residuals' masked sum at every ``proj_out``. Such a method names a
:class:`SiteGroup` subclass; the first concept to join creates the group and
puts the group's occupant at every site of the group's kind, later concepts
only join it, and the last one to leave takes the occupants out again (which
restores the original modules). Members are kept sorted by token, so the order
of attaching never changes the output. The group lives in the pipeline's state
(``state.py``).
"""
from __future__ import annotations

from typing import Callable, ClassVar

from ..families import denoiser

from .placement import site_names
from .sites import occupy, vacate
from .state import pipeline_state, release


class SiteGroup:
    """All concepts of one kind attached to one pipeline, with one occupant per site."""

    KEY: ClassVar[str]  # occupant key at every site, and the group's name in the pipeline state
    KIND: ClassVar[str]  # the site kind (``placement.site_names``)

    def __init__(self, pipe):
        self.pipe = pipe
        self.members: list = []

    def occupant(self, site: str) -> Callable:
        """The occupant for the site called ``site``."""
        raise NotImplementedError

    def admit(self, member) -> None:
        """Refuse a member that cannot share this group (raise); the default admits everyone."""

    def changed(self) -> None:
        """Called after every join and leave (e.g. to install or remove a hook the members need)."""

    @property
    def sites(self) -> list[str]:
        return site_names(denoiser(self.pipe), self.KIND)


def join(pipe, key: str, make: Callable[[], SiteGroup], member) -> SiteGroup:
    """Add ``member`` to the pipeline's group ``key`` (built with ``make()`` and placed at its sites if new)."""
    state = pipeline_state(pipe)
    group = state.groups.get(key)
    if group is None:
        group = make()
        placed = []
        try:
            for site in group.sites:
                occupy(denoiser(pipe), site, key, group.occupant(site))
                placed.append(site)
        except BaseException:
            for site in placed:
                vacate(denoiser(pipe), site, key)
            release(pipe)
            raise
        state.groups[key] = group
    try:
        group.admit(member)
    except BaseException:
        if not group.members:
            _dissolve(pipe, group)
        raise
    group.members = sorted([*group.members, member], key=lambda m: m.token)
    group.changed()
    return group


def leave(pipe, group: SiteGroup, member) -> None:
    """Take ``member`` out of ``group``; the last one out removes the group's occupants."""
    group.members = [m for m in group.members if m is not member]
    group.changed()
    if not group.members:
        _dissolve(pipe, group)


def _dissolve(pipe, group: SiteGroup) -> None:
    for site in group.sites:
        vacate(denoiser(pipe), site, group.KEY)
    state = pipeline_state(pipe, create=False)
    if state is not None and state.groups.get(group.KEY) is group:
        del state.groups[group.KEY]
        release(pipe)
