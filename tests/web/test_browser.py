"""End to end in a real browser: ``ckptlab serve`` started as a user starts it (``python -m ckptlab serve``, a
subprocess on a free loopback port) and Debian's chromium driven by Playwright. One server and one browser for the
whole file, a fresh browser context (cookies, storage, clipboard) per test. Every test fails on a JavaScript error,
a console error (a Content-Security-Policy violation is one), a dialog or a 5xx answer, unless it provokes that
refusal on purpose.

Oracles are independent of the app: the catalog read with plain ``sqlite3``, hashes computed with ``hashlib``,
the directory listing of the library, the DOM the browser built."""

from __future__ import annotations

import hashlib
import html
import json
import re
import secrets
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from fakes.browser import (
    XSS_NAMES,
    XSS_PICKLE_GLOBAL,
    XSS_TEXT,
    ErrorLog,
    add_sparse,
    add_xss_files,
    attacker_site,
    chromium_path,
    launch_browser,
    start_server,
)

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the web extra's playwright is not installed")

JOB_TIMEOUT_MS = 120_000
STATUSES = {"queued", "running", "done", "failed", "cancelled", "lost"}


# ------------------------------------------------------------------ the catalog, read without the app


def present(db: Path, where: str = "1", args: tuple = ()) -> dict[int, str]:
    """``id -> file name`` of the present files matching ``where`` (plain sqlite3: the oracle)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT id, name FROM files WHERE status = 'present' AND ({where})", args).fetchall()
    return dict(rows)


def file_id(db: Path, name: str) -> int:
    ids = present(db, "name = ?", (name,))
    assert ids, f"{name} is not in the catalog"
    return min(ids)


def file_path(db: Path, fid: int) -> Path:
    with sqlite3.connect(db) as conn:
        (raw,) = conn.execute("SELECT path FROM files WHERE id = ?", (fid,)).fetchone()
    return Path(raw.decode() if isinstance(raw, bytes) else raw)


def catalog_hashes(db: Path, fid: int) -> dict[str, str]:
    """The hashes (and fingerprint) the catalog holds for file ``fid``."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT c.sha256, c.autov1, c.autov2, c.autov3, c.crc32, c.blake3, c.fingerprint, "
                           "c.components "
                           "FROM files f JOIN content c ON (c.dev, c.ino, c.size, c.mtime_ns) = "
                           "(f.dev, f.ino, f.size, f.mtime_ns) WHERE f.id = ?", (fid,)).fetchone()
    if row is None:
        return {}
    out = {k: row[k] for k in row.keys() if row[k] and k != "components"}
    for name, value in json.loads(row["components"] or "{}").items():  # per-component fingerprints
        out[f"component {name}"] = value
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def listing(root: Path) -> set[str]:
    """Every path under ``root`` except the catalog's own files (what a job may leave behind)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not p.relative_to(root).parts[0].startswith("catalog.db")}


# ------------------------------------------------------------------ fixtures: one library, server, browser


@pytest.fixture(scope="session")
def e2e_library(sample_library, tmp_path_factory) -> Path:
    """A private copy of the sample library plus the files these tests need: LoRAs named and described with
    script payloads, and two big sparse checkpoints (hashing them is a job that runs for a while). Scanned with
    hashes and fingerprints, then the sparse ones without hashes (a hash job must really read them)."""
    import ckptlab

    lib = tmp_path_factory.mktemp("e2e") / "lib"
    shutil.copytree(sample_library, lib, symlinks=True,
                    ignore=shutil.ignore_patterns("catalog.db", "catalog.db-*"))
    add_xss_files(lib)
    ckptlab.scan(lib, db=lib / "catalog.db", hash=True, fingerprint=True)
    add_sparse(lib, "medium-sparse", "sd1_controlnet")   # ~0.7 GB of hole: a few seconds of hashing
    add_sparse(lib, "huge-sparse", "sdxl_checkpoint")    # ~7 GB of hole: a rewrite long enough to cancel
    ckptlab.scan(lib, db=lib / "catalog.db")
    return lib


@pytest.fixture(scope="session")
def db(e2e_library) -> Path:
    return e2e_library / "catalog.db"


@pytest.fixture(scope="session")
def server(db, tmp_path_factory):
    srv = start_server(db, tmp_path_factory.mktemp("e2e-home"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def browser():
    if chromium_path() is None:
        pytest.fail("chromium is not installed: run `make browser`")
    with playwright_sync.sync_playwright() as p:
        b = launch_browser(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def errors() -> ErrorLog:
    return ErrorLog()


@pytest.fixture
def context(browser, errors):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(30_000)
    ctx.on("page", errors.watch)
    bad: list[str] = []
    ctx.on("response", lambda r: bad.append(f"{r.status} {r.request.method} {r.url}") if r.status >= 500 else None)
    try:
        yield ctx
    finally:
        ctx.close()
    assert not bad, f"server errors: {bad}"
    assert not errors.dialogs, f"a dialog opened (script ran): {errors.dialogs}"
    assert not errors.unexpected(), "errors in the browser:\n" + "\n".join(errors.unexpected())


@pytest.fixture
def page(context):
    return context.new_page()


# ------------------------------------------------------------------ helpers driving the pages


def ids_on_page(page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#results article.card", "els => els.map(e => e.dataset.id)")]


def all_result_ids(page) -> set[int]:
    """The card ids of every page of the current result (following ``a[rel=next]``)."""
    seen: set[int] = set()
    for _ in range(100):
        seen.update(ids_on_page(page))
        nxt = page.locator("nav.pager a[rel=next]")
        if nxt.count() == 0:
            return seen
        page.goto(urljoin(page.url, nxt.first.get_attribute("href")))
    raise AssertionError("more than 100 result pages")


def urljoin(base: str, href: str) -> str:
    from urllib.parse import urljoin as join

    return join(base, href)


def total(page) -> int:
    return int(page.locator("#total").inner_text().strip().replace(",", ""))


def wait_total(page, n: int) -> None:
    page.wait_for_function("n => { const t = document.querySelector('#total');"
                           " return t && parseInt(t.textContent.replace(/,/g, '')) === n; }", arg=n)


def mark(page) -> None:
    """A value in the page's JS realm: gone if the page reloads or navigates."""
    page.evaluate("window.__e2e_mark = 'still here'")


