"""Only errors that can heal are retried: an unsupported scheme (a redirect to ftp://), a refused
connection and a host name that does not resolve fail at once; every retry is said as one line."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ckptlab.errors import NetworkError
from ckptlab.hub.http import Requester, connect_failure


class _Handler(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).hits += 1
        if self.path == "/flaky" and type(self).hits == 1:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/to-ftp":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/file.safetensors")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Handler.hits = 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_redirect_to_unsupported_scheme_is_not_retried(server):
    sleeps: list[float] = []
    req = Requester(retries=5, backoff=0.01, interval=0, sleep=sleeps.append)
    with pytest.raises(NetworkError, match="UnsupportedProtocol"):
        req.request("GET", server + "/to-ftp", what="download")
    assert _Handler.hits == 1  # asked once, never again
    assert not [s for s in sleeps if s > 0]  # no backoff waits


def test_server_errors_are_still_retried(server):
    sleeps: list[float] = []
    req = Requester(retries=5, backoff=0.01, interval=0, sleep=sleeps.append)
    resp = req.request("GET", server + "/flaky", what="lookup")
    assert resp.status_code == 200 and _Handler.hits == 2


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/x"


def test_refused_connection_is_not_retried():
    sleeps: list[float] = []
    log: list[str] = []
    req = Requester(retries=5, backoff=1.0, interval=0, sleep=sleeps.append, log=log.append)
    with pytest.raises(NetworkError, match="cannot connect to 127.0.0.1:[0-9]+: Connection refused") as ei:
        req.request("GET", _closed_port_url(), what="CivitAI lookup")
    assert str(ei.value).startswith("CivitAI lookup: ") and "attempts" not in str(ei.value)
    assert sleeps == [] and log == []


def test_dns_failure_is_not_retried(monkeypatch):
    def no_dns(*a, **kw):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # no real DNS query leaves the machine
    sleeps: list[float] = []
    req = Requester(retries=5, backoff=1.0, interval=0, sleep=sleeps.append, log=lambda m: None)
    with pytest.raises(NetworkError, match="cannot resolve the host name 'civitai.example'"):
        req.request("GET", "http://civitai.example/api", what="lookup")
    assert sleeps == []


def test_connect_failure_looks_through_the_cause_chain():
    inner = ConnectionRefusedError(111, "Connection refused")
    middle = RuntimeError("httpcore")
    middle.__cause__ = inner
    outer = OSError("httpx")
    outer.__cause__ = middle
    assert connect_failure(outer) == "refused"
    assert connect_failure(socket.gaierror(-2, "x")) == "dns"
    assert connect_failure(TimeoutError()) is None


def test_retries_are_said_one_line_each_with_attempt_and_wait(server):
    sleeps: list[float] = []
    log: list[str] = []
    req = Requester(retries=3, backoff=2.0, interval=0, sleep=sleeps.append, log=log.append)
    resp = req.request("GET", server + "/flaky", what="lookup")
    assert resp.status_code == 200
    assert log == ["lookup: HTTP 503; attempt 1 of 4 failed, retrying in 2 s"] and sleeps == [2.0]


class _Loop(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(302)
        self.send_header("Location", "/again" if self.path == "/start" else "/start")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_redirect_loop_is_a_network_error_not_an_internal_one():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Loop)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        req = Requester(retries=5, backoff=0, interval=0, sleep=lambda s: None, log=lambda m: None)
        with pytest.raises(NetworkError, match="more than 8 redirects"):
            req.request("GET", f"http://127.0.0.1:{srv.server_address[1]}/start", what="download")
    finally:
        srv.shutdown()
        srv.server_close()
