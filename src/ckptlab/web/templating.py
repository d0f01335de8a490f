"""The Jinja2 environment every page renders with. Autoescape is on for every template (model names, metadata,
sidecars and CivitAI descriptions are attacker-controlled text); nothing from a model is ever marked ``|safe``.
Templates extend ``base.html``, which carries the CSRF token (``hx-headers`` on ``<body>``, so every htmx request
sends it; plain forms add ``{{ csrf_field() }}``)."""

from __future__ import annotations

import datetime as _dt
from functools import lru_cache
from pathlib import Path

from markupsafe import Markup, escape

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def _when(ts: float | None) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@lru_cache(maxsize=1)
def environment():
    import jinja2

    from ckptlab.display import human_size

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = lambda n: human_size(n) if n is not None else ""
    env.filters["when"] = _when
    return env


def page(request, name: str, status: int = 200, headers: dict | None = None, **context):
    """Render template ``name`` as an HTML response. ``request``, the CSRF token (``csrf``, ``csrf_field()``)
    and ``partial`` (True for an htmx request, which wants a fragment) are always in the context."""
    from fastapi.responses import HTMLResponse

    guard = request.app.state.guard
    ctx = {"request": request, "csrf": guard.csrf, "partial": request.headers.get("hx-request") == "true",
           "csrf_field": lambda: Markup('<input type="hidden" name="csrf" value="%s">') % escape(guard.csrf),
           **context}
    html = environment().get_template(name).render(**ctx)
    return HTMLResponse(html, status_code=status, headers=headers)
