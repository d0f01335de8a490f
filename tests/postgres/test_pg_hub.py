"""Hub answers (``report``, ``dupes``, ``ls``/``ls --unsafe``, ``plan-space``) on a PostgreSQL catalog: the same
synthetic hub catalog (tests/fakes/hub_catalog.py, hostile names included) written into SQLite and into
PostgreSQL, and every answer compared with SQLite's, which is the oracle. Large reads stream: a named
server-side cursor hands rows over ``FETCH`` at a time, counted here at psycopg's boundary."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli_in_process
from fakes.hub_catalog import build

from ckptlab.library import report
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import find_dupes, iter_dupes
from ckptlab.library.hub_queries import FETCH, iter_listed

pytestmark = pytest.mark.xdist_group("test_pg_hub")

ROWS = 6000


def _norm(text: str, *dbs) -> str:
    for db in dbs:
        text = text.replace(str(db), "<db>")
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)?", "<utc time>", text)
    return re.sub(r"in \d+(\.\d+)? s", "in N s", text)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, postgres_server):
    """(sqlite file, postgres url): the same synthetic hub catalog in each."""
    sq = tmp_path_factory.mktemp("pghub") / "hub.db"
    pg = postgres_server.create_database()
    for db in (sq, pg):
        build(db, ROWS, seed=11, hostile=True, dup_share=0.3)
    yield sq, pg
    postgres_server.drop_database(pg)


@pytest.fixture(scope="module")
def icu_hub(hub, postgres_server):
    """The hub catalog again in a database whose default collation is ICU's en-US (case-insensitive first,
    punctuation ignored at first level: what many servers run), SQLite's catalog as the oracle."""
    import psycopg

    url = postgres_server.create_database()
    name = url.rsplit("/", 1)[1]
    postgres_server.drop_database(url)
    try:
        with psycopg.connect(postgres_server.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE \'en-US\' '
                         "LOCALE 'C'")
    except psycopg.Error as e:
        pytest.skip(f"this PostgreSQL has no ICU collations: {e}")
    build(url, ROWS, seed=11, hostile=True, dup_share=0.3)
    yield hub[0], url
    postgres_server.drop_database(url)


def _shape(g):
    return (g.kind, g.key, g.keep, g.reason, g.component, g.bytes_freed,
            [(c.id, c.path, c.keep, c.match, c.in_ui, c.action, c.note, c.bytes_freed) for c in g.copies])


@pytest.mark.parametrize("fmt", ["table", "json", "csv", "html"])
def test_report_equals_sqlite(hub, fmt):
    outs = []
    for db in hub:
        with Catalog(db) as cat:
            outs.append(_norm(report.report(cat, fmt, width=200), *hub))
    assert outs[0] == outs[1]
    assert len(outs[0]) > 1000


def test_dupes_equal_sqlite(hub):
    got = []
    for db in hub:
        with Catalog(db) as cat:
            res = find_dupes(cat, components=True)
            got.append(((res.unhashed, res.unfingerprinted), [_shape(g) for g in res.groups],
                        [_shape(g) for g in iter_dupes(cat)]))
    assert got[0] == got[1]
    assert len(got[0][1]) > 50


