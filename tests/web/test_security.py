"""What a page from elsewhere, a DNS-rebinding name, or a client without the access token can make the app do:
nothing. ``web/security.py``'s guard, tested through the app (FastAPI's TestClient) and, where the client library
would tidy the request up (``..`` segments, a second Host), through a real ``ckptlab serve`` on a free loopback
port spoken to with raw sockets.

"Nothing changed" is checked, not assumed: every refused request is followed by a comparison of the library
tree, every catalog row and the saved plans with their state before, and ``jobs.submit`` records its calls.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes.library_files import tensors, write_st
from fakes.web import BASE, HOST, PORT, make_client
from fakes.web_html import parse

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

SRC = Path(__file__).resolve().parents[2] / "src"
TOKEN = "s3cret-token-for-tests-0123456789"
SECRET = "SECRET-MARKER-6f1d2c"  # in a file outside every folder the app may serve
HEADERS = {"content-security-policy": "script-src 'self'", "x-content-type-options": "nosniff",
           "x-frame-options": "DENY"}


@pytest.fixture
def lib(tmp_path) -> Path:
    """A small library with a duplicate (so the disk page has a plan to apply) and a secret file beside it."""
    root = tmp_path / "lib"
    a = write_st(root / "models" / "Lora" / "a.safetensors", tensors("sd1_kohya_lora", seed=1))
    (root / "Downloads").mkdir()
    shutil.copy2(a, root / "Downloads" / "a.safetensors")
    with Catalog(root / "catalog.db") as cat:
        scan([root], cat, hash=True, fingerprint=True, workers=1)
    (tmp_path / "secret.txt").write_text(SECRET)
    (root / "secret.txt").write_text(SECRET)
    return root


@pytest.fixture
def submitted(monkeypatch):
    calls: list = []

    def submit(db, kind, params):
        calls.append((db, kind, params))
        return len(calls)

    monkeypatch.setattr("ckptlab.web.jobs.submit", submit)
    return calls


#: the catalog's records of the library (search indexes or caches another page may build on a GET are not state)
RECORD_TABLES = ("files", "content", "scans", "civitai_records", "civitai_links", "previews", "image_links",
                 "triggers")


def state(root: Path) -> tuple:
    """The library tree (files with inode, size, mtime), and every row of the catalog's record tables and of any
    jobs table."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        files += [str(Path(dirpath) / d) for d in dirnames]
        for n in filenames:
            if not n.startswith("catalog.db"):
                st = (Path(dirpath) / n).lstat()
                files.append((str(Path(dirpath) / n), st.st_ino, st.st_size, st.st_mtime_ns))
    con = sqlite3.connect(root / "catalog.db")
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if t in RECORD_TABLES or "job" in t.lower()]
        dump = {t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    finally:
        con.close()
    return sorted(map(str, files)), dump


def assert_headers(r) -> None:
    for k, v in HEADERS.items():
        assert v in r.headers.get(k, ""), (r.request.url, k, r.headers.get(k))


def raw_client(db: Path, **app_kwargs):
    """A TestClient that sends only what each test gives it (no Origin, no CSRF token)."""
    from fastapi.testclient import TestClient

    from ckptlab.web.app import create_app

    app_kwargs.setdefault("host", HOST)
    app_kwargs.setdefault("port", PORT)
    app = create_app(db, **app_kwargs)
    return TestClient(app, base_url=f"http://{app_kwargs['host'] if app_kwargs['host'] not in ('0.0.0.0', '::') else HOST}"
                                    f":{app_kwargs['port']}", follow_redirects=False)


def reviewed_form(c) -> dict:
    """The apply form of the disk page, as the page would post it (the CSRF field included)."""
    doc = parse(c.get("/disk").text)
    return {i.attrs["name"]: i.attrs.get("value") or "" for i in doc.by_id("apply-form").find_all("input")}


# -- Host (DNS rebinding) ---------------------------------------------------------------------------------

BAD_HOSTS = ["evil.example:8765", "127.0.0.1.evil.com", "127.0.0.1.evil.com:8765", "localhost.evil.com:8765",
             "127.0.0.1:8766", "127.0.0.1", "evil.example", "127.0.0.1:8765.evil.com", "127.0.0.1:8765@evil.com",
             "[::1].evil.com:8765", "0.0.0.0:8765", ""]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_a_host_the_server_was_not_bound_to_is_refused(lib, host):
    with raw_client(lib / "catalog.db") as c:
        for path in ("/", "/disk", "/safety", "/static/app.css", "/nonexistent"):
            r = c.get(path, headers={"host": host})
            assert r.status_code == 403, (host, path, r.status_code)
            assert "unexpected Host" in r.text and SECRET not in r.text
            assert_headers(r)


@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "LOCALHOST:8765", "[::1]:8765"])
def test_the_loopback_names_are_accepted(lib, host):
    with raw_client(lib / "catalog.db") as c:
        assert c.get("/safety", headers={"host": host}).status_code == 200


