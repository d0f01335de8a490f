"""HTTP plumbing shared by the hub clients: our User-Agent, polite pacing, retries with backoff,
redirects that never carry credentials to another origin, and one-line errors.

Every retry is said on stderr as it happens (what failed, attempt k of n, how long we wait), so an
unreachable server is never silence. Failures that cannot heal are not retried: a refused
connection (nothing listens there), a host name that does not resolve, a URL the client cannot
speak. Answers are read with a size cap and JSON with a nesting cap (``read_json``), so a hostile
server cannot exhaust memory or the stack; redirect loops end after ``MAX_REDIRECTS`` with one line.

httpx is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import urljoin, urlsplit

from ckptlab.errors import AuthError, HTTPStatusError, NetworkError, NotFoundError, ResponseShapeError
from ckptlab.jsonable import MAX_JSON_DEPTH, JSONDepthError, loads_limited
from ckptlab.version import __version__

USER_AGENT = f"ckptlab/{__version__} (model library tool; python-httpx)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 8
MAX_JSON_BYTES = 64 * 1024 * 1024  # an API answer larger than this is refused (bulk by-hash of 100 is ~1-5 MiB)
MAX_ERROR_BODY = 64 * 1024  # what is read of an error answer to build its message


def stderr_log(message: str) -> None:
    """Default retry reporter: one ``ckptlab: warning:`` line on stderr (control characters shown)."""
    from ckptlab.display import one_line

    try:
        sys.stderr.write(f"ckptlab: warning: {one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not turn a retry into a failure
        pass


def connect_failure(exc: BaseException) -> str | None:
    """``"refused"`` / ``"dns"`` when a transport error is a refused connection or a host name that
    does not resolve (looked up through the exception's cause chain: httpx wraps httpcore wraps the
    socket error); None for anything else."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 16:
        if isinstance(e, ConnectionRefusedError):
            return "refused"
        if isinstance(e, socket.gaierror):
            return "dns"
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def failed_url(exc: BaseException, default: str) -> str:
    """The URL the failed request went to (after redirects: the storage host, say), else ``default``."""
    try:
        return str(exc.request.url)  # httpx.RequestError.request; a RuntimeError when it has none
    except (AttributeError, RuntimeError):
        return default


def describe_transport_error(exc: BaseException, url: str) -> str:
    """A short human description of a transport failure (no URL query, no token)."""
    kind = connect_failure(exc)
    host = urlsplit(url).netloc.rpartition("@")[2]
    if kind == "refused":
        return f"cannot connect to {host}: Connection refused (nothing is listening there)"
    if kind == "dns":
        return f"cannot resolve the host name {urlsplit(url).hostname or host!r}"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text or 'connection failed'}"


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def redact(url: str) -> str:
    """A URL safe to print: no query string (presigned URLs and ``?token=`` live there), no userinfo."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return f"{p.scheme}://{host}{p.path}"


class Pacer:
    """At most one request start per ``interval`` seconds across threads (polite rate limiting)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = interval
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            delay = self._next - now
            self._next = max(now, self._next) + self.interval
        if delay > 0:
            self._sleep(delay)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,12}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
        return None if when is None else max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):  # any odd date: as if there were none
        return None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None) -> float:
    """Exponential backoff ``base * 2**attempt`` capped at ``cap``; a server's Retry-After wins (capped too)."""
    if retry_after is not None:
        return min(retry_after, cap)
    return min(base * (2 ** attempt), cap)


def make_client(timeout: float | None = None):
    """httpx client with our headers; ``timeout`` (connect/read/write, seconds) defaults to
    ``$CKPTLAB_HTTP_TIMEOUT`` or 30 - a stalled transfer is retried and resumed after it."""
    import httpx

    if timeout is None:
        try:
            timeout = float(os.environ.get("CKPTLAB_HTTP_TIMEOUT", "30"))
        except ValueError:
            timeout = 30.0

    return httpx.Client(
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
        follow_redirects=False,
    )