@pytest.mark.parametrize("sort", ["name", "size", "mtime", "path"])
@pytest.mark.parametrize("unsafe", [False, True])
def test_listing_equals_sqlite(hub, sort, unsafe):
    got = []
    for db in hub:
        with Catalog(db) as cat:
            got.append([(r.id, r.path) for r, _ in iter_listed(cat, sort=sort, unsafe=unsafe)])
    assert got[0] == got[1]
    assert len(got[0]) > (100 if unsafe else ROWS // 2)


@pytest.mark.parametrize("sort", ["name", "path"])
@pytest.mark.parametrize("unsafe", [False, True])
def test_listing_order_ignores_the_database_collation(icu_hub, sort, unsafe):
    got = []
    for db in icu_hub:
        with Catalog(db) as cat:
            got.append([r.id for r, _ in iter_listed(cat, sort=sort, unsafe=unsafe)])
    assert got[0] == got[1]
    if sort == "path" and not unsafe:  # the database's own collation would order the paths otherwise
        import psycopg

        with psycopg.connect(icu_hub[1]) as con:
            icu = [r[0] for r in con.execute("SELECT id FROM files WHERE status = 'present' "
                                             "ORDER BY display COLLATE \"default\", id").fetchall()]
        assert sorted(icu) == sorted(got[0]) and icu != got[0]


def test_dupes_and_report_ignore_the_database_collation(icu_hub):
    outs = []
    for db in icu_hub:
        with Catalog(db) as cat:
            outs.append(([_shape(g) for g in find_dupes(cat, components=True).groups],
                         _norm(report.report(cat, "table", width=200), *icu_hub)))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("args", [("ls", "--unsafe", "--json", "--limit", "30", "--offset", "10"),
                                  ("ls", "--unsafe", "--limit", "100"), ("ls", "--json", "--sort", "size"),
                                  ("dupes", "--json"), ("dupes", "--limit", "200"), ("report", "--format", "json"),
                                  ("report",)])
def test_cli_equals_sqlite(hub, args, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    outs = []
    for db in hub:
        r = run_cli_in_process(*args, "--db", db)
        assert r.returncode == 0, (db, r.stderr)
        outs.append(_norm(r.stdout, *hub))
    assert outs[0] == outs[1]


# -- streaming ----------------------------------------------------------------------------------------------
BIG = 20_000


@pytest.fixture(scope="module")
def big(tmp_path_factory, postgres_server):
    sq = tmp_path_factory.mktemp("pgbig") / "hub.db"
    pg = postgres_server.create_database()
    for db in (sq, pg):
        build(db, BIG, seed=2)
    yield sq, pg
    postgres_server.drop_database(pg)


@pytest.fixture
def pulls(monkeypatch):
    """The size of every batch of rows psycopg hands over (a plain cursor's whole answer, a server-side
    cursor's FETCH), recorded at psycopg's own methods."""
    import psycopg

    seen: list[tuple[str, int]] = []
    for cls in (psycopg.Cursor, psycopg.ClientCursor, psycopg.ServerCursor):
        for meth in ("fetchall", "fetchmany"):
            real = getattr(cls, meth)

            def spy(self, *a, _real=real, _name=f"{cls.__name__}.{meth}", **kw):
                rows = _real(self, *a, **kw)
                seen.append((_name, len(rows)))
                return rows

            monkeypatch.setattr(cls, meth, spy)
    return seen


@pytest.mark.parametrize("args", [("ls", "--unsafe", "--limit", "10"), ("ls", "--unsafe", "--json"),
                                  ("ls", "--json", "--sort", "size"), ("report",), ("report", "--format", "csv"),
                                  ("dupes", "--json")])
def test_large_reads_stream_and_equal_sqlite(big, pulls, args, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    sq, pg = big
    want = run_cli_in_process(*args, "--db", sq)
    pulls.clear()
    got = run_cli_in_process(*args, "--db", pg)
    assert got.returncode == want.returncode == 0, got.stderr
    assert _norm(got.stdout, *big) == _norm(want.stdout, *big)
    assert pulls and max(n for _, n in pulls) <= FETCH  # never the answer at once: a batch per round trip
    total = sum(n for _, n in pulls)
    if args[:3] == ("ls", "--unsafe", "--limit"):
        assert total < 100
    elif args[0] == "ls":
        shown = len(got.stdout.splitlines())
        assert total >= shown and (shown > FETCH or "--unsafe" in args)  # (the queue: 4 % of the rows)
        assert any(name == "ServerCursor.fetchmany" for name, _ in pulls)


def test_a_stream_left_early_is_closed_and_the_connection_stays_usable(big):
    _sq, pg = big
    with Catalog(pg) as cat:
        listed = iter_listed(cat, unsafe=False)
        first = [next(listed) for _ in range(5)]
        # a lookup and a write in between the rows: the connection is not held by the open cursor
        assert cat.conn.execute("SELECT count(*) FROM files").fetchone()[0] == BIG
        cat.conn.execute("UPDATE files SET folder = folder WHERE id = ?", (first[0][0].id,))
        rest = list(listed)
        assert len(first) + len(rest) == cat.conn.execute(
            "SELECT count(*) FROM files WHERE status = 'present'").fetchone()[0]
        page = iter_listed(cat, limit=3000)
        next(page)
        page.close()
        held = cat.conn.execute("SELECT count(*) FROM pg_cursors").fetchone()[0]
        assert held == 0  # every server-side cursor closed: none left open in the session
        stream = cat.conn.stream("SELECT id FROM files ORDER BY id")
        assert [r[0] for r in stream.fetchmany(3)] == [1, 2, 3] and stream.pulled == 3
        stream.close()
        assert cat.conn.execute("SELECT count(*) FROM pg_cursors").fetchone()[0] == 0


def test_stream_binds_like_execute(big):
    _sq, pg = big
    with Catalog(pg) as cat:
        sql = ("SELECT id, name FROM files WHERE (? IS NULL OR family = ?) AND name LIKE ? AND length(?) = 4 "
               "ORDER BY id")
        args = (None, None, "%-lora-%", "abcd")
        want = cat.conn.execute(sql, args).fetchall()
        assert want and list(cat.conn.stream(sql, args)) == want
        assert cat.conn.stream("SELECT '100%' AS p").fetchall() == [("100%",)]
        with pytest.raises(__import__("sqlite3").OperationalError, match="no_such_col"):
            cat.conn.stream("SELECT no_such_col FROM files")
        assert cat.conn.execute("SELECT 1").fetchone() == (1,)  # the connection is fine after the error
