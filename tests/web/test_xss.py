"""Script payloads everywhere attacker-controlled text reaches the app, and a crawl of every page it serves.

Model files, their metadata, the sidecars beside them, CivitAI records and image infotext are written by
whoever published the model: a catalog is built here whose every such string is a payload (file and folder names,
kohya ``ss_*`` fields, ModelSpec, a merge recipe, ``.civitai.info`` / ``.metadata.json`` / A1111 ``.json`` /
``.txt`` sidecars, CivitAI model and version records with HTML descriptions and ``javascript:`` links, a preview's
infotext, linked images, a pickle whose imported global is a payload). The crawler starts at ``/`` (plus each
model page, the error pages, and payloads put into query strings) and follows every link inside the app, so the
pages other engineers add are covered as they are merged.

Every HTML answer is read with ``html.parser`` as a browser would: no element or attribute may come from a payload
(no ``on*`` attribute anywhere - the app has none of its own, the CSP forbids them; no ``<script>`` but the app's
own ``/static`` files; no ``iframe``/``object``/``embed``/``base``; no ``javascript:`` URL), the raw payloads never
appear in the HTML source, and the payloads are present as text where the pages show those fields.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from collections import deque
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import pytest
from fakes.library_files import tensors, write_st
from fakes.web import BASE, make_client
from fakes.web_html import parse
from hostile.corpus import call, g, p2, u

from ckptlab.hub import store
from ckptlab.library import image_links
from ckptlab.library.catalog import Catalog
from ckptlab.library.previews import record_preview
from ckptlab.library.scanner import scan

P_IMG = "<img src=x onerror=alert(1)>"
P_SVG = "<svg onload=alert(2)>"
P_SCRIPT = '"><script>alert(3)</script>'
P_QUOTE = "' onmouseover='alert(4)' x='"
P_DQUOTE = '" onfocus="alert(5)" autofocus x="'
P_JS = "javascript:alert(6)"
P_IFRAME = '<iframe srcdoc="<script>alert(7)</script>"></iframe>'
P_STYLE = "</style><script>alert(8)</script>"
P_TEXTAREA = "</textarea><img src=x onerror=alert(9)>"
#: every payload whose raw form must never appear in an HTML source (javascript: is harmless as text)
RAW = (P_IMG, P_SVG, P_SCRIPT, P_QUOTE, P_DQUOTE, P_IFRAME, P_STYLE, P_TEXTAREA)
ALL = (*RAW, P_JS)

MAX_PAGES = 600
SKIP = ("/static/", "/jobs/events")


def _metadata() -> dict[str, str]:
    return {
        "ss_output_name": P_IMG, "ss_training_comment": P_SCRIPT, "ss_sd_model_name": P_QUOTE,
        "ss_tag_frequency": json.dumps({P_SVG: {P_IMG: 3, P_SCRIPT: 1}}), "ss_dataset_dirs": json.dumps(
            {P_IFRAME: {"n_repeats": 1, "img_count": 2}}), "ss_network_module": "networks.lora",
        "ss_base_model_version": P_DQUOTE, "ss_sd_model_hash": P_JS,
        "modelspec.title": P_SCRIPT, "modelspec.description": P_IFRAME, "modelspec.author": P_IMG,
        "modelspec.trigger_phrase": P_TEXTAREA, "modelspec.thumbnail": P_JS, "modelspec.license": P_STYLE,
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.sai_model_spec": "1.0.0",
    }


def _recipe() -> str:
    return json.dumps({"type": "webui", "primary_model_hash": P_SCRIPT, "secondary_model_hash": P_IMG,
                       "merge_recipe": P_IFRAME, "custom_name": P_DQUOTE, "model_a": P_SVG, "model_b": P_QUOTE,
                       "interp_method": P_STYLE})


def civitai_version(vid: int, mid: int, sha: str) -> dict:
    return {"id": vid, "modelId": mid, "name": P_IMG, "baseModel": P_SVG, "description": f"<p>{P_SCRIPT}</p>",
            "trainedWords": [P_IMG, P_QUOTE, P_TEXTAREA], "downloadUrl": P_JS,
            "model": {"name": P_SCRIPT, "type": "LORA", "nsfw": False},
            "files": [{"name": f"{P_IMG}.safetensors", "primary": True, "type": "Model",
                       "hashes": {"SHA256": sha}, "downloadUrl": P_JS}],
            "images": [{"url": P_JS, "meta": {"prompt": P_IFRAME, "negativePrompt": P_STYLE}}]}


@pytest.fixture(scope="module")
def xss_lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-xss") / "lib"
    lora_dir = root / "webui" / "models" / "Lora" / P_SVG
    lora = write_st(lora_dir / f"{P_IMG}.safetensors", tensors("sd1_kohya_lora", seed=1), _metadata())
    sha = hashlib.sha256(lora.read_bytes()).hexdigest().upper()
    (lora_dir / f"{P_IMG}.civitai.info").write_text(json.dumps(civitai_version(555, 55, sha)))
    (lora_dir / f"{P_IMG}.metadata.json").write_text(json.dumps({
        "model_name": P_SCRIPT, "base_model": P_SVG, "tags": [P_IMG, P_IFRAME], "trainedWords": [P_DQUOTE],
        "civitai": {"id": 555, "modelId": 55, "trainedWords": [P_TEXTAREA]}}))
    (lora_dir / f"{P_IMG}.json").write_text(json.dumps({"activation text": P_IMG, "description": P_SCRIPT,
                                                        "notes": P_IFRAME, "sd version": P_QUOTE}))
    (lora_dir / f"{P_IMG}.txt").write_text(P_STYLE + P_SCRIPT)
    # a same-bytes copy outside every UI folder (the disk page shows it), under a quote-breaking name
    (root / "Downloads").mkdir(parents=True)
    shutil.copy2(lora, root / "Downloads" / f"{P_DQUOTE}.safetensors")
    # a merged checkpoint with a payload recipe, named to break out of a single-quoted attribute
    ck = write_st(root / "webui" / "models" / "Stable-diffusion" / f"{P_QUOTE}.safetensors",
                  tensors("sd1_checkpoint", seed=2), {"sd_merge_recipe": _recipe(), "modelspec.title": P_IMG,
                                                      "ss_training_comment": P_SVG})
    # a pickle importing a "global" whose module and name are payloads (what check reports, the safety page shows)
    hostile = root / "webui" / "models" / "Stable-diffusion" / f"{P_SVG}.ckpt"
    hostile.write_bytes(p2(call(g(P_IMG, "system"), u(P_SCRIPT))))
    db = root / "catalog.db"
    with Catalog(db) as cat:
        scan([root / "webui", root / "Downloads"], cat, hash=True, fingerprint=True, workers=1)
        store.store_record(cat, "version", 555, civitai_version(555, 55, sha))
        store.store_record(cat, "model", 55, {"id": 55, "name": P_SCRIPT, "type": "LORA", "description": (
            f'<p>{P_IMG}</p><a href="{P_JS}">x</a>{P_IFRAME}'), "tags": [P_SVG], "creator": {"username": P_QUOTE},
            "modelVersions": [civitai_version(555, 55, sha), {**civitai_version(556, 55, "0" * 64), "name": P_SVG}]})
        store.put_link(cat, sha, 555, 55, matched_by="sha256", file_id=9000)
        img_dir = root / "outputs" / P_SVG
        img_dir.mkdir(parents=True)
        img = img_dir / f"{P_IMG}.png"
        img.write_bytes(b"\x89PNG\r\n\x1a\n")
        image_links.record(cat, [(img, [(sha, "lora", "hash")])])
        record_preview(cat, ck, img, seed=1, infotext=f"{P_SCRIPT}\nNegative prompt: {P_IMG}\nSteps: 20, "
                                                     f"Model: {P_QUOTE}")
    return root, db


def check_page(url: str, r, problems: list[str]) -> str:
    """The page's text (for the presence checks); every way a payload could have become markup is a problem."""
    for k in ("content-security-policy", "x-content-type-options"):
        if k not in r.headers:
            problems.append(f"{url}: no {k} header")
    ctype = r.headers.get("content-type", "")
    body = r.text
    if "html" not in ctype:
        if any(p in body for p in RAW) and not ctype.startswith(("application/json", "text/plain",
                                                                 "text/event-stream")):
            problems.append(f"{url}: raw payload in a {ctype} answer")
        return ""
    for p in RAW:
        if p in body:
            problems.append(f"{url}: raw payload in the HTML source: {p!r}")
    doc = parse(body)
    for n in doc.iter():
        if n.tag == "#document":
            continue
        for name, value in n.attrs.items():
            if name.lower().startswith("on"):
                problems.append(f"{url}: <{n.tag} {name}=...> (an event handler attribute)")
            v = (value or "").strip().lower().replace("\t", "").replace("\n", "")
            if name.lower() in ("href", "src", "action", "formaction", "hx-get", "hx-post", "hx-put",
                                "hx-delete", "poster", "data", "srcdoc", "xlink:href") and (
                    v.startswith(("javascript:", "vbscript:", "data:text/html")) or name.lower() == "srcdoc"):
                problems.append(f"{url}: <{n.tag} {name}={value!r}>")
            if name.lower() == "style" and ("expression(" in v or "javascript:" in v):
                problems.append(f"{url}: <{n.tag} style={value!r}>")
        if n.tag in ("iframe", "object", "embed", "base", "frame", "frameset", "applet"):
            problems.append(f"{url}: <{n.tag}> element")
        if n.tag == "script" and (not (n.attrs.get("src") or "").startswith("/static/") or n.text().strip()):
            problems.append(f"{url}: a script that is not one of the app's static files: {n.attrs}")
        if n.tag == "meta" and (n.attrs.get("http-equiv") or "").lower() == "refresh":
            problems.append(f"{url}: <meta http-equiv=refresh>")
        if n.tag in ("img", "image") and (n.attrs.get("src") or "") == "x":
            problems.append(f"{url}: <img src=x> from a payload")
    return doc.text()


