"""``ls`` streamed, and ``ls --unsafe`` as the moderation queue: malicious first, then suspicious, corrupt and
unchecked, paged with ``--limit`` / ``--offset``, never loading the catalog.

Oracles: plain Python over the catalog's raw rows (the queue's order and pages), and ``show.list_files`` (the
listing before hub scale: every row loaded, then filtered) for the other filters.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from fakes.hub_catalog import build
from fakes.library_files import a1111_library, comfy_library

from ckptlab.hub.link import link_lookup
from ckptlab.library import hub_queries
from ckptlab.library.catalog import Catalog
from ckptlab.library.hub_queries import iter_listed
from ckptlab.library.scanner import scan
from ckptlab.library.show import list_files

RANK = {"malicious": 0, "suspicious": 1, "corrupt": 2}


@pytest.fixture(scope="module")
def hub_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("hubmod") / "hub.db"
    build(db, 4000, seed=7, hostile=True)
    return db


def _queue(db) -> list[int]:
    """The moderation queue computed here: present files not called safe, by verdict rank, then name
    (case-insensitively), path, id."""
    con = sqlite3.connect(db)
    rows = con.execute("SELECT id, name, display, safety FROM files WHERE status = 'present'").fetchall()
    con.close()
    unsafe = [r for r in rows if r[3] != "safe"]
    return [r[0] for r in sorted(unsafe, key=lambda r: (RANK.get(r[3], 3), r[1].lower(), r[2], r[0]))]


def test_queue_order_and_pages(hub_db, cli):
    want = _queue(hub_db)
    with Catalog(hub_db) as cat:
        got = [r.id for r, _ in iter_listed(cat, unsafe=True)]
        page = [r.id for r, _ in iter_listed(cat, unsafe=True, limit=25, offset=40)]
    assert got == want and len(want) > 100
    assert page == want[40:65]
    lines = cli("ls", "--unsafe", "--json", "--limit", "30", "--offset", "10", "--db", str(hub_db)).stdout.splitlines()
    rows = [json.loads(x) for x in lines]
    assert [r["id"] for r in rows] == want[10:40]
    verdicts = [r["safety"] or "unchecked" for r in rows]
    assert verdicts == sorted(verdicts, key=lambda v: RANK.get(v, 3))
    first = [json.loads(x) for x in cli("ls", "--unsafe", "--json", "--limit", "5", "--db",
                                        str(hub_db)).stdout.splitlines()]
    assert [r["safety"] for r in first] == ["malicious"] * 5


def test_queue_shows_urls_and_hostile_names_visibly(hub_db, cli):
    text = cli("ls", "--unsafe", "--limit", "100", "--db", str(hub_db)).stdout
    lines = text.splitlines()
    assert lines[0].lstrip().startswith("SIZE") and len(lines) == 101
    assert any("s3://hub-bucket/uploads/" in ln for ln in lines)
    assert "\x1b" not in text and "\u202e" not in text  # escape sequences and bidi overrides rendered visibly
    verdict_col = [ln.split()[4] for ln in lines[1:]]  # size (two words), kind/family, format, verdict
    assert verdict_col.index("malicious") == 0 and "safe" not in verdict_col


def test_a_page_reads_a_page_of_rows(hub_db, monkeypatch):
    loaded = []
    real = hub_queries.record_of
    monkeypatch.setattr(hub_queries, "record_of", lambda row: loaded.append(row[0]) or real(row))
    with Catalog(hub_db) as cat:
        got = list(iter_listed(cat, unsafe=True, limit=100, civitai=link_lookup(cat)))
    assert len(got) == 100 and len(loaded) == 100


@pytest.fixture(scope="module")
def real_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubls")
    a1111_library(root / "a1111")
    comfy_library(root / "comfy")
    (root / "a1111" / "models" / "Lora" / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    db = root / "c.db"
    with Catalog(db) as cat:
        scan([root / "a1111", root / "comfy"], cat, hash=True, workers=1)
    return db


@pytest.mark.parametrize("opts", [dict(), dict(sort="size"), dict(sort="path"), dict(sort="mtime"),
                                  dict(kind="lora"), dict(family="sd1"), dict(search="vae"), dict(errors=True),
                                  dict(missing=True), dict(family="sdxl", sort="size")],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_listing_equals_the_listing_before(real_db, opts):
    with Catalog(real_db) as cat:
        want = [(r.id, c) for r, c in list_files(cat, civitai=link_lookup(cat), **opts)]
        got = [(r.id, c) for r, c in iter_listed(cat, civitai=link_lookup(cat), **opts)]
        paged = [(r.id, c) for r, c in iter_listed(cat, civitai=link_lookup(cat), limit=2, offset=1, **opts)]
    assert got == want
    assert paged == want[1:3]
    if not opts.get("missing") and not opts.get("errors"):
        assert want


def test_unsafe_set_is_unchanged_only_ordered(real_db, hub_db):
    for db in (real_db, hub_db):
        with Catalog(db) as cat:
            want = {r.id for r, _ in list_files(cat, unsafe=True)}
            got = [r.id for r, _ in iter_listed(cat, unsafe=True)]
        assert set(got) == want and len(got) == len(want)
