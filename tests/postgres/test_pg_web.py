"""The web app on a PostgreSQL catalog: the library index (its triggers, its CivitAI-derived columns, its text
search without FTS5), the library page and the model page answer as they do on SQLite, for the same library
(the SQLite answers are the oracle; the search cases are the web tests' own, diacritics and FTS syntax included)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from fakes.web import make_client

import ckptlab
from ckptlab.hub import store
from ckptlab.library.catalog import Catalog
from ckptlab.web.query import Filters, facets, search

pytestmark = pytest.mark.xdist_group("test_pg_web")  # one module per worker: its module fixtures built once


def _web_query_module():
    """tests/web/test_query.py's cases (filters, search words, odd names), loaded by path: one list of cases."""
    path = Path(__file__).resolve().parents[1] / "web" / "test_query.py"
    spec = importlib.util.spec_from_file_location("_pg_web_query_cases", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CASES = _web_query_module()
SEARCHES = ["tweak", "detai lor", "sd15", "SD15_STYLE", "elan", "ÉLAN", "猫", "near", "quoted", "stylword",
            "ghibli sty", "zxqtrigger", "sidecarw", "ponyw", "sidecartag", "anime", "character", "safetensors",
            "v1 5 pruned", "nothing-like-this", '"', "NEAR(a b)", "a OR b", "names:lora", "%", "_", "\\", "é" * 50]


def _decorate(lib: Path, db) -> None:
    """What tests/web/test_query.py's ``varied`` does to its catalog: scan, CivitAI records and links (one with
    accents), verdicts, trigger words, through the catalog's and the hub's own APIs."""
    ckptlab.scan(lib, db=db, hash=True)
    with Catalog(db) as cat:
        by_name: dict = {}
        for r in cat.files():
            by_name.setdefault(r.name, []).append(r)
        style = by_name["sd15_style_lora.safetensors"][0]
        store.store_record(cat, "model", 11, {"id": 11, "name": "Détail Tweaker «XL»", "type": "LORA",
                                              "tags": ["Style", "anime"],
                                              "modelVersions": [{"id": 102, "name": "v2"}, {"id": 101, "name": "v1"}]})
        store.store_record(cat, "version", 101, {"id": 101, "modelId": 11, "name": "v1.0", "baseModel": "SD 1.5",
                                                 "trainedWords": ["stylword", "Ghibli style"],
                                                 "model": {"name": "Détail Tweaker «XL»", "type": "LORA"}})
        store.put_link(cat, style.sha256, 101, 11, matched_by="sha256")
        peft = by_name["pytorch_lora_weights.safetensors"][0]
        store.store_record(cat, "model", 21, {"id": 21, "name": "Pony Character", "type": "LORA", "tags": ["character"],
                                              "modelVersions": [{"id": 201, "name": "v1"}]})
        store.store_record(cat, "version", 201, {"id": 201, "modelId": 21, "name": "v1", "baseModel": "Pony",
                                                 "trainedWords": ["ponyword"], "model": {"name": "Pony Character"}})
        store.put_link(cat, peft.sha256, 201, 21, matched_by="autov3")
        with cat.transaction() as c:
            c.execute("UPDATE files SET safety = 'malicious' WHERE id = ?", (by_name["anime_hypernet.pt"][0].id,))
            c.execute("UPDATE files SET safety = NULL WHERE id = ?", (by_name["RRDB_ESRGAN_x4.pth"][0].id,))
            c.execute("UPDATE files SET triggers = ? WHERE id = ?",
                      (json.dumps([{"word": "zxqtrigger", "count": 3, "sources": ["tag frequency"]}]),
                       by_name["sd15_locon.safetensors"][0].id))


@pytest.fixture(scope="module")
def module_pg(postgres_server):
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture(scope="module")
def pair(sample_library, tmp_path_factory, module_pg):
    """(sqlite catalog, postgres url) of one private copy of the sample library with odd names and sidecars."""
    lib = tmp_path_factory.mktemp("pg-web") / "lib"
    shutil.copytree(sample_library, lib, symlinks=True)
    for f in lib.glob("catalog.db*"):
        f.unlink()
    lora = lib / "a1111" / "models" / "Lora"
    for name in CASES.ODD_NAMES:
        shutil.copyfile(lora / "sd15_style_lora.safetensors", lora / name)
    (lora / "sdxl_detail_lora.civitai.info").write_text(json.dumps(
        {"id": 901, "modelId": 90, "name": "v2 sidecar", "baseModel": "SDXL 1.0", "trainedWords": ["sidecarword"],
         "model": {"name": "Sidecar Detail Model", "type": "LORA"}, "files": []}), encoding="utf-8")
    (lora / "flux_style_lora.metadata.json").write_text(json.dumps(
        {"model_name": "Flux Metadata Style", "base_model": "Flux.1 D", "tags": ["Sidecartag", "anime"]}),
        encoding="utf-8")
    dbs = (lib / "catalog.db", module_pg)
    for db in dbs:
        _decorate(lib, db)
    return dbs


def _cards(db, f: Filters) -> tuple[int, list[dict]]:
    with Catalog(db) as cat:
        page = search(cat, f)
    # ids and first-seen times are each catalog's own; everything else must be the same
    return page.total, [{k: v for k, v in dataclasses.asdict(c).items() if k not in ("id", "added")}
                        for c in page.cards]


@pytest.mark.parametrize("q", SEARCHES)
def test_search_gives_the_same_cards(pair, q):
    sqlite_answer = _cards(pair[0], Filters(q=q[:200], per_page=240))
    assert _cards(pair[1], Filters(q=q[:200], per_page=240)) == sqlite_answer


def test_the_accent_and_link_searches_find_something(pair):
    """The cases above would also agree if both found nothing: these must find the linked file."""
    for q in ("tweak", "detai lor", "stylword", "ponyw", "zxqtrigger", "elan", "猫"):
        total, cards = _cards(pair[1], Filters(q=q, per_page=240))
        assert total >= 1 and cards, q


@pytest.mark.parametrize("case", CASES.FILTER_CASES, ids=lambda c: "&".join(f"{k}={v}" for k, v in c.items()))
def test_filters_give_the_same_cards(pair, case):
    assert _cards(pair[1], Filters(**case, per_page=240)) == _cards(pair[0], Filters(**case, per_page=240))


@pytest.mark.parametrize("sort", ["name", "size", "added", "family"])
def test_sorts_and_pages_agree(pair, sort):
    for desc in (False, True):
        for page in (1, 2):
            f = Filters(sort=sort, desc=desc, page=page, per_page=30)
            if sort == "added":  # first-seen times are each scan's own: compare the set of the whole list
                f = Filters(sort=sort, desc=desc, per_page=240)
                a, b = _cards(pair[0], f), _cards(pair[1], f)
                assert a[0] == b[0] and sorted(map(json.dumps, a[1])) == sorted(map(json.dumps, b[1]))
                continue
            assert _cards(pair[1], f) == _cards(pair[0], f)


def test_facets_agree(pair):
    out = []
    for db in pair:
        with Catalog(db) as cat:
            out.append(facets(cat))
    assert out[0] == out[1]
    assert dict((v, n) for v, _l, n in out[1]["linked"])["yes"] >= 2  # the linked content and its copies


def test_index_follows_catalog_changes(pair, tmp_path):
    """The triggers: a change the CLI makes (a verdict, a missing file) reaches the next answer on both."""
    for db in pair:
        with Catalog(db) as cat:
            rec = next(r for r in cat.files() if r.name == "sd15_loha.safetensors")
            with cat.transaction() as c:
                c.execute("UPDATE files SET safety = 'suspicious' WHERE id = ?", (rec.id,))
    a = _cards(pair[0], Filters(safety=("suspicious",), per_page=240))
    assert a == _cards(pair[1], Filters(safety=("suspicious",), per_page=240))
    assert any(c["file_name"] == "sd15_loha.safetensors" for c in a[1])


def _page_text(html: str) -> str:
    html = re.sub(r"/model/\d+", "/model/N", html)
    html = re.sub(r'data-id="\d+"', 'data-id="N"', html)
    html = re.sub(r"\d+(\.\d+)? ms", "N ms", html)
    html = re.sub(r'name="csrf[^>]*>', "", html)
    html = re.sub(r'name="fingerprint" value="\w+"', "", html)  # the disk plan's digest: it names its catalog
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "<time>", html)