def test_a_loopback_address_other_than_127_0_0_1_accepts_its_own_name(lib):
    """``--host 127.0.0.2`` (or any loopback address): the browser sends that address as the Host. The guard
    accepted only 127.0.0.1/localhost/[::1] before, so such a server refused every request."""
    with raw_client(lib / "catalog.db", host="127.0.0.2") as c:
        assert c.get("/safety", headers={"host": "127.0.0.2:8765"}).status_code == 200
        assert c.get("/safety", headers={"host": "127.0.0.3:8765"}).status_code == 403


def test_a_named_host_and_extra_hosts(lib):
    with raw_client(lib / "catalog.db", host="192.0.2.10", token=TOKEN, extra_hosts=("models.lan",)) as c:
        auth = {"authorization": f"Bearer {TOKEN}"}
        assert c.get("/safety", headers={**auth, "host": "192.0.2.10:8765"}).status_code == 200
        assert c.get("/safety", headers={**auth, "host": "models.lan:8765"}).status_code == 200
        assert c.get("/safety", headers={**auth, "host": "evil.example:8765"}).status_code == 403


# -- state-changing requests: Origin + CSRF ----------------------------------------------------------------

REFUSED_POSTS = {
    "no Origin, no Referer": {},
    "foreign Origin": {"origin": "http://evil.example"},
    "foreign Origin, our Referer": {"origin": "http://evil.example", "referer": f"{BASE}/disk"},
    "Origin null": {"origin": "null"},
    "Origin null, our Referer": {"origin": "null", "referer": f"{BASE}/disk"},
    "other port": {"origin": "http://127.0.0.1:9999"},
    "other scheme": {"origin": "https://127.0.0.1:8765"},
    "rebinding name as Origin": {"origin": "http://127.0.0.1.evil.com:8765"},
    "foreign Referer only": {"referer": "http://evil.example/page"},
}


@pytest.mark.parametrize("case", sorted(REFUSED_POSTS))
def test_a_post_from_elsewhere_is_refused_and_changes_nothing(lib, submitted, case):
    db = lib / "catalog.db"
    with make_client(db) as good:
        form = reviewed_form(good)
        csrf = good.headers["x-csrf-token"]
    before = state(lib)
    with raw_client(db) as c:
        c.app.state.guard.csrf = csrf  # the token the page carried (a new app makes its own)
        headers = {"x-csrf-token": csrf, **REFUSED_POSTS[case]}
        for path in ("/disk/apply", "/jobs", "/jobs/1/cancel"):
            r = c.post(path, data=form, headers=headers)
            assert r.status_code == 403, (case, path, r.status_code)
            assert "Origin mismatch" in r.text and len(r.text.strip().splitlines()) == 1
            assert_headers(r)
    assert state(lib) == before and not submitted
    assert not (lib / "catalog.db.plans").exists()


@pytest.mark.parametrize("csrf_header,csrf_field", [(None, None), ("wrong", None), (None, "wrong"),
                                                    ("wrong", "wrong"), ("", ""), (None, "")])
