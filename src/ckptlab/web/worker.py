"""One job's process: ``python -m ckptlab.web.worker DB JOB_ID`` (started by ``ckptlab.web.jobs.submit``).

It reads the job's row, marks it ``running``, calls the public API with a ``progress=`` callback, and writes the
end: ``done`` with the result (``jsonable.to_jsonable``) and the files made, ``failed`` with the one-line message
of a ``CkptlabError`` (anything else: "internal error: ..." with the traceback in the job's log), or
``cancelled`` when SIGINT (``jobs.cancel``, the CLI's Ctrl-C path: atomic writers remove their temporary file)
or SIGTERM interrupted it. A thread writes the progress to the row at most ``WRITES_PER_S`` times a second, and a
heartbeat every ``jobs.HEARTBEAT_S`` while the work is silent. After a job that wrote files under a catalogued
root, a scan of just those files (recorded under that root) lets the library show them. The result is written
before that: from then on the job can only end ``done``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

WRITES_PER_S = 5


class Reporter:
    """The ``progress`` callback: keeps done/total/description in memory; ``Beat`` writes them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.done = 0
        self.total: int | None = None
        self.description: str | None = None
        self.version = 0

    def __call__(self, advance: int = 0, *, total: int | None = None, description: str | None = None) -> None:
        with self.lock:
            if total is not None:
                self.total = int(total)
            if description is not None:
                self.description = str(description)[:300]
            if advance:
                self.done += int(advance)
            self.version += 1

    def reset(self, description: str) -> None:
        with self.lock:
            self.done, self.total, self.description = 0, None, description
            self.version += 1

    def snapshot(self) -> tuple[int, int, int | None, str | None]:
        with self.lock:
            return self.version, self.done, self.total, self.description


class Beat(threading.Thread):
    """Writes the reporter's state (when it changed; at most WRITES_PER_S a second) and the heartbeat."""

    def __init__(self, db: Path, job_id: int, reporter: Reporter):
        super().__init__(name="job-heartbeat", daemon=True)
        self.db, self.job_id, self.reporter = db, job_id, reporter
        self.stopping = threading.Event()

    def run(self) -> None:
        import sqlite3

        from ckptlab.library.catalog import raw_connection
        from ckptlab.web.jobs import HEARTBEAT_S

        try:
            conn = raw_connection(self.db, 30)
        except sqlite3.Error:
            return
        try:
            seen, last_write = -1, 0.0
            while not self.stopping.wait(1 / WRITES_PER_S):
                version, done, total, desc = self.reporter.snapshot()
                now = time.time()
                if version == seen and now - last_write < HEARTBEAT_S:
                    continue
                try:
                    conn.execute("UPDATE web_jobs SET done = ?, total = ?, description = ?, heartbeat = ? "
                                 "WHERE id = ? AND status = 'running'", (done, total, desc, now, self.job_id))
                except sqlite3.Error:
                    continue  # busy: the next beat tries again
                seen, last_write = version, now
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=5)


def _interrupt(signum, frame):  # SIGTERM: the same clean-up path as Ctrl-C
    raise KeyboardInterrupt


def _catalogue(db: Path, made: list[str], reporter: Reporter) -> list[str]:
    """Catalogue the files ``made`` that lie under a catalogued root, as a scan of that root would (same root and
    folder), reading only those files: never a walk of the whole root. The roots they went into."""

    from ckptlab.library.catalog import raw_connection
    from ckptlab.library.scanner import scan
    from ckptlab.web.jobs import open_catalog

    conn = raw_connection(db, 30)
    try:
        roots = [r for (r,) in conn.execute("SELECT DISTINCT root FROM files WHERE root IS NOT NULL")]
    finally:
        conn.close()
    chosen: dict[str, list[str]] = {}
    for p in made:
        under = [r for r in roots if os.path.commonpath([os.path.abspath(r), p]) == os.path.abspath(r)]
        if under:
            chosen.setdefault(max(under, key=len), []).append(p)
    cat = open_catalog(db)
    try:
        for root in sorted(chosen):
            reporter.reset(f"cataloguing {len(chosen[root])} file(s) in {Path(root).name}")
            scan(chosen[root], cat, under=root, progress=reporter)
    finally:
        cat.close()
    return sorted(chosen)


