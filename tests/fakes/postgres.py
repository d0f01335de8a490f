"""A real PostgreSQL server for the catalog tests (a pytest plugin, see tests/conftest.py).

``postgres_server`` (session): Debian's PostgreSQL (``/usr/lib/postgresql/*/bin``) initialised in a temporary
folder, trust authentication on loopback only, a private Unix socket folder, a free port, fsync off; one server
per test process (each xdist worker has its own), stopped at the end (only this one, by its data folder).
When root, the server runs as the ``postgres`` user (initdb refuses root) on a folder that user owns.
Skipped, with the reason, when no ``initdb`` is installed (``make postgres`` installs it).

``pg_url`` (function): a fresh, empty database on that server, as a ``postgresql://`` URL.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if os.path.isfile(os.path.join(d, "initdb")):
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root = bindir, root
        self.data, self.sock = root / "data", root / "sock"
        self.port = _free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._n = itertools.count()

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", self.user, "--"] if self.user else []) + list(args)

    def start(self) -> None:
        self.sock.mkdir()
        if self.user:
            shutil.chown(self.root, self.user)
            shutil.chown(self.sock, self.user)
        subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                 "-E", "UTF8", "--locale=C", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        # trust for the admin (the tests' own user) on loopback; everyone else by password (the wrong-password
        # tests); nothing beyond loopback
        (self.data / "pg_hba.conf").write_text("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                                               "host all all 127.0.0.1/32 scram-sha-256\n")
        opts = (f"-k {self.sock} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
                "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                                 str(self.root / "log"), "-w", "-t", "60", "start"),
                       check=True, capture_output=True, timeout=90)

    def stop(self) -> None:
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                       capture_output=True, timeout=60)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def create_role(self, name: str, password: str) -> None:
        """A login role with a password that owns nothing (for the password tests)."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
                conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' CREATEDB")

    def create_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._n)}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass


@pytest.fixture(scope="session")
def postgres_server():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'ckptlab[postgres]')")
    bindir = _bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) installed: run 'make postgres' (Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="ckptlab-pg-"))
    server = PostgresServer(bindir, root)
    try:
        server.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(root, ignore_errors=True)
        out = getattr(e, "stderr", b"") or b""
        pytest.fail(f"could not start PostgreSQL: {e}: {out.decode(errors='replace')[-500:]}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server):
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
