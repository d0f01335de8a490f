"""Who may talk to ``ckptlab serve``, and what a page from elsewhere can never make it do.

The threat: the app can rename, link and delete model files, so any web page the user opens (or a DNS name an
attacker re-points at 127.0.0.1) must not be able to drive it, and a string from a model file, a sidecar or
CivitAI must never run as script. The checks, in order, as one ASGI middleware in front of every route:

1. **Host** must be a name this server was bound to (``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT`` on
   loopback; the ``--host`` given otherwise, plus any ``--allow-host``): a DNS-rebinding page sends its own name.
   A wildcard bind (``0.0.0.0``/``::``) accepts the loopback names, the machine's host name, and the address the
   connection came in on (a LAN client typing ``http://192.168.1.5:8765/``); a proxy's name needs ``--allow-host``
   (as given: ``models.example.com`` also bare, for a proxy on 443).
2. **Token** (only when bound beyond loopback, where it is mandatory): ``Authorization: Bearer TOKEN``, the
   ``ckptlab_token`` cookie, or ``?token=TOKEN`` once (answered with a redirect that sets the cookie -
   HttpOnly, SameSite=Strict - and drops the token from the address bar).
3. **State-changing requests** (anything but GET/HEAD/OPTIONS) need an ``Origin`` (else ``Referer``) of this same
   scheme+host+port, and the CSRF token (``X-CSRF-Token`` header, as htmx sends it, or a ``csrf`` form field)
   equal to this server's: a random value written into every page, unreadable from another origin.
   ``Origin: null`` (a sandboxed frame, a cross-site redirect) is never same-origin. A WebSocket handshake
   passes the Host, token and Origin checks too (browsers open cross-site WebSockets without preflight).
4. Every answer carries a Content-Security-Policy with no inline script (``script-src 'self'``), ``nosniff``,
   ``frame-ancestors 'none'`` and ``Referrer-Policy: same-origin``: escaping (Jinja autoescape) is the first
   line against script payloads in model metadata, the policy the second.

Refusals are plain-text 4xx answers with one line saying why (403 for Host/Origin/CSRF, 401 for the token). An
exception escaping a route is answered here (500, with the headers) before Starlette's outer handler would answer
without them.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_COOKIE = "ckptlab_token"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    """True for ``127.0.0.0/8``, ``::1`` and ``localhost``."""
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def _bracketed(host: str) -> str:
    """An IPv6 literal in the brackets a Host header puts around it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _has_port(name: str) -> bool:
    if name.startswith("["):
        return "]:" in name
    return name.count(":") == 1 and name.rsplit(":", 1)[1].isdigit()


def new_token() -> str:
    """A fresh secret (URL-safe, 256 bits)."""
    return secrets.token_urlsafe(32)


@dataclass
class Guard:
    """The security settings of one server: where it is bound, its access token (None on loopback) and its
    CSRF token. ``allowed_hosts`` are the Host header values accepted (with port)."""

    host: str
    port: int
    token: str | None = None
    csrf: str = field(default_factory=new_token)
    extra_hosts: tuple[str, ...] = ()

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @functools.cached_property
    def allowed_hosts(self) -> frozenset[str]:
        """The Host values accepted (lower case): each name with this server's port, and without one where the
        port is 80. ``--allow-host`` names (a reverse proxy's) are taken as given: with a port only that one,
        without one also bare (a proxy on 443 forwards ``Host: models.example.com``). A wildcard bind adds, per
        request, the address the connection came in on (``host_ok``)."""
        names: set[str] = set()
        if is_wildcard(self.host):
            import socket

            names.update(LOOPBACK_NAMES)
            names.update(n for n in {socket.gethostname(), socket.getfqdn()} if n)
        else:
            names.add(_bracketed(self.host))
            if self.loopback:
                names.update(LOOPBACK_NAMES)
        out = {f"{n.lower()}:{self.port}" for n in names}
        if self.port == 80:
            out.update(n.lower() for n in names)
        for extra in self.extra_hosts:
            extra = extra.strip().lower()
            out.add(extra)
            if not _has_port(extra):
                out.add(f"{extra}:{self.port}")
        return frozenset(out)

    def host_ok(self, host: str | None, server: tuple | None = None) -> bool:
        """``host`` (the request's Host header) names this server. ``server``: the ASGI scope's local address of
        the connection; on a wildcard bind the address a client connected to is a name of this server (a
        DNS-rebinding page sends its own name, never the IP literal)."""
        if not host:
            return False
        host = host.lower()
        if host in self.allowed_hosts:
            return True
        if is_wildcard(self.host) and server and server[0]:
            local = f"{_bracketed(str(server[0]))}:{self.port}".lower()
            return host == local or (self.port == 80 and host == _bracketed(str(server[0])).lower())
        return False

    def token_ok(self, presented: str | None) -> bool:
        if self.token is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


