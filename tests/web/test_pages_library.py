"""The library page (``/``) against the catalog it shows: the cards are exactly the present files, the badges say
what the catalog says, filters and search through the page give the ids a plain pass over the catalog rows gives,
htmx gets fragments, paging carries the filters, list view and density are remembered, bad values answer 400.

Oracle: the catalog's rows (``Catalog.files()`` / sqlite3), never ``query.search`` itself."""

from __future__ import annotations

import os
import re
import sqlite3
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes.web import make_client

from ckptlab.library.catalog import Catalog

HX = {"hx-request": "true"}


class Cards(HTMLParser):
    """Every element carrying ``data-id`` (a card or a list row): its tag, classes, links, badges, copy texts and
    the text of its ``.card-name``; plus the page's pager links, view links and selected options."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self.pager: dict[str, str] = {}
        self.views: dict[str, str] = {}
        self.ids: dict[str, dict] = {}
        self._stack: list[tuple[str, dict | None, bool]] = []  # (tag, card it opened, opened .card-name)
        self._card: dict | None = None
        self._in_name = 0
        self._in_pager = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if "id" in a:
            self.ids[a["id"]] = {"tag": tag, **a}
        opened_card = None
        if "data-id" in a:
            opened_card = self._card = {"id": int(a["data-id"]), "tag": tag, "class": cls, "links": [],
                                        "badges": [], "copy": [], "name": "", "img": None}
            self.cards.append(self._card)
        if tag == "nav" and "pager" in cls:
            self._in_pager = True
        if tag == "a" and self._in_pager and a.get("rel"):
            self.pager[a["rel"]] = a.get("href", "")
        if tag == "a" and a.get("data-view"):
            self.views[a["data-view"]] = a.get("href", "")
        card = self._card
        if card is not None:
            if tag == "a" and a.get("href"):
                card["links"].append(a["href"])
            if "badge" in cls:
                card["badges"].append(cls)
            if "data-copy" in a:
                card["copy"].append(a["data-copy"])
            if tag == "img":
                card["img"] = a.get("src")
            if "card-name" in cls:
                self._in_name += 1
        if tag not in ("img", "input", "br", "meta", "link"):
            self._stack.append((tag, opened_card, "card-name" in cls))

    def handle_endtag(self, tag):
        while self._stack:
            t, opened, named = self._stack.pop()
            if named:
                self._in_name -= 1
            if opened is not None:
                self._card = None
            if t == "nav":
                self._in_pager = False
            if t == tag:
                break

    def handle_data(self, data):
        if self._card is not None and self._in_name:
            self._card["name"] += data

    def by_id(self) -> dict[int, dict]:
        return {c["id"]: c for c in self.cards}


def parse(html: str) -> Cards:
    return Cards(html)


def present(db: Path) -> list:
    with Catalog(db) as cat:
        return cat.files()


def ids_of(r) -> list[int]:
    assert r.status_code == 200, r.text[:500]
    return [c["id"] for c in parse(r.text).cards]


def all_ids(client, query: str = "") -> list[int]:
    """The ids the page lists for ``query``, following the pager to the end."""
    url = "/?" + "&".join(x for x in (query, "per_page=30") if x)
    out: list[int] = []
    for _ in range(100):
        r = client.get(url)
        out += ids_of(r)
        nxt = parse(r.text).pager.get("next")
        if not nxt:
            return out
        url = nxt
    raise AssertionError("pager never ends")


def png_bytes() -> bytes:
    """A valid 1x1 PNG (built by hand: no imaging dependency)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def stem(name: str) -> str:
    return os.path.splitext(name)[0]


# -- the cards are the catalog's present files --------------------------------------------------------------

def test_page_lists_exactly_the_present_files(client, sample_library):
    recs = present(sample_library / "catalog.db")
    n = sqlite3.connect(sample_library / "catalog.db").execute(
        "SELECT count(*) FROM files WHERE status = 'present'").fetchone()[0]
    assert len(recs) == n > 40
    r = client.get("/?per_page=240")
    cards = parse(r.text).by_id()
    assert sorted(cards) == sorted(rec.id for rec in recs)
    assert parse(r.text).ids["total"]["tag"] == "span"
    assert re.search(r'<span id="total">(\d+)</span>', r.text).group(1) == str(n)
    for rec in recs:
        c = cards[rec.id]
        assert c["tag"] == "article" and "card" in c["class"]
        assert f"/model/{rec.id}" in c["links"]
        assert c["name"].strip() == stem(rec.name)  # no CivitAI link in the sample: the display name is the stem
    # the default page shows the first 60: all of them here, each once
    assert sorted(ids_of(client.get("/"))) == sorted(rec.id for rec in recs)


