"""``ckptlab serve``: the library as a local web app (FastAPI + Jinja2 templates + htmx, served by uvicorn).

The app is a face of the same library the commands use: every page reads the catalog through
``ckptlab.library`` / ``ckptlab.hub`` and every job calls the public API (``ckptlab.api``), so a change made by
one is seen by the other. Modules:

- ``app``: ``create_app(db, host=, port=, token=)`` assembles the routers below behind ``security.GuardMiddleware``.
- ``security``: Host / token / Origin / CSRF checks and the Content-Security-Policy.
- ``templating``: the Jinja2 environment (autoescape everywhere) and ``page()``.
- ``deps``: the per-thread catalog connection routes use (``ThreadCatalog``).
- ``index`` + ``query``: the library as a derived, indexed table with FTS5, kept current by SQLite triggers that
  every writer fires; the library page's search, filters, facets, sort and paging.
- ``pages_library`` + ``media`` (previews, only from catalogued paths), ``pages_model``, ``pages_disk`` +
  ``pages_safety``: one router per area.
- ``jobs`` + ``job_kinds`` + ``worker`` + ``pages_jobs``: long work in worker processes calling ``ckptlab.api``,
  state in the catalog (``web_jobs``), progress by server-sent events, cancel as Ctrl-C.

Nothing here is imported by the core install: ``pip install "ckptlab[web]"`` adds FastAPI, uvicorn and Jinja2.
"""
