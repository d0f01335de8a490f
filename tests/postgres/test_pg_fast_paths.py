"""The PostgreSQL connection's fast paths give what the plain paths give: a write outside a transaction sent as
one simple query (BEGIN, the lock, the statement, COMMIT), and server-side parameters (prepared by psycopg from a
statement's 5th run, pipelined by ``executemany``) where every parameter has its column's type. Oracles: SQLite
running the same statements, and the client-side path (``prepare = False``) on the same database."""

from __future__ import annotations

import sqlite3

import pytest

from ckptlab.library.sql_dialect import PgConnection, server_bindable, translate

pytestmark = pytest.mark.xdist_group("test_pg_fast_paths")

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER, x REAL, b BLOB, UNIQUE(name))"
ROWS = [(f"n{i}", i, i / 4, bytes([i % 256]) * 3) for i in range(40)] + [("100%_off", 7, None, None),
                                                                        ("quote'd", None, 1.5, b"")]


@pytest.mark.parametrize(("sql", "bindable"), [
    ("SELECT sha256 FROM content WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ?", True),
    ("INSERT INTO t(name, n) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = excluded.n", True),
    ("UPDATE files SET status = ? WHERE id IN (?, ?)", True),
    ("SELECT id FROM t ORDER BY id LIMIT ? OFFSET ?", True),
    ("SELECT * FROM files WHERE id = ?", False),  # a prepared * breaks when a migration adds a column
    ("SELECT f.* FROM files f WHERE f.id = ?", False),
    ("SELECT x FROM t WHERE ? IS NULL OR name = ?", False),  # an untyped NULL
    ("SELECT length(?)", False),
    ("SELECT 1 FROM t WHERE name LIKE '%a' AND id = ?", False),
    ("SELECT 1 FROM t WHERE lower(name) = ?", False),
    ("SELECT 1 FROM t WHERE id = ?1 OR n = ?1", False),
])
def test_which_statements_bind_server_side(sql, bindable):
    assert server_bindable(translate(sql).sql[-1]) is bindable


def _both(pg_url, tmp_path):
    sq = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    pg = PgConnection(pg_url)
    pg.ensure_compat()
    for c in (sq, pg):
        c.execute(SCHEMA)
    return sq, pg


QUERIES = [("SELECT id, name, n, x, b FROM t WHERE n = ? ORDER BY id", lambda i: (i % 9,)),
           ("SELECT id, name FROM t WHERE name = ?", lambda i: (ROWS[i % len(ROWS)][0],)),
           ("SELECT count(*) FROM t WHERE n >= ? AND x < ?", lambda i: (i, i / 2)),
           ("SELECT name FROM t WHERE id IN (?, ?, ?) ORDER BY id", lambda i: (i, i + 1, "3")),
           ("SELECT name FROM t WHERE b = ?", lambda i: (bytes([i % 40]) * 3,)),
           ("SELECT id FROM t ORDER BY id LIMIT ? OFFSET ?", lambda i: (3, i))]


@pytest.mark.parametrize("prepare", [True, False])
def test_statements_run_many_times_answer_as_sqlite(pg_url, tmp_path, monkeypatch, prepare):
    monkeypatch.setattr(PgConnection, "prepare", prepare)
    sq, pg = _both(pg_url, tmp_path)
    ins = "INSERT INTO t(name, n, x, b) VALUES (?, ?, ?, ?)"
    for c in (sq, pg):
        c.execute("BEGIN IMMEDIATE")
        c.executemany(ins, ROWS)
        c.execute("COMMIT")
    for sql, args in QUERIES:
        for i in range(12):  # past psycopg's prepare threshold (5)
            assert pg.execute(sql, args(i)).fetchall() == sq.execute(sql, args(i)).fetchall(), (sql, i)
    up = "INSERT INTO t(name, n) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET n = excluded.n"
    for c in (sq, pg):
        c.execute("BEGIN IMMEDIATE")
        for i in range(20):
            c.execute(up, (f"n{i * 3}", -i))
        c.execute("COMMIT")
    # (not the ids: a PostgreSQL upsert spends an identity value even when it updates)
    want = sq.execute("SELECT name, n, x, b FROM t ORDER BY name").fetchall()
    assert pg.execute("SELECT name, n, x, b FROM t ORDER BY name").fetchall() == want
    # a column added by another connection: the prepared statements (explicit columns) go on working
    other = PgConnection(pg_url)
    other.execute("ALTER TABLE t ADD COLUMN extra TEXT")
    other.close()
    sql, args = QUERIES[0]
    assert pg.execute(sql, args(1)).fetchall() == sq.execute(sql, args(1)).fetchall()
    pg.close()


