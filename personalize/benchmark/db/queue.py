"""The benchmark's row queue: one row per unit of work, shared by every process of a run.

A process *claims* a pending row whose dependencies are done inside one transaction that no other claim can
interleave with (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``), so two
processes never take the same row. A row is marked done only after its outputs are written (atomically), so a
process killed at any moment loses at most the row it was working on: on the next run, rows held by a dead
process (its pid is gone on this host, or its heartbeat stopped) go back to pending, and failed rows are retried.

:class:`BenchmarkQueue` holds every query; a backend (``sqlite.py``, ``postgres.py``) only says how to connect,
how to begin a transaction, which column types and placeholder its SQL uses, and how claims lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # the plan imports torch; the queue (and a process that only reads it) need not
    from ..plan import Unit

SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    ord INTEGER NOT NULL,
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    method TEXT NOT NULL,
    method_type TEXT NOT NULL,
    concept TEXT NOT NULL,
    concept_class TEXT,
    setting TEXT NOT NULL,
    setting_label TEXT NOT NULL,
    prompt TEXT,
    prompt_index INTEGER,
    seed {big},
    purpose TEXT,
    outputs TEXT NOT NULL,
    payload TEXT NOT NULL,
    digest TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started {real},
    finished {real},
    seconds {real},
    peak_memory {big},
    result TEXT,
    provenance TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS deps (key TEXT NOT NULL, dep TEXT NOT NULL, PRIMARY KEY (key, dep));
CREATE INDEX IF NOT EXISTS deps_dep ON deps (dep);
CREATE INDEX IF NOT EXISTS units_status ON units (status, ord);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, rank INTEGER, started {real},
                                    heartbeat {real}, info TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
JSON_COLUMNS = ("setting", "outputs", "payload", "result", "provenance")
STALE_AFTER = 120.0  # seconds without a heartbeat before another host's rows are taken back
HEARTBEAT = 10.0
UNIT_COLUMNS = ("ord", "key", "kind", "method", "method_type", "concept", "concept_class", "setting",
                "setting_label", "prompt", "prompt_index", "seed", "purpose", "outputs", "payload", "digest")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BenchmarkQueue(ABC):
    """The rows, their claims, the workers' heartbeats and the run's metadata, in one SQL database."""

    #: the backend's SQL: parameter placeholder, floating-point and 64-bit integer column types
    placeholder = "?"
    real_type, big_type = "REAL", "INTEGER"
    #: appended to the claim's SELECT: how a backend keeps two claims off one row (empty: the transaction does)
    claim_lock = ""
    conn = None

    # ------------------------------------------------------------------ what a backend provides
    @property
    @abstractmethod
    def where(self) -> str:
        """The database as shown to users (a path, or a URL without its password)."""

    @abstractmethod
    def _open(self):
        """A new connection (the heartbeat thread has its own)."""

    @abstractmethod
    def _begin(self, exclusive: bool) -> list[str]:
        """Statements that open a transaction; ``exclusive`` ones exclude every other exclusive one."""

    def _now(self, conn) -> float:
        """The clock heartbeats are written and judged by."""
        return time.time()

    # ------------------------------------------------------------------ plumbing
    def _setup(self, create: bool) -> None:
        self._lock = threading.Lock()
        self.worker: Optional[str] = None
        self._beat: Optional[threading.Thread] = None
        self._stop = threading.Event()
        if create:
            with self.transaction() as c:
                for statement in SCHEMA.format(real=self.real_type, big=self.big_type).split(";"):
                    if statement.strip():
                        c.execute(statement)

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    def execute(self, sql: str, params=(), conn=None):
        """Run one statement written with ``?`` placeholders; returns the cursor."""
        return (conn or self.conn).execute(self._sql(sql), params)

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = True):
        """One write transaction; ``exclusive`` ones never interleave (claims, plan changes, registrations)."""
        with self._lock:
            for statement in self._begin(exclusive):
                self.conn.execute(statement)
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.stop_heartbeat()
        self.conn.close()

    # ------------------------------------------------------------------ plan
    def sync_plan(self, units: list[Unit], spec_digest: str, spec_name: str, **meta: str) -> int:
        """Insert units not in the database yet; refuse a unit whose key exists with other content. Returns new rows."""
        from ...errors import BadInputError

        with self.transaction() as c:
            existing = {r["key"]: r["digest"] for r in self.execute("SELECT key, digest FROM units", conn=c)}
            changed = [u.key for u in units if u.key in existing and existing[u.key] != u.digest()]
            if changed:
                raise BadInputError(
                    f"{self.where} holds {len(changed)} unit(s) made with other settings (e.g. {changed[0]}); "
                    "write this spec's run to a new --out folder (and a new --db database)")
            new = [(i, u) for i, u in enumerate(units) if u.key not in existing]
            marks = ",".join("?" * len(UNIT_COLUMNS))
            c.cursor().executemany(self._sql(f"INSERT INTO units ({', '.join(UNIT_COLUMNS)}) VALUES ({marks})"), [
                (i, u.key, u.kind, u.method, u.method_type, u.concept, u.concept_class,
                 json.dumps(u.setting, sort_keys=True), u.setting_label, u.prompt, u.prompt_index, u.seed,
                 u.purpose, json.dumps(u.outputs), json.dumps(u.payload, sort_keys=True, default=str), u.digest())
                for i, u in new])
            deps = [(u.key, d) for _, u in new for d in u.deps]
            if deps:
                c.cursor().executemany(self._sql("INSERT INTO deps (key, dep) VALUES (?, ?) ON CONFLICT DO NOTHING"),
                                       deps)
        self.set_meta(spec_name=spec_name, spec_digest=spec_digest, **meta)
        return len(new)

    # ------------------------------------------------------------------ workers
    def register(self, rank: int, info: dict) -> str:
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with self.transaction() as c:
            now = self._now(c)
            self.execute("INSERT INTO workers (id, host, pid, rank, started, heartbeat, info) VALUES (?,?,?,?,?,?,?)",
                         (self.worker, socket.gethostname(), os.getpid(), rank, now, now, json.dumps(info)), conn=c)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self.worker

    def _heartbeat(self) -> None:
        conn = None
        while not self._stop.wait(HEARTBEAT):
            try:  # a lost connection (a restarted server) is opened again at the next beat
                conn = conn or self._open()
                self.execute("UPDATE workers SET heartbeat=? WHERE id=?", (self._now(conn), self.worker), conn=conn)
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None

    def _dead_workers(self, c) -> list[str]:
        host, now = socket.gethostname(), self._now(c)
        dead = []
        for w in self.execute("SELECT id, host, pid, heartbeat FROM workers", conn=c).fetchall():
            if w["id"] == self.worker:
                continue
            if (w["host"] == host and not _pid_alive(w["pid"])) or now - (w["heartbeat"] or 0) > STALE_AFTER:
                dead.append(w["id"])
        return dead

    def if_alone(self, action) -> bool:
        """Run ``action()`` if no other live process works on this database; True if it ran.

        It runs inside an exclusive transaction, so no process can register (and start writing files) meanwhile.
        """
        with self.transaction() as c:
            dead = set(self._dead_workers(c)) | {self.worker}
            if any(w["id"] not in dead for w in self.execute("SELECT id FROM workers", conn=c).fetchall()):
                return False
            action()
            return True

    def recover(self, retry_failed: bool = False) -> int:
        """Rows held by dead processes (and, with ``retry_failed``, failed rows) back to pending."""
        with self.transaction() as c:
            n = 0
            for w in self._dead_workers(c):
                n += self.execute("UPDATE units SET status='pending', worker=NULL WHERE status='running' AND worker=?",
                                  (w,), conn=c).rowcount
                self.execute("DELETE FROM workers WHERE id=?", (w,), conn=c)
            if retry_failed:
                n += self.execute("UPDATE units SET status='pending', error=NULL WHERE status='failed'",
                                  conn=c).rowcount
            return n

    # ------------------------------------------------------------------ work
    def claim(self) -> Optional[dict]:
        """Take the first pending row whose dependencies are all done (None when there is none right now)."""
        with self.transaction(exclusive=not self.claim_lock) as c:
            row = self.execute(
                "SELECT * FROM units u WHERE u.status='pending' AND NOT EXISTS ("
                " SELECT 1 FROM deps d JOIN units v ON v.key=d.dep WHERE d.key=u.key AND v.status!='done')"
                " ORDER BY u.ord LIMIT 1" + self.claim_lock, conn=c).fetchone()
            if row is None:
                return None
            self.execute("UPDATE units SET status='running', worker=?, attempts=attempts+1, started=? WHERE key=?",
                         (self.worker, time.time(), row["key"]), conn=c)
            return _decode(row)

    def _own_row(self, sql: str, params: tuple) -> None:
        """Change a row this worker holds (a row taken back from it meanwhile stays as it is)."""
        with self.transaction(exclusive=False) as c:
            self.execute(sql + " WHERE key=? AND worker=?", params + (self.worker,), conn=c)

    def finish(self, key: str, result: dict, seconds: float, peak_memory: Optional[int], provenance: dict) -> None:
        self._own_row("UPDATE units SET status='done', finished=?, seconds=?, peak_memory=?, result=?, provenance=?, "
                      "error=NULL", (time.time(), seconds, peak_memory, json.dumps(result, default=float),
                                     json.dumps(provenance), key))

    def fail(self, key: str, error: str) -> None:
        self._own_row("UPDATE units SET status='failed', finished=?, error=?", (time.time(), error, key))

    def release(self, key: str) -> None:
        self._own_row("UPDATE units SET status='pending', worker=NULL", (key,))

    def result(self, key: str) -> Optional[dict]:
        row = self.execute("SELECT result FROM units WHERE key=?", (key,)).fetchone()
        return json.loads(row["result"]) if row and row["result"] else None

    def rows_by_key(self, keys: list[str]) -> list[dict]:
        marks = ",".join("?" * len(keys))
        rows = self.execute(f"SELECT * FROM units WHERE key IN ({marks})", keys).fetchall() if keys else []
        found = {r["key"]: _decode(r) for r in rows}
        return [found[k] for k in keys]

    # ------------------------------------------------------------------ state
    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        for r in self.execute("SELECT status, COUNT(*) AS n FROM units GROUP BY status").fetchall():
            counts[r["status"]] = r["n"]
        counts["total"] = sum(counts.values())
        return counts

    def blocked(self) -> int:
        """Pending rows that can never run because something they need failed."""
        return self.execute(
            "SELECT COUNT(*) AS n FROM units u WHERE u.status='pending' AND EXISTS ("
            " SELECT 1 FROM deps d JOIN units v ON v.key=d.dep WHERE d.key=u.key AND v.status='failed')"
        ).fetchone()["n"]

    def rows(self) -> list[dict]:
        return [_decode(r) for r in self.execute("SELECT * FROM units ORDER BY ord").fetchall()]

    def failures(self, limit: int = 5) -> list[tuple[str, str]]:
        return [(r["key"], r["error"]) for r in
                self.execute("SELECT key, error FROM units WHERE status='failed' ORDER BY ord LIMIT ?",
                             (limit,)).fetchall()]

    def dependencies(self, key: str) -> list[str]:
        return [r["dep"] for r in self.execute("SELECT dep FROM deps WHERE key=? ORDER BY dep", (key,)).fetchall()]

    def set_meta(self, **values: str) -> None:
        with self.transaction() as c:
            c.cursor().executemany(self._sql("INSERT INTO meta (key, value) VALUES (?, ?) "
                                             "ON CONFLICT (key) DO UPDATE SET value=excluded.value"),
                                   list(values.items()))

    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.execute("SELECT key, value FROM meta").fetchall()}


def _decode(row) -> dict:
    out = dict(row)
    for k in JSON_COLUMNS:
        out[k] = json.loads(out[k]) if out.get(k) else ({} if k != "outputs" else [])
    return out


__all__ = ["BenchmarkQueue", "HEARTBEAT", "STALE_AFTER"]
