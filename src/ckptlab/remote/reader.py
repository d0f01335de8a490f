"""Ranged reads of one remote object: ``RemoteFile(url, size=None)``, a seekable read-only binary file.

One transport per scheme, each a single ranged GET per read (no HEAD when the size is known):

- ``http``/``https``: the standard library's ``http.client`` on a kept-alive connection per thread and host. The
  reply is checked against the request (206 + ``Content-Range`` for a range; a 200 is only accepted for the whole
  object) and read with a bound: a server that ignores ``Range``, sends fewer or more bytes than asked, or never ends
  is one error line, never a hang (socket timeout) nor a buffer larger than what was asked. (fsspec's
  ``HTTPFileSystem.cat_file`` reads the whole reply into memory whatever it is: not acceptable for hostile servers.)
- ``s3``: s3fs's ``get_object`` with ``Range`` (its ``open()`` would send a HEAD first); the reply's
  ``ContentRange`` gives the object's size, so an unknown size costs no extra request either.
- ``gs``/``gcs``, ``az``/``abfs``/``abfss``: fsspec's ``cat_file(url, start, end)`` (one ranged GET), and
  ``fs.size(url)`` (one metadata request) when the size is not given.

Every request is counted (``stats()``, ``counting()``); 429/500/502/503/504 (S3 ``SlowDown``) and dropped
connections are retried with exponential backoff and jitter, ``MAX_TRIES`` tries in all, then one line.
"""

from __future__ import annotations

import io
import os
import random
import re
import threading
import time
from contextlib import contextmanager

from ckptlab.errors import AuthError, CkptlabError, NetworkError, NotFoundError

#: the first GET of an object reads this much from its start (a safetensors header of a LoRA or a checkpoint fits)
READAHEAD = 64 * 1024
#: the piece size of a streamed read (hashing): what one ``read`` of the response body returns at most
STREAM_CHUNK = 4 * 1024 * 1024
#: the block cache of one ``RemoteFile`` holds at most this many bytes (small reads only; big reads go straight)
CACHE_BYTES = 4 * 1024 * 1024
#: tries per request (the first + retries) on throttling and dropped connections
MAX_TRIES = int(os.environ.get("CKPTLAB_REMOTE_TRIES", "5"))
#: backoff: base * 2**try, +-50 % jitter, capped
BACKOFF_BASE = float(os.environ.get("CKPTLAB_REMOTE_BACKOFF", "0.2"))
BACKOFF_MAX = 10.0
#: seconds a socket may stay silent before the request fails (a server that never answers or never ends)
TIMEOUT = float(os.environ.get("CKPTLAB_REMOTE_TIMEOUT", "60"))

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

_lock = threading.Lock()
_totals = [0, 0]  # requests, bytes received (body bytes)


def stats() -> dict:
    """``{"requests": n, "bytes": n}`` sent/received by this process's remote reads so far (thread-safe)."""
    with _lock:
        return {"requests": _totals[0], "bytes": _totals[1]}


class Counter:
    """Requests and bytes between the ``counting()`` block's start and its end (or now, inside it)."""

    def __init__(self):
        s = stats()
        self._start = (s["requests"], s["bytes"])
        self._end: tuple[int, int] | None = None

    def _now(self) -> tuple[int, int]:
        if self._end is not None:
            return self._end
        s = stats()
        return s["requests"], s["bytes"]

    @property
    def requests(self) -> int:
        return self._now()[0] - self._start[0]

    @property
    def bytes(self) -> int:
        return self._now()[1] - self._start[1]

    def __repr__(self) -> str:
        return f"<remote Counter requests={self.requests} bytes={self.bytes}>"


@contextmanager
def counting():
    """``with counting() as c: ...`` then ``c.requests``, ``c.bytes``: what the block cost this process (other
    threads' reads in the same interval count too)."""
    c = Counter()
    try:
        yield c
    finally:
        c._end = c._now()


def _count(requests: int = 0, nbytes: int = 0) -> None:
    with _lock:
        _totals[0] += requests
        _totals[1] += nbytes


