"""Review fixes of the PostgreSQL catalog: a ``?password=`` in the URL never shown (and still used), apply-plan
acting on a PostgreSQL catalog (SQLite is the oracle), malformed URLs as one-line usage errors, and the SQL
translation traps (each fixed form run on the real server and on SQLite itself, the oracle)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3

import pytest
from conftest import run_cli, run_cli_in_process

from ckptlab.library.sql_dialect import DbUrl, PgConnection, redact, translate

pytestmark = pytest.mark.xdist_group("test_pg_review_fixes")
SECRET = "SECRETQ-7f3"


def _no_pgpassword(monkeypatch):
    for name in ("PGPASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent/pgpass")


@pytest.fixture
def role_url(postgres_server, pg_url, monkeypatch):
    """A URL of ``pg_url``'s database for a role with password auth, the password as ``?password=``."""
    _no_pgpassword(monkeypatch)
    postgres_server.create_role("ckpt_q", SECRET)
    db = pg_url.rsplit("/", 1)[1]
    import psycopg

    with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{db}" OWNER TO ckpt_q')
    return f"postgresql://ckpt_q@127.0.0.1:{postgres_server.port}/{db}?sslmode=disable&password={SECRET}"


# -- 1. the password in the query -----------------------------------------------------------------------
@pytest.mark.parametrize("option", ["password", "PassWord", "pass%77ord"])
def test_query_password_left_out_of_the_shown_url(option):
    url = f"postgresql://u@127.0.0.1:5/db?connect_timeout=3&{option}={SECRET}&sslmode=disable"
    shown = redact(url)
    assert SECRET not in shown
    assert shown == "postgresql://u@127.0.0.1:5/db?connect_timeout=3&sslmode=disable"  # the rest kept, in order
    loc = DbUrl(url)
    assert SECRET not in str(loc) and SECRET not in os.fspath(loc) and loc.password == SECRET
    # both passwords at once: neither shown
    both = f"postgresql://u:{SECRET}x@h/db?password={SECRET}"
    assert SECRET not in redact(both)


def test_cli_error_never_shows_a_query_password():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_cli("ls", "--db", f"postgresql://u@127.0.0.1:{port}/db?password={SECRET}", timeout=60)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ") and "cannot open catalog" in lines[0]
    assert SECRET not in r.stdout + r.stderr


def test_query_password_connects_and_is_never_the_path(role_url, monkeypatch):
    from ckptlab.library.catalog import Catalog, CatalogError

    with Catalog(role_url) as cat:  # connects: the password was used (the role has password auth)
        assert SECRET not in str(cat.path) and cat.path.password == SECRET
        assert cat.conn.execute("SELECT current_user").fetchone()[0] == "ckpt_q"
    monkeypatch.setattr(DbUrl, "_seen", {})  # as a new process: only the redacted URL, no password anywhere
    with pytest.raises(CatalogError, match="no password supplied|authentication failed"):
        Catalog(redact(role_url))


def test_query_password_never_printed_by_commands(role_url, tmp_path):
    from fakes.library_files import a1111_library

    a1111_library(tmp_path / "lib")
    outs = []
    for argv in (["scan", tmp_path / "lib", "--hash"], ["ls", "--json"], ["plan-space", "--json"],
                 ["plan-space", "-o", tmp_path / "plan.json"], ["report", "--format", "json"]):
        r = run_cli(*argv, "--db", role_url, timeout=120)
        assert r.returncode == 0, (argv, r.stderr)
        outs.append(r.stdout + r.stderr)
    assert not [o for o in outs if SECRET in o]
    assert SECRET not in (tmp_path / "plan.json").read_text()
    assert json.loads((tmp_path / "plan.json").read_text())["catalog"] == redact(role_url)


def test_web_worker_gets_the_query_password_by_environment(role_url):
    """The job worker's argv carries the redacted URL; ``_start_worker`` hands ``DbUrl.password`` as PGPASSWORD."""
    from ckptlab.web.jobs import worker_argv

    loc = DbUrl(role_url)
    argv = worker_argv(loc, 1)
    assert not [a for a in argv if SECRET in str(a)]
    assert loc.password == SECRET


# -- 3. malformed URLs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["postgresql://u:PW-x1@[::1/db", "postgresql://u:PW-x1@host:99999/db",
                                 "postgresql://u:PW-x1@host:port/db"])