def test_a_write_outside_a_transaction_is_one_query_and_behaves_as_before(pg_url, tmp_path, monkeypatch):
    sq, pg = _both(pg_url, tmp_path)
    sent = []
    real = pg._conn.cursor

    def spy(*a, **kw):
        cur = real(*a, **kw)
        ex = cur.execute
        cur.execute = lambda q, *p, **k: sent.append(q) or ex(q, *p, **k)
        return cur

    monkeypatch.setattr(pg._conn, "cursor", spy)
    for c in (sq, pg):
        cur = c.execute("INSERT INTO t(name, n) VALUES ('100%_off', 1)")  # a literal percent sign, no values
        assert cur.lastrowid == 1
        cur = c.execute("INSERT INTO t(name, n, x) VALUES (?, ?, ?)", ("it's 50% ; COMMIT", 2, 0.5))
        assert cur.lastrowid == 2
        assert c.execute("UPDATE t SET n = n + ? WHERE n >= ?", (10, 1)).rowcount == 2
        with pytest.raises(sqlite3.IntegrityError):
            c.execute("INSERT INTO t(name, n) VALUES (?, ?)", ("100%_off", 3))
        assert not c.in_transaction
        assert c.execute("DELETE FROM t WHERE n = ?", (999,)).rowcount == 0
    writes = [q for q in sent if not q.startswith(("SELECT", "ROLLBACK"))]  # (not the table's key, read once)
    assert sent.count("ROLLBACK") == 1  # after the failed insert
    assert len(writes) == 5 and all(q.startswith("BEGIN; SELECT pg_advisory_xact_lock(") and q.endswith("; COMMIT")
                                    for q in writes)
    monkeypatch.undo()
    assert pg.execute("SELECT id, name, n, x FROM t ORDER BY id").fetchall() == \
        sq.execute("SELECT id, name, n, x FROM t ORDER BY id").fetchall()
    assert pg.execute("SELECT changes()").fetchone() == (0,)


def test_a_write_waiting_for_the_lock_times_out_as_sqlite_says(pg_url, tmp_path):
    _sq, pg = _both(pg_url, tmp_path)
    holder = PgConnection(pg_url)
    holder.execute("BEGIN IMMEDIATE")
    waiter = PgConnection(pg_url, busy_timeout_s=0.3)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        waiter.execute("INSERT INTO t(name) VALUES (?)", ("x",))
    assert not waiter.in_transaction
    holder.execute("ROLLBACK")
    assert waiter.execute("INSERT INTO t(name) VALUES (?)", ("x",)).rowcount == 1
    assert pg.execute("SELECT name FROM t").fetchall() == [("x",)]
    for c in (holder, waiter, pg):
        c.close()


def test_table_exists_check_answers_as_the_sqlite_master_view(pg_url, tmp_path):
    sq, pg = _both(pg_url, tmp_path)
    for c in (sq, pg):
        c.execute("CREATE INDEX t_n ON t(n)")
        c.execute("CREATE VIEW v AS SELECT id FROM t")
    fast = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    assert "pg_class" in translate(fast).sql[-1]  # not the view: an indexed catalog lookup
    for name in ("t", "v", "t_n", "nothing", "T"):
        view = pg.execute("SELECT count(*) FROM (SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?) x",
                          (name,)).fetchone()[0]
        assert len(pg.execute(fast, (name,)).fetchall()) == view, name
        assert pg.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                          (name,)).fetchone()[0] == view
        assert (pg.execute(f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{name}'").fetchone()
                is not None) == (name in ("t", "v"))
    want = sq.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 't'").fetchone()
    assert pg.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 't'").fetchone() == want
    pg.close()
