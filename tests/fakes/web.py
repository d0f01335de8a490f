"""Test clients of the web app (``ckptlab.web``)."""

from __future__ import annotations

from pathlib import Path

HOST = "127.0.0.1"
PORT = 8765
BASE = f"http://{HOST}:{PORT}"


def make_client(db: Path, **app_kwargs):
    """A TestClient of ``create_app(db)`` that sends what the app's own pages send: the bound Host, and on every
    request a same-origin Origin and the CSRF token (read from the app, as a page would read it)."""
    from fastapi.testclient import TestClient

    from ckptlab.web.app import create_app

    app_kwargs.setdefault("host", HOST)
    app_kwargs.setdefault("port", PORT)
    app = create_app(db, **app_kwargs)
    base = f"http://{app_kwargs['host']}:{app_kwargs['port']}"
    client = TestClient(app, base_url=base, follow_redirects=False)
    client.headers.update({"origin": base, "x-csrf-token": app.state.guard.csrf})
    return client