def run(db: Path, job_id: int) -> int:
    from ckptlab.errors import CkptlabError
    from ckptlab.jsonable import to_jsonable
    from ckptlab.web.job_kinds import KINDS, made_paths
    from ckptlab.web.jobs import open_catalog

    signal.signal(signal.SIGTERM, _interrupt)
    cat = open_catalog(db)
    conn = cat.conn

    def end(status: str, **cols) -> None:
        sets = ", ".join(f"{k} = ?" for k in cols)
        sql = f"UPDATE web_jobs SET status = ?, finished = ?{', ' + sets if sets else ''} WHERE id = ?"
        conn.execute(sql, (status, time.time(), *cols.values(), job_id))

    row = conn.execute("SELECT kind, params, status, cancel_requested FROM web_jobs WHERE id = ?",
                       (job_id,)).fetchone()
    if row is None:
        print(f"ckptlab worker: no job {job_id} in {db}", file=sys.stderr)
        return 2
    kind, params, status, cancel_requested = row
    if status != "queued":
        print(f"ckptlab worker: job {job_id} is {status}, not queued", file=sys.stderr)
        return 2
    if cancel_requested:
        end("cancelled")
        return 130
    conn.execute("UPDATE web_jobs SET status = 'running', pid = ?, started = ?, heartbeat = ? WHERE id = ?",
                 (os.getpid(), time.time(), time.time(), job_id))
    params = json.loads(params)
    shown = json.dumps(params)  # the stored params: a download URL's secrets are not in them
    params = _with_secret(kind, params)
    reporter = Reporter()
    beat = Beat(db, job_id, reporter)
    beat.start()
    spec = KINDS.get(kind)
    returned = False
    try:
        if spec is None:
            raise CkptlabError(f"unknown job kind {kind!r}")
        print(f"ckptlab worker: job {job_id} {kind} {shown}", flush=True)
        result = spec.run(params, db, reporter)
        returned = True
        _ignore_signals()  # the work is done: record it, whatever comes now
    except KeyboardInterrupt:
        if not returned:
            beat.stop()
            end("cancelled", error=None)
            cat.close()
            return 130
        _ignore_signals()  # SIGINT landed between the work's return and the line above: it is done all the same
    except CkptlabError as e:
        beat.stop()
        end("failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        cat.close()
        return getattr(e, "exit_code", 1)
    except Exception as e:  # noqa: BLE001 - the job's end must be written whatever happened
        beat.stop()
        traceback.print_exc()
        end("failed", error=f"internal error: {type(e).__name__}: {str(e)[:300]} (see the job's log)")
        cat.close()
        return 70
    try:
        version, done, total, desc = reporter.snapshot()
        made = made_paths(result)
        payload = to_jsonable(result)
        if not isinstance(payload, dict):
            payload = {"items": payload}
        total = total or done or None  # finished: all of it was done, whether or not the work said how much
        # the result first (from now on a cancel or a dead worker cannot make the job anything but done), then
        # the catalogue, then done
        conn.execute("UPDATE web_jobs SET result = ?, made = ?, done = ?, total = ?, description = ? WHERE id = ?",
                     (json.dumps(payload), json.dumps(made), total or 0, total, desc, job_id))
        scanned: list[str] = []
        if spec.writes and spec.catalogue and made:
            try:
                scanned = _catalogue(db, made, reporter)
            except CkptlabError as e:  # the job itself succeeded: say so, with the catalogue's trouble
                print(f"ckptlab worker: cataloguing the outputs failed: {e}", file=sys.stderr)
        beat.stop()
        if scanned:
            payload.setdefault("catalogued_roots", scanned)
        end("done", result=json.dumps(payload), made=json.dumps(made), done=total or 0, total=total,
            description=desc)
        return 0
    finally:
        cat.close()


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _with_secret(kind: str, params: dict) -> dict:
    """A download's full source URL from the environment ``jobs.submit`` gave this worker (the row holds it
    redacted), when it is the one the row's redacted URL stands for."""
    from ckptlab.web.jobs import SECRET_ENV

    secret = os.environ.pop(SECRET_ENV, None)
    if kind != "download" or not secret or not isinstance(params.get("source"), str):
        return params
    from ckptlab.hub.http import redact

    if redact(secret) != params["source"]:
        return params
    return {**params, "source": secret}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m ckptlab.web.worker CATALOG JOB_ID", file=sys.stderr)
        return 2
    return run(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