def test_library_and_model_pages_agree(pair):
    pages = []
    for db in pair:
        with make_client(db) as client:
            got = {}
            for url in ("/", "/?q=detai+lor", "/?kind=lora&sort=size", "/?linked=yes", "/?q=%E7%8C%AB", "/safety",
                        "/safety?verdict=malicious", "/disk", "/jobs"):
                r = client.get(url)
                assert r.status_code == 200, (db, url, r.text[:300])
                got[url] = _page_text(r.text.replace(client.app.state.guard.csrf, "<csrf>").replace(str(db), "<db>"))
            with Catalog(db) as cat:
                rec = next(r for r in cat.files() if r.name == "sd15_style_lora.safetensors")
            r = client.get(f"/model/{rec.id}")
            assert r.status_code == 200, (db, r.text[:300])
            got["model"] = _page_text(r.text.replace(client.app.state.guard.csrf, "<csrf>"))
            assert "Détail Tweaker" in r.text or "D&#233;tail Tweaker" in r.text
        pages.append(got)
    for url in pages[0]:
        if pages[1][url] != pages[0][url]:
            import difflib

            diff = "\n".join(difflib.unified_diff(pages[0][url].splitlines(), pages[1][url].splitlines(), lineterm="", n=0))
            raise AssertionError(f"{url}: {diff[:3000]}")


