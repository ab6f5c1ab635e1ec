"""The benchmark's row queue: SQLite beside the outputs by default, PostgreSQL for several machines.

``open_db(target)`` takes a path (a SQLite file) or a ``postgresql://`` URL; both give a :class:`BenchmarkQueue`
with the same rows, claims, heartbeats and recovery (see ``queue.py``).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import BadInputError

from .postgres import PostgresDB, check_url, is_postgres_url, is_url, redact
from .queue import BenchmarkQueue
from .sqlite import BenchmarkDB


def open_db(target: str | Path, create: bool = True) -> BenchmarkQueue:
    """The queue at ``target``: a ``postgresql://`` URL, or else the path of a SQLite file."""
    if is_postgres_url(target):
        return PostgresDB(str(target), create=create)
    if is_url(target):  # another scheme: not a file name, and maybe holding a password
        raise BadInputError(f"'{redact(str(target))}' is not a PostgreSQL URL; give postgresql://user@host/dbname "
                            "or the path of OUT/benchmark.sqlite")
    return BenchmarkDB(target, create=create)


__all__ = ["BenchmarkDB", "BenchmarkQueue", "PostgresDB", "check_url", "is_postgres_url", "is_url", "open_db", "redact"]
