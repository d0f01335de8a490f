"""Only errors that can heal are retried: an unsupported scheme (a redirect to ftp://) fails at once."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ckptlab.errors import NetworkError
from ckptlab.hub.http import Requester


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
