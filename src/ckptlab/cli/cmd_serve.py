"""``ckptlab serve``: the library as a local web app (``ckptlab.web``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option


def serve_cmd(
    db: Optional[Path] = db_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs an "
                                                         "access token (one is made and printed if --token is "
                                                         "not given)."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CKPTLAB_TOKEN",
                                        help="Access token every request must carry (default on loopback: none). "
                                             "Prefer the CKPTLAB_TOKEN variable: an option shows in 'ps'."),
    allow_host: Optional[list[str]] = typer.Option(None, "--allow-host", help="Another Host name to accept (a "
                                                                              "reverse proxy's, as it forwards it: "
                                                                              "NAME or NAME:PORT); repeatable."),
    open_browser: bool = typer.Option(False, "--open", help="Open the app in the default browser."),
) -> None:
    """Browse, search and act on the library in a browser (local by default).

      ckptlab serve --db sample-library/catalog.db --open
      ckptlab serve --host 0.0.0.0 --port 8765   # prints the address with its access token
    """
    import importlib.util

    from ckptlab.errors import UsageError
    from ckptlab.library.catalog import default_db_path

    missing = [m for m in ("fastapi", "uvicorn", "jinja2", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f'ckptlab serve needs the web extra ({", ".join(missing)} missing): '
                         'pip install "ckptlab[web]"')
    from ckptlab.web.security import is_loopback, new_token
    if token is not None and len(token) < 16:
        raise UsageError("--token must be at least 16 characters")
    if not is_loopback(host) and token is None:
        token = new_token()
    from ckptlab.web.app import serve

    def ready(url: str) -> None:
        typer.echo(f"ckptlab serve: {url}  (Ctrl-C stops)", err=True)

    serve(db if db is not None else default_db_path(), host=host, port=port, token=token, open_browser=open_browser,
          extra_hosts=tuple(allow_host or ()), on_ready=ready)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
