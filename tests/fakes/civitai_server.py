"""A loopback fake of CivitAI for tests: the API (by-hash GET and bulk POST, model versions, models,
the download endpoint) and a second "storage" server the download redirects to, speaking the shapes
in shared/reference/hub.md §2.7.

Knobs for failure cases: ``script`` (forced statuses for the next requests to a route, e.g. 429 then
success), ``down`` (every API call answers 503), ``drop_after`` (storage closes the connection after N
bytes, once per entry), ``corrupt`` (storage serves bytes that do not match the published SHA256),
``ignore_range`` (storage answers 200 to a Range request), ``throttle`` (slow storage). Every request
is recorded.

Hostile modes: ``endless`` (file ids whose storage answer has no length and never ends; the fake
stops at ``ENDLESS_SAFETY`` bytes so a client without a cap fails instead of hanging, and
``sent[fid]`` counts what went out), ``extra_bytes`` (file id -> junk appended to the body, the
``Content-Length`` counting it), ``ignore_if_range`` (206 even when ``If-Range`` no longer matches,
as a broken server would), ``redirect_loop`` (the download endpoint redirects to itself forever),
``raw_api`` (API path -> raw body bytes served with 200, for malformed JSON shapes), ``hold``
(a ``threading.Event``: storage answers a file request only once it is set; up to 60 s),
``after_drop`` (file id -> bytes that replace the file right after a ``drop_after`` drop).
Storage answers carry ``ETag`` (the SHA-256 of the current bytes) and ``Last-Modified`` (from
``mtime[fid]``) and honour ``If-Range`` (a stale validator gets the whole file with 200).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from fakes import ENDLESS_SAFETY, serve_endless  # noqa: F401 - ENDLESS_SAFETY is imported from here by tests

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201a0b1f1"
    "c90000000049454e44ae426082"
)


def file_hashes(data: bytes) -> dict:
    """The hash set CivitAI publishes for a file (UPPER hex), computed with hashlib/zlib."""
    sha = hashlib.sha256(data).hexdigest().upper()
    out = {"AutoV1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(), "AutoV2": sha[:10],
           "SHA256": sha, "CRC32": f"{zlib.crc32(data) & 0xFFFFFFFF:08X}"}
    if len(data) >= 8:
        n = int.from_bytes(data[:8], "little")
        if 8 + n <= len(data) and data[8:9] == b"{":
            out["AutoV3"] = hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper()
    return out


@dataclass
class Recorded:
    server: str
    method: str
    path: str
    headers: dict
    body: bytes = b""


@dataclass
class FakeCivitai:
    token: str = "civitai-secret-token-0123456789"
    versions: dict = field(default_factory=dict)      # version id -> version object
    models: dict = field(default_factory=dict)        # model id -> model object (without modelVersions)
    blobs: dict = field(default_factory=dict)         # file id -> bytes served by storage
    script: dict = field(default_factory=dict)        # route prefix -> list of (status, headers) to answer first
    down: bool = False
    api_delay: float = 0.0                            # seconds the API waits before answering (timeouts)
    drop_after: dict = field(default_factory=dict)    # file id -> byte count after which the connection drops (once)
    corrupt: set = field(default_factory=set)         # file ids served with flipped bytes
    ignore_range: bool = False
    throttle: float = 0.0                             # seconds to sleep after each 8 KiB storage chunk
    require_token: bool = True
    content_disposition: dict = field(default_factory=dict)  # file id -> raw header value (bytes or str)
    requests: list = field(default_factory=list)
    active_files: int = 0                             # storage file transfers in progress now
    max_active_files: int = 0                         # ... and the most seen at once
    rendezvous: int = 0                               # storage holds transfers until this many were active at once (max 5 s)
    endless: set = field(default_factory=set)
    sent: dict = field(default_factory=dict)          # file id -> body bytes written by storage (endless mode)
    extra_bytes: dict = field(default_factory=dict)
    ignore_if_range: bool = False
    redirect_loop: bool = False
    raw_api: dict = field(default_factory=dict)
    mtime: dict = field(default_factory=dict)         # file id -> Last-Modified value
    hold: threading.Event | None = None
    after_drop: dict = field(default_factory=dict)    # file id -> new bytes served once the drop happened
    etag_raw: dict = field(default_factory=dict)      # file id -> raw ETag header bytes (non-ASCII, controls)

    # -- building the catalogue ------------------------------------------------------------------
    def add_model(self, model_id: int, name: str, type_: str = "LORA", *, nsfw: bool = False, **extra) -> dict:
        m = {"id": model_id, "name": name, "type": type_, "nsfw": nsfw, "description": f"<p>{name} description</p>",
             "tags": ["style", "test"], "creator": {"username": "tester", "image": None},
             "allowCommercialUse": ["Image"], "allowDerivatives": True, "allowNoCredit": True,
             "allowDifferentLicense": True, "stats": {"downloadCount": 10, "thumbsUpCount": 3}}
        m.update(extra)
        self.models[model_id] = m
        return m

    def add_version(self, version_id: int, model_id: int, files: list[tuple[int, str, bytes]], *,
                    name: str = "v1.0", base_model: str = "SD 1.5", trained_words=("trigger word",),
                    file_type: str = "Model") -> dict:
        m = self.models[model_id]
        vfiles = []
        for i, (fid, fname, data) in enumerate(files):
            self.blobs[fid] = data
            vfiles.append({"id": fid, "name": fname, "type": file_type, "sizeKB": len(data) / 1024,
                           "metadata": {"format": "SafeTensor" if fname.endswith(".safetensors") else "PickleTensor",
                                        "size": "pruned", "fp": "fp16"},
                           "pickleScanResult": "Success", "virusScanResult": "Success",
                           "hashes": file_hashes(data), "primary": i == 0,
                           "downloadUrl": f"{self.api_url}/api/download/models/{version_id}"
                                          + ("" if i == 0 else f"?type=Model&format=SafeTensor&fileId={fid}")})
        v = {"id": version_id, "modelId": model_id, "name": name, "description": "<p>version notes</p>",
             "baseModel": base_model, "baseModelType": "Standard", "status": "Published",
             "air": f"urn:air:sd1:{m['type'].lower()}:civitai:{model_id}@{version_id}",
             "createdAt": "2024-01-01T00:00:00.000Z", "publishedAt": "2024-01-02T00:00:00.000Z",
             "trainedWords": list(trained_words), "stats": {"downloadCount": 5, "thumbsUpCount": 1},
             "model": {"name": m["name"], "type": m["type"], "nsfw": m["nsfw"], "poi": False},
             "files": vfiles,
             "images": [{"url": f"{self.storage_url}/images/{version_id}/width=450/preview.png", "nsfwLevel": 1,
                         "width": 1, "height": 1, "hash": "U00000fQfQfQfQfQfQfQfQfQfQfQ", "type": "image",
                         "meta": {"prompt": "a cat", "seed": 1}}],
             "downloadUrl": f"{self.api_url}/api/download/models/{version_id}"}
        self.versions[version_id] = v
        return v

    def model_object(self, model_id: int) -> dict:
        m = copy.deepcopy(self.models[model_id])
        vs = [copy.deepcopy(v) for v in self.versions.values() if v["modelId"] == model_id]
        vs.sort(key=lambda v: -v["id"])  # newest first
        for v in vs:
            v.pop("model", None)
        m["modelVersions"] = vs
        return m

    def find_by_hash(self, h: str) -> dict | None:
        h = h.upper()
        for vid in sorted(self.versions):
            for f in self.versions[vid]["files"]:
                if h in {str(x).upper() for x in f["hashes"].values()}:
                    return self.versions[vid]
        return None

    def api_requests(self, prefix: str = "") -> list[Recorded]:
        return [r for r in self.requests if r.server == "api" and r.path.startswith(prefix)]

    # -- servers ---------------------------------------------------------------------------------
    def start(self) -> FakeCivitai:
        self._api = _QuietServer(("127.0.0.1", 0), _make_handler(self, "api"))
        self._storage = _QuietServer(("127.0.0.1", 0), _make_handler(self, "storage"))
        for srv in (self._api, self._storage):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self._api, self._storage):
            srv.shutdown()
            srv.server_close()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self._api.server_address[1]}"

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self._storage.server_address[1]}"



_LOCK = threading.Lock()
_ACTIVE = threading.Condition(_LOCK)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # clients that hang up (timeouts, Ctrl-C) are expected
        return


def _make_handler(fake: FakeCivitai, which: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # keep test output clean
            return

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers=None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _record(self, body: bytes = b""):
            fake.requests.append(Recorded(which, self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body))

        def _scripted(self) -> bool:
            path = urlsplit(self.path).path
            for prefix, queue in fake.script.items():
                if path.startswith(prefix) and queue:
                    status, headers = queue.pop(0)
                    self._json(status, {"error": "scripted failure"}, headers)
                    return True
            return False

        def do_GET(self):
            self._record()
            if which == "storage":
                return self._storage_get()
            if fake.api_delay:
                import time

                time.sleep(fake.api_delay)
            if self._scripted():
                return None
            if fake.down:
                return self._json(503, {"error": "Service Unavailable"})
            url = urlsplit(self.path)
            path = url.path
            if path in fake.raw_api:
                return self._send(200, fake.raw_api[path])
            if m := re.fullmatch(r"/api/v1/model-versions/by-hash/([^/]+)", path):
                v = fake.find_by_hash(m.group(1))
                return self._json(200, v) if v else self._json(404, {"error": "Model not found"})
            if m := re.fullmatch(r"/api/v1/model-versions/(\d+)", path):
                v = fake.versions.get(int(m.group(1)))
                return self._json(200, v) if v else self._json(404, {"error": "Model not found"})
            if m := re.fullmatch(r"/api/v1/models/(\d+)", path):
                mid = int(m.group(1))
                if mid not in fake.models:
                    return self._json(404, {"error": f"No model with id {mid}"})
                return self._json(200, fake.model_object(mid))
            if m := re.fullmatch(r"/api/download/models/(\d+)", path):
                return self._download(int(m.group(1)), parse_qs(url.query))
            return self._json(404, {"error": "Not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            self._record(body)
            if which != "api":
                return self._json(405, {"error": "method not allowed"})
            if self._scripted():
                return None
            if fake.down:
                return self._json(503, {"error": "Service Unavailable"})
            if urlsplit(self.path).path in fake.raw_api:
                return self._send(200, fake.raw_api[urlsplit(self.path).path])
            if urlsplit(self.path).path != "/api/v1/model-versions/by-hash":
                return self._json(404, {"error": "Not found"})
            try:
                hashes = json.loads(body)
            except ValueError:
                return self._json(400, {"error": "Invalid JSON"})
            if (not isinstance(hashes, list) or len(hashes) > 100
                    or not all(isinstance(h, str) and re.fullmatch(r"[0-9A-Fa-f]{64}", h) for h in hashes)):
                return self._json(400, {"error": "Invalid hashes"})
            out, seen = [], set()
            for h in hashes:
                v = fake.find_by_hash(h)
                if v and v["id"] not in seen:
                    seen.add(v["id"])
                    out.append(v)
            return self._json(200, out)

        def _download(self, vid: int, query: dict):
            if fake.redirect_loop:
                return self._send(302, b"", {"Location": self.path})
            auth = self.headers.get("Authorization")
            if fake.require_token and auth != f"Bearer {fake.token}":
                return self._json(401, {"error": "Unauthorized",
                                        "message": "The creator of this asset requires you to be logged in to download it"})
            v = fake.versions.get(vid)
            if not v:
                return self._json(404, {"error": "File not found"})
            files = v["files"]
            if "fileId" in query:
                files = [f for f in files if str(f["id"]) == query["fileId"][0]]
            else:
                files = [f for f in files if f["primary"]]
            if not files:
                return self._json(404, {"error": "File not found"})
            f = files[0]
            cd = quote(f'attachment; filename="{f["name"]}"', safe="")
            loc = f"{fake.storage_url}/files/{f['id']}?X-Amz-Expires=86400&X-Amz-Signature=abc&response-content-disposition={cd}"
            return self._send(307, b"", {"Location": loc, "Cache-Control": "no-store"})

        def _storage_get(self):
            if self.headers.get("Authorization"):
                return self._send(400, b"<Error><Code>InvalidRequest</Code><Message>Missing x-amz-content-sha256"
                                       b"</Message></Error>", ctype="application/xml")
            url = urlsplit(self.path)
            if m := re.fullmatch(r"/images/\d+/[^/]+/[^/]+\.png", url.path):
                return self._send(200, PNG_1x1, ctype="image/png")
            m = re.fullmatch(r"/files/(\d+)", url.path)
            if not m or int(m.group(1)) not in fake.blobs:
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", ctype="application/xml")
            fid = int(m.group(1))
            with _ACTIVE:
                fake.active_files += 1
                fake.max_active_files = max(fake.max_active_files, fake.active_files)
                _ACTIVE.notify_all()
                # concurrency tests: wait until the expected number of transfers overlap, so "they ran in
                # parallel" does not depend on timing (a serial client just waits out the deadline)
                deadline = time.monotonic() + 5
                while fake.max_active_files < fake.rendezvous and time.monotonic() < deadline:
                    _ACTIVE.wait(deadline - time.monotonic())
            try:
                return self._serve_file(fid, url)
            finally:
                with _ACTIVE:
                    fake.active_files -= 1

        def _serve_file(self, fid: int, url):
            data = fake.blobs[fid]
            if fid in fake.corrupt:
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            if fid in fake.endless:
                return self._serve_endless(fid, data)
            data = data + fake.extra_bytes.get(fid, b"")
            total = len(data)
            start, status = 0, 200
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            last_modified = fake.mtime.get(fid, "Mon, 01 Jan 2024 00:00:00 GMT")
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if rng and if_range is not None and if_range not in (etag, last_modified) and not fake.ignore_if_range:
                rng = None  # RFC 9110 13.1.5: a validator that no longer matches means the whole file
            if rng and not fake.ignore_range:
                mm = re.fullmatch(r"bytes=(\d+)-", rng.strip())
                if mm:
                    start = int(mm.group(1))
                    if start >= total:
                        return self._send(416, b"", {"Content-Range": f"bytes */{total}"}, ctype="application/xml")
                    status = 206
            body = memoryview(data)[start:]  # no copy: tests may serve large files
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if fid in fake.etag_raw:
                self._headers_buffer.append(b"ETag: " + fake.etag_raw[fid] + b"\r\n")
            else:
                self.send_header("ETag", etag)
            self.send_header("Last-Modified", last_modified)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            cd = fake.content_disposition.get(fid)
            if cd is None:
                name = parse_qs(url.query).get("response-content-disposition", [""])[0]
                cd = name
                if not cd.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in cd):  # as S3/R2 do: RFC 5987
                    inner = re.search(r'filename="(.*)"', cd)
                    cd = "attachment; filename*=UTF-8''" + quote(inner.group(1) if inner else "", safe="")
            if isinstance(cd, bytes):  # raw (e.g. UTF-8) header bytes, as some servers send them
                self._headers_buffer.append(b"Content-Disposition: " + cd + b"\r\n")
            elif cd:
                self.send_header("Content-Disposition", cd)
            if fake.hold is not None:
                fake.hold.wait(60)
            self.end_headers()
            cut = fake.drop_after.pop(fid, None)
            if cut is not None and cut < len(body):
                self.wfile.write(body[:cut])
                self.wfile.flush()
                if fid in fake.after_drop:  # the file is replaced upstream while the client reconnects
                    fake.blobs[fid] = fake.after_drop.pop(fid)
                self.close_connection = True
                import socket

                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return None
            if fake.throttle:
                import time

                for i in range(0, len(body), 8192):
                    try:
                        self.wfile.write(body[i:i + 8192])
                        self.wfile.flush()
                    except OSError:  # the client went away
                        return None
                    time.sleep(fake.throttle)
                return None
            self.wfile.write(body)
            return None

        def _serve_endless(self, fid: int, data: bytes):
            serve_endless(self, data, fake.sent, fid)

    return Handler