def _Retry(message: str) -> NetworkError:  # noqa: N802 - raised like the exception it stands for
    """A failure worth another try (throttling, a dropped connection): a ``NetworkError`` marked ``retryable``; its
    message is the last line when the tries run out (no exception class of its own: errors.py holds them all)."""
    e = NetworkError(message)
    e.retryable = True
    return e


def _backoff(attempt: int) -> None:
    delay = min(BACKOFF_MAX, BACKOFF_BASE * (2 ** attempt))
    time.sleep(delay * (0.5 + random.random()))


def _with_retries(url: str, fn):
    """``fn()`` with retries on ``_Retry``; after ``MAX_TRIES`` one ``NetworkError`` line naming ``url``."""
    last = ""
    for attempt in range(max(1, MAX_TRIES)):
        try:
            return fn()
        except NetworkError as e:
            if not getattr(e, "retryable", False):
                raise
            last = e.message
            if attempt + 1 < max(1, MAX_TRIES):
                _backoff(attempt)
    raise NetworkError(f"gave up after {max(1, MAX_TRIES)} tries: {last}", url)


def _missing_extra(url: str, name: str) -> CkptlabError:
    return CkptlabError(f"reading {url.partition('://')[0]}:// paths needs {name}: pip install 'ckptlab[remote]'", url)


# -- filesystems: one per (protocol, options) per process --------------------------------------------------------
_fs_cache: dict = {}


def filesystem(protocol: str, **options):
    """The fsspec filesystem for ``protocol`` with ``options`` (storage options; FSSPEC_<PROTOCOL>_<KWARG> env
    config applies), made once per process per (protocol, options): Ray workers reuse it for every task."""
    key = (protocol, tuple(sorted((k, repr(v)) for k, v in options.items())))
    fs = _fs_cache.get(key)
    if fs is None:
        try:
            import fsspec
        except ImportError:
            raise _missing_extra(f"{protocol}://", "fsspec") from None
        try:
            fs = fsspec.filesystem(protocol, **options)
        except ImportError as e:
            raise _missing_extra(f"{protocol}://", getattr(e, "name", None) or "its fsspec backend") from None
        except (ValueError, TypeError) as e:
            raise CkptlabError(f"cannot configure {protocol}://: {e}") from None
        with _lock:
            fs = _fs_cache.setdefault(key, fs)
    return fs


def _protocol(url: str) -> str:
    scheme = url.partition("://")[0].lower()
    return {"gcs": "gs", "abfs": "az", "abfss": "az"}.get(scheme, scheme)


# -- transports ---------------------------------------------------------------------------------------------------
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_TOTAL_ONLY = re.compile(r"bytes\s+\*/(\d+)")


def _parse_total(content_range: str | None) -> int | None:
    if not content_range:
        return None
    m = _CONTENT_RANGE.match(content_range) or _TOTAL_ONLY.match(content_range)
    if not m:
        return None
    t = m.groups()[-1]
    return int(t) if t != "*" else None


