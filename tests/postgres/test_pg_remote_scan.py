"""Remote scans (``scan s3://bucket/prefix``, moto) into a PostgreSQL catalog: the same rows as the same scan into
SQLite (the oracle; both read back here with the database's own client, not the code under test), concurrent
scans of different prefixes and of one prefix, ``--ray`` once, and the hub answers on the scanned catalog."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import SRC, run_cli, run_cli_in_process
from fakes.remote_library import FACT_COLUMNS, build_library, rows

pytestmark = pytest.mark.xdist_group("test_pg_remote_scan")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("pglib")
    return build_library(root / "lib", root / "canary")


def pg_rows(url: str, *, strip: str = "") -> dict[str, dict]:
    """``fakes.remote_library.rows`` for a PostgreSQL catalog, read with psycopg itself."""
    import psycopg
    from psycopg.rows import dict_row

    out = {}
    with psycopg.connect(url, row_factory=dict_row) as con:
        for r in con.execute("SELECT * FROM files WHERE status = 'present'").fetchall():
            path = bytes(r["path"]).decode("utf-8", "surrogateescape")
            rel = path[len(strip):].lstrip("/") if strip and path.startswith(strip) else path
            d = {c: r[c] for c in FACT_COLUMNS}
            for c in ("info", "safety_detail", "dtypes", "triggers"):
                d[c] = json.loads(d[c]) if d[c] is not None else None
            c = con.execute("SELECT sha256, autov1, autov2, autov3, crc32, blake3, fingerprint, components, "
                            "fingerprint_bf16, components_bf16 FROM content WHERE dev = %s AND ino = %s AND "
                            "size = %s AND mtime_ns = %s", (r["dev"], r["ino"], r["size"], r["mtime_ns"])).fetchone()
            if isinstance(d["info"], dict) and isinstance(d["info"].get("path"), str) and strip:
                d["info"]["path"] = d["info"]["path"].replace(strip, "<root>")
            d["content"] = dict(c) if c is not None else None
            assert rel not in out, f"{rel} twice"
            out[rel] = d
    return out


def _pg(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as con:
        return con.execute(sql).fetchall()


def _norm(text: str, *dbs) -> str:
    for db in dbs:
        text = text.replace(str(db), "<db>")
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)?", "<utc time>", text)
    text = re.sub(r"\b1\d{9}\.\d+", "<time>", text)
    return re.sub(r"in \d+(\.\d+)? s", "in N s", text)


def _answers_equal(sq, pg, monkeypatch):
    """``dupes``, ``report`` and ``ls --unsafe`` on the two catalogs: the same text."""
    monkeypatch.setenv("COLUMNS", "200")
    for args in (("dupes", "--json"), ("dupes",), ("report", "--format", "json"), ("report",),
                 ("ls", "--unsafe", "--json"), ("ls", "--json", "--sort", "path")):
        outs = []
        for db in (sq, pg):
            r = run_cli_in_process(*args, "--db", db)
            assert r.returncode == 0, (args, db, r.stderr)
            outs.append(_norm(r.stdout, sq, pg))
        assert outs[0] == outs[1], args
        assert outs[0].strip(), args


def test_remote_scan_into_postgres_equals_sqlite_and_so_do_the_answers(s3, library, pg_url, tmp_path, monkeypatch):
    s3.put_tree("lib", library)
    s3.put_tree("mirror", library)  # a second upload of every model: duplicate groups for dupes and report
    sq = tmp_path / "c.db"
    for db in (sq, pg_url):
        for prefix in ("lib", "mirror"):
            r = run_cli_in_process("scan", "--json", "--hash", "--fingerprint", "--db", db, s3.url(prefix))
            assert r.returncode == 0, r.stderr
    want = rows(sq, strip=s3.url("lib"))
    assert len(want) > 5 and any(v["error"] for v in want.values())
    assert pg_rows(pg_url, strip=s3.url("lib")) == want
    _answers_equal(sq, pg_url, monkeypatch)
    # the rows are objects: URLs as their paths, never a local path
    assert all(p.startswith((s3.url("lib"), s3.url("mirror"))) for (p,) in _pg(pg_url, "SELECT display FROM files"))


def _popen(env, *args):
    full = {**os.environ, **env, "PYTHONPATH": str(SRC), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "ckptlab", "scan", "--json", *map(str, args)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"scan did not finish: {err[-2000:]}")
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def test_two_prefixes_at_once_into_one_catalog(s3_server, s3, library, pg_url, tmp_path):
    s3.put_tree("a", library)
    s3.put_tree("b", library)
    sq = tmp_path / "c.db"
    for prefix in ("a", "b"):  # the oracle: one after the other into SQLite
        r = run_cli_in_process("scan", "--hash", "--db", sq, s3.url(prefix))
        assert r.returncode == 0, r.stderr
    procs = [_popen(s3_server.env, "--hash", "--db", pg_url, s3.url(p)) for p in ("a", "b")]
    sums = [_finish(p)[0] for p in procs]
    assert pg_rows(pg_url) == rows(sq)  # every object once, as the SQLite scans wrote them
    n = len(rows(sq)) // 2
    assert [s["new"] for s in sums] == [n, n]
    con = sqlite3.connect(sq)
    want_status = sorted(r[0] for r in con.execute("SELECT status FROM scans"))
    con.close()
    got_status = sorted(r[0] for r in _pg(pg_url, "SELECT status FROM scans"))
    assert got_status == want_status and len(got_status) == 2 and "running" not in got_status
    assert _pg(pg_url, "SELECT count(*), count(DISTINCT path) FROM files") == [(2 * n, 2 * n)]


def test_one_prefix_twice_at_once_the_second_waits_and_finds_it_done(s3_server, s3, library, pg_url, tmp_path):
    from fakes.s3_proxy import S3Proxy

    s3.put_tree("lib", library)
    p = S3Proxy(s3_server.endpoint, delay_gets=0.2)  # a slow store: the first scan is still reading
    try:
        first = _popen(p.env(s3_server.env), "--db", pg_url, s3.url("lib"))
        deadline = time.monotonic() + 120
        while not p.gets and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert p.gets, "the first scan never read an object"
        second = _popen(s3_server.env, "--db", pg_url, s3.url("lib"))
        s1, _ = _finish(first)
        s2, err2 = _finish(second)
    finally:
        p.close()
    assert "another scan of this catalog is running; waiting" in err2
    n = len(pg_rows(pg_url))
    errors = s1["errors"]
    assert s1["new"] == n and s2["new"] == 0 and s2["unchanged"] == n - errors  # (error rows are read again)
    assert _pg(pg_url, "SELECT count(*), count(DISTINCT path) FROM files") == [(n, n)]
    statuses = [r[0] for r in _pg(pg_url, "SELECT status FROM scans ORDER BY id")]
    assert len(statuses) == 2 and statuses[0] == statuses[1] != "running"


@pytest.mark.xdist_group("ray")
def test_ray_scan_into_postgres(ray_cluster, s3, library, pg_url, tmp_path):
    s3.put_tree("lib", library)
    sq = tmp_path / "c.db"
    r = run_cli_in_process("scan", "--hash", "--fingerprint", "--db", sq, s3.url("lib"))
    assert r.returncode == 0, r.stderr
    r = run_cli("scan", "--json", "--hash", "--fingerprint", "--ray", ray_cluster.address, "--db", pg_url,
                s3.url("lib"), env=s3.server.env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "complete"
    assert pg_rows(pg_url, strip=s3.url("lib")) == rows(sq, strip=s3.url("lib"))
