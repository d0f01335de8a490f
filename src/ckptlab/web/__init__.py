"""``ckptlab serve``: the library as a local web app (FastAPI + Jinja2 templates + htmx, served by uvicorn).

The app is a face of the same library the commands use: every page reads the catalog through
``ckptlab.library`` / ``ckptlab.hub`` and every job calls the public API (``ckptlab.api``), so a change made by
one is seen by the other. Modules:

- ``app``: ``create_app(db, host=, port=, token=)`` assembles the routers below behind ``security.GuardMiddleware``.
- ``security``: Host / token / Origin / CSRF checks and the Content-Security-Policy.
- ``templating``: the Jinja2 environment (autoescape everywhere) and ``page()``.
- ``deps``: the per-thread catalog connection routes use.
- ``query``: the library page's search, filters, sort and paging.
- ``pages_*``: one router per area (library, model page, jobs, disk plan and safety).

Nothing here is imported by the core install: ``pip install "ckptlab[web]"`` adds FastAPI, uvicorn and Jinja2.
"""