def test_same_origin_without_the_csrf_token_is_refused(lib, submitted, csrf_header, csrf_field):
    db = lib / "catalog.db"
    before = state(lib)
    with raw_client(db) as c:
        with make_client(db) as good:
            form = reviewed_form(good)
        form.pop("csrf")
        if csrf_field is not None:
            form["csrf"] = csrf_field
        headers = {"origin": BASE}
        if csrf_header is not None:
            headers["x-csrf-token"] = csrf_header
        for path in ("/disk/apply", "/jobs"):
            r = c.post(path, data=form, headers=headers)
            assert r.status_code == 403 and "CSRF" in r.text, (path, r.status_code)
            r = c.post(path, json=form, headers=headers)
            assert r.status_code == 403
    assert state(lib) == before and not submitted


def test_the_right_origin_and_token_are_accepted(lib, submitted):
    """The control for the refusals above: the same form from the app's own page goes through, with the CSRF token
    in the header (htmx) or in the form (a plain post), and with a Referer where a browser sent no Origin."""
    db = lib / "catalog.db"
    with make_client(db) as c:
        form = reviewed_form(c)
        csrf = c.headers["x-csrf-token"]
        r = c.post("/disk/apply", data=form)
        assert r.status_code == 303
    with raw_client(db) as c:
        c.app.state.guard.csrf = csrf
        assert c.post("/disk/apply", data=form, headers={"origin": BASE}).status_code == 303
        assert c.post("/disk/apply", data=form, headers={"referer": f"{BASE}/disk"}).status_code == 303
    assert len(submitted) == 3


def test_get_with_query_tricks_changes_nothing(lib, submitted):
    """GET never changes anything: the apply route answers GET with 405 whatever the query says, and every GET
    route of the app (those of the other pages included, as merged) is called with hostile query strings."""
    from starlette.routing import Route

    db = lib / "catalog.db"
    before = state(lib)
    with make_client(db) as c:
        form = reviewed_form(c)
        q = "&".join(f"{k}={v}" for k, v in form.items())
        for path in (f"/disk/apply?{q}", f"/disk/apply?{q}&_method=POST"):
            assert c.get(path).status_code == 405
            assert c.get(path, headers={"x-http-method-override": "POST"}).status_code == 405
            assert c.head(path).status_code in (404, 405)
        tricks = (f"?{q}&_method=POST&confirm=1&apply=1&path={lib / 'Downloads' / 'a.safetensors'}&kind=scan"
                  f"&delete=1&token={TOKEN}")
        for route in c.app.routes:
            if not isinstance(route, Route) or "GET" not in (route.methods or ()) or re.search(
                    r"events|stream", route.path):
                continue
            path = re.sub(r"\{[^}]+\}", "1", route.path)
            r = c.get(path + tricks, headers={"x-http-method-override": "POST"})
            assert r.status_code < 500, (path, r.status_code)
    assert state(lib) == before and not submitted


# -- the access token off loopback --------------------------------------------------------------------------

def test_non_loopback_without_the_token_is_401(lib, submitted):
    db = lib / "catalog.db"
    with raw_client(db, host="0.0.0.0", token=TOKEN) as c:
        for path in ("/", "/disk", "/safety", "/static/app.css", "/nonexistent"):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                            {"cookie": "ckptlab_token=wrong"}, {"authorization": f"Bearer {TOKEN}x"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert TOKEN not in r.text
                assert_headers(r)
            assert c.get(path + "?token=wrong").status_code == 401
        # a state change carrying the token only in its URL is refused too
        r = c.post(f"/disk/apply?token={TOKEN}", data={}, headers={"origin": BASE})
        assert r.status_code == 401
    assert not submitted


def test_non_loopback_with_the_token(lib):
    db = lib / "catalog.db"
    with raw_client(db, host="0.0.0.0", token=TOKEN) as c:
        assert c.get("/safety", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/safety", headers={"cookie": f"other=1; ckptlab_token={TOKEN}"}).status_code == 200
        r = c.get(f"/safety?verdict=malicious&token={TOKEN}")
        assert r.status_code == 303
        assert r.headers["location"] == "/safety?verdict=malicious"  # the token leaves the address bar
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"ckptlab_token={TOKEN};")
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attrs
        assert_headers(r)


def _asgi_get(app, raw_path: bytes, query: bytes, raw: bool = True) -> tuple[int, dict]:
    """One GET through the app's ASGI interface, with exactly this raw path (no client library tidying it)."""
    sent: list = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    path = raw_path.decode("latin-1")
    from urllib.parse import unquote

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(path), "raw_path": raw_path if raw else None, "query_string": query, "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8765")], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8765)}
    # a thread of its own: in a worker that also ran the browser tests, Playwright's sync API keeps an event loop
    # running in this thread, and asyncio.run() refuses to start another one there
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(app(scope, receive, send))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            failure.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    if failure:
        raise failure[0]
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], {k.decode().lower(): v.decode("latin-1") for k, v in start["headers"]}