def still_marked(page) -> bool:
    return page.evaluate("window.__e2e_mark") == "still here"


def choose(page, name: str, value: str) -> None:
    """Pick ``value`` in the filter control named ``name`` (a select, checkboxes or radios)."""
    ctl = page.locator(f"#filters [name='{name}']")
    assert ctl.count(), f"no filter control named {name}"
    tag = ctl.first.evaluate("e => e.tagName.toLowerCase()")
    if tag == "select":
        ctl.first.select_option(value)
    else:
        box = page.locator(f"#filters input[name='{name}'][value='{value}']")
        if not box.is_visible():  # in a collapsed group: open it as a user would
            page.locator(f"#filters details:has(input[name='{name}'][value='{value}']) > summary").first.click()
        box.check()


def watch_status(page) -> None:
    """From the next document on, record every text ``#job-status`` shows, from the first one the server
    rendered to the page's own later updates (an init script: it runs before the page's scripts)."""
    page.add_init_script("""(() => {
        window.__e2e_statuses = [];
        const note = () => { const s = document.querySelector('#job-status');
            const t = s && s.textContent.trim();
            if (t && window.__e2e_statuses[window.__e2e_statuses.length - 1] !== t) window.__e2e_statuses.push(t); };
        new MutationObserver(note).observe(document, {subtree: true, childList: true, characterData: true,
                                                      attributes: true});
    })()""")


