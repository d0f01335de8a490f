"""One table per vocabulary: a kind has one label wherever the web app shows it (card badge, list row, kind
filter), and a file has one precision word (library index, card badge, filter choices, model page)."""

from __future__ import annotations

import json
import re

import pytest
from fakes.web import make_client

from ckptlab.library.catalog import Catalog
from ckptlab.web import index as _index  # noqa: F401 - registers the index and hub tables in every catalog opened


def _ids(db, n):
    with Catalog(db) as cat:
        return [r[0] for r in cat.conn.execute("SELECT id FROM files WHERE status = 'present' ORDER BY id LIMIT ?",
                                               (n,))]


def test_card_badge_and_kind_filter_say_the_same(catalog_copy):
    a, b = _ids(catalog_copy, 2)
    with Catalog(catalog_copy) as cat, cat.transaction() as c:  # the kinds the two tables used to disagree on
        c.execute("UPDATE files SET kind = 'unet' WHERE id = ?", (a,))
        c.execute("UPDATE files SET kind = 'clip_vision' WHERE id = ?", (b,))
    with make_client(catalog_copy) as client:
        html = client.get("/?per_page=240").text
        rows = client.get("/?per_page=240&view=list").text
    badges = {}
    for kind, label in re.findall(r'<article class="card" data-id="\d+" data-kind="([^"]+)">.*?'
                                  r'<span class="badge kind">([^<·]+)', html, re.S):
        badges.setdefault(kind, set()).add(label.strip())
    facet = dict(re.findall(r'<input type="checkbox" name="kind" value="([^"]+)"[^>]*> ([^<]+?)\s*<', html))
    assert {"unet", "clip_vision"} <= badges.keys()
    for kind in ("unet", "clip_vision", "checkpoint"):
        assert badges[kind] == {facet[kind]}, kind
        assert f"<td>{facet[kind]}</td>" in rows or f"<td>{facet[kind]} ·" in rows


def test_one_precision_vocabulary(catalog_copy):
    from ckptlab.library import precision
    from ckptlab.web import index, pages_library

    assert pages_library.PRECISIONS == precision.PRECISIONS and index.precision_of is precision.precision_of
    # every word the classifier gives is a filter choice (the page's own list used to lack fp64)
    for dtypes in ({"F64": 8}, {"F32": 4}, {"F16": 2}, {"BF16": 2}, {"F8_E4M3": 1}, {"Q4_K": 1},
                   {"F16": 1, "F32": 1}):
        assert precision.precision_of(dtypes) in pages_library.PRECISIONS
    fid = _ids(catalog_copy, 1)[0]
    with Catalog(catalog_copy) as cat, cat.transaction() as c:
        c.execute("UPDATE files SET dtypes = '{\"F64\": 4096, \"F32\": 8}' WHERE id = ?", (fid,))
    with make_client(catalog_copy) as client:
        card = client.get("/?precision=fp64").text
        assert re.findall(r'data-id="(\d+)"', card) == [str(fid)]
        assert '<span class="badge precision">fp64</span>' in card
        page = client.get(f"/model/{fid}").text
        assert re.search(r'data-field="precision">fp64', page)


def test_a_search_refreshes_once_and_does_not_recount_the_index(catalog_copy, monkeypatch):
    """One ``index.refresh`` per answer, and the index's size comes from the facets cached per generation, not
    from a ``count(*)`` over the whole index on every filtered request."""
    from ckptlab.web import index, query

    calls = []
    real = index.refresh
    monkeypatch.setattr(index, "refresh", lambda cat: calls.append(1) or real(cat))
    with Catalog(catalog_copy) as cat:
        query.search(cat, query.Filters(safety=("safe",)))  # builds the index and the facets
        calls.clear()
        seen: list[str] = []
        cat.conn.set_trace_callback(seen.append)
        page = query.search(cat, query.Filters(safety=("safe",)))
        cat.conn.set_trace_callback(None)
        assert calls == [1]
        assert not [s for s in seen if re.fullmatch(r"\s*SELECT count\(\*\) FROM web_index\s*", s)], seen
        n = cat.conn.execute("SELECT count(*) FROM files WHERE status = 'present' AND safety = 'safe'").fetchone()[0]
        assert page.total == n


