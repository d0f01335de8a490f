"""Progress reporting: long work takes an optional ``progress`` callback; the CLI renders it with
rich (``cli.common.progress_bar``) and the web app can stream it. One signature everywhere."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, advance: int = 0, *, total: int | None = None, description: str | None = None) -> None:
        """Advance by ``advance`` units; optionally (re)set the total or the description."""


def null_progress(advance: int = 0, *, total: int | None = None, description: str | None = None) -> None:
    return None
