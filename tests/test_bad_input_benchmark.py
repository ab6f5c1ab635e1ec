"""``personalize benchmark`` as an attacker would use it: every bad input is one line, exit code 2, nothing
written, no traceback, and a PostgreSQL password never reaches the screen.

- ``--db``/``status``/``report`` with malformed PostgreSQL URLs (bad port, bad %-escape in the password, no host,
  another scheme, ...): the message never holds the password, raw or decoded;
- ``status``/``report`` on an empty or foreign file refuse it and leave it byte for byte (SQLite would have
  turned it into a database), and read a valid database on a read-only filesystem;
- spec fields (``name``, ``cc101:``, ``folder:``, ``limit``, seeds ...) and CustomConcept101's json fields are
  type-checked; the CLI's folder options refuse an empty string (which Path reads as the current folder).
"""
from __future__ import annotations

import json
import os
import sqlite3

import pytest
import yaml

from conftest import make_photos
from test_bad_input import BENCH, check_error, run_cli

PASSWORD = "Hunter2-s3cret"
ESCAPED = "Hunter2%2Fs3cret"  # the same password with an escaped '/', decoded: 'Hunter2/s3cret'

BAD_URLS = {
    "port-not-a-number": f"postgresql://bench:{PASSWORD}@db-host:notaport/bench",
    "port-out-of-range": f"postgresql://bench:{PASSWORD}@db-host:99999/bench",
    "port-zero": f"postgresql://bench:{PASSWORD}@db-host:0/bench",
    "bad-escape-in-password": f"postgresql://bench:{PASSWORD}%zz@db-host/bench",
    "percent-at-end": f"postgresql://bench:{PASSWORD}%@db-host/bench",
    "unescaped-slash-in-password": "postgresql://bench:Hunter2/s3cret@db-host/bench",
    "unescaped-at-in-password": f"postgresql://bench:{PASSWORD}@x@db-host:bad/bench",
    "no-host": f"postgresql://bench:{PASSWORD}@/bench",
    "unclosed-ipv6-host": f"postgresql://bench:{PASSWORD}@[::1/bench",
    "space-in-url": f"postgresql://bench:{PASSWORD} @db-host/bench",
    "bad-escape-in-query-password": f"postgresql://bench@db-host/bench?password={PASSWORD}%zz",
    "unknown-scheme": f"mysql://bench:{PASSWORD}@db-host/bench",
    "postgres-typo-scheme": f"postgresq://bench:{PASSWORD}@db-host/bench",
    "nothing-listens": f"postgresql://bench:{ESCAPED}@127.0.0.1:1/bench?connect_timeout=5",
}


def _no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (PASSWORD, "Hunter2/s3cret", ESCAPED, "s3cret"):
            assert secret not in text, f"the password is shown: {text}"


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BENCH))
    return path


@pytest.mark.parametrize("url", list(BAD_URLS.values()), ids=list(BAD_URLS))
def test_malformed_database_url_never_shows_the_password(capsys, tmp_path, spec, url):
    out = tmp_path / "out"
    for argv in (["benchmark", "status", url], ["benchmark", "report", url, "--out", out],
                 ["benchmark", "run", spec, "--db", url, "--out", out, "--no-progress"]):
        code, stdout, err = run_cli(capsys, argv)
        check_error(code, err)
        _no_secret(stdout, err)
        assert not out.exists(), f"{argv[1]} wrote {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_redact_hides_the_password_of_urls_too_malformed_to_parse():
    from personalize.benchmark.db.postgres import check_url, redact, scrub

    for url in BAD_URLS.values():
        _no_secret(redact(url))
    assert redact(f"postgresql://bench:{PASSWORD}@h/db") == "postgresql://bench:***@h/db"
    assert redact(f"postgresql://bench@h/db?sslmode=require&password={PASSWORD}") == \
        "postgresql://bench@h/db?sslmode=require&password=***"
    assert redact("postgresql://bench@h/db") == "postgresql://bench@h/db"
    _no_secret(scrub(f'invalid percent-encoded token: "{PASSWORD}%zz"', BAD_URLS["bad-escape-in-password"]))
    _no_secret(scrub("password Hunter2/s3cret refused", BAD_URLS["nothing-listens"]))  # the decoded form too
    for good in ("postgresql://bench@db-host/bench1", f"postgresql://bench:{ESCAPED}@db-host:5432/b",
                 "postgres://bench@[::1]:5433/b", "postgresql:///bench?host=/run/postgresql"):
        assert check_url(good) == good


# --------------------------------------------------------------------------- SQLite files status/report read
def _state(path):
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("content", [b"", b"not a database, just text\n", b"SQLite format 2\x00" + b"\x00" * 84],
                         ids=["empty", "text", "not-sqlite-3"])
