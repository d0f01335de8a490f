"""A counting object server for the scale benchmark (not a benchmark itself): serves the files under a folder
over HTTP on loopback, with Range requests, and answers the few S3 calls a reader needs, so the same sparse
file can be read as ``http://127.0.0.1:PORT/bucket/key`` (fsspec HTTP) or ``s3://bucket/key`` (s3fs with
``AWS_ENDPOINT_URL`` pointing here):

- ``HEAD|GET /bucket/key`` (``Range: bytes=a-b`` / ``a-`` / ``-n`` -> 206; the body goes out with ``sendfile``);
- ``GET /bucket?list-type=2&prefix=&delimiter=&max-keys=&continuation-token=`` (ListObjectsV2, paged);
- ``HEAD /bucket``, ``GET /bucket?location``.

Every request and every body byte sent is counted by the server, per object and per kind (GET / HEAD / LIST),
independently of the client's own counters: ``GET /__stats__`` returns the counts as JSON, ``POST /__reset__``
zeroes them, ``POST /__latency__/MS`` delays every later answer by MS milliseconds (an object store's time to
first byte; none of these is counted). Signatures are not checked (loopback, benchmark only). A folder's files are
its objects: a sparse file (header written, ``truncate()`` to full length) is a real-size object that costs no
disk, and its holes read as zeros.

    python benchmarks/_object_server.py ROOT PORT_FILE   # writes the port to PORT_FILE once listening
"""

from __future__ import annotations

import bisect
import datetime
import email.utils
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

PAGE = 1000  # S3's ListObjectsV2 page size


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.total = {"requests": 0, "bytes": 0, "GET": 0, "HEAD": 0, "LIST": 0, "other": 0}
        self.objects: dict[str, dict[str, int]] = {}

    def add(self, kind: str, key: str | None, nbytes: int) -> None:
        with self.lock:
            self.total["requests"] += 1
            self.total["bytes"] += nbytes
            self.total[kind] += 1
            if key is not None:
                o = self.objects.setdefault(key, {"requests": 0, "bytes": 0, "GET": 0, "HEAD": 0})
                o["requests"] += 1
                o["bytes"] += nbytes
                if kind in o:
                    o[kind] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"total": dict(self.total), "objects": {k: dict(v) for k, v in self.objects.items()}}