@pytest.mark.parametrize("raw_path", [b"//evil.example/x", b"/\\evil.example/x", b"///evil.example",
                                      b"/%0d%0aSet-Cookie:%20x=1", b"/\\/evil.example", None])
def test_the_token_redirect_stays_on_this_server(lib, raw_path):
    """``?token=`` answers with a redirect to the same address without the token. It was built from the decoded
    path: ``//evil.example/x`` redirected to another site, and an encoded CR/LF was decoded into the header."""
    from ckptlab.web.app import create_app

    app = create_app(lib / "catalog.db", host="0.0.0.0", token=TOKEN)
    if raw_path is None:  # a server that gives no raw_path: the decoded one, with a CR/LF in it, is quoted
        status, headers = _asgi_get(app, b"/%0d%0aSet-Cookie:%20x=1", f"token={TOKEN}".encode(), raw=False)
    else:
        status, headers = _asgi_get(app, raw_path, f"token={TOKEN}".encode())
    assert status == 303
    loc = headers["location"]
    assert loc.startswith("/") and not loc.startswith("//") and not loc.startswith("/\\")
    assert "\r" not in loc and "\n" not in loc


# -- headers on every answer --------------------------------------------------------------------------------

def test_security_headers_on_every_answer(lib):
    db = lib / "catalog.db"
    with make_client(db) as c:
        @c.app.get("/test-boom")
        def boom():
            raise RuntimeError("a bug")
        answers = {p: c.get(p) for p in ("/", "/disk", "/safety", "/jobs", "/model/999999", "/safety?verdict=x",
                                         "/disk?link=x", "/nonexistent", "/static/app.css", "/static/app.js",
                                         "/static/htmx.min.js", "/static/nope.css", "/disk/apply")}
        answers["refused POST"] = c.post("/disk/apply", headers={"origin": "http://evil.example"})
        answers["bad Host"] = c.get("/", headers={"host": "evil.example:8765"})
    statuses = {p: r.status_code for p, r in answers.items()}
    assert statuses["/safety?verdict=x"] == 400 and statuses["/nonexistent"] == 404
    assert statuses["/static/nope.css"] == 404 and statuses["refused POST"] == 403
    for r in answers.values():
        assert_headers(r)
    assert answers["/static/app.css"].headers["content-type"].startswith("text/css")


def test_security_headers_on_a_500(lib):
    """A bug in a route: Starlette's outermost error handler answered 500 without the guard's headers."""
    from fastapi.testclient import TestClient

    from ckptlab.web.app import create_app

    app = create_app(lib / "catalog.db")

    @app.get("/test-boom")
    def boom():
        raise RuntimeError("a bug")

    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        r = c.get("/test-boom")
    assert r.status_code == 500
    assert_headers(r)
    assert "a bug" not in r.text and "Traceback" not in r.text