class _HTTP:
    """Ranged GETs over ``http.client`` with one kept-alive connection per thread and host."""

    _local = threading.local()

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        self.url = url
        u = urlsplit(url)
        if not u.hostname:
            raise CkptlabError("not a valid URL (no host)", url)
        self.https = u.scheme.lower() == "https"
        self.host = u.hostname
        try:
            self.port = u.port
        except ValueError:
            raise CkptlabError("not a valid URL (bad port)", url) from None
        self.target = (u.path or "/") + (f"?{u.query}" if u.query else "")

    def _conn(self, fresh: bool = False):
        import http.client

        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        key = (self.https, self.host, self.port)
        c = conns.get(key)
        if c is not None and fresh:
            c.close()
            c = None
        if c is None:
            if self.https:
                import ssl

                c = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT,
                                                context=ssl.create_default_context())
            else:
                c = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            conns[key] = c
        return c

    def _drop(self) -> None:
        conns = getattr(self._local, "conns", None) or {}
        c = conns.pop((self.https, self.host, self.port), None)
        if c is not None:
            c.close()

    def _request(self, headers: dict):
        """Send one GET; returns the response (status checked: retried, or an error line)."""
        import http.client

        _count(requests=1)
        try:
            c = self._conn()
            try:
                c.request("GET", self.target, headers=headers)
                r = c.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                c = self._conn(fresh=True)  # a kept-alive connection the server closed meanwhile: reconnect once
                c.request("GET", self.target, headers=headers)
                r = c.getresponse()
        except TimeoutError:
            self._drop()
            raise NetworkError(f"no answer within {TIMEOUT:g} s", self.url) from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected,
                http.client.IncompleteRead) as e:
            self._drop()
            raise _Retry(f"connection dropped ({type(e).__name__})") from None
        except http.client.HTTPException as e:
            self._drop()
            raise NetworkError(f"bad HTTP reply: {type(e).__name__}: {e}", self.url) from None
        except OSError as e:
            self._drop()
            raise NetworkError(f"cannot connect: {e.strerror or e}", self.url) from None
        if r.status in RETRY_STATUS:
            self._drop()
            raise _Retry(f"HTTP {r.status} {r.reason}".strip())
        if r.status == 404:
            self._drop()
            raise NotFoundError(f"{self.url}: not found (HTTP 404)", 404)
        if r.status in (401, 403):
            self._drop()
            raise AuthError(f"{self.url}: access denied (HTTP {r.status})", r.status)
        return r

    def _read_body(self, r, n: int) -> bytes:
        """Exactly ``n`` bytes of ``r``'s body (bounded read; a short body is an error)."""
        buf = bytearray()
        try:
            while len(buf) < n:
                part = r.read(min(n - len(buf), STREAM_CHUNK))
                if not part:
                    break
                buf += part
        except TimeoutError:
            self._drop()
            raise NetworkError(f"the server stopped sending after {len(buf)} of {n} bytes (timed out)",
                               self.url) from None
        except (ConnectionResetError, ConnectionAbortedError, OSError) as e:
            self._drop()
            _count(nbytes=len(buf))
            raise _Retry(f"connection dropped after {len(buf)} of {n} bytes ({type(e).__name__})") from None
        _count(nbytes=len(buf))
        if len(buf) < n:
            self._drop()
            raise NetworkError(f"the server sent {len(buf)} of the {n} bytes asked for (truncated reply)", self.url)
        return bytes(buf)

    def _finish(self, r, extra_ok: bool) -> None:
        """After the bytes asked for: the body must be over (else the connection is dropped, never drained)."""
        if r.length not in (0, None) or not extra_ok:
            self._drop()
            r.close()
            return
        r.close()

    def get(self, start: int, end: int | None) -> tuple[bytes, int | None]:
        """Bytes ``[start, end)`` (``end`` None: to the end, only with a known size) and the object's total size
        from the reply."""
        def attempt():
            rng = f"bytes={start}-{end - 1}" if end is not None else f"bytes={start}-"
            r = self._request({"Range": rng, "Accept-Encoding": "identity"})
            if r.status == 416:
                total = _parse_total(r.getheader("Content-Range"))
                self._drop()
                if total is not None and start >= total:
                    return b"", total
                raise NetworkError(f"the server refused the range {rng} (HTTP 416)", self.url)
            clen = r.getheader("Content-Length")
            clen = int(clen) if clen and clen.isdigit() else None
            if r.status == 206:
                cr = r.getheader("Content-Range") or ""
                m = _CONTENT_RANGE.match(cr)
                if not m or int(m.group(1)) != start:
                    self._drop()
                    raise NetworkError(f"the server answered the range {rng} with another range ({cr[:80]!r})",
                                       self.url)
                total = int(m.group(3)) if m.group(3) != "*" else None
                first, last = int(m.group(1)), int(m.group(2))
                want = last - first + 1
                if end is not None and want > end - start:
                    self._drop()
                    raise NetworkError(f"the server sent {want} bytes for a {end - start}-byte range", self.url)
                if end is not None and want < end - start and (total is None or last + 1 < min(end, total)):
                    self._drop()
                    raise NetworkError(f"the server sent {want} of the {end - start} bytes asked for", self.url)
                if clen is not None and clen != want:
                    self._drop()
                    raise NetworkError(f"the reply's Content-Length {clen} does not match its range {cr[:80]!r}",
                                       self.url)
                data = self._read_body(r, want)
                self._finish(r, True)
                return data, total
            if r.status == 200:
                # the whole object: acceptable only when the whole object was asked for
                if start == 0 and end is None or (clen is not None and start == 0 and end is not None and clen <= end):
                    if clen is None:
                        self._drop()
                        raise NetworkError("the server ignored the Range request and sent no length", self.url)
                    data = self._read_body(r, clen)
                    self._finish(r, True)
                    return data, clen
                self._drop()
                raise NetworkError(f"the server ignored the Range request (HTTP 200 for {rng}); ranged reads are "
                                   "required", self.url)
            self._drop()
            raise NetworkError(f"HTTP {r.status} {r.reason}".strip(), self.url)

        return _with_retries(self.url, attempt)

    def stream(self, size: int | None, chunk: int, on_size=None):
        """The whole object (``size`` bytes; None: as the reply's Content-Length says, told to ``on_size``) in one
        GET, piece by piece."""
        r = _with_retries(self.url, lambda: self._request({"Accept-Encoding": "identity"}))
        if r.status not in (200, 206):
            self._drop()
            raise NetworkError(f"HTTP {r.status} {r.reason}".strip(), self.url)
        clen = r.getheader("Content-Length")
        if size is None:
            if clen is None or not clen.isdigit():
                self._drop()
                raise NetworkError("the server does not say the object's size (no Content-Length)", self.url)
            size = int(clen)
            on_size(size)
        if clen is not None and clen.isdigit() and int(clen) != size:
            self._drop()
            raise NetworkError(f"the server sends {clen} bytes but the object has {size}", self.url)
        done = 0
        try:
            while done <= size:
                try:
                    part = r.read(min(chunk, size - done) if done < size else 1)  # at the end: is there more?
                except TimeoutError:
                    raise NetworkError(f"the server stopped sending after {done} of {size} bytes (timed out)",
                                       self.url) from None
                except OSError as e:
                    raise NetworkError(f"connection dropped after {done} of {size} bytes ({type(e).__name__})",
                                       self.url) from None
                if done == size:
                    if part:
                        raise NetworkError(f"the server sends more than the object's {size} bytes", self.url)
                    break
                if not part:
                    raise NetworkError(f"the server sent {done} of the object's {size} bytes (truncated reply)",
                                       self.url)
                done += len(part)
                _count(nbytes=len(part))
                yield part
        finally:
            if done < size or r.length not in (0, None):
                self._drop()
            r.close()

    def size(self) -> int:
        data, total = self.get(0, 1)
        if total is None:
            raise NetworkError("the server does not say the object's size", self.url)
        return total


