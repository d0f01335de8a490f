"""Long work started from the app: one worker process per job (``python -m ckptlab.web.worker DB ID``), outside
the server's event loop and GIL, its state a row of the catalog's ``web_jobs`` table, so a page reload, a second
tab, the CLI or a restarted server all see the same jobs.

A job's life: ``submit`` validates the parameters (the kind's own checks and, for transforms, the API's dry run:
its one-line errors come back as ``CkptlabError``), refuses a second active job writing the same output, records
the row (``queued``) and starts the worker; the worker marks it ``running``, calls the public API with a
``progress=`` callback (done/total/description written to the row a few times a second, with a heartbeat), then
``done`` with the result, ``failed`` with the one-line error, or ``cancelled``. ``cancel`` sends SIGINT, as Ctrl-C
does in the CLI (atomic writers remove their temporary file), then SIGTERM and SIGKILL after a grace period. A
worker that died without saying so (its process gone, or its heartbeat stale) is ``lost``: decided when jobs are
read, never by a rescan at server start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, UsageError
from ckptlab.library.catalog import Catalog, catalog_location, register_migrations

COMPONENT = "web_jobs"
MIGRATIONS = ["""
    CREATE TABLE web_jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        pid INTEGER,
        done INTEGER NOT NULL DEFAULT 0,
        total INTEGER,
        description TEXT,
        result TEXT,
        error TEXT,
        outputs TEXT NOT NULL DEFAULT '[]',
        made TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        heartbeat REAL
    );
    CREATE INDEX web_jobs_status ON web_jobs(status);
    """]
register_migrations(COMPONENT, MIGRATIONS)

STATUSES = ("queued", "running", "done", "failed", "cancelled", "lost")
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled", "lost")

#: a running worker writes its heartbeat every HEARTBEAT_S; one silent for HEARTBEAT_STALE_S is lost
HEARTBEAT_S = 2.0
HEARTBEAT_STALE_S = 60.0
#: a queued job whose worker never said it started after this long is lost
START_TIMEOUT_S = 60.0
#: after SIGINT, how long a worker has to clean up before SIGTERM, then SIGKILL
CANCEL_GRACE_S = 10.0
KILL_GRACE_S = 5.0


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
    pid: int | None = None
    #: the outputs the job will write (planned at submit: one active job per output)
    outputs: list[str] = field(default_factory=list)
    #: the files it made (written by the worker when done)
    made: list[str] = field(default_factory=list)
    heartbeat: float | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def work_finished(self) -> bool:
        """The work itself returned (its result recorded): what follows (cataloguing the outputs) cannot undo it,
        so neither a cancel nor a worker dying then turns the job into anything but ``done``."""
        return self.result is not None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))

    def state(self) -> dict:
        """What the events stream sends: status and progress."""
        return {"id": self.id, "status": self.status, "done": self.done, "total": self.total,
                "description": self.description, "error": self.error}


_COLUMNS = ("id, kind, params, status, pid, done, total, description, result, error, outputs, made, "
            "cancel_requested, created, started, finished, heartbeat")


def _job(row) -> Job:
    (id_, kind, params, status, pid, done, total, desc, result, error, outputs, made, cancel_req, created,
     started, finished, heartbeat) = row
    return Job(id=id_, kind=kind, params=json.loads(params), status=status, done=done or 0, total=total,
               description=desc, result=json.loads(result) if result else None, error=error, created=created,
               started=started, finished=finished, pid=pid, outputs=json.loads(outputs or "[]"),
               made=json.loads(made or "[]"), heartbeat=heartbeat, cancel_requested=bool(cancel_req))


# ----------------------------------------------------------------------------------------------- connections

_local = threading.local()


def _cat(db: Path) -> Catalog:
    """This thread's catalog ``db`` (the web app's per-thread catalogs; the table is migrated on open because
    this module registers it)."""
    from ckptlab.web.deps import catalog_at

    return catalog_at(Path(db))


def _conn(db: Path):
    return _cat(db).conn


def _write(cat: Catalog, sql: str, args: tuple = ()) -> int:
    """One statement in its own transaction (``Catalog.transaction``: a busy or read-only catalog is a
    ``CatalogWriteError``, and a failed write or commit is rolled back, never left open on the connection)."""
    with cat.transaction() as conn:
        return conn.execute(sql, args).rowcount


# ----------------------------------------------------------------------------------------------- processes

#: workers this server process started (reaped on every read, so a finished one does not linger as a zombie
#: that ``kill(pid, 0)`` would still find)
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


def _reap() -> None:
    with _children_lock:
        for pid, proc in list(_children.items()):
            if proc.poll() is not None:
                del _children[pid]


def _alive(pid: int | None) -> bool:
    """The process ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    _reap()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the number
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] != b"Z"
    except OSError:
        return True  # no /proc (macOS): kill(pid, 0) said it is there