def test_websocket_handshakes_pass_the_same_checks(lib):
    """No route speaks WebSocket today, but the guard let every WebSocket scope through unchecked (a cross-site
    page can open one to 127.0.0.1, without preflight): a route added later would have been open to any site."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    from ckptlab.web.app import create_app

    async def echo(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_text("open")
        await websocket.close()

    WS = f"ws://{HOST}:{PORT}/test-ws"  # noqa: N806 (an absolute URL: the test client's Host is then ours)
    for kwargs, headers in [({}, {"host": "evil.example:8765", "origin": "http://evil.example:8765"}),
                            ({}, {"origin": "http://evil.example"}),
                            ({}, {}),
                            ({"host": "0.0.0.0", "token": TOKEN}, {"origin": BASE})]:
        app = create_app(lib / "catalog.db", **{"port": PORT, **kwargs})
        app.router.add_websocket_route("/test-ws", echo)
        with TestClient(app, base_url=BASE) as c, pytest.raises(WebSocketDisconnect):
            with c.websocket_connect(WS, headers=headers) as ws:
                ws.receive_text()
    app = create_app(lib / "catalog.db", port=PORT)
    app.router.add_websocket_route("/test-ws", echo)
    with TestClient(app, base_url=BASE) as c, c.websocket_connect(WS, headers={"origin": BASE}) as ws:
        assert ws.receive_text() == "open"


# -- paths: nothing outside what the app serves ---------------------------------------------------------------

TRAVERSALS = ["/static/..%2f..%2fsecurity.py", "/static/..%2F..%2F..%2F..%2Fsecret.txt", "/static/%2e%2e/app.py",
              "/static/%2e%2e%2f%2e%2e%2fweb%2fapp.py", "/static/..%5c..%5capp.py", "/static//etc/passwd",
              "/static/%2fetc%2fpasswd", "/static/..%252f..%252fapp.py", "/media/preview/..%2f..%2fsecret.txt",
              "/media/preview/%2e%2e%2f%2e%2e%2fsecret.txt", "/media/preview/1/..%2f..%2fsecret.txt",
              "/media/preview/%2fetc%2fpasswd", "/media/preview/..%2fcatalog.db", "/media/preview/999999"]
OUTSIDE = (SECRET, "class GuardMiddleware", "SQLite format 3", "root:x:0:0")


def _outside(text: str) -> bool:
    return any(m in text for m in OUTSIDE)


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_file_outside_through_encoded_paths(lib, path):
    with make_client(lib / "catalog.db") as c:
        r = c.get(path)
    assert r.status_code in (400, 403, 404, 405), (path, r.status_code)
    assert not _outside(r.content.decode("latin-1"))
    assert_headers(r)


# -- the real server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m ckptlab serve`` in a subprocess; its stderr is read until it says where it listens."""

    def __init__(self, db: Path, *args: str):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("CKPTLAB_TOKEN", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "ckptlab", "serve", "--db", str(db), "--port",
                                      str(self.port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.out = b""
        deadline = time.monotonic() + 60
        while b"ckptlab serve:" not in self.out:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start: {self.out!r}")
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                self.out += os.read(self.proc.stderr.fileno(), 65536)

    def raw(self, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data

    def get(self, path: str, host: str | None = None, extra: str = "") -> tuple[int, bytes]:
        host = host if host is not None else f"127.0.0.1:{self.port}"
        data = self.raw(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
        return int(data.split(b" ", 2)[1]), data

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest_out, rest_err = self.proc.communicate()
        return (self.out + rest_err + rest_out).decode("utf-8", "replace")


def test_real_server_refuses_rebinding_hosts_and_traversal(lib):
    srv = Server(lib / "catalog.db")
    try:
        p = srv.port
        assert srv.get("/safety")[0] == 200
        for host in (f"evil.example:{p}", "127.0.0.1.evil.com", f"127.0.0.1.evil.com:{p}", f"localhost:{p + 1}"):
            status, data = srv.get("/safety", host=host)
            assert status == 403, host
            assert b"content-security-policy" in data.lower()
        # a second Host header cannot smuggle another name past the check
        status, _ = srv.get("/safety", extra=f"Host: evil.example:{p}\r\n")
        assert status in (400, 403)
        # literal dot segments, as no client library would send them
        for path in ("/static/../../security.py", "/static/../../../../secret.txt", "/static/./../app.py",
                     "/media/preview/../../secret.txt", "/static/..\\..\\app.py", "/../secret.txt",
                     "/static/%2e%2e/%2e%2e/app.py"):
            status, data = srv.get(path)
            assert status in (400, 403, 404), (path, status)
            assert not _outside(data.decode("latin-1")), path
        # a cross-site form post
        body = b"fingerprint=x"
        data = srv.raw(b"POST /disk/apply HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://evil.example\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n"
                       b"Connection: close\r\n\r\n%s" % (p, len(body), body))
        assert data.startswith(b"HTTP/1.1 403")
    finally:
        srv.stop()


def test_serve_on_all_interfaces_makes_a_token_and_requires_it(lib, tmp_path):
    """``ckptlab serve --host 0.0.0.0`` without ``--token``: a token is made and printed once (in the address it
    prints); requests without it are refused."""
    srv = Server(lib / "catalog.db", "--host", "0.0.0.0")
    try:
        m = re.search(r"\?token=([A-Za-z0-9_-]+)", srv.out.decode())
        assert m, srv.out
        token = m.group(1)
        assert len(token) >= 32
        assert srv.get("/safety")[0] == 401
        assert srv.get("/static/app.css")[0] == 401
        assert srv.get("/safety", extra="Authorization: Bearer wrong\r\n")[0] == 401
        assert srv.get("/safety", extra=f"Authorization: Bearer {token}\r\n")[0] == 200
        status, data = srv.get(f"/safety?token={token}")
        assert status == 303 and b"HttpOnly" in data and b"SameSite=Strict" in data
        assert srv.get("/safety", extra=f"Cookie: ckptlab_token={token}\r\n")[0] == 200
    finally:
        out = srv.stop()
    assert out.count(token) == 1, out


def test_serve_refuses_a_short_token(lib, cli):
    r = cli("serve", "--db", str(lib / "catalog.db"), "--host", "0.0.0.0", "--port", str(free_port()),
            "--token", "short", timeout=60)
    assert r.returncode == 2 and "at least 16 characters" in r.stderr and "Traceback" not in r.stderr


# -- Host names beyond the bound address: --allow-host as given, and a wildcard bind -------------------------

def test_allow_host_without_a_port_is_accepted_bare_and_with_the_servers_port():
    """A reverse proxy on 443 forwards ``Host: models.example.com``; one on the server's port adds it."""
    from ckptlab.web.security import Guard

    g = Guard(host="127.0.0.1", port=8765, extra_hosts=("Models.Example.com",))
    assert g.host_ok("models.example.com") and g.host_ok("models.example.com:8765")
    assert not g.host_ok("models.example.com:443") and not g.host_ok("evil.example.com")
    with_port = Guard(host="127.0.0.1", port=8765, extra_hosts=("proxy.local:8443", "[fd00::1]:9000"))
    assert with_port.host_ok("proxy.local:8443") and with_port.host_ok("[fd00::1]:9000")
    assert not with_port.host_ok("proxy.local") and not with_port.host_ok("proxy.local:8765")


def test_a_wildcard_bind_accepts_the_address_connected_to_never_a_foreign_name():
    """On 0.0.0.0 a LAN client types the machine's address; a DNS-rebinding page sends its own name, which is
    refused even though the connection arrives on a real interface."""
    from ckptlab.web.security import Guard

    g = Guard(host="0.0.0.0", port=8765, token="t" * 32)
    lan = ("192.168.1.5", 8765)
    assert g.host_ok("192.168.1.5:8765", server=lan)
    assert g.host_ok("127.0.0.1:8765", server=("127.0.0.1", 8765))
    assert not g.host_ok("evil.test:8765", server=lan)
    assert not g.host_ok("192.168.1.6:8765", server=lan)
    assert not g.host_ok("192.168.1.5:9999", server=lan)
    v6 = Guard(host="::", port=8765, token="t" * 32)
    assert v6.host_ok("[fd00::5]:8765", server=("fd00::5", 8765))


def test_a_wildcard_bind_refuses_a_foreign_host_even_with_the_token(sample_library):
    token = "k" * 32
    with make_client(sample_library / "catalog.db", host="0.0.0.0", token=token) as c:
        ok = c.get("/", headers={"authorization": f"Bearer {token}", "host": "127.0.0.1:8765"})
        assert ok.status_code == 200
        evil = c.get("/", headers={"authorization": f"Bearer {token}", "host": "evil.test:8765"})
        assert evil.status_code == 403 and "Host" in evil.text
