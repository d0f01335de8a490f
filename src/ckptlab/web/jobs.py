"""SKELETON: long work started from the app, run outside the server's event loop (a worker process per job),
its state kept in the catalog so it survives a page reload. The jobs engineer replaces the bodies; the
signatures below are the contract other pages use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    id: int
    kind: str                 # scan, hash, check, convert, prune, precision, extract, replace, merge, lora-bake,
                              # lora-extract, download, generate, grid, apply-plan
    params: dict
    status: str               # queued, running, done, failed, cancelled, lost
    done: int = 0             # progress units done / total (bytes, files...), description as the work says it
    total: int | None = None
    description: str | None = None
    result: dict | None = None
    error: str | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None


def submit(db: Path, kind: str, params: dict) -> int:
    """Validate ``params`` for ``kind`` (``CkptlabError`` for bad ones), record the job, start its worker; the id."""
    raise NotImplementedError


def get(db: Path, job_id: int) -> Job | None:
    raise NotImplementedError


def cancel(db: Path, job_id: int) -> bool:
    """Ask a running job to stop (as Ctrl-C would: no partial output). False when it is not running."""
    raise NotImplementedError
