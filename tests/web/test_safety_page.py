"""The Safety page (``/safety``) on a catalog with the hostile corpus scanned in it (``tests/hostile``: every
payload would create a canary file if anything unpickled it).

Oracles: ``sqlite3`` over the catalog for which rows are not safe and the counts per verdict; ``ckptlab check
--json`` (the CLI in a subprocess) for the findings each row must show.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fakes.library_files import tensors, touch_garbage, write_st
from fakes.web import make_client
from fakes.web_html import parse
from hostile.corpus import build_hostile

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

NEVER = "never checked"


@pytest.fixture(scope="module")
def hostile_lib(tmp_path_factory):
    """The hostile corpus, a safe LoRA and a garbage ``.safetensors`` in one folder, scanned; one row made
    'never checked' (a catalog from before verdicts were stored) and one 'unchecked' (a check that failed)."""
    root = tmp_path_factory.mktemp("web-hostile")
    lib = root / "models"
    cases = build_hostile(lib, root / "canary")
    write_st(lib / "good.safetensors", tensors("sd1_embedding", seed=1))
    write_st(lib / "old.safetensors", tensors("sd1_embedding", seed=2))
    write_st(lib / "failed.safetensors", tensors("sd1_embedding", seed=3))
    touch_garbage(lib / "broken.safetensors", b"\xff" * 64)
    db = root / "catalog.db"
    with Catalog(db) as cat:
        scan([lib], cat, workers=1)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE files SET safety = NULL, safety_detail = NULL WHERE name = 'old.safetensors'")
        con.execute("UPDATE files SET safety = 'unchecked', safety_detail = ? WHERE name = 'failed.safetensors'",
                    (json.dumps({"error": "check failed: OSError: <b>disk</b> went away"}),))
    con.close()
    assert not any((root / "canary").iterdir()), "a payload ran"
    return root, db, cases


def oracle_rows(db: Path) -> dict[int, str]:
    con = sqlite3.connect(db)
    try:
        return {i: s if s is not None else NEVER for i, s in con.execute(
            "SELECT id, safety FROM files WHERE status = 'present' AND (safety IS NULL OR safety <> 'safe')")}
    finally:
        con.close()


def page_rows(client, url: str = "/safety") -> dict[int, object]:
    rows = {}
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.text
        doc = parse(r.text)
        table = doc.by_id("unsafe")
        for tr in table.find_all("tr"):
            if "data-id" in tr.attrs:
                assert int(tr.attrs["data-id"]) not in rows
                rows[int(tr.attrs["data-id"])] = tr
        nxt = doc.find("a", rel="next")
        url = nxt.attrs["href"] if nxt is not None else None
    return rows


def test_the_page_lists_exactly_the_files_that_are_not_safe(hostile_lib):
    root, db, cases = hostile_lib
    oracle = oracle_rows(db)
    assert len(oracle) > 60 and set(oracle.values()) >= {"malicious", "suspicious", "corrupt", "unchecked", NEVER}
    with make_client(db) as c:
        rows = page_rows(c)
    assert {i: tr.attrs["data-verdict"] for i, tr in rows.items()} == oracle
    # worst first
    order = ["malicious", "suspicious", "corrupt", "unchecked", NEVER]
    verdicts = [tr.attrs["data-verdict"] for tr in rows.values()]
    assert verdicts == sorted(verdicts, key=order.index)


def test_paging_walks_every_row_once(hostile_lib, monkeypatch):
    _root, db, _cases = hostile_lib
    monkeypatch.setattr("ckptlab.web.pages_safety.PER_PAGE", 7)
    with make_client(db) as c:
        rows = page_rows(c)
    assert set(rows) == set(oracle_rows(db))


def test_counts_per_verdict(hostile_lib):
    _root, db, _cases = hostile_lib
    con = sqlite3.connect(db)
    counts = dict(con.execute("SELECT coalesce(safety, 'never checked'), count(*) FROM files "
                              "WHERE status = 'present' GROUP BY 1"))
    con.close()
    with make_client(db) as c:
        doc = parse(c.get("/safety").text)
    shown = {li.attrs["data-verdict"]: int(li.find("span", cls="count").text())
             for li in doc.by_id("verdict-counts").find_all("li") if "data-verdict" in li.attrs}
    assert shown == {v: counts.get(v, 0) for v in shown}
    assert set(shown) == {"malicious", "suspicious", "corrupt", "unchecked", NEVER, "safe"}
    assert int(doc.by_id("unsafe-total").text()) == sum(n for v, n in counts.items() if v != "safe")


def test_findings_are_what_check_json_reports(hostile_lib, cli):
    root, db, _cases = hostile_lib
    with make_client(db) as c:
        rows = page_rows(c)
    con = sqlite3.connect(db)
    paths = {i: p for i, p, fmt in con.execute("SELECT id, display, format FROM files") if fmt == "pickle"}
    con.close()
    picked = {i: p for i, p in paths.items() if i in rows}
    assert len(picked) > 40
    r = cli("check", "--json", *picked.values())
    assert r.returncode in (3, 4, 5), r.stderr
    by_path = {}
    for line in r.stdout.splitlines():
        rec = json.loads(line)
        by_path[rec["path"]] = rec
    compared = 0
    for fid, path in picked.items():
        rec = by_path[path]
        tr = rows[fid]
        assert tr.attrs["data-verdict"] == rec["verdict"], path
        want = [(f["severity"], f["kind"], f["detail"], f["location"]) for f in rec["findings"]
                if f["severity"] != "info"][:50]
        shown = []
        for li in tr.find_all("li", cls="finding"):
            loc = li.find(cls="finding-location")
            shown.append((li.attrs["data-severity"], li.find(cls="finding-kind").text(),
                          li.find(cls="finding-detail").text(), loc.text()[1:-1] if loc is not None else ""))
        assert shown == want, path
        compared += len(want)
        assert [g.text() for g in tr.find_all("code", cls="global")] == rec["globals"], path
    assert compared > len(picked)
    assert not any((root / "canary").iterdir()), "a payload ran"


def test_links_to_the_model_page_and_a_check_job(hostile_lib):
    _root, db, _cases = hostile_lib
    con = sqlite3.connect(db)
    paths = dict(con.execute("SELECT id, display FROM files"))
    con.close()
    with make_client(db) as c:
        rows = page_rows(c)
    for fid, tr in rows.items():
        assert tr.find("a", cls="model-link").attrs["href"] == f"/model/{fid}"
        job = urlsplit(tr.find("a", cls="job-link").attrs["href"])
        assert job.path == "/jobs/new/check"
        assert parse_qs(job.query) == {"path": [paths[fid]]}


def test_unchecked_rows_say_why(hostile_lib):
    _root, db, _cases = hostile_lib
    with make_client(db) as c:
        r = c.get("/safety?verdict=unchecked")
    doc = parse(r.text)
    (tr,) = [tr for tr in doc.by_id("unsafe").find_all("tr") if "data-id" in tr.attrs]
    assert "check failed: OSError: <b>disk</b> went away" in tr.text()  # shown as text, not markup
    assert not tr.find_all("b")


@pytest.mark.parametrize("verdict", ["malicious", "suspicious", "corrupt", "unchecked", NEVER])
def test_filter_by_verdict(hostile_lib, verdict):
    _root, db, _cases = hostile_lib
    with make_client(db) as c:
        rows = page_rows(c, "/safety?" + "verdict=" + verdict.replace(" ", "+"))
    assert set(rows) == {i for i, v in oracle_rows(db).items() if v == verdict}


def test_bad_filter_values_are_400(hostile_lib):
    _root, db, _cases = hostile_lib
    with make_client(db) as c:
        for q in ("?verdict=safe", "?verdict=%3Cscript%3E", "?page=0", "?page=x"):
            r = c.get("/safety" + q)
            assert r.status_code == 400, q
            assert "<script>" not in r.text.split("</head>", 1)[1].replace('<script src="/static', "")


def test_an_all_safe_catalog(client):
    r = client.get("/safety")
    doc = parse(r.text)
    assert r.status_code == 200 and doc.by_id("all-safe") is not None
    assert not [tr for tr in doc.by_id("unsafe").find_all("tr") if "data-id" in tr.attrs]


def test_a_diffusers_folder_lists_the_findings_of_its_files(tmp_path, cli, monkeypatch):
    """A pipeline folder is one catalog row; its verdict is its worst file's, and the page shows each hostile
    file's findings under that file's name (oracle: ``ckptlab check --json`` on the folder)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "library"))
    from hostile.corpus import os_system, p2
    from test_scan_diffusers import pipeline

    folder = pipeline(tmp_path / "models" / "diffusers" / "sd15")
    (folder / "text_encoder" / "pytorch_model.bin").write_bytes(p2(os_system(tmp_path / "canary")))
    db = tmp_path / "catalog.db"
    with Catalog(db) as cat:
        scan([tmp_path / "models"], cat, workers=1)
    r = cli("check", "--json", str(folder))
    records = [json.loads(line) for line in r.stdout.splitlines()]
    want = [("text_encoder/pytorch_model.bin", f["severity"], f["kind"], f["detail"]) for rec in records
            if rec["verdict"] != "safe" for f in rec["findings"] if f["severity"] != "info"]
    assert want and r.returncode == 4
    with make_client(db) as c:
        rows = page_rows(c)
    (tr,) = rows.values()
    assert tr.attrs["data-verdict"] == "malicious"
    shown = [(li.find(cls="finding-file").text(), li.attrs["data-severity"], li.find(cls="finding-kind").text(),
              li.find(cls="finding-detail").text()) for li in tr.find_all("li", cls="finding")]
    assert shown == want
    assert not (tmp_path / "canary").exists()
