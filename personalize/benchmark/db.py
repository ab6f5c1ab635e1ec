"""The benchmark's SQLite database: one row per unit of work, shared by every process.

A process *claims* a pending row whose dependencies are done inside one
``BEGIN IMMEDIATE`` transaction, so two processes never take the same row. A
row is marked done only after its outputs are written (atomically), so a process
killed at any moment loses at most the row it was working on: on the next run,
rows held by a dead process (its pid is gone on this host, or its heartbeat
stopped) go back to pending, and failed rows are retried.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from ..errors import BadInputError
from .plan import Unit

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
    seed INTEGER,
    purpose TEXT,
    outputs TEXT NOT NULL,
    payload TEXT NOT NULL,
    digest TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    peak_memory INTEGER,
    result TEXT,
    provenance TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS deps (key TEXT NOT NULL, dep TEXT NOT NULL, PRIMARY KEY (key, dep));
CREATE INDEX IF NOT EXISTS deps_dep ON deps (dep);
CREATE INDEX IF NOT EXISTS units_status ON units (status, ord);
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, host TEXT, pid INTEGER, rank INTEGER, started REAL,
                                    heartbeat REAL, info TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
JSON_COLUMNS = ("setting", "outputs", "payload", "result", "provenance")
STALE_AFTER = 120.0  # seconds without a heartbeat before another host's rows are taken back
HEARTBEAT = 10.0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=120, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=120000")
    _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BenchmarkDB:
    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise BadInputError(f"no benchmark database at {self.path}; run 'personalize benchmark run SPEC.yaml' first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = _connect(self.path)
            if not create and not self.conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='units'").fetchone():
                raise sqlite3.DatabaseError("no units table")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise BadInputError(f"{self.path} is not a benchmark database (or is still being created); "
                                "give the OUT/benchmark.sqlite that 'personalize benchmark run' writes") from None
        self._lock = threading.Lock()
        if create:
            with self.transaction() as c:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
        self.worker: Optional[str] = None
        self._beat: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def transaction(self):
        """One write transaction, taken at once (``BEGIN IMMEDIATE``), so claims never interleave."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
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
    def sync_plan(self, units: list[Unit], spec_digest: str, spec_name: str) -> int:
        """Insert units not in the database yet; refuse a unit whose key exists with other content. Returns new rows."""
        added = 0
        with self.transaction() as c:
            existing = {r["key"]: r["digest"] for r in c.execute("SELECT key, digest FROM units")}
            changed = [u.key for u in units if u.key in existing and existing[u.key] != u.digest()]
            if changed:
                raise BadInputError(
                    f"{self.path} holds {len(changed)} unit(s) made with other settings (e.g. {changed[0]}); "
                    "write this spec's run to a new --out folder")
            for i, u in enumerate(units):
                if u.key in existing:
                    continue
                c.execute(
                    "INSERT INTO units (ord, key, kind, method, method_type, concept, concept_class, setting, "
                    "setting_label, prompt, prompt_index, seed, purpose, outputs, payload, digest) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (i, u.key, u.kind, u.method, u.method_type, u.concept, u.concept_class,
                     json.dumps(u.setting, sort_keys=True), u.setting_label, u.prompt, u.prompt_index, u.seed,
                     u.purpose, json.dumps(u.outputs), json.dumps(u.payload, sort_keys=True, default=str),
                     u.digest()))
                c.executemany("INSERT OR IGNORE INTO deps (key, dep) VALUES (?, ?)", [(u.key, d) for d in u.deps])
                added += 1
        self.set_meta(spec_name=spec_name, spec_digest=spec_digest)
        return added

    # ------------------------------------------------------------------ workers
    def register(self, rank: int, info: dict) -> str:
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        now = time.time()
        with self.transaction() as c:
            c.execute("INSERT INTO workers (id, host, pid, rank, started, heartbeat, info) VALUES (?,?,?,?,?,?,?)",
                      (self.worker, socket.gethostname(), os.getpid(), rank, now, now, json.dumps(info)))
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self.worker

    def _heartbeat(self) -> None:
        conn = _connect(self.path)
        try:
            while not self._stop.wait(HEARTBEAT):
                conn.execute("UPDATE workers SET heartbeat=? WHERE id=?", (time.time(), self.worker))
        finally:
            conn.close()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None

    def _dead_workers(self, c) -> list[str]:
        host, now = socket.gethostname(), time.time()
        dead = []
        for w in c.execute("SELECT id, host, pid, heartbeat FROM workers"):
            if w["id"] == self.worker:
                continue
            if (w["host"] == host and not _pid_alive(w["pid"])) or now - (w["heartbeat"] or 0) > STALE_AFTER:
                dead.append(w["id"])
        return dead

    def if_alone(self, action) -> bool:
        """Run ``action()`` if no other live process works on this database; True if it ran.

        It runs under the write lock, so no process can register (and start writing files) meanwhile.
        """
        with self.transaction() as c:
            dead = set(self._dead_workers(c)) | {self.worker}
            if any(w["id"] not in dead for w in c.execute("SELECT id FROM workers")):
                return False
            action()
            return True

    def recover(self, retry_failed: bool = False) -> int:
        """Rows held by dead processes (and, with ``retry_failed``, failed rows) back to pending."""
        with self.transaction() as c:
            dead = self._dead_workers(c)
            n = 0
            for w in dead:
                n += c.execute("UPDATE units SET status='pending', worker=NULL WHERE status='running' AND worker=?",
                               (w,)).rowcount
                c.execute("DELETE FROM workers WHERE id=?", (w,))
            if retry_failed:
                n += c.execute("UPDATE units SET status='pending', error=NULL WHERE status='failed'").rowcount
            return n

    # ------------------------------------------------------------------ work
    def claim(self) -> Optional[dict]:
        """Take the first pending row whose dependencies are all done (None when there is none right now)."""
        with self.transaction() as c:
            row = c.execute(
                "SELECT * FROM units u WHERE u.status='pending' AND NOT EXISTS ("
                " SELECT 1 FROM deps d JOIN units v ON v.key=d.dep WHERE d.key=u.key AND v.status!='done')"
                " ORDER BY u.ord LIMIT 1").fetchone()
            if row is None:
                return None
            c.execute("UPDATE units SET status='running', worker=?, attempts=attempts+1, started=? WHERE key=?",
                      (self.worker, time.time(), row["key"]))
            return _decode(row)

    def finish(self, key: str, result: dict, seconds: float, peak_memory: Optional[int], provenance: dict) -> None:
        with self.transaction() as c:
            c.execute("UPDATE units SET status='done', finished=?, seconds=?, peak_memory=?, result=?, provenance=?, "
                      "error=NULL WHERE key=? AND worker=?",
                      (time.time(), seconds, peak_memory, json.dumps(result, default=float),
                       json.dumps(provenance), key, self.worker))

    def fail(self, key: str, error: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE units SET status='failed', finished=?, error=? WHERE key=? AND worker=?",
                      (time.time(), error, key, self.worker))

    def release(self, key: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE units SET status='pending', worker=NULL WHERE key=? AND worker=?", (key, self.worker))

    def result(self, key: str) -> Optional[dict]:
        row = self.conn.execute("SELECT result FROM units WHERE key=?", (key,)).fetchone()
        return json.loads(row["result"]) if row and row["result"] else None

    def rows_by_key(self, keys: list[str]) -> list[dict]:
        marks = ",".join("?" * len(keys))
        rows = self.conn.execute(f"SELECT * FROM units WHERE key IN ({marks})", keys).fetchall() if keys else []
        found = {r["key"]: _decode(r) for r in rows}
        return [found[k] for k in keys]

    # ------------------------------------------------------------------ state
    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "running": 0, "done": 0, "failed": 0}
        for r in self.conn.execute("SELECT status, COUNT(*) AS n FROM units GROUP BY status"):
            counts[r["status"]] = r["n"]
        counts["total"] = sum(counts.values())
        return counts

    def blocked(self) -> int:
        """Pending rows that can never run because something they need failed."""
        return self.conn.execute(
            "SELECT COUNT(*) FROM units u WHERE u.status='pending' AND EXISTS ("
            " SELECT 1 FROM deps d JOIN units v ON v.key=d.dep WHERE d.key=u.key AND v.status='failed')"
        ).fetchone()[0]

    def rows(self) -> list[dict]:
        return [_decode(r) for r in self.conn.execute("SELECT * FROM units ORDER BY ord")]

    def failures(self, limit: int = 5) -> list[tuple[str, str]]:
        return [(r["key"], r["error"]) for r in
                self.conn.execute("SELECT key, error FROM units WHERE status='failed' ORDER BY ord LIMIT ?", (limit,))]

    def dependencies(self, key: str) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT dep FROM deps WHERE key=? ORDER BY dep", (key,))]

    def set_meta(self, **values: str) -> None:
        with self.transaction() as c:
            c.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.conn.execute("SELECT key, value FROM meta")}


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for k in JSON_COLUMNS:
        out[k] = json.loads(out[k]) if out.get(k) else ({} if k != "outputs" else [])
    return out


__all__ = ["BenchmarkDB"]