def error_message(resp, what: str, body: bytes | None = None) -> str:
    """``what: 404 Model not found`` using the JSON ``error``/``message`` fields when present."""
    detail = ""
    try:
        obj = json.loads(body if body is not None else resp.content)
        if isinstance(obj, dict):
            parts = [str(obj[k]) for k in ("error", "message") if isinstance(obj.get(k), (str, int, float))]
            detail = ": ".join(dict.fromkeys(parts))
    except Exception:  # noqa: BLE001 - any non-JSON (or absurdly nested) body
        detail = ""
    from ckptlab.display import printable

    detail = printable(" ".join(detail.split())[:200])
    return f"{what}: HTTP {resp.status_code}" + (f" {detail}" if detail else "")


def read_capped(resp, limit: int, what: str) -> bytes:
    """The body of a streamed response, at most ``limit`` bytes; more is a ``ResponseShapeError``."""
    import httpx

    cl = resp.headers.get("content-length")
    if cl and re.fullmatch(r"[0-9]{1,20}", cl) and int(cl) > limit:
        resp.close()
        raise ResponseShapeError(f"{what}: the answer is {int(cl)} bytes, more than the {limit} accepted")
    buf = bytearray()
    try:
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise ResponseShapeError(f"{what}: the answer is larger than the {limit} bytes accepted")
    except httpx.HTTPError as e:
        raise NetworkError(f"{what}: the answer broke off: {type(e).__name__}") from None
    finally:
        resp.close()
    return bytes(buf)


def parse_json(data: bytes, what: str):
    """JSON from a server, or a one-line ``ResponseShapeError`` (not JSON, too deep, bad numbers); the depth
    limit is ``jsonable.MAX_JSON_DEPTH`` (real CivitAI/HF answers nest < 15 levels)."""
    try:
        return loads_limited(data)
    except JSONDepthError:
        raise ResponseShapeError(f"{what}: the answer nests more than {MAX_JSON_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError):
        raise ResponseShapeError(f"{what}: the server did not answer JSON") from None


def raise_for_status(resp, what: str, *, token_hint: str = "", body: bytes | None = None) -> None:
    code = resp.status_code
    if code < 400:
        return
    msg = error_message(resp, what, body)
    if code == 404:
        raise NotFoundError(msg, code)
    if code == 401:
        raise AuthError(msg + (f" ({token_hint})" if token_hint else ""), code)
    if code == 403:
        raise AuthError(msg + " (no access: early access, a blocked account, or a token without rights)", code)
    raise HTTPStatusError(msg, code)


def retryable(exc: BaseException) -> bool:
    """Whether a transport error may heal on a retry: a dropped connection or a timeout may; a
    refused connection (nothing listens), a host name that does not resolve, a URL the client cannot
    speak (``ftp://`` after a redirect) or a request it cannot even form will not."""
    import httpx

    if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError)):
        return False
    if not isinstance(exc, (httpx.TransportError, httpx.TimeoutException)):
        return False  # e.g. a decoding error: the same bytes would come again
    return connect_failure(exc) is None


