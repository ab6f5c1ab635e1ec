"""Races between the processes of one benchmark run: opening a new database together, rendering the same
photos together, cleaning temp files while another process writes."""
from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from personalize.benchmark.db import BenchmarkDB
from personalize.paths import atomic_dir


def _open_together(path, start, errors):
    try:
        while time.time() < start:  # spin, so all processes open the file within microseconds
            pass
        db = BenchmarkDB(path)
        db.register(0, {})
        db.set_meta(opened="yes")
        db.close()
    except Exception as exc:  # reported to the parent, which fails the test with it
        errors.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path):
    # every rank of `accelerate launch` opens OUT/benchmark.sqlite at start-up; switching a new file to WAL
    # used to answer "database is locked" at once to all but one of them
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for round_ in range(16):
        path = tmp_path / f"db{round_}.sqlite"
        start = time.time() + 0.3
        procs = [ctx.Process(target=_open_together, args=(path, start, errors)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert not found, found
        db = BenchmarkDB(path, create=False)
        assert db.meta() == {"opened": "yes"}
        assert db.conn.execute("SELECT COUNT(*) FROM workers").fetchone()[0] == 4
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