def test_a_missing_file_leaves_the_page(library_copy):
    import ckptlab

    db = library_copy / "catalog.db"
    victim = next(r for r in present(db) if r.kind == "vae")
    os.unlink(victim.path)
    ckptlab.scan(library_copy, db=db)
    with make_client(db) as c:
        listed = all_ids(c)
    assert victim.id not in listed
    assert sorted(listed) == sorted(r.id for r in present(db))


def test_paging_covers_every_file_once_and_the_links_carry_the_filters(client, sample_library):
    recs = present(sample_library / "catalog.db")
    r = client.get("/?per_page=30&sort=size&desc=yes&safety=safe")
    page1 = parse(r.text)
    assert len(page1.cards) == 30
    assert "prev" not in page1.pager
    nxt = parse_qs(urlsplit(page1.pager["next"]).query)
    assert nxt == {"per_page": ["30"], "sort": ["size"], "desc": ["yes"], "safety": ["safe"], "page": ["2"]}
    assert "page 1 of 2" in r.text
    r2 = client.get(page1.pager["next"])
    page2 = parse(r2.text)
    assert "page 2 of 2" in r2.text and "next" not in page2.pager
    prev = parse_qs(urlsplit(page2.pager["prev"]).query)
    assert prev == {"per_page": ["30"], "sort": ["size"], "desc": ["yes"], "safety": ["safe"]}
    got = [c["id"] for c in page1.cards + page2.cards]
    assert len(got) == len(set(got))
    want = [rec for rec in recs if rec.safety == "safe"]
    assert sorted(got) == sorted(rec.id for rec in want)
    size = {rec.id: rec.size for rec in recs}
    sizes = [size[i] for i in got]
    assert sizes == sorted(sizes, reverse=True)  # largest first, across the page boundary


def test_infinite_scroll_appends_one_page_and_moves_the_pager(client, sample_library):
    r = client.get("/?per_page=30&format=safetensors&format=pickle&sort=size")
    html = r.text
    sentinel = re.search(r'<div class="sentinel" hx-get="([^"]+)" hx-trigger="revealed"', html)
    assert sentinel, "the grid ends with a revealed sentinel while pages remain"
    url = sentinel.group(1).replace("&amp;", "&")
    q = parse_qs(urlsplit(url).query)
    assert q["format"] == ["safetensors", "pickle"] and q["sort"] == ["size"]
    assert q["page"] == ["2"] and q["chunk"] == ["1"]
    chunk = client.get(url, headers=HX)
    assert chunk.status_code == 200
    assert 'id="results"' not in chunk.text and "<html" not in chunk.text
    assert 'hx-swap-oob="true"' in chunk.text and "page 2 of" in chunk.text
    first = ids_of(r)
    more = ids_of(chunk)
    recs = present(sample_library / "catalog.db")
    want = sorted(rec.id for rec in recs if rec.format in ("safetensors", "pickle"))
    assert len(want) > 30
    assert sorted(first + more) == want and len(first) == 30
    assert 'class="sentinel"' not in chunk.text  # the last page: nothing more to load


def test_htmx_gets_the_results_fragment_only(client):
    r = client.get("/?q=pruned", headers=HX)
    assert r.status_code == 200
    body = r.text.strip()
    assert body.startswith('<section id="results"') and body.endswith("</section>")
    assert "<html" not in body and 'id="filters"' not in body and 'id="total"' in body
    assert "HX-Request" in r.headers.get("vary", "")
    assert r.headers["hx-push-url"] == "/?q=pruned"  # the canonical URL, not every default the form sends
    noisy = client.get("/?q=pruned&linked=any&sort=name&desc=no&per_page=60&density=comfortable", headers=HX)
    assert noisy.headers["hx-push-url"] == "/?q=pruned"
    # htmx's history restore (Back after a cache miss) sends HX-Request too, and wants the page
    full = client.get("/?q=pruned", headers={**HX, "hx-history-restore-request": "true"})
    assert "<html" in full.text and 'id="filters"' in full.text