def etag_of(st: os.stat_result) -> str:
    return hashlib.md5(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()  # noqa: S324 - an id


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single ``bytes=`` range, or None for the whole object."""
    if not value or not value.startswith("bytes="):
        return None
    spec = value[6:].split(",")[0].strip()
    a, _, b = spec.partition("-")
    if a == "":
        n = int(b)
        return max(0, size - n), size
    start = int(a)
    end = size if b == "" else min(size, int(b) + 1)
    return start, end


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and a sendfile body are two writes: no 40 ms delayed-ACK stall
    server: Server

    def log_message(self, *args) -> None:  # quiet
        pass

    # -- helpers ------------------------------------------------------------------------------------------
    def _split(self) -> tuple[str, str, dict[str, list[str]]]:
        u = urlsplit(self.path)
        parts = unquote(u.path).lstrip("/").split("/", 1)
        return parts[0], parts[1] if len(parts) > 1 else "", parse_qs(u.query, keep_blank_values=True)

    def _file(self, bucket: str, key: str) -> Path | None:
        if not bucket or not key or ".." in key.split("/"):
            return None
        p = self.server.root / bucket / key
        return p if p.is_file() else None

    def _send(self, code: int, body: bytes, ctype: str = "application/xml", kind: str | None = "other",
              key: str | None = None, head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        if kind is not None:
            self.server.counts.add(kind, key, 0 if head else len(body))

    def _not_found(self, head: bool, kind: str = "other") -> None:
        body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchKey</Code><Message>not found</Message></Error>"
        self._send(404, body, kind=kind, head=head)

    # -- verbs --------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        if self.path == "/__reset__":
            self.server.counts.reset()
            self._send(200, b"{}", "application/json", kind=None)
        elif self.path.startswith("/__latency__/"):
            self.server.latency = float(self.path.rsplit("/", 1)[1]) / 1000
            self._send(200, b"{}", "application/json", kind=None)
        else:
            self._send(405, b"", kind="other")

    def do_HEAD(self) -> None:
        self._wait()
        self._object(head=True)

    def do_GET(self) -> None:
        if self.path == "/__stats__":
            self._send(200, json.dumps(self.server.counts.snapshot()).encode(), "application/json", kind=None)
            return
        self._wait()
        self._object(head=False)

    def _wait(self) -> None:
        if self.server.latency:  # an object store's time to first byte (S3: tens of ms), set by POST /__latency__
            time.sleep(self.server.latency)

    def _object(self, head: bool) -> None:
        bucket, key, q = self._split()
        if not key:
            return self._bucket(bucket, q, head)
        p = self._file(bucket, key)
        kind = "HEAD" if head else "GET"
        if p is None:
            return self._not_found(head, kind)
        st = p.stat()
        size = st.st_size
        try:
            rng = parse_range(self.headers.get("Range"), size)
        except ValueError:
            rng = None
        if rng is not None and rng[0] >= size and size > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.server.counts.add(kind, key, 0)
            return
        start, end = rng if rng is not None else (0, size)
        self.send_response(206 if rng is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag_of(st)}"')
        self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
        if rng is not None:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        sent = 0
        if not head and end > start:
            self.wfile.flush()
            with open(p, "rb") as fh:
                try:
                    while sent < end - start:
                        n = self.connection.sendfile(fh, start + sent, end - start - sent)
                        if not n:
                            break
                        sent += n
                except OSError:  # the client hung up (a reader that stops early)
                    self.close_connection = True
        self.server.counts.add(kind, f"{bucket}/{key}", sent)

    def _bucket(self, bucket: str, q: dict[str, list[str]], head: bool) -> None:
        root = self.server.root / bucket
        if not bucket or not root.is_dir():
            body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NoSuchBucket</Code></Error>"
            return self._send(404, body, head=head)
        if head:
            return self._send(200, b"", head=True)
        if "location" in q:
            body = (b"<?xml version='1.0' encoding='UTF-8'?><LocationConstraint "
                    b"xmlns='http://s3.amazonaws.com/doc/2006-03-01/'></LocationConstraint>")
            return self._send(200, body)
        self._list(bucket, root, q)

    def _list(self, bucket: str, root: Path, q: dict[str, list[str]]) -> None:
        def one(name: str) -> str:
            return q.get(name, [""])[0]

        prefix, delimiter = one("prefix"), one("delimiter")
        max_keys = min(PAGE, int(one("max-keys") or PAGE))
        after = one("continuation-token") or one("start-after")
        keys = self.server.keys(bucket)
        items: list[tuple[str, Path | None]] = []
        seen_prefixes: set[str] = set()
        i = bisect.bisect_right(keys, after) if after else bisect.bisect_left(keys, prefix)
        truncated = False
        last = ""
        while i < len(keys):
            k = keys[i]
            i += 1
            if not k.startswith(prefix):
                break
            if delimiter and delimiter in k[len(prefix):]:
                cp = prefix + k[len(prefix):].split(delimiter, 1)[0] + delimiter
                if cp in seen_prefixes:
                    continue
                if len(items) >= max_keys:
                    truncated = True
                    break
                seen_prefixes.add(cp)
                items.append((cp, None))
                last = k
                continue
            if len(items) >= max_keys:
                truncated = True
                break
            items.append((k, root / k))
            last = k
        out = ["<?xml version='1.0' encoding='UTF-8'?>",
               "<ListBucketResult xmlns='http://s3.amazonaws.com/doc/2006-03-01/'>",
               f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(items)}</KeyCount>",
               f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            out.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if truncated:
            out.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        for name, p in items:
            if p is None:
                out.append(f"<CommonPrefixes><Prefix>{escape(name)}</Prefix></CommonPrefixes>")
                continue
            st = p.stat()
            iso = datetime.datetime.fromtimestamp(st.st_mtime, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            out.append(f"<Contents><Key>{escape(name)}</Key><LastModified>{iso}</LastModified>"
                       f"<ETag>&quot;{etag_of(st)}&quot;</ETag><Size>{st.st_size}</Size>"
                       "<StorageClass>STANDARD</StorageClass></Contents>")
        out.append("</ListBucketResult>")
        self._send(200, "".join(out).encode(), kind="LIST")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.root = Path(root)
        self.counts = Counts()
        self.latency = 0.0  # seconds before each counted answer
        self._keys: dict[str, tuple[float, list[str]]] = {}

    def keys(self, bucket: str) -> list[str]:
        """Every key of ``bucket``, sorted (cached until the bucket folder's mtime changes)."""
        root = self.root / bucket
        stamp = root.stat().st_mtime
        hit = self._keys.get(bucket)
        if hit is None or hit[0] != stamp:
            keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            hit = self._keys[bucket] = (stamp, keys)
        return hit[1]


def main(argv: list[str]) -> None:
    root, port_file = Path(argv[0]), Path(argv[1])
    srv = Server(root)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(srv.server_address[1]))
    os.replace(tmp, port_file)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
