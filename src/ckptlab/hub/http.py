"""HTTP plumbing shared by the hub clients: our User-Agent, polite pacing, retries with backoff,
redirects that never carry credentials to another origin, and one-line errors.

httpx is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import email.utils
import os
import threading
import time
from collections.abc import Callable, Mapping
from urllib.parse import urljoin, urlsplit

from ckptlab import __version__
from ckptlab.errors import NetworkError

USER_AGENT = f"ckptlab/{__version__} (model library tool; python-httpx)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 8


class HTTPStatusError(NetworkError):
    """The server answered with an error status (kept on ``status``)."""

    def __init__(self, message: str, status: int):
        self.status = status
        super().__init__(message)


class NotFoundError(HTTPStatusError):
    """404: the thing asked for does not exist upstream (not an outage)."""


class AuthError(HTTPStatusError):
    """401/403: a token is missing, wrong, or does not grant access."""


class VerificationError(NetworkError):
    """Downloaded bytes do not match the published size or hash; nothing was kept."""


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
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


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


def error_message(resp, what: str) -> str:
    """``what: 404 Model not found`` using the JSON ``error``/``message`` fields when present."""
    detail = ""
    try:
        body = resp.json()
        if isinstance(body, dict):
            parts = [str(body[k]) for k in ("error", "message") if body.get(k)]
            detail = ": ".join(dict.fromkeys(parts))
    except Exception:  # noqa: BLE001 - any non-JSON body
        detail = ""
    detail = " ".join(detail.split())[:200]
    return f"{what}: HTTP {resp.status_code}" + (f" {detail}" if detail else "")


def raise_for_status(resp, what: str, *, token_hint: str = "") -> None:
    code = resp.status_code
    if code < 400:
        return
    msg = error_message(resp, what)
    if code == 404:
        raise NotFoundError(msg, code)
    if code == 401:
        raise AuthError(msg + (f" ({token_hint})" if token_hint else ""), code)
    if code == 403:
        raise AuthError(msg + " (no access: early access, a blocked account, or a token without rights)", code)
    raise HTTPStatusError(msg, code)


def retryable(exc: BaseException) -> bool:
    """Whether a transport error may heal on a retry: a refused or dropped connection may, a URL the
    client cannot speak (``ftp://`` after a redirect) or a request it cannot even form will not."""
    import httpx

    return not isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError))


class Requester:
    """Send requests with pacing, retries on 429/5xx/transport errors, and manual redirects.

    ``auth_headers`` are sent only to ``auth_origin`` (the API's own origin); a redirect to any
    other origin (the storage CDN) gets none of them, whatever the HTTP library would do.
    """

    def __init__(self, client=None, *, auth_headers: Mapping[str, str] | None = None, auth_origin: str | None = None,
                 retries: int = 5, backoff: float | None = None, max_backoff: float = 30.0, interval: float = 0.25,
                 sleep: Callable[[float], None] = time.sleep, token_hint: str = ""):
        self.token_hint = token_hint
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

    def send_once(self, method: str, url: str, *, headers=None, stream: bool = False, **kw):
        """One request, redirects followed by hand (credentials only to the auth origin)."""
        import httpx

        for _ in range(MAX_REDIRECTS + 1):
            self.pacer.wait()
            req = self.client.build_request(method, url, headers=self._headers_for(url, headers), **kw)
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
        raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=req)

    def request(self, method: str, url: str, *, what: str, stream: bool = False, allow: tuple[int, ...] = (), **kw):
        """Like ``send_once`` plus retries; returns a response with status < 400 (or in ``allow``),
        else raises a one-line ``NetworkError``."""
        import httpx

        attempt = 0
        while True:
            try:
                resp = self.send_once(method, url, stream=stream, **kw)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                if attempt >= self.retries or not retryable(e):
                    raise NetworkError(f"{what}: {type(e).__name__}: {e or 'connection failed'} "
                                       f"(after {attempt + 1} attempts)") from None
                self.sleep(backoff_delay(attempt, self.backoff, self.max_backoff, None))
                attempt += 1
                continue
            if resp.status_code in RETRY_STATUSES and attempt < self.retries:
                wait = backoff_delay(attempt, self.backoff, self.max_backoff,
                                     retry_after_seconds(resp.headers.get("retry-after")))
                if stream:
                    resp.close()
                self.sleep(wait)
                attempt += 1
                continue
            if resp.status_code >= 400 and resp.status_code not in allow:
                if stream:
                    resp.read()
                    resp.close()
                raise_for_status(resp, what, token_hint=self.token_hint)
            return resp