def _headers(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope.get("headers") or ():
        out.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
    return out


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def same_origin(headers: dict[str, str], scheme: str) -> bool:
    """The request's Origin (else, when there is no Origin at all, its Referer) is this scheme://Host. Absent
    both, or ``Origin: null``: not same-origin."""
    host = headers.get("host", "").lower()
    origin = headers.get("origin")
    if origin is not None and origin.strip().lower() == "null":
        return False  # an opaque origin (sandboxed frame, cross-origin redirect, file:): never this app's page
    if origin is None:
        ref = headers.get("referer")
        if not ref:
            return False
        parts = urlsplit(ref)
        origin = f"{parts.scheme}://{parts.netloc}"
    return origin.lower() == f"{scheme}://{host}"


async def _plain(send, status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    body = (message + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS, *extra]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """The ASGI middleware that applies a ``Guard`` to every HTTP request (see the module docstring)."""

    def __init__(self, app, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        g = self.guard
        headers = _headers(scope)
        if not g.host_ok(headers.get("host"), scope.get("server")):
            return await _plain(send, 403, "refused: unexpected Host header (ckptlab serve answers only to the "
                                           "name it was started on)")
        if g.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            auth = headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else None
            from_query = (query.get("token") or [None])[0]
            if from_query is not None and g.token_ok(from_query) and scope["method"] in SAFE_METHODS:
                rest = {k: v for k, v in query.items() if k != "token"}
                cookie = f"{TOKEN_COOKIE}={g.token}; Path=/; HttpOnly; SameSite=Strict"
                location = _local_location(scope, rest)
                return await _plain(send, 303, "token accepted", [(b"location", location.encode()),
                                                                   (b"set-cookie", cookie.encode())])
            if not (g.token_ok(bearer) or g.token_ok(_cookie(headers, TOKEN_COOKIE))):
                return await _plain(send, 401, "refused: this server needs its access token (open the address "
                                               "'ckptlab serve' printed, or send 'Authorization: Bearer TOKEN')")
        if scope["method"] not in SAFE_METHODS:
            scheme = scope.get("scheme", "http")
            if not same_origin(headers, scheme):
                return await _plain(send, 403, "refused: a state-changing request must come from this app's own "
                                               "pages (Origin mismatch)")
            if not g.csrf_ok(headers.get(CSRF_HEADER)):
                # a form post: the token is in the body; read it, then replay the body to the app
                body, receive = await _buffer(receive)
                if not g.csrf_ok(_form_field(headers, body, CSRF_FIELD)):
                    return await _plain(send, 403, "refused: missing or wrong CSRF token (reload the page)")

        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [
                    h for h in SECURITY_HEADERS if h[0] not in have]
            await send(message)

        try:
            return await self.app(scope, receive, send_with_headers)
        except Exception:
            # a bug in a route: Starlette's outer error handler would answer 500 without these headers; answer
            # here (with them) and re-raise so the error is still logged
            if not started:
                await _plain(send, 500, "internal error (the server's log has the details)")
            raise

    async def _websocket(self, scope, receive, send):
        """A WebSocket handshake passes the same Host, token and same-Origin checks as a state-changing request
        (a cross-site page can open a WebSocket to any address, and browsers send no preflight); refused
        handshakes are closed before they are accepted."""
        g = self.guard
        headers = _headers(scope)
        ok = g.host_ok(headers.get("host"), scope.get("server")) and same_origin(headers, "https" if scope.get("scheme") == "wss"
                                                            else "http")
        if ok and g.token is not None:
            auth = headers.get("authorization", "")
            bearer = auth[7:] if auth.lower().startswith("bearer ") else None
            ok = g.token_ok(bearer) or g.token_ok(_cookie(headers, TOKEN_COOKIE))
        if not ok:
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return None
        return await self.app(scope, receive, send)


def _local_location(scope, query: dict) -> str:
    """The address of this request on this server without its token: the raw (still percent-encoded) path, so a
    decoded CR/LF can never reach a header, and never ``//host`` (a browser reads that as another site)."""
    from urllib.parse import quote

    raw = scope.get("raw_path") or scope.get("path", "/").encode()
    path = "/" + quote(raw.decode("latin-1").lstrip("/\\"), safe="/%:@!$&'()*+,;=-._~")
    return path + (("?" + urlencode(query, doseq=True)) if query else "")


MAX_FORM_BYTES = 1 << 20


async def _buffer(receive):
    """Read the whole request body (up to ``MAX_FORM_BYTES``) and return it with a ``receive`` that replays it."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            chunks = []
            break
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay


def _form_field(headers: dict[str, str], body: bytes, name: str) -> str | None:
    ctype = headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("utf-8", "replace")).get(name)
        return values[0] if values else None
    if ctype.startswith("multipart/form-data"):
        marker = f'name="{name}"'.encode()
        i = body.find(marker)
        if i < 0:
            return None
        start = body.find(b"\r\n\r\n", i)
        end = body.find(b"\r\n", start + 4)
        return body[start + 4:end].decode("utf-8", "replace") if start >= 0 and end >= 0 else None
    return None