def test_the_form_carries_the_htmx_contract(client):
    html = client.get("/").text
    form = re.search(r'<form id="filters"[^>]*>', html).group(0)
    for attr in ('hx-get="/"', 'hx-target="#results"', 'hx-push-url="true"', 'action="/"', 'method="get"'):
        assert attr in form
    q = re.search(r'<input id="q"[^>]*>', html).group(0)
    assert 'name="q"' in q and 'type="search"' in q and "keyup changed delay:250ms" in q
    assert html.index('<form id="filters"') < html.index('id="q"') < html.index("</form>")
    assert re.search(r'<select name="density">', html)
    for name in ("sort", "desc", "per_page", "linked", "duplicates", "updates"):
        assert f'<select name="{name}">' in html, name


def test_the_filter_form_lists_the_catalogs_kinds_with_counts(client, sample_library):
    from collections import Counter

    kinds = Counter(rec.kind for rec in present(sample_library / "catalog.db") if rec.kind)
    kinds["lora"] += kinds["lycoris"]  # "LoRA" is what UIs file LyCORIS under: kind=lora finds both (ls --kind lora)
    html = client.get("/").text
    block = re.search(r'<details class="facet facet-kind">(.*?)</details>', html, re.S).group(1)
    listed = dict(re.findall(r'name="kind" value="([^"]+)"> [^<]*<span class="muted">(\d+)</span>', block))
    assert {k: int(n) for k, n in listed.items()} == dict(kinds)


# -- filters and search through the page ---------------------------------------------------------------------

@pytest.mark.parametrize("query, keep", [
    ("kind=checkpoint", lambda r: r.kind == "checkpoint"),
    ("kind=vae&kind=embedding", lambda r: r.kind in ("vae", "embedding")),
    ("family=sdxl", lambda r: r.family == "sdxl"),
    ("format=pickle", lambda r: r.format == "pickle"),
    ("q=inpainting", lambda r: "inpainting" in r.name.lower()),
    ("q=PRUNED&kind=checkpoint&format=pickle",
     lambda r: "pruned" in r.name.lower() and r.kind == "checkpoint" and r.format == "pickle"),
    ("q=no-such-model-anywhere", lambda r: False),
])
def test_filters_and_search_give_the_oracle_ids(client, sample_library, query, keep):
    want = sorted(rec.id for rec in present(sample_library / "catalog.db") if keep(rec))
    assert sorted(all_ids(client, query)) == want
    # the same filters as an htmx request give the same fragment's cards
    assert sorted(ids_of(client.get(f"/?{query}&per_page=240", headers=HX))) == want


def test_a_search_without_a_match_says_so_and_offers_a_reset(client):
    html = client.get("/?q=no-such-model-anywhere").text
    assert '<span id="total">0</span>' in html
    assert "No file matches" in html and "/jobs/new/scan" not in html


def test_safety_filter_and_badges_follow_the_catalog(library_copy):
    db = library_copy / "catalog.db"
    recs = present(db)
    bad, odd, unchecked = recs[3].id, recs[7].id, recs[11].id
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE files SET safety = 'malicious' WHERE id = ?", (bad,))
        conn.execute("UPDATE files SET safety = 'suspicious' WHERE id = ?", (odd,))
        conn.execute("UPDATE files SET safety = NULL WHERE id = ?", (unchecked,))
    verdict = {rec.id: rec.safety or "unchecked" for rec in present(db)}
    with make_client(db) as c:
        cards = parse(c.get("/?per_page=240").text).by_id()
        for fid, want in verdict.items():
            safety = [b for b in cards[fid]["badges"] if "safety" in b]
            assert safety == [["badge", "safety", want]], (fid, safety)
        assert sorted(all_ids(c, "safety=malicious&safety=suspicious")) == sorted([bad, odd])
        r = c.get("/?view=list&safety=malicious")
        rows = parse(r.text).cards
        assert [x["id"] for x in rows] == [bad] and ["badge", "safety", "malicious"] in rows[0]["badges"]


def card_blocks(html: str) -> dict[int, str]:
    """``{id: the card's own HTML}`` of the grid's cards."""
    return {int(i): block for i, block in re.findall(r'<article class="card" data-id="(\d+)"(.*?)</article>', html, re.S)}


