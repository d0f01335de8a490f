"""A PostgreSQL catalog that cannot be used: a wrong password, a database that does not exist, a database that
is not a ckptlab catalog for a read-only command, no server at all. Each is one line on stderr, exit 1, within
the connect timeout, and the password is never printed (stdout, stderr, a report, a plan)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.xdist_group("test_pg_bad_input")  # one module per worker: its module fixtures built once
PASSWORD = "pw-Zq81-never-shown"


def _one_line_error(r, *, contains: str = "") -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def role(postgres_server, pg_url):
    postgres_server.create_role("ckpt_user", PASSWORD)
    db = pg_url.rsplit("/", 1)[1]
    import psycopg

    with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{db}" OWNER TO ckpt_user')
    return f"postgresql://ckpt_user:{PASSWORD}@127.0.0.1:{postgres_server.port}/{db}"


@pytest.mark.parametrize("argv", [["ls"], ["scan", "{lib}"], ["report"], ["show", "ABCDEF0123"]])
def test_wrong_password_is_one_line(role, tmp_path, argv):
    bad = role.replace(PASSWORD, "wrong-" + PASSWORD[:5])
    r = run_cli(*[a.format(lib=tmp_path) for a in argv], "--db", bad, timeout=60)
    line = _one_line_error(r, contains="password authentication failed")
    assert PASSWORD[:5] not in r.stdout + r.stderr and "ckpt_user@127.0.0.1" in line


def test_missing_database_is_one_line(postgres_server):
    r = run_cli("ls", "--db", postgres_server.url("no_such_db"), timeout=60)
    _one_line_error(r, contains="does not exist")


def test_read_only_command_on_an_empty_database_makes_nothing(pg_url):
    r = run_cli("ls", "--db", pg_url, timeout=60)
    _one_line_error(r, contains="no catalog in this database yet")
    import psycopg

    with psycopg.connect(pg_url) as conn:  # nothing was created by a read
        assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
                            ).fetchone()[0] == 0


def test_no_server_is_one_line_within_the_timeout():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("ls", "--db", f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/lib", timeout=60)
    _one_line_error(r, contains="cannot open catalog")
    assert PASSWORD not in r.stdout + r.stderr


def test_password_never_printed_by_working_commands(role, tmp_path):
    from fakes.library_files import a1111_library

    files = a1111_library(tmp_path / "lib")
    outs = []
    for argv in (["scan", tmp_path / "lib", "--hash"], ["ls", "--json"], ["report", "--format", "json"],
                 ["plan-space", "--json"], ["show", files["vae"]], ["dupes"]):
        r = run_cli(*argv, "--db", role, timeout=120)
        assert r.returncode == 0, (argv, r.stderr)
        outs.append(r.stdout + r.stderr)
    assert not [o for o in outs if PASSWORD in o]
    report = json.loads(outs[2])
    assert report["catalog"] == role.replace(f":{PASSWORD}", "")  # the catalog named, without its password


def test_without_psycopg_the_url_names_the_extra(monkeypatch):
    import sys

    from ckptlab.errors import CatalogError
    from ckptlab.library.catalog import Catalog

    monkeypatch.setitem(sys.modules, "psycopg", None)  # "not installed"
    with pytest.raises(CatalogError, match=r"ckptlab\[postgres\]"):
        Catalog("postgresql://me@127.0.0.1:1/lib")