@pytest.mark.parametrize("how", ["option", "env"])
def test_malformed_url_is_a_usage_error(url, how):
    args, env = (["ls", "--db", url], None) if how == "option" else (["ls"], {"CKPTLAB_DB": url})
    r = run_cli(*args, env=env, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a valid PostgreSQL URL" in lines[0], r.stderr
    assert "PW-x1" not in r.stdout + r.stderr and "internal error" not in r.stderr


# -- 2. apply-plan on a PostgreSQL catalog (SQLite the oracle) ------------------------------------------
def _tree(root):
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("symlink", os.readlink(p).replace(str(root), "<root>"))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_nlink)
    return out


def test_apply_plan_on_postgres_does_what_it_does_on_sqlite(pg_url, tmp_path):
    from fakes.sample_files import make_model

    from ckptlab.library.catalog import Catalog

    src = tmp_path / "src"
    (src / "models" / "Stable-diffusion").mkdir(parents=True)
    (src / "models" / "Lora").mkdir(parents=True)
    a = make_model(src / "models" / "Stable-diffusion" / "a.safetensors", "sd1_checkpoint", dtype="F16")
    shutil.copyfile(a, src / "models" / "Stable-diffusion" / "a copy.safetensors")
    shutil.copyfile(a, src / "models" / "Lora" / "a again.safetensors")
    (src / "models" / "Stable-diffusion" / "a copy.preview.png").write_bytes(b"\x89PNG fake preview")
    make_model(src / "models" / "Stable-diffusion" / "b.ckpt", "sd1_checkpoint", ema=True, fmt="ckpt", seed=5)

    results, trees, rows = {}, {}, {}
    for name, db in (("sqlite", tmp_path / "c.db"), ("pg", pg_url)):
        root = tmp_path / name
        shutil.copytree(src, root, symlinks=True)
        plan = tmp_path / f"{name}.plan.json"
        for argv in (["scan", root / "models", "--hash", "--db", db],
                     ["plan-space", "-o", plan, "--db", db]):
            r = run_cli_in_process(*argv)
            assert r.returncode == 0, (name, argv, r.stderr)
        steps = json.loads(plan.read_text())["steps"]
        actions = {s["action"] for s in steps}
        assert "transform" in actions and {"delete_duplicate", "link_duplicate"} & actions, steps
        r = run_cli_in_process("apply-plan", plan, "--json")  # the plan's own catalog (a URL for PostgreSQL)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        recs = [json.loads(line) for line in r.stdout.splitlines()]
        results[name] = sorted((x["status"], x["path"].replace(str(root), "<root>")) for x in recs)
        trees[name] = _tree(root)
        with Catalog(db, must_exist=True) as cat:
            rows[name] = sorted((str(f.path).replace(str(root), "<root>"), f.status, f.sha256, f.size)
                                for f in cat.files(status=None))
    assert all(status == "done" for status, _ in results["sqlite"]), results["sqlite"]
    assert results["pg"] == results["sqlite"]
    assert trees["pg"] == trees["sqlite"]
    assert trees["sqlite"] != _tree(src)  # the plan changed something
    assert rows["pg"] == rows["sqlite"]  # rescanned as on SQLite: the catalog agrees with the files


# -- 4. the translation ---------------------------------------------------------------------------------
def test_rewrites_skip_strings_and_comments():
    t = translate("SELECT 'x IS NOT y', 'a COLLATE NOCASE' -- it's IS NOT ?\nWHERE a IS NOT ? AND b = ?")
    assert t.sql == ["SELECT 'x IS NOT y', 'a COLLATE NOCASE'  \nWHERE a IS DISTINCT FROM %s AND b = %s"]
    assert translate("SELECT ? /* don't */, ?").sql == ["SELECT %s  , %s"]


