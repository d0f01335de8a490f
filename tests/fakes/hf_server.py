"""A loopback fake of the Hugging Face Hub's file endpoint, enough for ``hf_hub_download``.

``HEAD``/``GET /{org}/{repo}/resolve/{revision}/{path}`` answers the way the Hub does (see
shared/reference/hub.md §3): every answer carries ``X-Repo-Commit``; a regular (git) file answers
200 with its git blob id as ``ETag``; an LFS file answers 302 to a second origin ("storage", the
same server reached as ``localhost`` instead of ``127.0.0.1``, like the Hub's CDN) with
``X-Linked-Etag`` (the file's SHA-256), ``X-Linked-Size`` and the git ``ETag``. Missing repos,
revisions and files answer 404 with the ``X-Error-Code`` the client maps to its errors. Storage
honours ``Range`` (206 + ``Content-Range``).

Knobs: ``require_token`` (hub routes answer 401 without ``Authorization: Bearer <token>``),
``corrupt`` (paths whose storage bytes differ from the published SHA-256, same length),
``drop_after`` (path -> bytes of body after which storage drops the connection: an int for once, a
list for one drop per request). Every request is recorded with its headers.

Hostile modes: ``endless`` (paths whose storage answer has no length and never ends, stopped at
``ENDLESS_SAFETY`` bytes; ``sent[path]`` counts what went out) and ``redirect_loop`` (every hub
route redirects to itself).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

from fakes import serve_endless


def git_blob_id(data: bytes) -> str:
    """What git names a blob: sha1 of ``blob <size>\\0`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Recorded:
    origin: str  # 'hub' | 'storage'
    method: str
    path: str
    headers: dict


@dataclass
class FakeRepo:
    commit: str
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    require_token: str | None = None
    corrupt: set = field(default_factory=set)
    drop_after: dict = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    endless: set = field(default_factory=set)
    sent: dict = field(default_factory=dict)
    redirect_loop: bool = False
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    # -- content ------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, lfs: set[str] | None = None) -> FakeRepo:
        commit = hashlib.sha1(repo_id.encode() + "\0".join(sorted(files)).encode()).hexdigest()
        repo = FakeRepo(commit, dict(files), set(lfs if lfs is not None else
                                                 {p for p in files if p.endswith((".safetensors", ".ckpt", ".bin",
                                                                                  ".gguf", ".pt", ".pth"))}))
        self.repos[repo_id] = repo
        return repo

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage(self) -> str:
        return f"http://localhost:{self.port}"

    # -- server -------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- routes -------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        host = (h.headers.get("Host") or "").split(":")[0]
        origin = "storage" if host == "localhost" else "hub"
        path = urlsplit(h.path).path
        self.requests.append(Recorded(origin, h.command, path, {k.lower(): v for k, v in h.headers.items()}))
        if origin == "storage":
            return self._storage(h, head, path)
        if self.redirect_loop:
            return self._send(h, 302, {"Location": h.path, "X-Repo-Commit": "0" * 40}, b"", head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"not found", head)
        repo_id, rev, fpath = m.group(1), unquote(m.group(2)), unquote(m.group(3))
        if self.require_token and h.headers.get("Authorization") != f"Bearer {self.require_token}":
            return self._send(h, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"},
                              b"unauthorized", head)
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._send(h, 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                              b"", head)
        if rev not in ("main", repo.commit):
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"},
                              b"", head)
        common = {"X-Repo-Commit": repo.commit}
        if fpath not in repo.files:
            return self._send(h, 404, {**common, "X-Error-Code": "EntryNotFound",
                                       "X-Error-Message": "Entry not found"}, b"", head)
        data = repo.files[fpath]
        etag = f'"{git_blob_id(data)}"'
        if fpath in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            loc = f"{self.storage}/lfs/{repo_id.replace('/', '--')}/{quote(fpath)}"
            return self._send(h, 302, {**common, "Location": loc, "ETag": etag, "X-Linked-Etag": f'"{sha}"',
                                       "X-Linked-Size": str(len(data))}, b"", head)
        return self._send(h, 200, {**common, "ETag": etag}, data, head)

    def _storage(self, h: BaseHTTPRequestHandler, head: bool, path: str) -> None:
        m = re.fullmatch(r"/lfs/([^/]+)/(.+)", path)
        repo = self.repos.get(m.group(1).replace("--", "/")) if m else None
        fpath = unquote(m.group(2)) if m else ""
        if repo is None or fpath not in repo.files:
            return self._send(h, 404, {}, b"no such blob", head)
        data = repo.files[fpath]
        if fpath in self.endless and not head:
            return self._serve_endless(h, fpath, data)
        if fpath in self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        start = 0
        rng = h.headers.get("Range")
        status, headers = 200, {}
        if rng and (rm := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = int(rm.group(1))
            if start >= len(data):
                return self._send(h, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        drop = None
        if not head and fpath in self.drop_after:
            plan = self.drop_after[fpath]
            if isinstance(plan, list):
                drop = plan.pop(0)
                if not plan:
                    del self.drop_after[fpath]
            else:
                drop = self.drop_after.pop(fpath)
        if drop is not None and drop < len(body):
            h.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body)), "Accept-Ranges": "bytes"}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:drop])
            h.wfile.flush()
            h.close_connection = True
            return
        return self._send(h, status, {**headers, "Accept-Ranges": "bytes"}, body, head)

    def _serve_endless(self, h: BaseHTTPRequestHandler, fpath: str, data: bytes) -> None:
        serve_endless(h, data, self.sent, fpath)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes, head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)
