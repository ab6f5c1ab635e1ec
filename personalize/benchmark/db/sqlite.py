"""The embedded backend: the queue in one SQLite file beside the run's outputs (``OUT/benchmark.sqlite``).

Processes of one machine share it safely (WAL, ``BEGIN IMMEDIATE`` claims). SQLite's locks are not reliable on
network filesystems, so a file on NFS, SMB, 9p, sshfs … is refused: several machines share a PostgreSQL queue.
"""
from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote
from typing import Optional

from ...errors import BadInputError
from .mounts import network_filesystem
from .queue import BenchmarkQueue


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=120, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=120000")
    _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file (sqlite.org/fileformat.html)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that never writes the file (nor creates one): ``status`` and ``report`` read a
    running, finished or read-only run. On a read-only filesystem a WAL database cannot get its shared-memory
    file, so it is then opened ``immutable`` (nothing can be writing it there)."""
    base = f"file:{quote(str(path.resolve()))}?mode=ro"
    for uri in (base, base + "&immutable=1"):
        conn = None
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=120, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=120000")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:  # "attempt to write a readonly database", "unable to open ..."
            if conn is not None:
                conn.close()
            if "locked" in str(exc) or uri.endswith("immutable=1"):
                raise
    raise AssertionError("unreachable")


def _retry_locked(op, deadline: float = 120.0):
    """Run ``op``, retrying while SQLite answers 'database is locked' without waiting for the lock.

    Switching a new file to WAL needs an exclusive lock, and SQLite refuses at once (the busy timeout does not
    apply) when two processes open the same new database together, as every rank of a launch does.
    """
    end = time.monotonic() + deadline
    while True:
        try:
            return op()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > end:
                raise
            time.sleep(0.02 + random.random() * 0.08)


class BenchmarkDB(BenchmarkQueue):
    """The queue in a SQLite file (the default; one machine)."""

    def __init__(self, path: str | Path, create: bool = True, mounts: Optional[str | Path] = None):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise BadInputError(f"no benchmark database at {self.path}; "
                                "run 'personalize benchmark run SPEC.yaml' first")
        fstype = network_filesystem(self.path.parent, mounts)
        if fstype:
            raise BadInputError(f"{self.path} is on a network filesystem ({fstype}) where SQLite's locks are "
                                "unreliable; put --out on a local disk, or share the run between machines with "
                                "--db postgresql://user@host/dbname")
        if not create:
            try:
                with open(self.path, "rb") as f:
                    head = f.read(len(MAGIC))
            except OSError as exc:
                raise BadInputError(f"cannot read {self.path}: {exc.strerror}") from None
            if head != MAGIC:  # an empty or foreign file is refused before SQLite could turn it into a database
                what = "an empty file" if not head else "not an SQLite file"
                raise BadInputError(f"{self.path} is {what}, not a benchmark database; give the "
                                    "OUT/benchmark.sqlite that 'personalize benchmark run' writes")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = _connect(self.path) if create else _connect_readonly(self.path)
            if not create and not self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='units'").fetchone():
                raise sqlite3.DatabaseError("no units table")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise BadInputError(f"{self.path} is not a benchmark database (or is still being created); "
                                "give the OUT/benchmark.sqlite that 'personalize benchmark run' writes") from None
        self._setup(create)

    @property
    def where(self) -> str:
        return str(self.path)

    def _open(self) -> sqlite3.Connection:
        return _connect(self.path)  # heartbeats: only a worker, which opened the file to write, opens more

    def _begin(self, exclusive: bool) -> list[str]:
        return ["BEGIN IMMEDIATE"]  # SQLite has one writer at a time: every write transaction is exclusive


__all__ = ["BenchmarkDB"]