def test_nocase_compares_both_sides_or_refuses():
    assert translate("SELECT 1 FROM t WHERE a = b COLLATE NOCASE").sql == [
        "SELECT 1 FROM t WHERE lower(a) = lower(b)"]
    assert translate("SELECT 1 FROM t WHERE t.a COLLATE NOCASE = ?1").sql == [
        "SELECT 1 FROM t WHERE lower(t.a) = lower(%(p1)s)"]
    assert translate("SELECT a FROM t ORDER BY t.a COLLATE NOCASE, b").sql == ["SELECT a FROM t ORDER BY lower(t.a), b"]
    for sql in ("SELECT ? COLLATE NOCASE", "CREATE TABLE x (a TEXT COLLATE NOCASE)",
                "SELECT 1 FROM t WHERE a = upper(b) COLLATE NOCASE", 'SELECT 1 FROM t WHERE "a" COLLATE NOCASE = b'):
        with pytest.raises(sqlite3.OperationalError, match="COLLATE NOCASE"):
            translate(sql)


def test_insert_or_ignore_returning_and_with_writes():
    assert translate("INSERT OR IGNORE INTO t(a) VALUES (?) RETURNING id").sql == [
        "INSERT INTO t(a) VALUES (%s) ON CONFLICT DO NOTHING RETURNING id"]
    assert translate("INSERT OR IGNORE INTO t(a) VALUES (?) -- no returning").sql == [
        "INSERT INTO t(a) VALUES (%s) ON CONFLICT DO NOTHING"]
    assert translate("WITH d AS (SELECT 1) DELETE FROM t WHERE a IN (SELECT * FROM d)").kind == "write"
    assert translate("WITH d AS (SELECT ? AS v) UPDATE t SET a = 1 WHERE a IN (SELECT v FROM d)").kind == "write"
    assert translate("WITH d AS (SELECT 'DELETE FROM x' AS v) SELECT v FROM d").kind == "other"


#: (setup, the statement, its parameters): each run on SQLite (the oracle) and on PostgreSQL through PgConnection
SETUP = ["CREATE TABLE w (id INTEGER PRIMARY KEY, name TEXT UNIQUE, other TEXT)",
         "INSERT INTO w(name, other) VALUES ('Abc', 'aBC'), ('x', 'y'), ('Q', NULL), ('IS NOT', 'IS NOT')"]
FORMS = [
    ("SELECT name FROM w WHERE name = other COLLATE NOCASE ORDER BY id", ()),
    ("SELECT name FROM w WHERE other COLLATE NOCASE = ? ORDER BY id", ("abc",)),
    ("SELECT name FROM w WHERE other IS NOT ? AND name != 'IS NOT x' ORDER BY id", ("y",)),
    ("SELECT 'it''s IS NOT', name -- a comment's quote ?\nFROM w WHERE name = ?", ("x",)),
    ("INSERT OR IGNORE INTO w(name) VALUES (?) RETURNING name", ("new",)),
    ("INSERT OR IGNORE INTO w(name) VALUES (?) RETURNING name", ("x",)),
    ("WITH d AS (SELECT 'Q' AS v) DELETE FROM w WHERE name IN (SELECT v FROM d)", ()),
    ("SELECT name FROM w ORDER BY name", ()),
]


def test_fixed_forms_run_on_postgres_as_on_sqlite(pg_url):
    lite = sqlite3.connect(":memory:", isolation_level=None)
    pg = PgConnection(pg_url)
    try:
        pg.ensure_compat()
        for s in SETUP:
            lite.execute(s)
            pg.execute(s)
        for sql, params in FORMS:
            want = [tuple(r) for r in lite.execute(sql, params).fetchall()]
            got = [tuple(r) for r in pg.execute(sql, params).fetchall()]
            assert got == want, sql
    finally:
        pg.close()
        lite.close()


def test_with_delete_takes_the_write_lock(pg_url):
    """Outside a transaction a ``WITH ... DELETE`` waits for the writer that holds the lock, as any write."""
    holder = PgConnection(pg_url)
    writer = PgConnection(pg_url, busy_timeout_s=0.2)
    try:
        holder.execute("CREATE TABLE z (a INTEGER)")
        holder.execute("INSERT INTO z(a) VALUES (1)")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            writer.execute("WITH d AS (SELECT 1 AS v) DELETE FROM z WHERE a IN (SELECT v FROM d)")
        holder.execute("ROLLBACK")
        writer.execute("WITH d AS (SELECT 1 AS v) DELETE FROM z WHERE a IN (SELECT v FROM d)")
        assert holder.execute("SELECT count(*) FROM z").fetchone()[0] == 0
    finally:
        writer.close()
        holder.close()
