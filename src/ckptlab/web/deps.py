"""The catalog a request reads: one SQLite connection per server thread (FastAPI runs plain ``def`` routes in a
thread pool; a connection must stay in the thread that opened it), opened on first use and kept. WAL mode lets
these readers see every commit the CLI or a job makes, at once, without blocking writers."""

from __future__ import annotations

import threading
from pathlib import Path

from starlette.requests import Request

from ckptlab.library.catalog import Catalog
from ckptlab.library.sql_dialect import is_postgres

_local = threading.local()


def catalog_at(path: Path) -> Catalog:
    """This thread's open catalog at ``path`` (opened, and migrated, on first use)."""
    cats = getattr(_local, "cats", None)
    if cats is None:
        cats = _local.cats = {}
    cat = cats.get(path)
    if cat is None:
        cat = cats[path] = Catalog(path)
    return cat


class ThreadCatalog(Catalog):
    """The catalog at ``path`` as seen from whichever thread uses it: every statement goes through the calling
    thread's own connection (``catalog_at``). FastAPI resolves a plain ``def`` dependency and runs the plain
    ``def`` route in two separate thread-pool calls, which may be different threads; a connection handed from
    the one to the other would fail ("SQLite objects created in a thread can only be used in that same
    thread") as soon as requests run concurrently."""

    def __init__(self, path: Path):  # no connection of its own
        self.path = path
        self.postgres = is_postgres(path)

    @property
    def conn(self):
        return catalog_at(self.path).conn

    def close(self) -> None:  # the per-thread connections stay open for the next request
        return None


def catalog(request: Request) -> Catalog:
    """The catalog of the app serving ``request`` (FastAPI dependency: ``cat: Catalog = Depends(catalog)``),
    safe to use from the route's thread whatever thread resolved it."""
    return ThreadCatalog(request.app.state.db)
