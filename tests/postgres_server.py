"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, ``postgres`` on a free local port.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` system user (``nobody``
where there is none). ``find_binaries`` returns None where no server is installed (``apt-get install
postgresql``); tests then skip and say so.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Optional

NO_SERVER = "no PostgreSQL server binaries (initdb, pg_ctl) found; install them with 'apt-get install -y postgresql'"


def find_binaries() -> Optional[Path]:
    """The folder holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(os.path.realpath(on_path)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """``with PostgresServer(bin_dir) as server: url = server.new_database()``."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.port = _free_port()
        self.user = None
        if os.geteuid() == 0:  # postgres will not run as root
            self.user = "postgres" if _has_user("postgres") else "nobody"
        self.dir = Path(tempfile.mkdtemp(prefix="personalize-pg-"))  # under /tmp: reachable by that user
        self.data = self.dir / "data"

    def _run(self, *args: str) -> None:
        kwargs = {"user": self.user} if self.user else {}
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, timeout=120,
                                cwd=self.dir, **kwargs)
        if result.returncode:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout[-2000:]} {result.stderr[-2000:]} {log[-2000:]}")

    def __enter__(self) -> "PostgresServer":
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://bench@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database on this server; its URL."""
        import psycopg

        name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def __exit__(self, *exc) -> None:
        try:
            self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", str(self.data))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