def links(url: str, html: str) -> list[str]:
    out = []
    doc = parse(html)
    for n in doc.iter():
        for attr in ("href", "src", "hx-get", "action"):
            v = n.attrs.get(attr)
            if not v or (attr == "action" and (n.attrs.get("method") or "get").lower() != "get"):
                continue
            full = urljoin(BASE + url, v)
            parts = urlsplit(full)
            if f"{parts.scheme}://{parts.netloc}" != BASE:
                continue
            local = parts.path + (f"?{parts.query}" if parts.query else "")
            if not local.startswith(SKIP) and "/events" not in parts.path:
                out.append(local)
    return out


def seeds(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    ids = [r[0] for r in con.execute("SELECT id FROM files ORDER BY id")]
    paths = [r[0] for r in con.execute("SELECT display FROM files ORDER BY id")]
    con.close()
    q = quote
    out = ["/", "/disk", "/disk?components=1&link=none", "/safety", "/jobs", *[f"/model/{i}" for i in ids],
           "/model/999999", "/model/" + q(P_IMG), "/nonexistent/" + q(P_SCRIPT)]
    for p in ALL:
        out += [f"/?q={q(p)}", f"/?kind={q(p)}", f"/?family={q(p)}&sort={q(p)}", f"/?page={q(p)}",
                f"/safety?verdict={q(p)}", f"/disk?link={q(p)}", f"/disk?convert_kind={q(p)}",
                f"/jobs/new/{q(p)}", f"/jobs/new/check?path={q(p)}"]
    out += [f"/jobs/new/check?path={q(p)}" for p in paths] + [f"/jobs/new/scan?path={q(p)}" for p in paths]
    return out


def crawl(client, start: list[str]) -> tuple[dict[str, int], str, list[str]]:
    problems: list[str] = []
    seen: dict[str, int] = {}
    texts: list[str] = []
    queue = deque(start)
    while queue and len(seen) < MAX_PAGES:
        url = queue.popleft()
        if url in seen:
            continue
        r = client.get(url)
        seen[url] = r.status_code
        if r.status_code >= 500:
            problems.append(f"{url}: {r.status_code}")
        texts.append(check_page(url, r, problems))
        if "html" in r.headers.get("content-type", "") and r.status_code < 400:
            queue.extend(u for u in links(url, r.text) if u not in seen)
            if url in start[:6]:  # the htmx fragment of the main pages too
                rh = client.get(url, headers={"hx-request": "true"})
                texts.append(check_page(url + " (htmx)", rh, problems))
    return seen, "\n".join(texts), problems


def test_no_payload_becomes_markup_on_any_page(xss_lib):
    root, db = xss_lib
    try:  # a job whose parameters carry payloads, when the jobs runner is in
        from ckptlab.web import jobs

        jobs.submit(db, "check", {"path": str(root / "webui" / "models" / "Stable-diffusion" / f"{P_SVG}.ckpt")})
    except Exception:  # noqa: BLE001 - the skeleton's NotImplementedError, or a runner that refuses the params
        pass
    with make_client(db) as c:
        seen, text, problems = crawl(c, seeds(db))
    assert not problems, "\n".join(problems[:40])
    assert len(seen) >= 40
    # the crawl reached the pages this branch has, and they show the payloads as text
    ok = {u for u, s in seen.items() if s == 200}
    assert {"/", "/disk", "/safety"} <= ok
    assert P_IMG in text and P_SVG in text and P_DQUOTE.strip() in text


def test_each_area_shows_the_payloads_as_text(xss_lib):
    root, db = xss_lib
    with make_client(db) as c:
        safety = c.get("/safety")
        disk = c.get("/disk")
        model_pages = {i: c.get(f"/model/{i}") for i in range(1, 6)}
    problems: list[str] = []
    s_text = check_page("/safety", safety, problems)
    d_text = check_page("/disk", disk, problems)
    assert not problems, problems
    # the hostile pickle: its name, its folder, and the imported "global" check reported
    assert f"{P_SVG}.ckpt" in s_text and P_IMG in s_text
    doc = parse(safety.text)
    globals_shown = [gl.text() for gl in doc.find_all("code", cls="global")]
    assert any(P_IMG in gl for gl in globals_shown), globals_shown
    # the duplicate group: the LoRA in a payload folder, and its quote-breaking copy in Downloads/
    assert f"{P_IMG}.safetensors" in d_text and P_SVG in d_text and f"{P_DQUOTE}.safetensors" in d_text
    for i, r in model_pages.items():
        if r.status_code == 200:  # the model page, once merged: the file names it shows are text
            check_page(f"/model/{i}", r, problems)
    assert not problems, problems


def test_the_checker_itself_on_a_page_that_would_fail():
    """The checks catch what they are meant to (so a clean crawl means something)."""
    class R:
        headers = {"content-type": "text/html", "content-security-policy": "x", "x-content-type-options": "x"}

        def __init__(self, text):
            self.text = text

    for bad in (f"<p>{P_IMG}</p>", f'<a title="{P_DQUOTE}">', f"<a href='{P_JS}'>x</a>",
                '<script>alert(1)</script>', f"<div title='{P_QUOTE}'>", f"<textarea>{P_TEXTAREA}</textarea>",
                P_IFRAME, '<script src="https://evil.example/x.js"></script>'):
        problems: list[str] = []
        check_page("/t", R(bad), problems)
        assert problems, bad
    ok: list[str] = []
    check_page("/t", R('<script src="/static/app.js" defer></script><p>&lt;img src=x onerror=alert(1)&gt;</p>'), ok)
    assert not ok