def test_the_model_page_shows_a_preview_only_when_it_exists(catalog_copy):
    """A sidecar record naming a preview that is not on disk: no ``<img>`` pointing at a 404 (the library page
    already asked ``media.preview_paths``; the model page now asks the same)."""
    fid = _ids(catalog_copy, 1)[0]
    with Catalog(catalog_copy) as cat, cat.transaction() as c:
        c.execute("UPDATE files SET status = 'missing', sidecars = ? WHERE id = ?",
                  ('{"files": {"preview": "ghost.preview.png", "thumb": "ghost.png"}}', fid))
    with make_client(catalog_copy) as client:
        page = client.get(f"/model/{fid}")
        assert page.status_code == 200 and "ghost.preview.png" in page.text  # the sidecar is listed
        assert 'class="model-preview"' not in page.text
        assert client.get(f"/media/preview/{fid}").status_code == 404  # what the img would have fetched


def test_one_untrusted_value_to_short_text_helper():
    """``display.short_text``: strings as they are, anything else as JSON, cut with the count left out; the index,
    the model and safety pages and the lineage section all use it (their limits differ, the rule does not)."""
    from ckptlab.display import short_text
    from ckptlab.library import lineage
    from ckptlab.web import index, pages_model, pages_safety

    assert short_text(None) is None and short_text("", empty="") == "" and short_text("Élan") == "Élan"
    assert short_text(["a", 1]) == '["a", 1]' and short_text({"k": 1}, indent=1) == '{\n "k": 1\n}'
    assert short_text("x" * 250) == "x" * 200 + "… [50 more characters]"
    assert index._text(["n"] * 300).endswith("more characters]") and index._text("") is None
    assert lineage._text(["n"] * 100).startswith('["n", "n"') and lineage._text(["n"] * 100).endswith(
        f"… [{len(str(['n'] * 100)) - 200} more characters]")
    assert pages_model._text(None) == "" and pages_model._text("y" * 10, 4) == "yyyy… [6 more characters]"
    assert pages_safety._text(None) == "" and pages_safety._text({"a": "b"}) == '{"a": "b"}'
    for f in (index._text, lineage._text, pages_safety._text):
        assert f.func is short_text


@pytest.mark.parametrize("listed, expect", [([30, 20, 10], True), ([20, 10], False), ([30, 25], True),
                                            ([15, 5], False), ([], False)])
def test_the_update_rule_is_one_rule(catalog_copy, listed, expect):
    """The library index's ``update_available`` and the model page's 'update available' come from one rule
    (``hub.store.newer_version_available``). Linked version 20; ``listed``: the model's versions, newest first
    (20 not listed and 30 first: a newer one exists; not listed and 15 first: none)."""
    fid = _ids(catalog_copy, 1)[0]
    with Catalog(catalog_copy) as cat:
        sha = cat.get(fid).sha256
        with cat.transaction() as c:
            c.execute("INSERT OR REPLACE INTO civitai_links(sha256, version_id, model_id, matched_by, linked_at) "
                      "VALUES (?, 20, 9, 'sha256', 0)", (sha,))
            for kind, rid, data in (("version", 20, {"id": 20, "name": "v20", "model": {"name": "M"}}),
                                    ("model", 9, {"id": 9, "name": "M", "modelVersions": [
                                        {"id": i, "name": f"v{i}"} for i in listed]})):
                c.execute("INSERT INTO civitai_records(kind, remote_id, revision, digest, fetched_at, checked_at, "
                          "data) VALUES (?, ?, 1, 'd', 0, 0, ?)", (kind, rid, json.dumps(data)))
    with make_client(catalog_copy) as client:
        lib = client.get("/?updates=yes&per_page=240").text
        page = client.get(f"/model/{fid}").text
    assert (f'data-id="{fid}"' in lib) is expect
    assert ('class="update-available"' in page) is expect


def test_family_from_a_sidecar_base_model_is_show_s_rule(catalog_copy):
    """A file with no identified family and no link: the index takes the family from the sidecar that names the
    model, by the rule ``ckptlab ls --family`` uses (``show.civitai_brief`` + ``base_model_family``)."""
    from ckptlab.library import show
    from ckptlab.web import query

    fid = _ids(catalog_copy, 1)[0]
    sc = {"cm_info": {"model_name": "Side", "base_model": "SDXL 1.0"}, "json": {"model_name": "Other",
                                                                                "base_model": "SD 1.5"}}
    with Catalog(catalog_copy) as cat:
        with cat.transaction() as c:
            c.execute("UPDATE files SET family = NULL, sidecars = ? WHERE id = ?", (json.dumps(sc), fid))
        rec = cat.get(fid)
        expect = show.base_model_family(show.civitai_brief(rec))
        card = next(c for c in query.search(cat, query.Filters(q="Side", per_page=240)).cards if c.id == fid)
    assert expect == "sdxl" and card.family == expect and card.name == "Side"