def _s3_error(url: str, e: Exception) -> Exception:
    """A botocore/s3fs exception as a retry or one line."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if isinstance(e, FileNotFoundError) or "nosuchkey" in low or "nosuchbucket" in low or "404" in low or \
            "not found" in low:
        what = "no such bucket" if "nosuchbucket" in low else "not found"
        return NotFoundError(f"{url}: {what}", 404)
    if isinstance(e, PermissionError) or "accessdenied" in low or "403" in low or "forbidden" in low:
        return AuthError(f"{url}: access denied", 403)
    if "nocredentials" in low or "unable to locate credentials" in low or "credentials" in low and "no " in low:
        return NetworkError("no credentials for this store (set AWS_* variables or ~/.aws)", url)
    if "slowdown" in low or "503" in low or "throttl" in low or "429" in low or "reset" in low or \
            "timeout" in low or "connection" in low and ("closed" in low or "aborted" in low):
        return _Retry(text.splitlines()[0][:200])
    if "could not connect" in low or "connect" in low:
        return NetworkError(f"cannot connect: {text.splitlines()[0][:200]}", url)
    return NetworkError(text.splitlines()[0][:300], url)


class _S3:
    """``get_object`` with ``Range`` through s3fs's client (one request, size from ``ContentRange``). A listed
    object's version id (``?versionId=`` or ``RemoteEntry.version_id``) is read as that version; without one its
    listed ETag is sent as ``If-Match``: an object replaced since the listing is an error, never other bytes."""

    def __init__(self, url: str, options: dict, version: str | None = None, etag: str | None = None):
        self.url = url
        self.fs = filesystem("s3", **options)
        base, _, url_version = url.partition("?versionId=")
        try:
            self.bucket, self.key, _ = self.fs.split_path(base)
        except ValueError as e:
            raise CkptlabError(f"not a valid S3 URL: {e}", url) from None
        self.version = version or url_version or None
        self.etag = etag if not self.version else None
        if not self.key:
            raise CkptlabError("names a bucket, not an object", url)

    def _call(self, **kw):
        from fsspec.asyn import sync

        if self.version:
            kw["VersionId"] = self.version
        elif self.etag:
            kw["IfMatch"] = f'"{self.etag}"'
        _count(requests=1)
        try:
            return sync(self.fs.loop, self.fs._call_s3, "get_object", Bucket=self.bucket, Key=self.key, **kw)
        except CkptlabError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore's exception zoo becomes one line (or a retry)
            low = f"{type(e).__name__}{e}".lower()
            if "invalidrange" in low or "not satisfiable" in low:
                e = NetworkError("invalid range")
                e.invalid_range = True
                raise e from None
            if "precondition" in low or "pre-condition" in low or "412" in low:
                raise NetworkError("the object changed since it was listed (ETag differs)", self.url) from None
            raise _s3_error(self.url, e) from None

    def _read(self, body, n: int, *, exact: bool = True) -> bytes:
        from fsspec.asyn import sync

        buf = bytearray()
        try:
            while len(buf) < n:
                part = sync(self.fs.loop, body.read, min(STREAM_CHUNK, n - len(buf)))
                if not part:
                    break
                buf += part
        except Exception as e:  # noqa: BLE001
            _count(nbytes=len(buf))
            raise _s3_error(self.url, e) from None
        _count(nbytes=len(buf))
        if exact and len(buf) < n:
            raise NetworkError(f"the store sent {len(buf)} of the {n} bytes asked for (truncated reply)", self.url)
        return bytes(buf)

    def get(self, start: int, end: int | None) -> tuple[bytes, int | None]:
        def attempt():
            rng = f"bytes={start}-{end - 1}" if end is not None else f"bytes={start}-"
            try:
                resp = self._call(Range=rng)
            except NetworkError as e:
                if not getattr(e, "invalid_range", False):
                    raise
                return b"", None
            body = resp["Body"]
            try:
                total = _parse_total(resp.get("ContentRange"))
                n = int(resp.get("ContentLength", -1))
                if end is not None and n > end - start:
                    raise NetworkError(f"the store sent {n} bytes for a {end - start}-byte range", self.url)
                if total is None and "ContentRange" not in resp:
                    if start != 0:
                        raise NetworkError("the store ignored the Range request", self.url)
                    total = n
                want = (min(end, total) if total is not None and end is not None else end if end is not None
                        else total) - start
                if n >= 0 and n != want:
                    raise NetworkError(f"the store sent {n} of the {want} bytes asked for", self.url)
                return self._read(body, want), total
            finally:
                body.close()

        data, total = _with_retries(self.url, attempt)
        if total is None and not data:
            total = self.size()
        return data, total

    def stream(self, size: int | None, chunk: int, on_size=None):
        from fsspec.asyn import sync

        resp = _with_retries(self.url, lambda: self._call())
        body = resp["Body"]
        done = 0
        try:
            if size is None:
                size = int(resp.get("ContentLength", -1))
                if size < 0:
                    raise NetworkError("the store does not say the object's size", self.url)
                on_size(size)
            n = int(resp.get("ContentLength", size))
            if n != size:
                raise NetworkError(f"the store sends {n} bytes but the object has {size}", self.url)
            while done < size:
                try:
                    part = sync(self.fs.loop, body.read, min(chunk, size - done))
                except Exception as e:  # noqa: BLE001
                    err = _s3_error(self.url, e)
                    raise (NetworkError(str(err), self.url) if getattr(err, "retryable", False) else err) from None
                if not part:
                    raise NetworkError(f"the store sent {done} of the object's {size} bytes (truncated reply)",
                                       self.url)
                done += len(part)
                _count(nbytes=len(part))
                yield part
        finally:
            body.close()

    def size(self) -> int:
        def attempt():
            _count(requests=1)
            try:
                return int(self.fs.info(self.url)["size"])
            except Exception as e:  # noqa: BLE001
                raise _s3_error(self.url, e) from None

        return _with_retries(self.url, attempt)


class _FSSpec:
    """Any other fsspec filesystem (gcsfs, adlfs): ``cat_file`` ranges, ``size`` for the size."""

    def __init__(self, url: str, options: dict):
        self.url = url
        self.fs = filesystem(_protocol(url), **options)

    def _guard(self, fn):
        def attempt():
            _count(requests=1)
            try:
                return fn()
            except CkptlabError:
                raise
            except Exception as e:  # noqa: BLE001
                raise _s3_error(self.url, e) from None

        return _with_retries(self.url, attempt)

    def size(self) -> int:
        return int(self._guard(lambda: self.fs.size(self.url)))

    def get(self, start: int, end: int | None) -> tuple[bytes, int | None]:
        data = self._guard(lambda: self.fs.cat_file(self.url, start=start, end=end))
        _count(nbytes=len(data))
        if end is not None and len(data) > end - start:
            raise NetworkError(f"the store sent {len(data)} bytes for a {end - start}-byte range", self.url)
        return bytes(data), None

    def stream(self, size: int | None, chunk: int, on_size=None):
        if size is None:
            size = self.size()
            on_size(size)
        big = max(chunk, 64 * 1024 * 1024)  # no streaming body in fsspec's generic API: big ranged GETs
        pos = 0
        while pos < size:
            data, _ = self.get(pos, min(size, pos + big))
            if not data:
                raise NetworkError(f"the store sent {pos} of the object's {size} bytes (truncated)", self.url)
            for i in range(0, len(data), chunk):
                yield data[i:i + chunk]
            pos += len(data)


def transport(url: str, options: dict | None = None, version: str | None = None, etag: str | None = None):
    proto = _protocol(url)
    if proto in ("http", "https"):
        return _HTTP(url)
    if proto == "s3":
        return _S3(url, options or {}, version, etag)
    return _FSSpec(url, options or {})


# -- the file object ----------------------------------------------------------------------------------------------
class RemoteFile(io.RawIOBase):
    """A remote object as a seekable, read-only binary file. Small reads fetch a ``READAHEAD`` block (cached, at
    most ``CACHE_BYTES`` per file); a read of ``READAHEAD`` bytes or more fetches exactly what is missing. ``size``
    (from a listing: ``RemoteEntry.size``) saves the request that would learn it; without it the first GET's reply
    says it (S3, HTTP), or one metadata request does (GCS, Azure)."""

    def __init__(self, url, size: int | None = None, *, readahead: int = READAHEAD, options: dict | None = None):
        super().__init__()
        version = etag = None
        if hasattr(url, "url") and hasattr(url, "size"):  # a RemoteEntry (or another RemoteFile)
            size = url.size if size is None else size
            version, etag = getattr(url, "version_id", None), getattr(url, "etag", None)
            url = url.url
        self.url = str(url)
        self.name = self.url
        self.version_id, self.etag = version, etag
        self._t = transport(self.url, options, version, etag)
        self._size = size
        self._pos = 0
        self._readahead = readahead
        self._spans: list[tuple[int, bytes]] = []  # (start, data), most recently used last
        self._cached = 0
        self._hot: tuple[int, bytes] | None = None  # the span the last lookup found (one of _spans)
        self._failed: CkptlabError | None = None

    # -- io protocol
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a remote object has no file descriptor")

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            pos = offset
        elif whence == 1:
            pos = self._pos + offset
        elif whence == 2:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    @property
    def size(self) -> int:
        if self._size is None:
            if isinstance(self._t, (_HTTP, _S3)):
                self._fetch(0, self._readahead)  # the first block's reply says the size
            if self._size is None:
                if self._failed is not None:
                    raise self._failed
                self._size = self._t.size()
        return self._size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        data = self.pread(self._pos, n)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    # -- ranged reads
    def pread(self, pos: int, n: int, *, exact: bool = False) -> bytes:
        """``n`` bytes from ``pos`` (fewer at the end of the object); the position is not moved. ``exact``: no
        read-ahead (a tensor's bytes: one GET of exactly its range unless cached)."""
        if n <= 0:
            return b""
        if self._size is not None:
            n = min(n, self._size - pos)
            if n <= 0:
                return b""
        big = exact or n >= self._readahead
        parts = []
        while n > 0:
            hit = self._lookup(pos)
            if hit is not None:
                s, data = hit
                piece = data[pos - s:pos - s + n]
                parts.append(piece)
                pos += len(piece)
                n -= len(piece)
                continue
            if self._size is not None and pos >= self._size:
                break
            if big:
                data = self._get(pos, pos + n)
                if len(data) <= CACHE_BYTES // 2:
                    self._keep(pos, data)
                parts.append(data)
                if len(data) < n and (self._size is None or pos + len(data) < self._size):
                    raise NetworkError(f"the store sent {len(data)} of the {n} bytes asked for", self.url)
                break
            got = self._fetch(pos, self._readahead)
            if not got:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _get(self, start: int, end: int) -> bytes:
        if self._size is not None:
            end = min(end, self._size)
            if start >= end:
                return b""
        if self._failed is not None:
            raise self._failed  # a refusal (404, a lying server...) is final for this open: never asked again
        try:
            data, total = self._t.get(start, end)
        except CkptlabError as e:
            self._failed = e
            raise
        if total is not None:
            if self._size is not None and total != self._size:
                raise NetworkError(f"the object is {total} bytes now, {self._size} when listed (it changed)",
                                   self.url)
            self._size = total
        return data

    def _fetch(self, pos: int, n: int) -> bytes:
        data = self._get(pos, pos + n)
        self._keep(pos, data)
        return data

    def _keep(self, pos: int, data: bytes) -> None:
        if data and len(data) <= CACHE_BYTES:
            self._spans.append((pos, data))
            self._cached += len(data)
            while self._cached > CACHE_BYTES and len(self._spans) > 1:
                gone = self._spans.pop(1 if len(self._spans) > 1 and self._spans[0][0] == 0 else 0)
                self._cached -= len(gone[1])  # the block at offset 0 (headers, magic) stays longest
                if gone is self._hot:
                    self._hot = None

    def _lookup(self, pos: int):
        hot = self._hot  # the span of the last hit first: a pickle machine's reads walk one span at a time
        if hot is not None and hot[0] <= pos < hot[0] + len(hot[1]):
            return hot
        for span in reversed(self._spans):
            if span[0] <= pos < span[0] + len(span[1]):
                self._hot = span
                return span
        return None

    def stream(self, chunk: int = STREAM_CHUNK):
        """The whole object from its start in one GET, in pieces of at most ``chunk`` bytes."""
        def learn(size: int) -> None:
            self._size = size

        # an unknown size is learnt from the streamed reply itself (no request for the size alone)
        yield from self._t.stream(self._size, chunk, learn)


class RemoteBuffer:
    """The part of the ``mmap`` interface the pickle scanner uses (``len``, indexing and slicing to bytes,
    ``find``/``rfind``, ``close``), served from a ``RemoteFile``'s ranged reads: only what the scanner touches is
    fetched."""

    def __init__(self, rf: RemoteFile):
        self.rf = rf
        self._len = rf.size
        self.closed = False

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            if step != 1:
                return self.rf.pread(start, max(0, stop - start))[::step]
            return self.rf.pread(start, max(0, stop - start))
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("index out of range")
        return self.rf.pread(i, 1)[0]

    def rfind(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self._len if end is None else min(end, self._len)
        j = self.rf.pread(start, end - start).rfind(sub)
        return -1 if j < 0 else start + j

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end = self._len if end is None else min(end, self._len)
        j = self.rf.pread(start, end - start).find(sub)
        return -1 if j < 0 else start + j

    def close(self) -> None:
        self.closed = True


# Inside a ``session()`` (one command, one file's facts), one RemoteFile per URL per thread: detect_format, the
# header parser and the polyglot check of one object share its first block (the request budget of a header read).
# Outside a session every open is fresh: a changed object is never served from an old block.
_recent = threading.local()
RECENT_FILES = 4


@contextmanager
def session():
    """Share opened objects (their sizes and cached blocks) among the reads inside this block (this thread)."""
    depth = getattr(_recent, "depth", 0)
    _recent.depth = depth + 1
    if depth == 0:
        _recent.files, _recent.trees = [], {}
    try:
        yield
    finally:
        _recent.depth = depth
        if depth == 0:
            _recent.files, _recent.trees = [], {}


def open_remote(url, size: int | None = None) -> RemoteFile:
    """A ``RemoteFile`` for ``url`` (a URL string or a ``RemoteEntry``); inside a ``session()`` this thread's open
    one for the same URL (its size and cached blocks) when there is one."""
    entry = url if hasattr(url, "url") and hasattr(url, "size") else None
    if entry is not None:
        size = entry.size if size is None else size
        url = entry.url
    url = str(url)
    if not getattr(_recent, "depth", 0):
        return RemoteFile(entry if entry is not None else url, size)
    lst = getattr(_recent, "files", None)
    if lst is None:
        lst = _recent.files = []
    for rf in lst:
        if rf.url == url and (size is None or rf._size in (None, size)):
            if size is not None:
                rf._size = size
            return rf
    rf = RemoteFile(entry if entry is not None else url, size)
    lst.append(rf)
    if len(lst) > RECENT_FILES:
        lst.pop(0)
    return rf



def list_prefix(url: str) -> list[tuple[str, int]]:
    """``(url, size)`` of every object under the prefix ``url`` (a diffusers folder's files), sorted. A plain
    listing (the scan's paged listing is ``remote.listing``); http(s) has none."""
    proto = _protocol(url)
    if proto in ("http", "https"):
        raise CkptlabError("an http(s) URL cannot be listed: name the files", url)
    fs = filesystem(proto)
    scheme = url.partition("://")[0]
    prefix = url.rstrip("/")

    def attempt():
        _count(requests=1)
        try:
            return fs.find(prefix, detail=True)
        except Exception as e:  # noqa: BLE001
            raise _s3_error(url, e) from None

    found = _with_retries(url, attempt)
    out = []
    for name, info in sorted(found.items()):
        if info.get("type") == "directory":
            continue
        full = name if "://" in name else f"{scheme}://{name}"
        out.append((full, int(info.get("size") or 0)))
    return out


def _tree(url: str) -> dict[str, int]:
    """``{object url: size}`` under the prefix this lookup belongs to: one listing per prefix per session (a
    diffusers pipeline's whole tree in one LIST), registering each object's size for ``open_remote``."""
    trees = getattr(_recent, "trees", None) if getattr(_recent, "depth", 0) else None
    if trees is not None:
        for root, tree in trees.items():
            if url == root or url.startswith(root + "/"):
                return tree
    root = url.rstrip("/")
    tree = dict(list_prefix(root + "/")) if not root.endswith(("model_index.json", "config.json")) else {}
    if not tree:  # an object, or a name inside a prefix not listed yet: list its parent
        root = root.rsplit("/", 1)[0]
        tree = dict(list_prefix(root + "/"))
    if trees is not None:
        trees[root] = tree
    return tree


def tree_lookup(url: str) -> tuple[str | None, int | None]:
    """("file", size) | ("dir", None) | (None, None) for ``url`` in its prefix's listing."""
    u = str(url).rstrip("/")
    tree = _tree(u)
    if u in tree:
        return "file", tree[u]
    if any(k.startswith(u + "/") for k in tree):
        return "dir", None
    return None, None


def tree_children(url: str) -> list[str]:
    """The direct children (objects and sub-prefixes) of the prefix ``url``."""
    u = str(url).rstrip("/")
    out = set()
    for k in _tree(u):
        if k.startswith(u + "/"):
            out.add(u + "/" + k[len(u) + 1:].split("/", 1)[0])
    return sorted(out)
