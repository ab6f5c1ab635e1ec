"""Races between the processes of one benchmark run: opening a new database together, rendering the same
photos together, cleaning temp files while another process writes; and the row queue's contract, two workers
and a kill -9 mid-row, for each backend (SQLite, and PostgreSQL on a real server the tests start)."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from postgres_server import NO_SERVER, PostgresServer, find_binaries

from personalize.benchmark.db import BenchmarkDB, open_db, queue
from personalize.benchmark.plan import Unit
from personalize.errors import BadInputError
from personalize.paths import atomic_dir

FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def postgres_server():
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip(NO_SERVER)
    with PostgresServer(bin_dir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    """Where a new, empty queue lives: a SQLite file, or a new database on the test's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "benchmark.sqlite")
    return request.getfixturevalue("postgres_server").new_database()


def _open_together(path, start, errors):
    try:
        while time.time() < start:  # spin, so all processes open the file within microseconds
            pass
        db = open_db(path)
        db.register(0, {})
        db.set_meta(opened="yes")
        db.close()
    except Exception as exc:  # reported to the parent, which fails the test with it
        errors.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path, request, backend):
    # every rank of `accelerate launch` opens the database at start-up; switching a new SQLite file to WAL used
    # to answer "database is locked" at once to all but one of them; PostgreSQL creates the tables under a lock
    errors = FORK.Queue()
    for round_ in range(16 if backend == "sqlite" else 3):
        path = (str(tmp_path / f"db{round_}.sqlite") if backend == "sqlite"
                else request.getfixturevalue("postgres_server").new_database())
        start = time.time() + 0.3
        procs = [FORK.Process(target=_open_together, args=(path, start, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert not found, found
        db = open_db(path, create=False)
        assert db.meta() == {"opened": "yes"}
        assert db.execute("SELECT COUNT(*) AS n FROM workers").fetchone()["n"] == 4
        db.close()


def test_atomic_dir_without_replace_keeps_the_first_finished_folder(tmp_path):
    target = tmp_path / "photos"
    with atomic_dir(target, replace=False) as slow:
        (slow / "a.png").write_text("slow")
        with atomic_dir(target, replace=False) as fast:  # another process finishes first
            (fast / "a.png").write_text("fast")
        held = open(target / "a.png")  # a reader of the first folder
    assert (target / "a.png").read_text() == "fast" and held.read() == "fast"
    held.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp folder left behind
    with atomic_dir(target) as tmp:  # the default still replaces
        (tmp / "b.png").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.png"]


def test_temp_files_are_cleaned_only_when_alone_and_under_the_write_lock(tmp_path):
    path = tmp_path / "benchmark.sqlite"
    me, other = BenchmarkDB(path), BenchmarkDB(path)
    me.register(0, {})
    other.register(1, {})  # alive: same host, this very pid
    ran = []
    assert me.if_alone(lambda: ran.append(1)) is False and ran == []

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    other.stop_heartbeat()
    other.conn.execute("UPDATE workers SET pid=? WHERE id=?", (int(dead.stdout), other.worker))  # its process died

    def try_to_register():
        probe = sqlite3.connect(str(path), timeout=0.1, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")  # a newcomer cannot register while the cleaning runs
        probe.close()
        ran.append(1)

    assert me.if_alone(try_to_register) is True and ran == [1]
    me.close()
    other.close()
    assert os.path.exists(path)


# ----------------------------------------------------------------------------- the queue, on each backend
# six independent rows, then "b" after a0 and a1, then "c" after b
PLAN = [Unit(key=f"a{i}", kind="generate", method="m", method_type="m", concept="x", outputs=[f"a{i}.txt"])
        for i in range(6)]
PLAN += [Unit(key="b", kind="score", method="m", method_type="m", concept="x", deps=["a0", "a1"]),
         Unit(key="c", kind="score", method="m", method_type="m", concept="x", deps=["b"])]


# many rows that take no time: claims of two workers collide as often as they can
MANY = [Unit(key=f"r{i:03d}", kind="generate", method="m", method_type="m", concept="x") for i in range(150)]


def _planned(target, plan=PLAN) -> "queue.BenchmarkQueue":
    db = open_db(target)
    db.sync_plan(plan, "digest", "unit")
    return db


def test_queue_contract(target):
    db = _planned(target)
    assert db.sync_plan(PLAN, "digest", "unit") == 0  # planning again adds nothing
    changed = [Unit(**{**PLAN[0].__dict__, "prompt": "other"})]
    with pytest.raises(BadInputError, match="made with other settings") as info:
        db.sync_plan(changed, "digest", "unit")
    assert "\n" not in str(info.value)
    other = open_db(target)
    db.register(0, {"gpu": "a"})
    other.register(1, {})
    claimed = [db.claim(), other.claim()]
    assert [r["key"] for r in claimed] == ["a0", "a1"] and claimed[0]["outputs"] == ["a0.txt"]
    assert db.counts() == {"pending": 6, "running": 2, "done": 0, "failed": 0, "total": 8}
    other.release("a1")  # back to pending, taken again by the next claim
    assert db.claim()["key"] == "a1"
    db.finish("a0", {"score": 0.5}, 1.5, 2 ** 40, {"host": "h"})
    other.finish("a1", {"score": 9.9}, 1.0, None, {})  # not its row any more: ignored
    assert db.result("a0") == {"score": 0.5} and db.result("a1") is None
    keys = []
    while (row := other.claim()) is not None:
        keys.append(row["key"])
    assert keys == ["a2", "a3", "a4", "a5"]  # not b: a1 is not done
    db.finish("a1", {}, 1.0, None, {})
    for key in keys[:-1]:
        other.finish(key, {}, 1.0, None, {})
    other.fail("a5", "RuntimeError: boom")
    assert db.claim()["key"] == "b" and db.claim() is None  # c waits for b
    db.fail("b", "RuntimeError: broken")
    assert db.blocked() == 1 and db.failures() == [("a5", "RuntimeError: boom"), ("b", "RuntimeError: broken")]
    assert db.dependencies("b") == ["a0", "a1"] and [r["key"] for r in db.rows_by_key(["b", "a0"])] == ["b", "a0"]
    assert db.recover(retry_failed=True) == 2 and db.counts()["failed"] == 0
    row = {r["key"]: r for r in db.rows()}["a0"]
    assert (row["status"], row["peak_memory"], row["provenance"]) == ("done", 2 ** 40, {"host": "h"})
    assert abs(row["finished"] - time.time()) < 60  # a double-precision clock, not a 4-byte float
    db.set_meta(base_fingerprint="f")
    assert db.meta() == {"spec_name": "unit", "spec_digest": "digest", "base_fingerprint": "f"}
    other.close()
    db.close()
    with pytest.raises(BadInputError, match="no benchmark"):
        open_db(target + "_missing" if "://" not in target else target.rsplit("/", 1)[0] + "/postgres", create=False)


def _work(target, marks: Path, rank: int, hold: str = "", start: float = 0.0, seconds: float = 0.02) -> None:
    """A worker's loop as the runner's: claim, do the row (its output written once, exclusively), finish."""
    while time.time() < start:
        pass
    db = open_db(target)
    db.register(rank, {})
    db.recover()
    while True:
        row = db.claim()
        if row is None:
            if db.counts()["running"] == 0:
                break
            db.recover()
            time.sleep(0.02)
            continue
        if row["key"] == hold:
            (marks / "holding").touch()
            time.sleep(600)  # killed here, mid-row
        time.sleep(seconds)
        try:
            os.close(os.open(marks / row["key"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # the row's work done a second time
            (marks / f"{row['key']}.twice").touch()
        db.finish(row["key"], {"by": db.worker}, seconds, None, {})
    db.close()


def _marks(tmp_path) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir()
    return marks


def test_two_workers_split_rows_without_overlap(target, tmp_path):
    _planned(target, PLAN + MANY).close()
    marks = _marks(tmp_path)
    start = time.time() + 0.5
    procs = [FORK.Process(target=_work, args=(target, marks, rank, "", start, 0.0)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    db = open_db(target, create=False)
    rows = db.rows()
    assert sorted(p.name for p in marks.iterdir()) == sorted(r["key"] for r in rows)  # each row's work done once
    assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows) and len(rows) == len(PLAN + MANY)
    ranks = {r["id"]: r["rank"] for r in db.execute("SELECT id, rank FROM workers").fetchall()}
    assert {ranks[r["worker"]] for r in rows} == {0, 1}  # both did work
    db.close()


def test_kill_9_mid_row_loses_no_row_and_does_none_twice(target, tmp_path):
    _planned(target).close()
    marks = _marks(tmp_path)
    victim = FORK.Process(target=_work, args=(target, marks, 0, "a3"))
    victim.start()
    deadline = time.time() + 120
    while not (marks / "holding").exists() and victim.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert victim.is_alive(), f"the worker ended before it could be killed (exit code {victim.exitcode})"
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    db = open_db(target, create=False)
    before = {r["key"]: r["finished"] for r in db.rows() if r["status"] == "done"}
    assert set(before) == {"a0", "a1", "a2"} and db.counts()["running"] == 1  # a3 held by the dead worker
    (marks / "holding").unlink()
    survivor = FORK.Process(target=_work, args=(target, marks, 1))
    survivor.start()
    survivor.join(timeout=120)
    assert survivor.exitcode == 0
    rows = {r["key"]: r for r in db.rows()}
    assert all(r["status"] == "done" for r in rows.values())  # no row lost
    assert all(rows[k]["finished"] == t for k, t in before.items())  # nothing finished was redone
    assert {k: r["attempts"] for k, r in rows.items() if r["attempts"] != 1} == {"a3": 2}
    assert sorted(p.name for p in marks.iterdir()) == sorted(u.key for u in PLAN)  # each row's work done once
    db.close()


def test_a_worker_on_another_host_is_dead_once_its_heartbeat_is_stale(target, monkeypatch):
    monkeypatch.setattr(queue, "HEARTBEAT", 0.05)
    db, other = _planned(target), open_db(target)
    other.register(1, {})
    assert other.claim()["key"] == "a0"
    beat = other.execute("SELECT heartbeat FROM workers WHERE id=?", (other.worker,)).fetchone()["heartbeat"]
    deadline = time.time() + 30
    while other.execute("SELECT heartbeat FROM workers WHERE id=?", (other.worker,)).fetchone()["heartbeat"] == beat:
        assert time.time() < deadline, "the heartbeat thread never beat"
        time.sleep(0.05)
    other.stop_heartbeat()
    db.register(0, {})
    now = db._now(db.conn)  # the clock heartbeats are judged by (PostgreSQL: the server's)
    set_beat = "UPDATE workers SET host='elsewhere', pid=1, heartbeat=? WHERE id=?"
    db.execute(set_beat, (now - queue.STALE_AFTER / 2, other.worker))  # another host's pid says nothing here
    assert db.recover() == 0 and db.if_alone(lambda: None) is False
    db.execute(set_beat, (now - queue.STALE_AFTER - 5, other.worker))
    assert db.recover() == 1 and db.claim()["key"] == "a0"
    assert db.if_alone(lambda: None) is True
    other.close()
    db.close()


def test_benchmark_run_status_and_report_on_postgres(postgres_server, tmp_path, capsys):
    """The real runner and CLI on a PostgreSQL queue: no SQLite file, status and report read the server."""
    from test_benchmark import N_ROWS, write_spec

    from personalize.cli import main

    url, out = postgres_server.new_database(), tmp_path / "out"
    main(["benchmark", "run", str(write_spec(tmp_path)), "--out", str(out), "--db", url, "--no-progress"])
    said = " ".join(capsys.readouterr().out.split())  # as one line, however the console wrapped it
    assert f"{N_ROWS}/{N_ROWS} rows done" in said and f"--run-dir {out}" in said
    assert not (out / "benchmark.sqlite").exists() and (out / "images").is_dir()
    main(["benchmark", "status", url])
    assert f"{N_ROWS}/{N_ROWS} done" in capsys.readouterr().out
    main(["benchmark", "report", url, "--out", str(tmp_path / "report")])  # the run folder: the recorded --out
    assert "beta=0.9" in (tmp_path / "report" / "index.html").read_text()
