"""The library index as a catalog component: its triggers mark exactly the files a change touches, a catalog that
cannot be written still answers from the rows it has, and the labels are the names UIs use."""

from __future__ import annotations

import json
import sqlite3

import pytest

from ckptlab.library.catalog import Catalog
from ckptlab.web import index
from ckptlab.web.query import Filters, search


def test_triggers_mark_only_the_rows_a_change_touches(catalog_copy):
    with Catalog(catalog_copy) as cat:
        search(cat, Filters())
        assert index.pending(cat) == 0
        one = cat.files()[0]
        with cat.transaction() as c:
            c.execute("UPDATE files SET last_seen = last_seen + 1, last_scan = 99")  # what every rescan does
        assert index.pending(cat) == 0
        with cat.transaction() as c:
            c.execute("UPDATE files SET safety = 'suspicious' WHERE id = ?", (one.id,))
        assert [r[0] for r in cat.conn.execute("SELECT file_id FROM web_index_dirty")] == [one.id]
        twins = {r.id for r in cat.find_by_sha256(one.sha256)}
        with cat.transaction() as c:  # a link marks every file with those bytes
            c.execute("INSERT INTO civitai_links(sha256, version_id, model_id, matched_by, linked_at) "
                      "VALUES (?, 1, 2, 'sha256', 0)", (one.sha256,))
        assert {r[0] for r in cat.conn.execute("SELECT file_id FROM web_index_dirty")} == twins | {one.id}
        assert index.refresh(cat) == len(twins | {one.id})
        assert index.pending(cat) == 0
        assert {c.id for c in search(cat, Filters(linked=True)).cards} == twins


def test_a_read_only_catalog_answers_from_the_rows_it_has(catalog_copy):
    with Catalog(catalog_copy) as cat:
        total = search(cat, Filters()).total
        with cat.transaction() as c:
            c.execute("UPDATE files SET safety = 'malicious' WHERE id = (SELECT min(id) FROM files)")
    ro = sqlite3.connect(f"file:{catalog_copy}?mode=ro", uri=True)
    cat = Catalog.__new__(Catalog)  # a catalog whose writes fail, as on a read-only medium
    cat.path, cat.conn = catalog_copy, ro
    try:
        page = search(cat, Filters())
        assert page.total == total and index.pending(cat) == 1  # stale by one verdict, not an error
    finally:
        ro.close()


def test_labels_are_the_names_uis_use():
    assert [index.family_label(f) for f in ("sd1", "sd2", "sdxl", "flux", None)] == ["SD 1.5", "SD 2.1",
                                                                                     "SDXL 1.0", "Flux.1 D", None]
    assert [index.subtype_label("lora", v) for v in ("locon", "dora", "kohya", "peft")] == ["LoCon", "DoRA", None,
                                                                                          None]
    assert [index.subtype_label("lycoris", v) for v in ("loha", "lokr", "whatever")] == ["LoHa", "LoKr", "LyCORIS"]
    assert index.subtype_label("checkpoint", "inpaint") == "inpaint"
    assert index.precision_of({"F16": 95, "F32": 5}) == "fp16" and index.precision_of({"F16": 50, "F32": 50}) \
        == "mixed"
    assert index.precision_of({"F8_E4M3": 10}) == "fp8" and index.precision_of({"Q4_K": 9, "F32": 1}) == "quantized"
    assert index.precision_of(None) is None and index.precision_of({"F16": "x"}) is None


@pytest.mark.parametrize("text", ['"', 'a" OR "b', "NEAR(x y)", "*", "col:x", "\x00", "x" * 10_000])
def test_match_expressions_are_quoted_words_only(text):
    expr = index.match_expression(text)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE VIRTUAL TABLE t USING fts5(a)")
    con.execute("INSERT INTO t VALUES ('x y a b col')")
    if expr is not None:
        con.execute("SELECT * FROM t WHERE t MATCH ?", (expr,)).fetchall()  # valid FTS5 whatever was typed
        assert expr.count('"') == 2 * len(expr.split(" "))
    con.close()


def test_first_build_happens_once(catalog_copy):
    with Catalog(catalog_copy) as cat:
        cat.conn.execute("DELETE FROM web_index")
        with cat.transaction() as c:
            c.execute("INSERT OR IGNORE INTO web_index_dirty(file_id) SELECT id FROM files")
        n = len(cat.files(status=None))
        assert index.refresh(cat) == n
        assert index.refresh(cat) == 0
        assert search(cat, Filters()).total == len(cat.files())


def test_odd_civitai_records_never_break_the_index(catalog_copy):
    """CivitAI data is untrusted: names that are numbers or lists, tags that are a string, versions not a list."""
    from ckptlab.hub import store

    with Catalog(catalog_copy) as cat:
        one = cat.files()[0]
        store.store_record(cat, "version", 55, {"id": 55, "name": ["v", 1], "baseModel": 15, "trainedWords": "word",
                                                "model": {"name": 12345}})
        store.store_record(cat, "model", 56, {"id": 56, "name": None, "tags": "notalist",
                                              "modelVersions": {"id": 99}})
        store.put_link(cat, one.sha256, 55, 56, matched_by="sha256")
        card = next(c for c in search(cat, Filters(linked=True)).cards if c.id == one.id)
        assert (card.name, card.tags, card.update_available) == ("12345", (), False)
        assert json.loads(card.version_name) == ["v", 1]  # shown as text, as ls shows it
        assert one.id in {c.id for c in search(cat, Filters(q="12345")).cards}


def test_a_page_does_not_wait_long_for_another_writer(catalog_copy, monkeypatch):
    """While another process holds the write lock (a scan's batch, a job), the page answers from the rows it has
    and catches up on the next request after the lock is released."""
    monkeypatch.setattr(index, "WAIT_MS", 50)
    with Catalog(catalog_copy) as cat:
        search(cat, Filters())
        one = cat.files()[0]
        writer = sqlite3.connect(str(catalog_copy), isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE files SET safety = 'malicious' WHERE id = ?", (one.id,))
            assert search(cat, Filters(safety=("malicious",))).total == 0  # not committed yet: nothing to see
            writer.execute("COMMIT")
            writer.execute("BEGIN IMMEDIATE")  # the next batch holds the lock again
            assert search(cat, Filters(safety=("malicious",))).total == 0  # stale: could not refresh
            assert index.pending(cat) == 1
            writer.execute("COMMIT")
        finally:
            writer.close()
        assert [c.id for c in search(cat, Filters(safety=("malicious",))).cards] == [one.id]
        assert cat.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000  # the catalog's own wait is back
