"""The queue in PostgreSQL, for a benchmark spread over several machines (``--db postgresql://user@host/dbname``).

Claims lock the one row they take (``SELECT … FOR UPDATE SKIP LOCKED``), so workers on any number of machines
claim in parallel without waiting on each other; the rarer changes that must not interleave (the plan, worker
registrations, taking back rows of dead workers) hold a transaction-scoped advisory lock instead of SQLite's
``BEGIN IMMEDIATE``. Heartbeats use the server's clock, so hosts whose clocks disagree still judge each other
alive or dead correctly (a worker on another host is dead when its heartbeat is older than ``STALE_AFTER``).

The driver is psycopg 3, imported only when a ``postgresql://`` URL is given (``pip install 'psycopg[binary]'``).
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

from ...errors import BadInputError
from .queue import BenchmarkQueue

SCHEMES = ("postgresql://", "postgres://")
LOCK_KEY = 0x70657273  # the advisory lock taken by exclusive transactions ("pers"); per database
INSTALL = "pip install 'psycopg[binary]'  (or: pip install 'personalize[postgres]')"
SECRET = "***"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_QUERY_PASSWORD = re.compile(r"((?:^|[?&;])password=)[^&#;]*", re.IGNORECASE)


def is_postgres_url(target) -> bool:
    return isinstance(target, str) and target.startswith(SCHEMES)


def is_url(target) -> bool:
    """Whether ``target`` is written as a URL (``scheme://…``) rather than a file path."""
    return isinstance(target, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", target) is not None


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and reports.

    Works on the text itself, not on a parse, so a URL too malformed to parse is redacted too: everything
    between the user name's ``:`` and the last ``@`` is the password (a ``/`` or ``@`` inside it included), and
    a ``password=`` query parameter is hidden as well."""
    scheme, sep, rest = url.partition("://")
    hide = rf"\1{SECRET}"
    if not sep:
        return _QUERY_PASSWORD.sub(hide, url)
    cred, at, tail = rest.rpartition("@")
    if at and ":" in cred:
        rest = f"{cred.split(':', 1)[0]}:{SECRET}@{tail}"
    return f"{scheme}://{_QUERY_PASSWORD.sub(hide, rest)}"


def _secrets(url: str) -> list[str]:
    """The URL's password as written and as decoded (to scrub from a driver's message)."""
    _, _, rest = url.partition("://")
    cred, at, _ = rest.rpartition("@")
    found = [cred.split(":", 1)[1]] if at and ":" in cred else []
    found += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(url)]
    found = [f.lstrip("?&;") for f in found]
    return [x for f in found if f for x in {f, unquote(f)} if len(x) > 0]


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error) without the URL's password in any form."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, SECRET)
    return text


def check_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL libpq can read, else one line naming the problem (never the password)."""
    shown = redact(url)
    if not is_postgres_url(url):
        raise BadInputError(f"--db takes a postgresql://user@host/dbname URL, not '{shown}'; without --db the queue "
                            "is OUT/benchmark.sqlite")
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise BadInputError(f"the database URL '{shown}' contains spaces or control characters; percent-encode "
                            "them (a space is %20)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # Python's reason may quote a piece of the password: say it in our words
        reason = "an unclosed '[' in an IPv6 host" if "IPv6" in str(exc) else "its port is not a number from 1 to 65535"
        raise BadInputError(f"the database URL '{shown}' cannot be read: {reason}; write it as "
                            "postgresql://user:password@host:port/dbname, percent-encoding any '/', '@', ':' or "
                            "'%' in the password (%2F, %40, %3A, %25)") from None
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    for what, text in (("user name", user), ("password", password), ("database name", parts.path),
                       ("options", parts.query)):
        if _BAD_ESCAPE.search(text):
            raise BadInputError(f"the database URL '{shown}' has a '%' in its {what} that is not followed by two hex "
                                "digits; write a literal '%' as %25 (percent-encode special characters)")
    query_host = any(k == "host" and v for k, v in parse_qsl(parts.query))
    if not parts.hostname and not query_host:
        raise BadInputError(f"the database URL '{shown}' names no host; write postgresql://user@host/dbname (or "
                            "?host=/run/postgresql for a local socket)")
    if port == 0:
        raise BadInputError(f"the database URL '{shown}' has port 0; give the server's port (PostgreSQL's default "
                            "is 5432)")
    return url


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
        self.url = check_url(url)
        psycopg, _ = _driver()
        try:
            self.conn = self._open()
            missing = not create and self.execute("SELECT to_regclass('units') AS t").fetchone()["t"] is None
        except psycopg.Error as exc:
            reason = scrub((str(exc).strip().splitlines() or [type(exc).__name__])[-1], url)
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


__all__ = ["PostgresDB", "check_url", "is_postgres_url", "is_url", "redact", "scrub"]