def wait_status(page, status: str, timeout: float = JOB_TIMEOUT_MS) -> None:
    page.wait_for_function("s => { const e = document.querySelector('#job-status');"
                           " return e && e.textContent.trim() === s; }", arg=status, timeout=timeout)


def start_job_from_model_page(page, server, fid: int, kind: str) -> int:
    """Open the model page, follow its job link for ``kind``, submit the form; the new job's id."""
    page.goto(f"{server.url}/model/{fid}")
    link = page.locator(f"a.job-link[href*='/jobs/new/{kind}']")
    assert link.count(), f"no {kind} job link on /model/{fid}"
    link.first.click()
    page.wait_for_url(re.compile(rf"/jobs/new/{kind}\b"))
    page.locator("#job-form button[type=submit]").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    return int(urlsplit(page.url).path.rsplit("/", 1)[1])


def job_count(context, server) -> int:
    """Rows of the jobs list, read by a page of the app's own origin."""
    p = context.new_page()
    try:
        p.goto(f"{server.url}/jobs")
        return p.locator("table#jobs tr[data-id]").count()
    finally:
        p.close()


# ------------------------------------------------------------------ the library


def test_grid_shows_every_present_file_of_the_catalog(page, server, db):
    want = present(db)
    page.goto(server.url + "/")
    assert total(page) == len(want)
    cards = page.locator("#results article.card")
    assert cards.count() > 0
    # each card links to its model page and shows a name
    first = cards.first
    fid = first.get_attribute("data-id")
    assert first.locator(f"a[href='/model/{fid}']").count() >= 1
    assert first.locator(".card-name").inner_text().strip()
    assert all_result_ids(page) == set(want)
    # in pages of 30 (the pager's next links, followed to the end): the same files
    page.goto(server.url + "/?per_page=30")
    assert total(page) == len(want) and page.locator("nav.pager a[rel=next]").count() >= 1
    assert all_result_ids(page) == set(want)


def test_search_and_kind_filter_update_in_place_push_the_url_and_back_restores(page, server, db):
    everything = present(db)
    anything = present(db, "name LIKE '%anything%'")
    vaes = present(db, "kind = 'vae'")
    assert 0 < len(anything) < len(everything) and 0 < len(vaes) < len(everything)
    page.goto(server.url + "/")
    assert total(page) == len(everything)
    mark(page)

    page.locator("#q").press_sequentially("anything")
    page.wait_for_url(re.compile(r"[?&]q=anything\b"))
    wait_total(page, len(anything))
    assert set(ids_on_page(page)) == set(anything)
    assert still_marked(page), "the search reloaded the page instead of updating #results"

    page.go_back()
    page.wait_for_url(lambda url: "q=anything" not in url)
    wait_total(page, len(everything))
    assert page.locator("#q").input_value() == ""

    mark(page)
    choose(page, "kind", "vae")
    page.wait_for_url(re.compile(r"[?&]kind=vae\b"))
    wait_total(page, len(vaes))
    assert set(ids_on_page(page)) == set(vaes)
    assert still_marked(page), "the filter reloaded the page instead of updating #results"

    page.go_back()
    page.wait_for_url(lambda url: "kind=vae" not in url)
    wait_total(page, len(everything))

    # a pushed URL is a real address: opened cold it shows the same result
    page.goto(server.url + "/?kind=vae&q=mse")
    both = present(db, "kind = 'vae' AND name LIKE '%mse%'")
    assert 0 < len(both) < len(vaes)
    assert total(page) == len(both) and set(ids_on_page(page)) == set(both)


# ------------------------------------------------------------------ the model page


