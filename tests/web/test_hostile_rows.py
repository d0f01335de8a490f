"""Hostile catalog and CivitAI content (values another tool, an old version or a stranger wrote into the catalog):
the library page, the model page, the disk page and the CLI's ``show``/``ls`` answer cleanly, and one bad row
never keeps the rest of the library from being indexed."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli_in_process
from fakes.web import make_client

from ckptlab.library.catalog import Catalog
from ckptlab.web import index


def _present(db):
    with Catalog(db) as cat:
        return [(r[0], r[1]) for r in cat.conn.execute(
            "SELECT id, name FROM files WHERE status = 'present' ORDER BY id")]


def _set(db, fid, sql, *args):
    with Catalog(db) as cat, cat.transaction() as c:
        c.execute(sql, (*args, fid))


def _cli_clean(db, fid, path):
    """``ckptlab show`` and ``ls`` on the catalog: no traceback (exit 0, or a one-line error)."""
    for args in (("show", "--db", db, path), ("ls", "--db", db)):
        r = run_cli_in_process(*args)
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode == 0, (args, r.stderr)


def test_a_hostile_dtypes_row_never_poisons_the_index(catalog_copy):
    """``files.dtypes`` of ``{"F16": 1e400}`` (inf once parsed): ``/`` still answers and lists every other file;
    the row itself is listed by name, with no precision."""
    rows = _present(catalog_copy)
    bad = rows[0][0]
    _set(catalog_copy, bad, "UPDATE files SET dtypes = ? WHERE id = ?", '{"F16": 1e400, "F32": NaN}')
    with make_client(catalog_copy) as client:
        r = client.get("/?per_page=240")
        assert r.status_code == 200
        ids = {int(x) for x in __import__("re").findall(r'class="card[^"]*" data-id="(\d+)"', r.text)}
        assert ids == {fid for fid, _ in rows}  # the oracle: the catalog's present rows
        assert client.get(f"/model/{bad}").status_code == 200
    with Catalog(catalog_copy) as cat:
        assert index.pending(cat) == 0
        assert cat.conn.execute("SELECT precision FROM web_index WHERE file_id = ?", (bad,)).fetchone() == (None,)


def test_precision_of_skips_values_that_are_no_byte_counts():
    assert index.precision_of({"F16": float("inf")}) is None
    assert index.precision_of({"F16": float("nan"), "BF16": 10}) == "bf16"
    assert index.precision_of({"F16": "x", "F32": 10}) == "fp32"
    assert index.precision_of({"F16": True}) is None


def test_a_row_whose_derivation_raises_is_indexed_bare(catalog_copy, monkeypatch):
    rows = _present(catalog_copy)
    bad_id, bad_name = rows[1]
    real = index._derive

    def derive(row, versions, models):
        if row[0] == bad_id:
            raise RuntimeError("hostile")
        return real(row, versions, models)

    monkeypatch.setattr(index, "_derive", derive)
    with Catalog(catalog_copy) as cat:
        index.rebuild_all(cat)
        assert index.pending(cat) == 0
        got = dict(cat.conn.execute("SELECT file_id, file_name FROM web_index").fetchall())
        assert got == dict(rows)
        assert cat.conn.execute("SELECT kind, precision, linked FROM web_index WHERE file_id = ?",
                                (bad_id,)).fetchone() == (None, None, 0)


def test_a_civitai_version_whose_model_is_a_string(catalog_copy):
    fid, _ = _present(catalog_copy)[0]
    with Catalog(catalog_copy) as cat:
        rec = cat.get(fid)
        path = rec.path
        with cat.transaction() as c:
            c.execute("INSERT OR REPLACE INTO civitai_links(sha256, version_id, model_id, matched_by, linked_at) "
                      "VALUES (?, 7, 8, 'sha256', 0)", (rec.sha256,))
            c.execute("INSERT INTO civitai_records(kind, remote_id, revision, digest, fetched_at, checked_at, "
                      "data) VALUES ('version', 7, 1, 'd', 0, 0, ?)", (json.dumps({"model": "str", "name": ["x"],
                                                                      "trainedWords": "not a list"}),))
            c.execute("INSERT INTO civitai_records(kind, remote_id, revision, digest, fetched_at, checked_at, "
                      "data) VALUES ('model', 8, 1, 'd', 0, 0, ?)", (json.dumps({"name": 5, "modelVersions": "x"}),))
    from ckptlab.hub import store

    with Catalog(catalog_copy) as cat:
        s = store.link_summary(cat, rec.sha256)
        assert s["version_id"] == 7 and s["model_name"] is None and s["trigger_words"] == []
    with make_client(catalog_copy) as client:
        assert client.get(f"/model/{fid}").status_code == 200
        assert client.get("/").status_code == 200
    _cli_clean(catalog_copy, fid, path)


@pytest.mark.parametrize("column", ["info", "sidecars", "safety_detail", "components"])
def test_malformed_json_in_a_catalog_column(catalog_copy, column):
    fid, _ = _present(catalog_copy)[0]
    with Catalog(catalog_copy) as cat:
        path = cat.get(fid).path
        table = "content" if column == "components" else "files"
        if table == "files":
            cat.conn.execute(f"UPDATE files SET {column} = '{{not json' WHERE id = ?", (fid,))
        else:
            cat.conn.execute("UPDATE content SET components = '{not json' WHERE sha256 = "
                             "(SELECT sha256 FROM content LIMIT 1)")
        cat.conn.commit()
    with Catalog(catalog_copy) as cat:
        rec = cat.get(fid)
        if table == "files":
            assert getattr(rec, column) is None
    with make_client(catalog_copy) as client:
        assert client.get(f"/model/{fid}").status_code == 200
        assert client.get("/disk").status_code == 200
        assert client.get("/").status_code == 200
    _cli_clean(catalog_copy, fid, path)


def test_dtypes_with_a_string_count(catalog_copy):
    fid, _ = _present(catalog_copy)[0]
    with Catalog(catalog_copy) as cat:
        path = cat.get(fid).path
    _set(catalog_copy, fid, "UPDATE files SET dtypes = ? WHERE id = ?", '{"F16": "x", "F32": 1024}')
    with make_client(catalog_copy) as client:
        r = client.get(f"/model/{fid}")
        assert r.status_code == 200 and "F32 1.0 KiB" in r.text
        assert client.get("/").status_code == 200
    _cli_clean(catalog_copy, fid, path)


@pytest.mark.parametrize("column, value", [
    ("info", "[1, 2]"), ("info", '{"metadata": "x", "vram": 5, "components": 7, "evidence": 3}'),
    ("sidecars", '"a string"'), ("sidecars", '{"files": ["x"], "json": "y", "trigger_words": "z", "cm_info": []}'),
    ("dtypes", "[1, 2]"), ("safety_detail", "5"), ("safety_detail", '{"findings": "x", "files": []}'),
    ("triggers", '{"word": 1}'),
])
def test_valid_json_of_the_wrong_shape(catalog_copy, column, value):
    """JSON that parses but is not the shape the scanner writes (a list, a string, a number where an object
    belongs): every page and the CLI answer cleanly."""
    fid, _ = _present(catalog_copy)[0]
    with Catalog(catalog_copy) as cat:
        path = cat.get(fid).path
        cat.conn.execute(f"UPDATE files SET {column} = ? WHERE id = ?", (value, fid))
        cat.conn.commit()
    with make_client(catalog_copy) as client:
        for url in (f"/model/{fid}", "/", "/disk", "/safety"):
            assert client.get(url).status_code == 200, url
    _cli_clean(catalog_copy, fid, path)