def worker_argv(db: Path, job_id: int) -> list[str]:
    """The command line of a job's worker."""
    return [sys.executable, "-m", "ckptlab.web.worker", str(db), str(job_id)]


def log_dir(db: Path) -> Path:
    """Where job logs go: ``<catalog>.jobs/`` beside the catalog."""
    from ckptlab.library.catalog import side_path

    return side_path(db, ".jobs")


def log_path(db: Path, job_id: int) -> Path:
    return log_dir(db) / f"job-{job_id}.log"


def _start_worker(db: Path, job_id: int, secret: str | None = None) -> int:
    import ckptlab

    logs = log_dir(db)
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    # the worker imports this same ckptlab (a source checkout included)
    src = str(Path(ckptlab.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop(SECRET_ENV, None)
    if getattr(db, "password", None):  # a PostgreSQL URL's password goes by environment, never on the command line
        env["PGPASSWORD"] = db.password
    if secret is not None:
        env[SECRET_ENV] = secret
    with open(log_path(db, job_id), "ab") as log:
        proc = subprocess.Popen(worker_argv(db, job_id), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=str(logs.parent), env=env,
                                start_new_session=True, close_fds=True)
    with _children_lock:
        _children[proc.pid] = proc
    return proc.pid


# ----------------------------------------------------------------------------------------------- the contract


def submit(db: Path, kind: str, params: dict) -> int:
    """Validate ``params`` for ``kind`` (``CkptlabError`` for bad ones), record the job, start its worker; the id.

    ``params`` are the kind's form fields (``ckptlab.web.job_kinds``), as strings from a form or as Python values;
    the main input is ``path`` (``plan`` for ``apply-plan``). A second job while another active one writes the
    same output is refused (``UsageError``)."""
    from ckptlab.web.job_kinds import prepare

    db = catalog_location(db)  # a Path, or a postgresql:// URL kept whole
    clean, outputs = prepare(db, kind, params)
    clean, secret = _without_secrets(kind, clean)
    cat = _cat(db)
    now = time.time()
    with cat.transaction() as conn:
        _refresh_active(conn, db)
        mine = {os.path.abspath(o) for o in outputs}
        for jid, jkind, jout in conn.execute("SELECT id, kind, outputs FROM web_jobs WHERE status IN "
                                             "('queued', 'running')"):
            theirs = {os.path.abspath(o) for o in json.loads(jout or "[]")}
            clash = sorted(mine & theirs)
            if clash:
                raise UsageError(f"job {jid} ({jkind}) is already writing {clash[0]}; wait for it or cancel it")
            if kind == "apply-plan" and jkind == "apply-plan":
                raise UsageError(f"job {jid} is already applying a plan; wait for it or cancel it")
        job_id = conn.execute("INSERT INTO web_jobs(kind, params, status, outputs, created) "
                              "VALUES (?, ?, 'queued', ?, ?)",
                              (kind, json.dumps(clean), json.dumps(sorted(mine)), now)).lastrowid
    try:
        pid = _start_worker(db, job_id, secret)
    except OSError as e:
        _write(cat, "UPDATE web_jobs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
               (f"cannot start the worker: {e.strerror or e}", time.time(), job_id))
        return job_id
    _write(cat, "UPDATE web_jobs SET pid = ? WHERE id = ? AND pid IS NULL", (pid, job_id))
    return job_id


#: the environment variable that hands a download's full source URL (its query string's token included) to the
#: worker; the row, the log and the page keep the redacted URL
SECRET_ENV = "CKPTLAB_JOB_SOURCE"


def _without_secrets(kind: str, params: dict) -> tuple[dict, str | None]:
    """``params`` as stored and shown: a URL ``source`` without its query string (``?token=...``) or userinfo
    (``hub.http.redact``), and the full URL when it differed (handed to the worker in its environment only)."""
    source = params.get("source")
    if kind != "download" or not isinstance(source, str) or "://" not in source:
        return params, None
    from ckptlab.hub.http import redact

    safe = redact(source)
    if safe == source:
        return params, None
    return {**params, "source": safe}, source


def _is_worker_of(pid: int, db: Path, job_id: int) -> bool | None:
    """Whether process ``pid`` is the worker of job ``job_id`` of ``db`` (its command line ends with them); None
    where the command line cannot be read (no /proc)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not args:  # mid-exec (the arguments are set up after the exec that let Popen return) or exiting
        return None
    if len(args) < 2 or args[-1] != str(job_id):
        return False
    try:
        return os.path.abspath(args[-2]) == os.path.abspath(db) or os.path.samefile(args[-2], db)
    except OSError:
        return False


def _lost(db: Path, job: Job, now: float) -> bool:
    """A queued/running job whose worker is gone (or silent, where the process cannot be identified)."""
    if job.pid is None:
        return now - job.created > START_TIMEOUT_S
    if not _alive(job.pid):
        return True
    mine = _is_worker_of(job.pid, db, job.id)
    if mine is not None:  # Linux: the process is known for sure; a busy catalog delaying heartbeats is no death
        return not mine
    beat = job.heartbeat or job.started or job.created
    return now - beat > HEARTBEAT_STALE_S


def _gone_status(job: Job) -> tuple[str, str | None]:
    """What a job whose worker died without writing its end is: done when its work had returned (only the
    cataloguing of the outputs was cut short), cancelled when a cancel was asked, else lost."""
    if job.work_finished:
        return "done", None
    if job.cancel_requested:
        return "cancelled", None
    return "lost", "the worker process ended without reporting (killed, or crashed)"


def _settle(cat: Catalog, db: Path, job: Job) -> Job:
    """Mark ``job`` lost (or cancelled, when a cancel was asked; done, when its work had finished) if its worker
    died without saying so."""
    if not job.active or not _lost(db, job, time.time()):
        return job
    status, error = _gone_status(job)
    conn = cat.conn
    changed = _write(cat, "UPDATE web_jobs SET status = ?, error = COALESCE(error, ?), finished = ? "
                           "WHERE id = ? AND status IN ('queued', 'running')", (status, error, time.time(), job.id))
    if changed:
        job.status, job.error, job.finished = status, job.error or error, time.time()
        return job
    row = conn.execute(f"SELECT {_COLUMNS} FROM web_jobs WHERE id = ?", (job.id,)).fetchone()
    return _job(row) if row else job


def _refresh_active(conn, db: Path) -> None:
    """Inside a write transaction: settle every active job (for the one-output rule)."""
    now = time.time()
    for row in conn.execute(f"SELECT {_COLUMNS} FROM web_jobs WHERE status IN ('queued', 'running')").fetchall():
        job = _job(row)
        if _lost(db, job, now):
            status, error = _gone_status(job)
            conn.execute("UPDATE web_jobs SET status = ?, error = COALESCE(error, ?), finished = ? WHERE id = ?",
                         (status, error, now, job.id))


def get(db: Path, job_id: int) -> Job | None:
    """The job ``job_id`` (None if there is none), its worker checked if it is still active."""
    cat = _cat(Path(db))
    row = cat.conn.execute(f"SELECT {_COLUMNS} FROM web_jobs WHERE id = ?", (job_id,)).fetchone()
    return _settle(cat, Path(db), _job(row)) if row else None


def list_jobs(db: Path, *, limit: int = 100, offset: int = 0, status: str | None = None) -> list[Job]:
    """Jobs newest first (active ones checked as in ``get``)."""
    cat = _cat(Path(db))
    where, args = ("WHERE status = ?", (status,)) if status else ("", ())
    rows = cat.conn.execute(f"SELECT {_COLUMNS} FROM web_jobs {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                            (*args, limit, offset)).fetchall()
    return [_settle(cat, Path(db), _job(r)) for r in rows]


def count_jobs(db: Path) -> int:
    return _conn(Path(db)).execute("SELECT COUNT(*) FROM web_jobs").fetchone()[0]


def cancel(db: Path, job_id: int) -> bool:
    """Ask a running job to stop (as Ctrl-C would: no partial output). False when it is not running.

    SIGINT goes to the worker's process group at once (the worker and any processes it started, as Ctrl-C in a
    terminal); a background thread sends SIGTERM after ``CANCEL_GRACE_S`` and SIGKILL after ``KILL_GRACE_S``
    more if it is still there, and marks the row ``cancelled`` if the worker could not. False too when the work
    has already finished (only its outputs' cataloguing is left): the job ends ``done``, its output kept."""
    db = Path(db)
    cat = _cat(db)
    job = get(db, job_id)
    if job is None or not job.active or job.work_finished:
        return False
    changed = _write(cat, "UPDATE web_jobs SET cancel_requested = 1 WHERE id = ? AND result IS NULL "
                          "AND status IN ('queued', 'running')", (job_id,))
    if not changed:  # finished meanwhile
        return False
    if job.pid is None:  # its worker has not started: nothing to signal
        _write(cat, "UPDATE web_jobs SET status = 'cancelled', finished = ? WHERE id = ? AND status = 'queued'",
               (time.time(), job_id))
        return True
    pid = job.pid
    if not _signal(db, job_id, pid, signal.SIGINT):
        get(db, job_id)  # gone already: settle it now
        return True
    threading.Thread(target=_escalate, args=(db, job_id, pid), name=f"cancel-job-{job_id}", daemon=True).start()
    return True


def _signal(db: Path, job_id: int, pid: int, sig: int) -> bool:
    """Send ``sig`` to the worker's process group (its session leader is the worker); False if it is gone, or
    if the number now belongs to another process (checked each time: a pid reused during the grace period must
    not have its process group signalled)."""
    if not _alive(pid) or _is_worker_of(pid, db, job_id) is False:
        return False
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        try:
            os.kill(pid, sig)
        except OSError:
            return False
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _work_finished(db: Path, job_id: int) -> bool:
    """The job's work has returned (its result is recorded): no more signals for it."""
    try:
        row = _conn(db).execute("SELECT result FROM web_jobs WHERE id = ?", (job_id,)).fetchone()
    except Exception:  # noqa: BLE001 - a background thread: when in doubt, go on escalating
        return False
    return bool(row and row[0] is not None)


def _escalate(db: Path, job_id: int, pid: int) -> None:
    if not _wait_gone(pid, CANCEL_GRACE_S) and not _work_finished(db, job_id):
        _signal(db, job_id, pid, signal.SIGTERM)
        if not _wait_gone(pid, KILL_GRACE_S) and not _work_finished(db, job_id):
            _signal(db, job_id, pid, signal.SIGKILL)
            _wait_gone(pid, KILL_GRACE_S)
    try:
        get(db, job_id)  # a worker killed before it could write its end: settled as cancelled
    except CkptlabError:
        pass
    except Exception:  # noqa: BLE001 - a background thread: never raise into nowhere
        pass


def file_ids(db: Path, paths: list[str]) -> dict[str, int]:
    """path -> catalog file id, for the ``paths`` the catalog holds as present files."""
    from ckptlab.library.catalog import path_key

    conn = _conn(Path(db))
    out: dict[str, int] = {}
    for p in paths:
        row = conn.execute("SELECT id FROM files WHERE path = ? AND status = 'present'", (path_key(p),)).fetchone()
        if row:
            out[p] = row[0]
    return out


def open_catalog(db: Path) -> Catalog:
    """A new connection of its own (the worker's), the jobs table migrated."""
    return Catalog(db, must_exist=True)
