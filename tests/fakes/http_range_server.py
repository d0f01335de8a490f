"""A loopback HTTP server with ``Range`` support that logs every request, and hostile behaviours on demand.

``serve({"/a.safetensors": path_or_bytes}, behaviour={"/x": "ignore_range"})`` -> ``RangeServer`` with ``.url(name)``,
``.log`` (one ``Hit(method, path, range, status, sent)`` per request: the server's own count of requests and body
bytes, the cross-check of ``ckptlab.remote.stats``) and ``.stop()``. Files are served from disk with ``seek`` + read
in pieces (a sparse real-size file costs no memory).

Behaviours: ``ignore_range`` (200 + the whole body), ``short`` (a 206 whose body stops half way and the connection
closes), ``more`` (a 206 that claims and sends more bytes than asked), ``endless`` (200, no length, bytes forever),
``stall`` (headers, then silence), ``503xN`` (503 N times, then normal), ``503`` (always 503), ``404``, ``403``,
``reset`` (the connection closes without a reply).
"""

from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Hit:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


class RangeServer:
    def __init__(self, httpd, thread, files, behaviour):
        self.httpd, self.thread, self.files, self.behaviour = httpd, thread, files, behaviour
        self.log: list[Hit] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.open: set = set()  # the connections being served (kept alive between requests)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def hits(self, name: str | None = None) -> list[Hit]:
        with self.lock:
            return [h for h in self.log if name is None or h.path == "/" + name.lstrip("/")]

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def stop(self) -> None:
        """Stop serving, kept-alive connections included: a handler thread left on one would go on answering for
        this server, also once another server is given the same port (a client's cached connection to that
        host:port would then reach the stopped server)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            conns = list(self.open)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def serve(files: dict, behaviour: dict | None = None) -> RangeServer:
    behaviour = dict(behaviour or {})

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True  # headers and a small body in separate writes: no 40 ms delayed-ACK stall
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def setup(self):
            super().setup()
            with server.lock:
                server.open.add(self.connection)

        def finish(self):
            with server.lock:
                server.open.discard(self.connection)
            super().finish()

        def _record(self, status: int, sent: int) -> Hit:
            hit = Hit(self.command, self.path, self.headers.get("Range"), status, sent)
            with server.lock:
                server.log.append(hit)
            return hit

        def _size_and_reader(self, src):
            if isinstance(src, (bytes, bytearray)):
                data = bytes(src)
                return len(data), lambda a, n: data[a:a + n]
            p = Path(src)
            size = p.stat().st_size

            def read(a, n):
                with open(p, "rb") as fh:
                    fh.seek(a)
                    return fh.read(n)
            return size, read

        def _send_body(self, read, start: int, n: int) -> int:
            """Send; the pending hit (logged before the body: a client may hang up mid-body) counts the bytes."""
            sent = 0
            try:
                while sent < n:
                    piece = read(start + sent, min(1 << 20, n - sent))
                    if not piece:
                        break
                    self.pending.sent = sent + len(piece)  # counted before the write: the client may be done first
                    self.wfile.write(piece)
                    sent += len(piece)
            except OSError:
                self.pending.sent = sent  # not delivered
                self.close_connection = True
            return sent

        def do_HEAD(self):
            self._record(405, 0)
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            name = self.path
            how = behaviour.get(name, "")
            with server.lock:
                server.counts[name] = server.counts.get(name, 0) + 1
                nth = server.counts[name]
            if how == "reset":
                self._record(0, 0)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            m503 = re.fullmatch(r"503(?:x(\d+))?", how)
            if m503 and (m503.group(1) is None or nth <= int(m503.group(1))):
                self._record(503, 0)
                self.send_response(503, "Slow Down")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if how in ("404", "403") or name not in files:
                code = 403 if how == "403" else 404
                self._record(code, 0)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            size, read = self._size_and_reader(files[name])
            if how == "endless":
                hit = self._record(200, 0)
                self.send_response(200)
                self.end_headers()  # no length: the body never ends
                try:
                    while hit.sent < 512 * 1024 * 1024:
                        hit.sent += 65536
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    hit.sent -= 65536
                self.close_connection = True
                return
            if how == "stall":
                self._record(206, 0)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{size - 1}/{size}")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                threading.Event().wait(30)
                self.close_connection = True
                return
            rng = self.headers.get("Range")
            m = _RANGE.match(rng or "")
            if m and how != "ignore_range":
                a = int(m.group(1))
                b = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if a >= size:
                    self._record(416, 0)
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                n = b - a + 1
                if how == "more":
                    n = n + 100
                    b = b + 100
                self.pending = self._record(206, 0)  # logged before the reply: the client may be done first
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.send_header("Content-Length", str(n))
                self.end_headers()
                if how == "short":
                    sent = self._send_body(read, a, n // 2)
                    self.close_connection = True
                elif how == "more":
                    sent = self._send_body(read, a, n - 100)
                    try:
                        self.pending.sent = sent + 100
                        self.wfile.write(b"\0" * 100)
                    except OSError:
                        self.pending.sent = sent
                        self.close_connection = True
                else:
                    sent = self._send_body(read, a, n)
                return
            self.pending = self._record(200, 0)
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if how == "short":
                self._send_body(read, 0, size // 2)
                self.close_connection = True
            else:
                self._send_body(read, 0, size)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    files = {"/" + k.lstrip("/"): (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in files.items()}
    behaviour = {"/" + k.lstrip("/"): v for k, v in behaviour.items()}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    server = RangeServer(httpd, thread, files, behaviour)
    thread.start()
    return server