@pytest.mark.parametrize("verb", ["status", "report"])
def test_status_and_report_refuse_a_file_that_is_no_database_and_leave_it_alone(capsys, tmp_path, content, verb):
    path = tmp_path / "run" / "benchmark.sqlite"
    path.parent.mkdir()
    path.write_bytes(content)
    before = _state(path)
    out = tmp_path / "report"
    code, _, err = run_cli(capsys, ["benchmark", verb, path] + (["--out", out] if verb == "report" else []))
    check_error(code, err, "not a benchmark database", str(path))
    assert _state(path) == before, "the file (or its folder) was changed"
    assert not out.exists()


def test_a_foreign_sqlite_database_is_refused_unchanged(capsys, tmp_path):
    path = tmp_path / "other.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a)")
    conn.commit()
    conn.close()
    before = _state(path)
    code, _, err = run_cli(capsys, ["benchmark", "status", path])
    check_error(code, err, "not a benchmark database")
    assert _state(path) == before


@pytest.fixture
def finished_db(tmp_path):
    """A benchmark database as a finished run leaves it (one failed row, meta), closed."""
    from personalize.benchmark.db import open_db
    from personalize.benchmark.plan import Unit

    path = tmp_path / "run" / "benchmark.sqlite"
    db = open_db(path)
    unit = Unit(key="train/perfusion/disc", kind="train", method="perfusion", method_type="perfusion",
                concept="disc", concept_class="ball", seed=0)
    db.sync_plan([unit], "digest", "unit")
    db.register(0, {})
    db.claim()
    db.fail("train/perfusion/disc", "RuntimeError: out of memory")
    db.close()
    return path


