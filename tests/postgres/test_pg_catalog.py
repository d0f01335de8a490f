"""The catalog's own behaviours on both backends (a ``db`` fixture parametrised over a SQLite file and a fresh
PostgreSQL database), the schema PostgreSQL gets (the same tables and columns as SQLite's), the translation's
corner cases, and the location handling of ``--db`` / ``$CKPTLAB_DB`` URLs (a password is never printed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptlab.errors import CatalogError
from ckptlab.hashes import Hashes
from ckptlab.library import catalog as cat
from ckptlab.library.catalog import Catalog, catalog_location
from ckptlab.library.sql_dialect import DbUrl, is_postgres, redact, translate

pytestmark = pytest.mark.xdist_group("test_pg_catalog")  # one module per worker: its module fixtures built once


def _all_components() -> None:
    """Import every module that registers catalog tables (what `serve` imports)."""
    import ckptlab.hub.store  # noqa: F401
    import ckptlab.library.copies  # noqa: F401
    import ckptlab.library.image_links  # noqa: F401
    import ckptlab.library.lineage  # noqa: F401
    import ckptlab.web.index  # noqa: F401
    import ckptlab.web.jobs  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "c.db"
    return request.getfixturevalue("pg_url")


# -- the schema ---------------------------------------------------------------------------------------------
def test_fresh_postgres_catalog_has_sqlites_tables_and_columns(tmp_path, pg_url):
    _all_components()
    with Catalog(tmp_path / "c.db") as lite:
        tables = [r[0] for r in lite.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name NOT LIKE 'web_index_fts_%' ORDER BY name")]
        want = {t: [r[1] for r in lite.conn.execute(f"PRAGMA table_info({t})")] for t in tables}
        versions = dict(lite.conn.execute("SELECT component, version FROM schema_versions").fetchall())
        core = lite.schema_version
    with Catalog(pg_url) as pg:
        import psycopg

        with psycopg.connect(pg_url) as raw:  # PostgreSQL's own catalog, not the translation's
            got_tables = {r[0] for r in raw.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                "AND table_type = 'BASE TABLE'")}
            got = {t: [r[0] for r in raw.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
                "ORDER BY ordinal_position", (t,))] for t in want}
            types = dict(raw.execute("SELECT column_name, data_type FROM information_schema.columns "
                                     "WHERE table_name = 'files'").fetchall())
        assert pg.schema_version == core
        assert dict(pg.conn.execute("SELECT component, version FROM schema_versions").fetchall()) == versions
    assert set(want) <= got_tables and got_tables - set(want) == {"ckptlab_meta"}
    for t, cols in want.items():
        assert got[t] == (["rowid", *cols] if t == "web_index_fts" else cols), t
    # sizes, inodes and ns times need 64 bits; paths are raw bytes
    assert types["ino"] == types["size"] == types["mtime_ns"] == "bigint" and types["path"] == "bytea"


def test_two_processes_open_a_new_postgres_catalog_at_once(pg_url):
    import subprocess
    import sys

    from conftest import SRC

    code = ("import sys; import ckptlab.web.index, ckptlab.web.jobs, ckptlab.library.copies, ckptlab.library.lineage, "
            "ckptlab.library.image_links; from ckptlab.library.catalog import Catalog; "
            "c = Catalog(sys.argv[1]); print(c.schema_version); c.close()")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert {o.strip() for o, _ in outs} == {str(len(cat._CORE_MIGRATIONS))}


# -- the catalog on both backends ---------------------------------------------------------------------------
def test_registered_migrations_run_in_order_once(db, monkeypatch):
    monkeypatch.setattr(cat, "_REGISTERED", {})
    cat.register_migrations("hub", ["CREATE TABLE hub_links (file_id INTEGER, url TEXT);"])
    with Catalog(db) as c:
        assert c.component_version("hub") == 1
        c.conn.execute("INSERT INTO hub_links VALUES (1, 'u')")
    cat.register_migrations("hub", ["CREATE TABLE hub_links (file_id INTEGER, url TEXT);",
                                    "ALTER TABLE hub_links ADD COLUMN version_id INTEGER;"])
    with Catalog(db) as c:
        assert c.component_version("hub") == 2
        assert c.conn.execute("SELECT file_id, url, version_id FROM hub_links").fetchall() == [(1, "u", None)]


def test_failed_migration_leaves_nothing_half_done(db, monkeypatch):
    monkeypatch.setattr(cat, "_REGISTERED", {})
    cat.register_migrations("x", ["CREATE TABLE x_a (i INTEGER); CREATE TABLE x_a (i INTEGER);"])
    with pytest.raises(CatalogError):
        Catalog(db)
    monkeypatch.setattr(cat, "_REGISTERED", {})
    with Catalog(db) as c:
        assert c.component_version("x") == 0
        assert c.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'x_a'").fetchone() is None


def test_newer_schema_is_refused(db):
    with Catalog(db) as c:
        c.conn.execute("PRAGMA user_version = 99")
    with pytest.raises(CatalogError, match="newer"):
        Catalog(db)


def test_content_hashes_big_numbers_and_raw_byte_paths(db, tmp_path):
    """64-bit stat keys (an inode past 2^32, ns times), raw-byte paths (not UTF-8), hash lookups."""
    key = (2**40 + 3, 2**35 + 7, 5 * 2**32, 1_700_000_000_123_456_789)
    h = Hashes(sha256="AB" * 32, autov1="12345678", autov2="ABABABABAB", autov3="C" * 12, crc32="0A0B0C0D",
               blake3="DE" * 32, size=key[2])
    with Catalog(db) as c:
        with c.transaction():
            c.put_hashes(key, h)
        name = os.fsdecode(b"/lib/caf\xe9 \xff.safetensors")
        with c.transaction() as conn:
            fid = conn.execute("INSERT INTO files(path, display, name, dev, ino, size, mtime_ns, first_seen, "
                               "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (cat.path_key(name), cat.display_path(name), "x", *key, 1.5, 1.5)).lastrowid
        assert isinstance(fid, int)
        rec = c.get(fid)
        assert rec.stat_key == key and rec.sha256 == "AB" * 32 and rec.path == cat.display_path(name)
        assert c.get_by_path(name).id == fid
        assert [r.id for r in c.find_by_hash("abababab")] == [fid]  # an 8+ digit SHA-256 prefix
        assert [r.id for r in c.find_by_hash("0x0a0b0c0d")] == [fid]
        assert [r.id for r in c.find_by_hash("ababab")] == []  # too short for a prefix
        assert c.content(key)["hashes"] == h
        before = c.change_marker()
        assert c.move_file(fid, "/lib/moved.safetensors", (9, 9, key[2], key[3]))
        assert c.change_marker() != before
        assert c.content((9, 9, key[2], key[3]))["hashes"] == h  # the hashes followed the move
        assert [r.name for r in c.files(search="MOVED", sort="name")] == ["moved.safetensors"]
        assert c.counts() == {"present": 1}


def test_errors_keep_their_sqlite_classes(db):
    import sqlite3

    with Catalog(db) as c:
        c.conn.execute("INSERT INTO scans(started, roots, status) VALUES (1, '[]', 'x')")
        with pytest.raises(sqlite3.IntegrityError):
            c.conn.execute("INSERT INTO files(path, display, name, first_seen, last_seen) VALUES (?, 'a', 'a', 1, 1)",
                           (None,))
        with pytest.raises(sqlite3.OperationalError):
            c.conn.execute("SELECT no_such_column FROM files")
        with pytest.raises(ZeroDivisionError):  # a transaction rolled back on any error, the catalog usable after
            with c.transaction() as conn:
                conn.execute("INSERT INTO scans(started, roots, status) VALUES (2, '[]', 'y')")
                raise ZeroDivisionError("a failure inside the transaction")
        assert c.conn.execute("SELECT count(*) FROM scans").fetchone()[0] == 1
        assert not c.conn.in_transaction


# -- translation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("sqlite", "postgres"), [
    ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = %s AND c = %s"),
    ("SELECT a FROM t WHERE b = ?1 OR c = ?1", "SELECT a FROM t WHERE b = %(p1)s OR c = %(p1)s"),
    ("SELECT '?' || a FROM t WHERE b LIKE '%x' AND c = ?", "SELECT '?' || a FROM t WHERE b LIKE '%%x' AND c = %s"),
    ("SELECT '50%' FROM t", "SELECT '50%' FROM t"),
    ("INSERT OR IGNORE INTO t(a) VALUES (?)", "INSERT INTO t(a) VALUES (%s) ON CONFLICT DO NOTHING"),
    ("SELECT a FROM t ORDER BY f.name COLLATE NOCASE, +w.size DESC", "SELECT a FROM t ORDER BY lower(f.name), w.size DESC"),
    ("SELECT 1 WHERE old.a IS NOT new.a AND b IS NOT NULL", "SELECT 1 WHERE old.a IS DISTINCT FROM new.a AND b IS NOT NULL"),
    ("CREATE TABLE t (id INTEGER PRIMARY KEY, p BLOB, r REAL, n INTEGER NOT NULL)",
     "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, p BYTEA, r DOUBLE PRECISION, "
     "n BIGINT NOT NULL)"),
])
def test_translation(sqlite, postgres):
    assert translate(sqlite).sql == [postgres]


def test_trigger_becomes_a_function_and_a_trigger():
    t = translate("CREATE TRIGGER tr AFTER UPDATE OF a ON files WHEN old.a IS NOT new.a BEGIN\n"
                  "INSERT OR IGNORE INTO d(file_id) VALUES (new.id);\nEND;")
    fn, trig = t.sql
    assert fn.startswith("CREATE OR REPLACE FUNCTION tr_fn() RETURNS trigger LANGUAGE plpgsql")
    assert "INSERT INTO d(file_id) VALUES (new.id) ON CONFLICT DO NOTHING;" in fn
    assert trig == ("CREATE TRIGGER tr AFTER UPDATE OF a ON files FOR EACH ROW WHEN (old.a IS DISTINCT FROM new.a) "
                    "EXECUTE FUNCTION tr_fn()")


# -- locations ----------------------------------------------------------------------------------------------
def test_a_path_option_mangled_url_is_the_url_again():
    url = "postgresql://me@db.example:5433/lib?sslmode=disable"
    mangled = Path(url)  # what typer's Path option makes of it
    assert str(mangled) == "postgresql:/me@db.example:5433/lib?sslmode=disable"
    for value in (url, mangled, "postgres://me@db.example:5433/lib?sslmode=disable"):
        loc = catalog_location(value)
        assert isinstance(loc, DbUrl) and loc.dsn == url
    assert not is_postgres(Path("/data/postgresql/catalog.db")) and not is_postgres("catalog.db")


def test_password_is_never_in_the_shown_url():
    loc = DbUrl("postgresql://me:s3cr%40t@h:5432/lib")
    assert str(loc) == "postgresql://me@h:5432/lib" and "s3cr" not in repr(loc) and "s3cr" not in os.fspath(loc)
    assert loc.dsn.endswith("me:s3cr%40t@h:5432/lib") and loc.password == "s3cr@t"
    assert DbUrl(str(loc)).dsn == loc.dsn  # the shown URL reconnects with it, in this process
    assert redact("postgresql://h/lib") == "postgresql://h/lib"


def test_env_var_url(monkeypatch):
    monkeypatch.setenv("CKPTLAB_DB", "postgresql://me@h/lib")
    assert cat.default_db_path().dsn == "postgresql://me@h/lib"
