"""The catalog a request reads: one SQLite connection per server thread (FastAPI runs plain ``def`` routes in a
thread pool; a connection must stay in the thread that opened it), opened on first use and kept. WAL mode lets
these readers see every commit the CLI or a job makes, at once, without blocking writers."""

from __future__ import annotations

import threading
from pathlib import Path

from starlette.requests import Request

from ckptlab.library.catalog import Catalog

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


def catalog(request: Request) -> Catalog:
    """The catalog of the app serving ``request`` (FastAPI dependency: ``cat: Catalog = Depends(catalog)``)."""
    return catalog_at(request.app.state.db)