def test_bulk_rebuild_drops_and_recreates_the_indexes(pair, monkeypatch):
    """A rebuild of most of the index drops its secondary indexes and creates them again from the catalog's
    own record of them (``sqlite_master``; on PostgreSQL a view over ``pg_indexes``): same answers after."""
    from ckptlab.web import index

    monkeypatch.setattr(index, "BULK", 1)
    before = _cards(pair[1], Filters(q="detai lor", per_page=240)), _cards(pair[1], Filters(sort="size", per_page=240))
    with Catalog(pair[1]) as cat:
        names = sorted(r[0] for r in cat.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'web_index'"))
        assert index.rebuild_all(cat) > 0
        assert sorted(r[0] for r in cat.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'web_index'")) == names
    assert "web_index_name" in names
    after = _cards(pair[1], Filters(q="detai lor", per_page=240)), _cards(pair[1], Filters(sort="size", per_page=240))
    assert after == before


def test_a_hash_job_runs_its_worker_on_postgres(pair):
    """A job from the page: the worker process opens the PostgreSQL catalog, beats, stores its result."""
    import hashlib

    from ckptlab.web import jobs

    jobs_tests = importlib.util.spec_from_file_location(
        "_pg_jobs_cases", Path(__file__).resolve().parents[1] / "web" / "test_jobs.py")
    mod = importlib.util.module_from_spec(jobs_tests)
    jobs_tests.loader.exec_module(mod)
    f = pair[0].parent / "a1111" / "models" / "Lora" / "sd15_loha.safetensors"
    with make_client(pair[1]) as client:
        job_id = mod.start(client, "hash", path=f)
        assert mod.wait_final(client, job_id) == "done"
    job = jobs.get(pair[1], job_id)
    assert job.result["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest().upper()
    assert jobs.log_path(pair[1], job_id).is_file()  # the log went to the catalog's side folder


def test_serve_takes_the_url_as_its_path_option_mangles_it(pair):
    """``serve --db`` is a ``Path`` option: ``postgresql://h/db`` arrives as ``postgresql:/h/db``."""
    from ckptlab.library.sql_dialect import DbUrl
    from ckptlab.web.app import create_app

    app = create_app(Path(pair[1]), host="127.0.0.1", port=8765)
    assert isinstance(app.state.db, DbUrl) and app.state.db.dsn == pair[1]