def test_model_page_from_a_card_shows_the_catalogs_hashes_and_copies_them(page, context, server, db):
    fid = file_id(db, "sd15_style_lora.safetensors")
    want = catalog_hashes(db, fid)
    assert want.get("sha256") and want.get("autov2")
    page.goto(server.url + "/?kind=lora")
    page.locator(f"#results article.card[data-id='{fid}'] a[href='/model/{fid}']").first.click()
    page.wait_for_url(re.compile(rf"/model/{fid}$"))
    assert page.locator("h1.model-name").inner_text().strip()
    for section in ("identification", "metadata", "sidecars", "duplicates"):
        assert page.locator(f"section#{section}").count() == 1, section

    shown = page.eval_on_selector_all("#hashes button[data-copy]", "els => els.map(e => e.dataset.copy)")
    shown_lower = {s.lower() for s in shown}
    assert want["sha256"].lower() in shown_lower and want["autov2"].lower() in shown_lower
    known = {v.lower() for v in want.values()}
    assert shown_lower <= known, f"copy buttons with values the catalog does not hold: {shown_lower - known}"

    # the copy button puts exactly the hash on the clipboard
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    sha = next(s for s in shown if s.lower() == want["sha256"].lower())
    page.locator(f"#hashes button[data-copy='{sha}']").first.click()
    page.wait_for_function("h => navigator.clipboard.readText().then(t => t === h)", arg=sha)

    # the A1111 prompt syntax names the file as A1111 does (its stem), and has its copy button
    syntax = page.locator("#lora-syntax").inner_text().strip()
    assert syntax.startswith("<lora:sd15_style_lora:") and syntax.endswith(">")
    assert syntax in page.eval_on_selector_all("[data-copy]", "els => els.map(e => e.dataset.copy)")


# ------------------------------------------------------------------ jobs


def test_job_started_from_the_model_page_runs_to_done_with_live_progress(page, server, db):
    fid = file_id(db, "medium-sparse.safetensors")
    path = file_path(db, fid)
    assert "sha256" not in catalog_hashes(db, fid)  # the job must really read the file
    events: list[str] = []
    page.on("request", lambda r: events.append(r.url) if re.search(r"/jobs/\d+/events", r.url) else None)
    watch_status(page)
    job = start_job_from_model_page(page, server, fid, "hash")
    mark(page)
    wait_status(page, "done")
    seen = page.evaluate("window.__e2e_statuses")
    assert still_marked(page), "the job page reloaded to show progress"
    assert set(seen) <= STATUSES and seen[-1] == "done"
    assert seen[0] in ("queued", "running"), f"the page was first rendered {seen[0]}: no live update to watch"
    assert any(f"/jobs/{job}/events" in u for u in events), "the page did not follow the job's event stream"
    # the bar ends full
    assert page.eval_on_selector("#job-progress", "p => p.max > 0 && p.value === p.max")
    # the work was done: the hash the job recorded is the file's sha256 (computed here with hashlib)
    assert catalog_hashes(db, fid).get("sha256", "").lower() == sha256_of(path)
    assert page.locator("#job-error").count() == 0 or not page.locator("#job-error").inner_text().strip()


def test_cancel_stops_a_running_job_and_leaves_no_partial_file(page, server, db, e2e_library):
    """A precision change of a 7 GB checkpoint, cancelled once its partial output is on disk: the job says
    cancelled, the partial file is gone and no output was made (the library's listing is what it was)."""
    fid = file_id(db, "huge-sparse.safetensors")
    before = listing(e2e_library)
    page.goto(f"{server.url}/model/{fid}")
    page.locator("a.job-link[href*='/jobs/new/precision']").first.click()
    page.wait_for_url(re.compile(r"/jobs/new/precision\b"))
    page.locator("#job-form [name=to]").select_option("bf16")
    page.locator("#job-form button[type=submit]").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    mark(page)
    wait_status(page, "running")
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while not (partial := listing(e2e_library) - before):  # the output being written
        assert time.monotonic() < deadline, "the job wrote nothing"
        assert page.locator("#job-status").inner_text().strip() == "running"
        time.sleep(0.05)
    page.locator("button#cancel").click()
    wait_status(page, "cancelled")
    assert still_marked(page)
    assert listing(e2e_library) == before, f"a cancelled job left {listing(e2e_library) - before} (had {partial})"
    page.reload()
    assert page.locator("#job-status").inner_text().strip() == "cancelled"  # the state outlives the page
    assert page.locator("button#cancel").count() == 0