class Requester:
    """Send requests with pacing, retries on 429/5xx/transport errors, and manual redirects.

    ``auth_headers`` are sent only to ``auth_origin`` (the API's own origin); a redirect to any
    other origin (the storage CDN) gets none of them, whatever the HTTP library would do.
    """

    def __init__(self, client=None, *, auth_headers: Mapping[str, str] | None = None, auth_origin: str | None = None,
                 retries: int = 5, backoff: float | None = None, max_backoff: float = 30.0, interval: float = 0.25,
                 sleep: Callable[[float], None] = time.sleep, token_hint: str = "",
                 log: Callable[[str], None] | None = None):
        self.token_hint = token_hint
        self.log = log if log is not None else stderr_log
        self.client = client if client is not None else make_client()
        self.auth_headers = dict(auth_headers or {})
        self.auth_origin = origin(auth_origin) if auth_origin else None
        if backoff is None:  # CKPTLAB_HTTP_BACKOFF: base delay in seconds (1 s: 1, 2, 4... capped at 30 s)
            try:
                backoff = float(os.environ.get("CKPTLAB_HTTP_BACKOFF", "1"))
            except ValueError:
                backoff = 1.0
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.sleep = sleep
        self.pacer = Pacer(interval, sleep=sleep)

    def close(self) -> None:
        self.client.close()

    def _headers_for(self, url: str, extra: Mapping[str, str] | None) -> dict:
        headers = dict(extra or {})
        if self.auth_origin and origin(url) == self.auth_origin:
            headers.update(self.auth_headers)
        return headers

    def send_once(self, method: str, url: str, *, headers=None, stream: bool = False, what: str = "request", **kw):
        """One request, redirects followed by hand (credentials only to the auth origin). More than
        ``MAX_REDIRECTS`` redirects (a loop) or a redirect to a URL that cannot be requested is a
        one-line ``NetworkError``."""
        import httpx

        for _ in range(MAX_REDIRECTS + 1):
            self.pacer.wait()
            try:
                req = self.client.build_request(method, url, headers=self._headers_for(url, headers), **kw)
            except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, TypeError) as e:
                raise NetworkError(f"{what}: cannot request {redact(url)!r}: {' '.join(str(e).split())[:120]}") from None
            resp = self.client.send(req, stream=stream)
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                location = urljoin(str(resp.url), resp.headers["location"])
                resp.close()
                if "reason=download-auth" in location:  # CivitAI's browser-style "log in first" redirect
                    raise AuthError(f"HTTP {resp.status_code} redirect to the login page"
                                    + (f" ({self.token_hint})" if self.token_hint else ""), 401)
                if resp.status_code == 303:
                    method, kw = "GET", {k: v for k, v in kw.items() if k not in ("json", "content", "data")}
                url = location
                continue
            return resp
        raise NetworkError(f"{what}: more than {MAX_REDIRECTS} redirects (a redirect loop?), last to {redact(url)}")

    def request(self, method: str, url: str, *, what: str, stream: bool = False, allow: tuple[int, ...] = (), **kw):
        """Like ``send_once`` plus retries; returns a response with status < 400 (or in ``allow``),
        else raises a one-line ``NetworkError``."""
        import httpx

        attempt = 0
        tries = self.retries + 1
        while True:
            try:
                resp = self.send_once(method, url, stream=True, what=what, **kw)
            except httpx.HTTPError as e:
                why = describe_transport_error(e, failed_url(e, url))
                if attempt >= self.retries or not retryable(e):
                    n = f" (after {attempt + 1} attempts)" if attempt else ""
                    raise NetworkError(f"{what}: {why}{n}") from None
                wait = backoff_delay(attempt, self.backoff, self.max_backoff, None)
                self.log(f"{what}: {why}; attempt {attempt + 1} of {tries} failed, retrying in {wait:g} s")
                self.sleep(wait)
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                wait = backoff_delay(attempt, self.backoff, self.max_backoff,
                                     retry_after_seconds(resp.headers.get("retry-after")))
                resp.close()
                self.log(f"{what}: HTTP {resp.status_code}; attempt {attempt + 1} of {tries} failed, "
                         f"retrying in {wait:g} s")
                self.sleep(wait)
                attempt += 1
                continue
            if resp.status_code >= 400 and resp.status_code not in allow:
                body = _read_some(resp, MAX_ERROR_BODY)
                raise_for_status(resp, what, token_hint=self.token_hint, body=body)
            if not stream:  # read here, with a cap: a hostile server cannot stream forever into memory
                data = read_capped(resp, MAX_JSON_BYTES, what)  # decoded already: drop the encoding headers
                headers = [(k, v) for k, v in resp.headers.items()
                           if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
                return httpx.Response(resp.status_code, headers=headers, content=data, request=resp.request)
            return resp

    def get_json(self, method: str, url: str, *, what: str, **kw):
        """The JSON a request answers (size and nesting capped, see ``parse_json``)."""
        resp = self.request(method, url, what=what, stream=True, **kw)
        return parse_json(read_capped(resp, MAX_JSON_BYTES, what), what)


def _read_some(resp, limit: int) -> bytes:
    """Up to ``limit`` bytes of a streamed (error) answer, then the connection is closed."""
    import httpx

    buf = bytearray()
    try:
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) >= limit:
                break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()
    return bytes(buf[:limit])
