"""A loopback HTTP proxy in front of the moto S3 server for the remote scan tests: it counts the requests
it forwards (object GETs by key, listings) and can answer the first ``fail_first`` requests with S3's
throttling reply (HTTP 503, ``<Code>SlowDown</Code>``), as a busy bucket does, or delay object GETs. Runs in a thread of the
test process; the code under test reaches it through ``AWS_ENDPOINT_URL`` like any S3 endpoint."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class S3Proxy:
    def __init__(self, upstream: str, fail_first: int = 0, delay_gets: float = 0.0):
        u = urlsplit(upstream)
        self.delay_gets = delay_gets  # seconds before each object GET is answered (a slow store)
        self.host, self.port = u.hostname, u.port
        self.fail_left = fail_first
        self.throttled = 0
        self.gets: Counter[str] = Counter()  # "bucket/key" -> object GETs (ranged or not)
        self.lists = 0
        self.events: list[tuple[str, str]] = []  # ("list" | "get", path) in the order they arrived
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                body = None
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    body = self.rfile.read(n)
                with proxy.lock:
                    fail = proxy.fail_left > 0
                    if fail:
                        proxy.fail_left -= 1
                        proxy.throttled += 1
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                path, _, query = self.path.partition("?")
                if self.command == "GET":
                    with proxy.lock:
                        if "list-type" in query or "versions" in query or path.count("/") < 2:
                            proxy.lists += 1
                            proxy.events.append(("list", self.path))
                        else:
                            proxy.gets[unquote(path.lstrip("/"))] += 1
                            proxy.events.append(("get", unquote(path.lstrip("/"))))
                            if proxy.delay_gets:
                                time.sleep(proxy.delay_gets)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    self.send_response(r.status)
                    for k, v in r.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
                "FSSPEC_S3_ENDPOINT_URL": self.endpoint}

    def reset(self) -> None:
        with self.lock:
            self.gets.clear()
            self.lists = 0
            self.events.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