class _ReadOnlyFilesystem(sqlite3.Connection):
    """What SQLite answers on a read-only filesystem to every connection that may write (its WAL shared memory)."""

    def execute(self, *args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")


def _read_only(monkeypatch, path):
    """Make ``path`` and its folder read-only: chmod where that binds (not root), else SQLite's own answers on a
    read-only filesystem for every connection that is not opened ``immutable``."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        path.parent.chmod(0o555)
        return lambda: (path.parent.chmod(0o755), path.chmod(0o644))
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        if "immutable=1" not in str(database):
            kwargs["factory"] = _ReadOnlyFilesystem
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    return lambda: None


def test_status_reads_a_database_on_a_read_only_filesystem(capsys, monkeypatch, finished_db):
    before = _state(finished_db)
    restore = _read_only(monkeypatch, finished_db)
    try:
        code, stdout, err = run_cli(capsys, ["benchmark", "status", finished_db])
    finally:
        restore()
    assert code == 0, err
    assert "0/1 done" in stdout and "1 failed" in stdout and "out of memory" in stdout
    assert _state(finished_db) == before


def test_status_never_writes_a_database_it_reads(capsys, finished_db):
    before = _state(finished_db)[:2]
    code, stdout, err = run_cli(capsys, ["benchmark", "status", finished_db])
    assert code == 0, err
    assert _state(finished_db)[:2] == before  # a reader of a WAL database may add its -wal/-shm, nothing more


# --------------------------------------------------------------------------- spec and CustomConcept101 fields
def _validate(capsys, tmp_path, spec: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return run_cli(capsys, ["benchmark", "validate", path])


CLIP = {**BENCH, "base": "tiny", "evaluator": {"backend": "clip"}}
BAD_SPECS = {
    "name-a-list": ({**BENCH, "name": ["a", "b"]}, ["spec: name", "string", "list"]),
    "name-a-number": ({**BENCH, "name": 5}, ["spec: name", "int"]),
    "name-a-path": ({**BENCH, "name": "../escaped"}, ["spec: name", "file name"]),
    "name-empty": ({**BENCH, "name": ""}, ["spec: name", "empty"]),
    "base-empty": ({**BENCH, "base": ""}, ["base"]),
    "cc101-a-list": ({**CLIP, "concepts": [{"cc101": ["cc101"]}]}, ["concepts[0].cc101", "list"]),
    "cc101-a-number": ({**CLIP, "concepts": [{"cc101": 101}]}, ["concepts[0].cc101", "int"]),
    "cc101-null": ({**CLIP, "concepts": [{"cc101": None}]}, ["concepts[0].cc101", "NoneType"]),
    "cc101-empty": ({**CLIP, "concepts": [{"cc101": ""}]}, ["concepts[0].cc101", "empty"]),
    "cc101-limit-false": ({**CLIP, "concepts": [{"cc101": "cc101", "limit": False}]}, ["limit", "whole number"]),
    "cc101-limit-zero-float": ({**CLIP, "concepts": [{"cc101": "cc101", "limit": 0.0}]}, ["limit", "whole number"]),
    "folder-a-number": ({**CLIP, "concepts": [{"folder": 5, "superclass": "ball"}]}, ["concepts[0].folder"]),
    "folder-null": ({**CLIP, "concepts": [{"folder": None, "superclass": "ball"}]}, ["concepts[0].folder"]),
    "folder-name-a-list": ({**CLIP, "concepts": [{"folder": "photos", "superclass": "ball", "name": ["a"]}]},
                           ["name", "list"]),
    "superclass-empty": ({**CLIP, "concepts": [{"folder": "photos", "superclass": " "}]}, ["superclass", "empty"]),
    "superclass-control": ({**CLIP, "concepts": [{"folder": "photos", "superclass": "ba\x07ll"}]},
                           ["superclass", "control characters"]),
    "toyworld-of-mappings": ({**BENCH, "concepts": [{"toyworld": [{"a": 1}]}]}, ["concepts[0].toyworld"]),
    "seed-negative": ({**BENCH, "seeds": [-1]}, ["seeds", "0 to"]),
    "seed-too-large": ({**BENCH, "seeds": [2**70]}, ["seeds", "0 to"]),
    "seed-count-huge": ({**BENCH, "seeds": 10**9}, ["seeds", "fewer"]),
}


@pytest.mark.parametrize("spec, words", list(BAD_SPECS.values()), ids=list(BAD_SPECS))
def test_spec_fields_are_type_checked(capsys, monkeypatch, tmp_path, cc101, spec, words):
    make_photos(tmp_path / "photos", n=2)
    monkeypatch.chdir(tmp_path)
    code, _, err = _validate(capsys, tmp_path, spec)
    check_error(code, err, *words)
    assert not (tmp_path / "unit_out").exists()


def test_valid_cc101_spec_still_validates(capsys, tmp_path, cc101):
    """The control for the cases above and below."""
    code, stdout, err = _validate(capsys, tmp_path, {**CLIP, "concepts": [{"cc101": str(cc101), "limit": 0}]})
    assert code == 0, err
    code, stdout, err = _validate(capsys, tmp_path, {**CLIP, "concepts": [{"cc101": str(cc101), "limit": 1}]})
    assert code == 0, err
    assert "1 concept(s)" in stdout


@pytest.mark.parametrize("key, value", [
    ("instance_prompt", 5), ("instance_prompt", None), ("instance_prompt", ["photo of a <new1> barn"]),
    ("class_prompt", ["barn"]), ("class_prompt", 3), ("class_prompt", ""), ("class_prompt", "   "),
    ("instance_data_dir", 5), ("instance_data_dir", None), ("prompt_filename", ["prompts/barn.txt"]),
    ("class_data_dir", 7), ("class_data_dir", ["regularization"]),
])
def test_cc101_json_fields_are_type_checked(capsys, tmp_path, cc101, key, value):
    entries = json.loads((cc101 / "dataset.json").read_text())
    entries[0][key] = value
    (cc101 / "dataset.json").write_text(json.dumps(entries))
    code, _, err = _validate(capsys, tmp_path, {**CLIP, "concepts": [{"cc101": str(cc101)}]})
    check_error(code, err, "dataset.json entry 0", repr(key), "non-empty string")


@pytest.mark.parametrize("where", ["dataset.json", "prompts/barn.txt", "compose"])
def test_cc101_files_that_are_not_utf8_or_typed(capsys, tmp_path, cc101, where):
    spec = {**CLIP, "concepts": [{"cc101": str(cc101)}]}
    if where == "compose":
        multi = json.loads((cc101 / "dataset_multiconcept.json").read_text())
        multi[0][2]["prompt_filename_compose"] = 5
        (cc101 / "dataset_multiconcept.json").write_text(json.dumps(multi))
        spec["concepts"][0]["compositions"] = True
        words = ["prompt_filename_compose", "non-empty string"]
    else:
        (cc101 / where).write_bytes(b"\xff\xfe{} not UTF-8\n")
        words = ["UTF-8", where.split("/")[-1]]
    code, _, err = _validate(capsys, tmp_path, spec)
    check_error(code, err, *words)


# --------------------------------------------------------------------------- the verbs' options
@pytest.mark.parametrize("argv, words", [
    (["run", "{spec}", "--out", ""], ["--out is empty"]),
    (["report", "{db}", "--out", ""], ["--out is empty"]),
    (["report", "{db}", "--out", "{tmp}/report", "--run-dir", ""], ["--run-dir is empty"]),
    (["run", "{spec}", "--out", "{tmp}/out", "--clip-weights", "{spec}"], ["--clip-weights", "toyworld"]),
    (["run", "{spec}", "--out", "{tmp}/out", "--db", ""], ["--db takes a postgresql://"]),
    (["status", ""], ["no benchmark database"]),
], ids=["run-out-empty", "report-out-empty", "report-run-dir-empty", "clip-weights-unused", "db-empty",
        "status-empty"])
def test_benchmark_options_refuse_empty_and_unused_values(capsys, monkeypatch, tmp_path, spec, argv, words):
    """An empty --out used to run the whole benchmark into the current folder; --clip-weights on a toy-world
    spec was ignored without a word."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    db = tmp_path / "none.sqlite"
    code, _, err = run_cli(capsys, ["benchmark"] + [a.format(spec=spec, db=db, tmp=tmp_path) for a in argv])
    check_error(code, err, *words)
    assert list(work.iterdir()) == [] and not (tmp_path / "out").exists() and not (tmp_path / "report").exists()