# ------------------------------------------------------------------ script payloads from model files


NO_INJECTION = """() => {
    const bad = [];
    for (const el of document.querySelectorAll('*')) {
        for (const a of el.attributes) {
            const n = a.name.toLowerCase();
            if (n.startsWith('on') || n.startsWith('hx-on')) bad.push(el.tagName + ' ' + n);
            if (/^\\s*javascript:/i.test(a.value) && (n === 'href' || n === 'src' || n === 'action'))
                bad.push(el.tagName + ' ' + n + '=' + a.value);
        }
        if (el.tagName === 'IFRAME') bad.push('iframe');
        if (el.tagName === 'IMG' && el.getAttribute('src') === 'x') bad.push('img src=x');
        if (el.tagName === 'SCRIPT' && !(el.getAttribute('src') || '').startsWith('/static/')) bad.push('script');
    }
    if (window.__xss !== undefined) bad.push('window.__xss=' + window.__xss);
    return bad;
}"""


def test_script_payloads_in_names_metadata_and_sidecars_stay_text(page, server, db):
    xss = present(db, "name LIKE '%.safetensors' AND (name LIKE '%<%' OR name LIKE '%''%')")
    assert len(xss) == len(XSS_NAMES)
    pickle_id = file_id(db, XSS_NAMES[1] + ".pt")
    pages = ["/", "/?kind=lora", "/?q=" + quote("img src"), "/?view=list&kind=lora"]
    pages += [f"/model/{i}" for i in [*xss, pickle_id]] + ["/safety", "/disk", "/jobs"]
    for path in pages:
        resp = page.goto(server.url + path)
        assert resp.status == 200, path
        page.wait_for_load_state("load")
        assert page.evaluate(NO_INJECTION) == [], path
    # the payloads were shown, as text: each model page names its file literally
    for fid, name in xss.items():
        page.goto(f"{server.url}/model/{fid}")
        text = page.locator("body").inner_text()
        stem = name[: -len(".safetensors")]
        assert stem in text, f"/model/{fid} does not show its name {stem!r} as text"
        # and the metadata and sidecar payloads too, as the literal text they are
        for section in ("metadata", "sidecars"):
            assert XSS_TEXT[:40] in page.locator(f"section#{section}").inner_text(), (fid, section)
    page.goto(server.url + "/?kind=lora")
    cards = page.locator("#results .card-name").all_inner_texts()
    assert all(any(name in c for c in cards) for name in XSS_NAMES), cards
    # the malicious pickle is listed on the safety page with its finding, as text
    page.goto(server.url + "/safety")
    row = page.locator(f"table#unsafe tr[data-id='{pickle_id}']")
    assert row.count() == 1
    assert XSS_PICKLE_GLOBAL in page.locator("body").inner_text()


# ------------------------------------------------------------------ who may drive the server


