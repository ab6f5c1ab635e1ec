"""The queue in PostgreSQL, for a benchmark spread over several machines (``--db postgresql://user@host/dbname``).

Claims lock the one row they take (``SELECT … FOR UPDATE SKIP LOCKED``), so workers on any number of machines
claim in parallel without waiting on each other; the rarer changes that must not interleave (the plan, worker
registrations, taking back rows of dead workers) hold a transaction-scoped advisory lock instead of SQLite's
``BEGIN IMMEDIATE``. Heartbeats use the server's clock, so hosts whose clocks disagree still judge each other
alive or dead correctly (a worker on another host is dead when its heartbeat is older than ``STALE_AFTER``).

The driver is psycopg 3, imported only when a ``postgresql://`` URL is given (``pip install 'psycopg[binary]'``).
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ...errors import BadInputError
from .queue import BenchmarkQueue

SCHEMES = ("postgresql://", "postgres://")
LOCK_KEY = 0x70657273  # the advisory lock taken by exclusive transactions ("pers"); per database
INSTALL = "pip install 'psycopg[binary]'  (or: pip install 'personalize[postgres]')"


def is_postgres_url(target) -> bool:
    return isinstance(target, str) and target.startswith(SCHEMES)


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and reports."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def _driver():
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:
        raise BadInputError(f"--db postgresql://… needs the psycopg driver: {INSTALL}") from None
    return psycopg, dict_row


class PostgresDB(BenchmarkQueue):
    """The queue in a PostgreSQL database (one database, or one schema via ``?options=-csearch_path=…``, per run)."""

    placeholder = "%s"
    real_type, big_type = "DOUBLE PRECISION", "BIGINT"
    claim_lock = " FOR UPDATE OF u SKIP LOCKED"

    def __init__(self, url: str, create: bool = True):
        self.url = url
        psycopg, _ = _driver()
        try:
            self.conn = self._open()
            missing = not create and self.execute("SELECT to_regclass('units') AS t").fetchone()["t"] is None
        except psycopg.Error as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise BadInputError(f"cannot use PostgreSQL at {self.where}: {reason}; check the URL, that the server "
                                "is reachable and that the database exists (createdb NAME)") from None
        if missing:
            self.conn.close()
            raise BadInputError(f"{self.where} holds no benchmark; run 'personalize benchmark run SPEC.yaml "
                                f"--db {self.where}' first")
        self._setup(create)

    @property
    def where(self) -> str:
        return redact(self.url)

    def _open(self):
        psycopg, dict_row = _driver()
        return psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=20)

    def _begin(self, exclusive: bool) -> list[str]:
        return ["BEGIN"] + ([f"SELECT pg_advisory_xact_lock({LOCK_KEY})"] if exclusive else [])

    def _now(self, conn) -> float:
        return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS t").fetchone()["t"])


__all__ = ["PostgresDB", "is_postgres_url", "redact"]