def test_card_badges_show_kind_subtype_size_and_base_model(client, sample_library):
    from ckptlab.display import human_size

    html = client.get("/?per_page=240").text
    blocks = card_blocks(html)
    for rec in present(sample_library / "catalog.db"):
        block = blocks[rec.id]
        size = re.search(r'<span class="badge size">([^<]*)</span>', block).group(1)
        assert size == human_size(rec.size), rec.name
        kind = re.search(r'<span class="badge kind">([^<]*)</span>', block).group(1)
        # a LoRA's variant is its key format (kohya, peft...), not shown; LyCORIS shows its algorithm as UIs name it
        lyco = {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
        if rec.kind in ("lora", "lycoris"):
            sub = lyco.get((rec.variant or "").lower(), "LyCORIS" if rec.kind == "lycoris" else None)
        else:
            sub = rec.variant
        assert kind.endswith(f" · {sub}") if sub else " · " not in kind, (rec.name, rec.variant, kind)
        base = re.search(r'<span class="badge base">([^<]*)</span>', block)
        # the sample has no CivitAI links: a file with a family shows it (its facet label), one without none
        assert bool(base) == bool(rec.family), rec.name
        assert f'src="/media/preview/{rec.id}"' not in block  # no previews in the sample: the placeholder
        assert f'<span class="ph" data-kind="{rec.kind}">' in block


def test_copy_buttons_give_the_a1111_prompt_syntax(client, sample_library):
    cards = parse(client.get("/?per_page=240").text).by_id()
    recs = present(sample_library / "catalog.db")
    assert any(r.kind == "lycoris" for r in recs) and any(r.kind == "embedding" for r in recs)
    for rec in recs:
        if rec.kind in ("lora", "lycoris"):
            want = [f"<lora:{stem(rec.name)}:1>"]
        elif rec.kind == "embedding":
            want = [stem(rec.name)]
        else:
            want = []
        assert cards[rec.id]["copy"] == want, rec.name


def test_duplicate_and_update_badges_render_from_the_card(client, monkeypatch, sample_library):
    """The badges read ``Card.duplicates`` / ``Card.update_available`` (whatever ``query.search`` computes)."""
    from ckptlab.web import pages_library, query

    real = query.search

    def search(cat, f):
        page = real(cat, f)
        for card in page.cards:  # the sample has real duplicates: only the two set here may show badges
            card.duplicates, card.update_available = 0, False
        page.cards[0].duplicates = 2
        page.cards[1].update_available = True
        return page

    monkeypatch.setattr(pages_library, "search", search)
    r = client.get("/?per_page=240")
    cards = parse(r.text).cards
    assert ["badge", "dup"] in cards[0]["badges"] and "2 dup" in r.text
    assert ["badge", "update"] in cards[1]["badges"]
    assert all(["badge", "dup"] not in c["badges"] for c in cards[1:])
    assert all(["badge", "update"] not in c["badges"] for c in cards[:1] + cards[2:])
    rows = parse(client.get("/?per_page=240&view=list").text).cards
    assert ["badge", "dup"] in rows[0]["badges"] and ["badge", "update"] in rows[1]["badges"]


@pytest.mark.skipif("SKELETON" in (__import__("ckptlab.web.query", fromlist=["x"]).search.__doc__ or ""),
                    reason="the skeleton query.search does not compute duplicates (the indexed one does)")
def test_a_copy_of_a_file_shows_the_duplicate_badge_on_both(library_copy):
    import shutil

    import ckptlab

    db = library_copy / "catalog.db"
    src = next(r for r in present(db) if r.kind == "embedding" and r.format == "safetensors")
    copy = Path(src.path).with_name("copy_of_" + src.name)
    shutil.copyfile(src.path, copy)
    ckptlab.scan(library_copy, db=db, hash=True)
    recs = present(db)
    by_sha: dict[str, list[int]] = {}
    for rec in recs:
        if rec.sha256:
            by_sha.setdefault(rec.sha256, []).append(rec.id)
    with make_client(db) as c:
        cards = parse(c.get("/?per_page=240").text).by_id()
    for rec in recs:
        n = len(by_sha.get(rec.sha256, [rec.id])) - 1 if rec.sha256 else 0
        dup = [b for b in cards[rec.id]["badges"] if "dup" in b]
        assert bool(dup) == bool(n), rec.name


def test_a_preview_sidecar_shows_on_the_card(library_copy):
    import ckptlab

    db = library_copy / "catalog.db"
    lora = next(r for r in present(db) if r.kind == "lora")
    Path(lora.path).with_name(stem(lora.name) + ".preview.png").write_bytes(png_bytes())
    ckptlab.scan(library_copy, db=db)
    with make_client(db) as c:
        cards = parse(c.get("/?per_page=240").text).by_id()
        assert cards[lora.id]["img"] == f"/media/preview/{lora.id}"
        assert [i for i, card in cards.items() if card["img"]] == [lora.id]
        assert c.get(cards[lora.id]["img"]).headers["content-type"] == "image/png"


def test_names_from_files_are_escaped(library_copy):
    import ckptlab

    db = library_copy / "catalog.db"
    lora = next(r for r in present(db) if r.kind == "lora")
    evil = Path(lora.path).with_name('x"><img src=x onerror=alert(1)>.safetensors')
    os.rename(lora.path, evil)
    ckptlab.scan(library_copy, db=db)
    with make_client(db) as c:
        html = c.get("/?per_page=240").text
    assert "<img src=x" not in html and "onerror=alert(1)>" not in html
    assert "x&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'data-copy="&lt;lora:x&#34;&gt;&lt;img src=x onerror=alert(1)&gt;:1&gt;"' in html


# -- view and density ------------------------------------------------------------------------------------------

def test_list_view_is_a_table_of_the_same_files_and_is_remembered(client, sample_library):
    recs = present(sample_library / "catalog.db")
    r = client.get("/?view=list&per_page=240")
    p = parse(r.text)
    assert "article" not in {c["tag"] for c in p.cards}
    assert sorted(c["id"] for c in p.cards) == sorted(rec.id for rec in recs)
    assert all(c["tag"] == "tr" and f"/model/{c['id']}" in c["links"] for c in p.cards)
    heads = re.findall(r"<th[^>]*>(?:<a[^>]*>)?([^<]+)", r.text)
    assert heads == ["Name", "Kind", "Base model", "Precision", "Size", "Safety", "Added", "Folder"]
    # the sortable headers: size sorts largest first, a second click reverses, the filters stay
    by_size = re.search(r'<a class="sort" href="([^"]+)"[^>]*title="sort by size"', r.text).group(1)
    assert parse_qs(urlsplit(by_size.replace("&amp;", "&")).query) == {"sort": ["size"], "desc": ["yes"],
                                                                         "per_page": ["240"]}
    r2 = client.get(by_size.replace("&amp;", "&"))
    size = {rec.id: rec.size for rec in recs}
    got = [size[c["id"]] for c in parse(r2.text).cards]
    assert got == sorted(got, reverse=True) and 'aria-sort="descending"' in r2.text
    again = re.search(r'<a class="sort" href="([^"]+)"[^>]*title="sort by size"', r2.text).group(1)
    assert "desc" not in parse_qs(urlsplit(again.replace("&amp;", "&")).query)
    assert "ckptlab_view=list" in r.headers["set-cookie"]
    assert 'data-view="list"' in r.text and 'data-view="grid"' in r.text
    # the next request without ?view= keeps the list (cookie), and the grid link switches back
    again = client.get("/?kind=vae")
    assert "view-list" in again.text and '<table class="list">' in again.text
    grid = client.get(parse(again.text).views["grid"])
    assert "view-grid" in grid.text and parse(grid.text).cards[0]["tag"] == "article"
    assert parse_qs(urlsplit(parse(again.text).views["grid"]).query)["kind"] == ["vae"]


def test_density_is_a_discoverable_setting_and_is_remembered(client):
    r = client.get("/")
    assert "density-comfortable" in r.text and ">Density" in r.text
    r = client.get("/?density=dense")
    assert 'class="results view-grid density-dense"' in r.text
    assert '<option value="dense" selected>' in r.text
    assert "ckptlab_density=dense" in r.headers["set-cookie"]
    assert "density-dense" in client.get("/").text
    assert client.get("/?density=huge").status_code == 400


# -- bad input and the empty library ---------------------------------------------------------------------------

@pytest.mark.parametrize("query, word", [("sort=bogus", "sort"), ("safety=evil", "safety"), ("page=0", "page"),
                                         ("per_page=7", "per_page"), ("linked=maybe", "linked"),
                                         ("view=carousel", "view")])
def test_bad_values_are_a_400_with_one_line(client, query, word):
    r = client.get(f"/?{query}")
    assert r.status_code == 400
    msg = re.search(r'<p class="error-box" role="alert">(.*?)</p>', r.text, re.S).group(1)
    assert word in msg and "\n" not in msg.strip() and "Traceback" not in r.text


def test_a_page_past_the_end_says_so(client):
    r = client.get("/?page=99")
    assert r.status_code == 200 and "There is no page 99" in r.text and ids_of(r) == []


def test_an_empty_library_offers_a_scan(tmp_path):
    with make_client(tmp_path / "empty.db") as c:
        r = c.get("/")
    assert r.status_code == 200 and '<span id="total">0</span>' in r.text
    assert 'href="/jobs/new/scan"' in r.text and "library is empty" in r.text
