"""The app: the routers of every area behind the security middleware, the shipped static files, and the catalog
it serves (``create_app``). ``serve()`` runs it with uvicorn (what ``ckptlab serve`` calls)."""

from __future__ import annotations

from pathlib import Path

from ckptlab.errors import UsageError
from ckptlab.web.security import Guard, GuardMiddleware, is_loopback

DEFAULT_PORT = 8765


def create_app(db: str | Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
               extra_hosts: tuple[str, ...] = ()):
    """The ASGI app serving catalog ``db`` (created if missing: its library page then offers a scan).

    Args:
        db: the catalog file.
        host: the address the server is bound to (decides the Host names accepted).
        port: the port it is bound to.
        token: the access token; required (not None) when ``host`` is not loopback.
        extra_hosts: further Host names to accept (a reverse proxy's name).

    Returns:
        A FastAPI application.

    Raises:
        UsageError: a non-loopback ``host`` without a token.
    """
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from ckptlab.library.catalog import Catalog, catalog_location
    from ckptlab.web import media, pages_disk, pages_jobs, pages_library, pages_model
    from ckptlab.web.templating import STATIC

    if not is_loopback(host) and not token:
        raise UsageError(f"--host {host} is reachable from other machines: it needs an access token (--token)")
    db = catalog_location(db)  # a postgresql:// URL stays one
    if isinstance(db, Path):
        db = db.expanduser().absolute()
    Catalog(db).close()  # create and migrate once, here, so no request pays for it (and errors show at start)
    app = FastAPI(title="ckptlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db
    app.state.guard = Guard(host=host, port=port, token=token, extra_hosts=tuple(extra_hosts))
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    for module in (pages_library, pages_model, pages_jobs, pages_disk, media):
        app.include_router(module.router)
    _error_pages(app)
    # the guard wraps everything, static files and error pages included
    app.add_middleware(GuardMiddleware, guard=app.state.guard)
    return app


def _error_pages(app) -> None:
    """A ``CkptlabError`` raised by a route (a bad filter value, an unknown file id) is a one-line answer with
    the command's meaning: 404 for something not in the catalog, 400 for any other bad input; htmx requests get
    the fragment, others the whole page."""
    from ckptlab.errors import CkptlabError, NotInCatalogError
    from ckptlab.web.templating import page

    async def handler(request, exc: CkptlabError):
        status = 404 if isinstance(exc, NotInCatalogError) else 400
        return page(request, "error.html", status=status, message=str(exc), nav=None)

    app.add_exception_handler(CkptlabError, handler)


def serve(db: str | Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
          open_browser: bool = False, extra_hosts: tuple[str, ...] = (), on_ready=None) -> None:
    """Run the app with uvicorn until interrupted. ``on_ready(url)`` is called once the socket listens (the
    CLI prints the address there; with a token the address carries it once)."""
    import uvicorn

    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: use a port number from 1 to 65535")
    app = create_app(db, host=host, port=port, token=token, extra_hosts=extra_hosts)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if shown in ('0.0.0.0', '[::]') else shown}:{port}/"
    if token:
        url += f"?token={token}"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # listening now (a port in use ends the run with uvicorn's message instead)
                if on_ready is not None:
                    on_ready(url)
                if open_browser:
                    import webbrowser

                    webbrowser.open(url)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    Server(config).run()