def test_another_origin_cannot_start_a_job(page, context, server, db, errors):
    """A page on another origin posts to /jobs (fetch, a preflighted fetch, an auto-submitted form): refused,
    no job is created. The same form posted by the app's own page (the job tests) works."""
    fid = file_id(db, "v1-5-pruned-emaonly.safetensors")
    path = file_path(db, fid)
    page.goto(f"{server.url}/jobs/new/hash?path={quote(str(path))}")
    fields = page.eval_on_selector_all("#job-form [name]", "els => els.filter(e => e.name && !e.disabled)"
                                       ".map(e => [e.name, e.value])")
    fields = [(k, v) for k, v in fields if k != "csrf"] + [("csrf", "forged")]
    assert any(v == str(path) for _, v in fields), f"the form does not carry the file's path: {fields}"
    before = job_count(context, server)
    target = f"{server.url}/jobs"
    inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in fields)
    body = json.dumps(fields)
    attack = {
        "/fetch": f"""<!doctype html><title>loading</title><script>
            const body = new URLSearchParams({body});
            const simple = fetch({json.dumps(target)}, {{method: "POST", mode: "no-cors", credentials: "include",
                body}}).then(r => "sent:" + r.type, e => "blocked");
            const pre = fetch({json.dumps(target)}, {{method: "POST", credentials: "include", body,
                headers: {{"X-CSRF-Token": "forged"}}}}).then(r => "read:" + r.status, e => "blocked");
            Promise.all([simple, pre]).then(r => {{ document.title = "done " + r.join(" "); }});
            </script>""",
        "/form": f"""<!doctype html><title>prize</title><form id="f" method="POST" action="{html.escape(target)}">
            {inputs}</form><script>document.getElementById("f").submit();</script>""",
    }
    errors.allow("CORS policy")
    errors.allow("Failed to load resource")
    errors.allow("403")
    sent: list[str] = []
    context.on("request", lambda r: sent.append(r.method) if r.url == target else None)
    with attacker_site(attack) as evil:
        page.goto(evil + "/fetch")
        page.wait_for_function("document.title.startsWith('done')")
        # nothing readable came back (the simple post's answer is opaque, or withheld by the resource policy),
        # and the preflighted one was never sent
        assert page.title() in ("done sent:opaque blocked", "done blocked blocked")
        assert "POST" in sent  # the simple one did reach the server (which must refuse it: see the job count)
        with page.expect_response(lambda r: r.url == target and r.request.method == "POST") as answer:
            page.goto(evil + "/form")
        assert answer.value.status == 403
        assert "refused" in answer.value.text()
    # a same-origin script without the CSRF token (what injected markup could do) is refused too
    page.goto(server.url + "/")
    status = page.evaluate("""([url, fields]) => fetch(url, {method: "POST", body: new URLSearchParams(
        fields.filter(f => f[0] !== "csrf")), headers: {"X-CSRF-Token": "forged"}}).then(r => r.status)""",
                           [target, fields])
    assert status == 403
    assert job_count(context, server) == before, "a refused request created a job"


def test_a_foreign_host_name_is_refused(page, server, errors):
    """DNS rebinding: evil.test resolves to 127.0.0.1 (the browser's resolver rules) so its pages would be
    same-origin with the server; the server refuses the Host it was not started on."""
    errors.allow("Failed to load resource")
    errors.allow("Cross-Origin-Opener-Policy header has been ignored")  # chromium: evil.test is not https
    resp = page.goto(f"http://evil.test:{server.port}/")
    assert resp.status == 403
    assert "Host" in page.locator("body").inner_text()
    assert page.locator("#q").count() == 0
    resp = page.goto(f"http://evil.test:{server.port}/static/app.js")
    assert resp.status == 403


def test_a_non_loopback_bind_needs_the_token_and_drops_it_from_the_address(browser, db, tmp_path, errors):
    token = secrets.token_urlsafe(24)
    srv = start_server(db, tmp_path / "home", host="0.0.0.0", token=token)
    errors.allow("Failed to load resource")
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        errors.watch(page)
        resp = page.goto(srv.url + "/")
        assert resp.status == 401
        assert page.locator("#q").count() == 0
        resp = page.goto(f"{srv.url}/?token={token}")
        assert resp.status == 200
        assert page.url == srv.url + "/", "the token stayed in the address bar"
        assert page.locator("#q").count() == 1
        assert token not in page.content()
        # the rest of the session works without the token in any address
        resp = page.goto(srv.url + "/jobs")
        assert resp.status == 200
        other = browser.new_context()
        try:
            assert other.new_page().goto(srv.url + "/jobs").status == 401  # another browser profile: no
        finally:
            other.close()
        assert not errors.unexpected(), errors.unexpected()
    finally:
        ctx.close()
        srv.stop()
