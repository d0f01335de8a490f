"""Catalog: location, WAL, schema versioning, third-party migrations, plan round-trip."""

from __future__ import annotations

import json
import sqlite3

import pytest

from ckptlab.errors import CatalogError, FormatError
from ckptlab.hashes import Hashes
from ckptlab.library import catalog as cat
from ckptlab.library.plan import PlanStep, SpacePlan


def test_default_path_env_override_and_platform_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTLAB_DB", str(tmp_path / "x.db"))
    assert cat.default_db_path() == tmp_path / "x.db"
    monkeypatch.delenv("CKPTLAB_DB")
    import platformdirs

    assert cat.default_db_path() == cat.Path(platformdirs.user_data_dir("ckptlab", appauthor=False)) / "catalog.db"


def test_wal_and_user_version(tmp_path):
    with cat.Catalog(tmp_path / "c.db") as c:
        assert c.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.schema_version == len(cat._CORE_MIGRATIONS)
    raw = sqlite3.connect(tmp_path / "c.db")
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"files", "content", "scans", "schema_versions"} <= tables


def test_newer_schema_is_refused(tmp_path):
    cat.Catalog(tmp_path / "c.db").close()
    raw = sqlite3.connect(tmp_path / "c.db")
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(CatalogError, match="newer"):
        cat.Catalog(tmp_path / "c.db")


def test_not_a_database_is_a_clean_error(tmp_path):
    (tmp_path / "c.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(CatalogError):
        cat.Catalog(tmp_path / "c.db")


def test_registered_migrations_run_in_order_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cat, "_REGISTERED", {})
    cat.register_migrations("hub", ["CREATE TABLE hub_links (file_id INTEGER, url TEXT);"])
    with cat.Catalog(tmp_path / "c.db") as c:
        assert c.component_version("hub") == 1
        c.conn.execute("INSERT INTO hub_links VALUES (1, 'u')")
    # a later version appends a migration; only the new one runs, data survives
    cat.register_migrations("hub", ["CREATE TABLE hub_links (file_id INTEGER, url TEXT);",
                                    "ALTER TABLE hub_links ADD COLUMN version_id INTEGER;"])
    with cat.Catalog(tmp_path / "c.db") as c:
        assert c.component_version("hub") == 2
        assert c.conn.execute("SELECT file_id, url, version_id FROM hub_links").fetchall() == [(1, "u", None)]


def test_failed_migration_leaves_nothing_half_done(tmp_path, monkeypatch):
    monkeypatch.setattr(cat, "_REGISTERED", {})
    cat.register_migrations("bad", ["CREATE TABLE t1 (a); CREATE TABLE t1 (b);"])
    with pytest.raises(CatalogError):
        cat.Catalog(tmp_path / "c.db")
    monkeypatch.setattr(cat, "_REGISTERED", {})
    with cat.Catalog(tmp_path / "c.db") as c:
        names = {r[0] for r in c.conn.execute("SELECT name FROM sqlite_master")}
        assert "t1" not in names and c.component_version("bad") == 0


def test_content_keyed_by_stat_identity_and_hash_lookup(tmp_path):
    h = Hashes(sha256="AB" * 32, autov1="E3B0C442", autov2="AB" * 5, autov3="CD" * 6, crc32="01020304",
               blake3="EF" * 32, size=10)
    with cat.Catalog(tmp_path / "c.db") as c:
        c.put_hashes((1, 2, 10, 99), h)
        assert c.content((1, 2, 10, 99))["hashes"] == h
        assert c.content((1, 2, 10, 100)) is None


def test_plan_round_trip_and_validation(tmp_path):
    plan = SpacePlan(steps=[
        PlanStep("delete_duplicate", "/m/b.safetensors", size=100, bytes_freed=100, sha256="AA", keep="/m/a.safetensors",
                 reason="same sha256", keep_size=100, keep_sha256="AA", match="sha256"),
        PlanStep("transform", "/m/c.safetensors", size=400, bytes_freed=200, ops=["to_fp16"], output="/m/c.safetensors"),
    ], catalog="/x.db")
    p = plan.save(tmp_path / "plan.json")
    obj = json.loads(p.read_text())
    assert obj["format"] == "ckptlab-space-plan" and obj["version"] == 2
    assert obj["total_bytes_freed"] == 300
    assert obj["by_action"] == {"delete_duplicate": {"files": 1, "bytes_freed": 100},
                                "to_fp16": {"files": 1, "bytes_freed": 200}}
    back = SpacePlan.load(p)
    assert back.steps == plan.steps
    with pytest.raises(FormatError):
        PlanStep("delete_duplicate", "/x", size=1, bytes_freed=1)
    with pytest.raises(FormatError):
        SpacePlan.from_dict({"format": "ckptlab-space-plan", "version": 2, "steps": [{"action": "melt", "path": "x",
                                                                                        "size": 1, "bytes_freed": 0}]})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FormatError):
        SpacePlan.load(tmp_path / "bad.json")


# -- concurrent opening of a brand-new catalog (schema creation must not race) -------------------
def _open_many_threads(path, n):
    import threading

    barrier = threading.Barrier(n)
    errors = []

    def opener():
        barrier.wait()
        try:
            cat.Catalog(path).close()
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=opener) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _check_schema_once(path):
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(cat._CORE_MIGRATIONS)
        rows = raw.execute("SELECT component, version FROM schema_versions").fetchall()
        assert rows == [(c, len(m)) for c, m in cat._REGISTERED.items()]
    finally:
        raw.close()


def test_threads_opening_a_new_catalog_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cat, "_REGISTERED", {})
    cat.register_migrations("extra", ["CREATE TABLE extra_a (x INTEGER);", "CREATE TABLE extra_b (y INTEGER);"])
    for i in range(6):
        path = tmp_path / f"t{i}.db"
        assert _open_many_threads(path, 6) == []
        _check_schema_once(path)


def _proc_open(path, barrier, q):
    barrier.wait()
    try:
        cat.Catalog(path).close()
        q.put(None)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


def test_processes_opening_a_new_catalog_at_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for i in range(3):
        path = tmp_path / f"p{i}.db"
        barrier, q = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_proc_open, args=(path, barrier, q)) for _ in range(4)]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert results == [None] * 4
        _check_schema_once(path)
