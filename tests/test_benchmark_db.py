"""Opening the benchmark's queue: SQLite refused on network filesystems, PostgreSQL URLs, the driver, messages."""
from __future__ import annotations

import socket
import sys

import pytest

from personalize.benchmark.db import BenchmarkDB, mounts, open_db
from personalize.benchmark.db.postgres import redact
from personalize.cli import main
from personalize.errors import BadInputError

MOUNTS = """\
sysfs /sys sysfs rw,nosuid 0 0
/dev/sda1 / ext4 rw,relatime 0 0
server:/export /mnt/share nfs4 rw,vers=4.2 0 0
/dev/sdb1 /mnt/share/scratch ext4 rw 0 0
//nas/team /mnt/team\\040drive cifs rw 0 0
me@box:/home/me /home/u/remote fuse.sshfs rw 0 0
tmpfs /mnt/share/scratch/ram tmpfs rw 0 0
"""


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return path


@pytest.mark.parametrize("folder, fstype, network", [
    ("/", "ext4", False),
    ("/home/u", "ext4", False),
    ("/mnt/share", "nfs4", True),
    ("/mnt/share/runs/bench", "nfs4", True),
    ("/mnt/shared", "ext4", False),  # a prefix of the name is not a mount point above it
    ("/mnt/share/scratch/bench", "ext4", False),  # a local disk mounted inside the share
    ("/mnt/share/scratch/ram/x", "tmpfs", False),
    ("/mnt/team drive/bench", "cifs", True),  # \040 in the table is a space
    ("/home/u/remote/runs", "fuse.sshfs", True),
])
def test_the_filesystem_of_a_folder_is_its_longest_mount_point(table, folder, fstype, network):
    assert mounts.filesystem_of(folder, table) == fstype
    assert mounts.network_filesystem(folder, table) == (fstype if network else None)


def test_a_symlink_is_judged_by_where_it_leads(table, tmp_path):
    (tmp_path / "link").symlink_to("/mnt/share/runs")
    assert mounts.network_filesystem(tmp_path / "link", table) == "nfs4"
    assert mounts.filesystem_of("/x", tmp_path / "no_such_table") is None  # no table: nothing refused


def test_sqlite_on_a_network_filesystem_is_refused_with_a_hint(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "mounts"
    fake.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/x {tmp_path / 'nfs'} nfs rw 0 0\n")
    with pytest.raises(BadInputError) as info:
        BenchmarkDB(tmp_path / "nfs" / "out" / "benchmark.sqlite", mounts=fake)
    assert "network filesystem (nfs)" in str(info.value) and "--db postgresql://" in str(info.value)
    assert "\n" not in str(info.value) and not (tmp_path / "nfs").exists()
    BenchmarkDB(tmp_path / "local" / "benchmark.sqlite", mounts=fake).close()  # a local folder still works

    made = tmp_path / "nfs" / "benchmark.sqlite"  # a database made elsewhere, then found on the share
    BenchmarkDB(made).close()
    monkeypatch.setattr(mounts, "MOUNTS", fake)  # the table every open reads by default
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "status", str(made)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "network filesystem (nfs)" in err and "--db postgresql://" in err


def test_a_missing_driver_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    with pytest.raises(BadInputError) as info:
        open_db("postgresql://bench@db-host/bench")
    assert "pip install 'psycopg[binary]'" in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_server_is_one_line_without_the_password():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BadInputError) as info:
        open_db(f"postgresql://bench:secret@127.0.0.1:{port}/bench", create=False)
    message = str(info.value)
    assert "cannot use PostgreSQL at postgresql://bench:***@127.0.0.1" in message
    assert "secret" not in message and "\n" not in message
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"


def test_db_option_takes_only_a_postgresql_url(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["benchmark", "run", str(tmp_path / "spec.yaml"), "--db", str(tmp_path / "q.sqlite")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "--db takes a postgresql://" in err and len(err.splitlines()) == 1
