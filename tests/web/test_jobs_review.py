"""The jobs engine after the review of issue 16: what a link or a same-origin post may start, secrets in download
URLs, a cancel that lands after the work finished, cataloguing only the outputs, catalog write errors, signals
only to our own worker, and download URLs off loopback."""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes.web import make_client
from fakes.web_fixtures import JOBS_CKPT, JOBS_LORA

import ckptlab
from ckptlab.errors import UsageError
from ckptlab.web import jobs

CKPT, LORA = JOBS_CKPT, JOBS_LORA
pytestmark = pytest.mark.usefixtures("no_stray_workers")
FINAL = ("done", "failed", "cancelled", "lost")


@pytest.fixture
def lib(jobs_library) -> Path:
    return jobs_library


@pytest.fixture
def db(lib) -> Path:
    return lib / "catalog.db"


@pytest.fixture
def rw(db):
    with make_client(db) as c:
        yield c




def rows(db: Path) -> list[tuple]:
    conn = sqlite3.connect(str(db))
    try:
        return conn.execute("SELECT id, kind, status, params FROM web_jobs ORDER BY id").fetchall()
    finally:
        conn.close()


def wait_final(db: Path, job_id: int, limit_s: float = 120) -> jobs.Job:
    """Poll until a final state (a deadline against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job = jobs.get(db, job_id)
        if job.final:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


def form_of(html: str) -> str:
    return html[html.index('<form id="job-form"'):]


def empty_plan(path: Path, db: Path) -> Path:
    from ckptlab.library.plan import SpacePlan

    path.parent.mkdir(parents=True, exist_ok=True)
    return SpacePlan(catalog=str(db)).save(path)


# ------------------------------------------------------------------------------ 1. apply-plan only from /disk


def test_apply_plan_is_not_a_form_kind(rw, db, tmp_path):
    """Before: /jobs/new/apply-plan was a form and POST /jobs kind=apply-plan ran any plan file."""
    from ckptlab.web.pages_disk import plans_dir

    reviewed = empty_plan(plans_dir(db) / "plan-x.json", db)
    assert rw.get("/jobs/new/apply-plan", params={"plan": str(reviewed)}).status_code == 404
    r = rw.post("/jobs", data={"kind": "apply-plan", "plan": str(reviewed)})
    assert r.status_code == 400
    assert "Duplicates &amp; disk" in r.text
    assert rows(db) == []
    assert "/jobs/new/apply-plan" not in rw.get("/jobs").text


def test_submit_refuses_a_plan_outside_the_plans_folder(db, tmp_path):
    """Before: any plan file that loaded was accepted. A symlink inside the folder to a plan elsewhere counts as
    elsewhere (realpath)."""
    from ckptlab.web.pages_disk import plans_dir

    outside = empty_plan(tmp_path / "elsewhere" / "plan.json", db)
    with pytest.raises(UsageError, match="reviewed on the Duplicates & disk page"):
        jobs.submit(db, "apply-plan", {"plan": str(outside)})
    link = plans_dir(db) / "plan-link.json"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    with pytest.raises(UsageError):
        jobs.submit(db, "apply-plan", {"plan": str(link)})
    sneaky = plans_dir(db) / ".." / "elsewhere.json"
    empty_plan(Path(os.path.normpath(sneaky)), db)
    with pytest.raises(UsageError):
        jobs.submit(db, "apply-plan", {"plan": str(sneaky)})
    assert rows(db) == []
    # the disk page's own place is accepted (an empty plan: the job runs and ends done)
    inside = empty_plan(plans_dir(db) / "plan-ok.json", db)
    job_id = jobs.submit(db, "apply-plan", {"plan": str(inside)})
    assert wait_final(db, job_id).status == "done"


# ------------------------------------------------------------------------------ 2. what a link may prefill


def test_links_prefill_only_input_paths(rw, lib, tmp_path):
    """Before: every field came from the query string: a link could tick overwrite/allow-suspicious and choose
    the output."""
    ckpt, lora = lib / CKPT, lib / LORA
    evil = tmp_path / "evil.safetensors"
    r = rw.get("/jobs/new/convert", params={"path": str(ckpt), "overwrite": "on", "allow_suspicious": "on",
                                            "drop_ema": "on", "out": str(evil), "out_dir": str(tmp_path)})
    form = form_of(r.text)
    assert f'name="path" value="{ckpt}"' in form
    assert not re.search(r'name="(overwrite|allow_suspicious|drop_ema)"[^>]*checked', form)
    assert str(evil) not in form and f'value="{tmp_path}"' not in form
    r = rw.get("/jobs/new/merge", params={"path": str(ckpt), "output": str(evil), "method": "add_difference",
                                          "alpha": "0.9"})
    form = form_of(r.text)
    assert f'name="model_a" value="{ckpt}"' in form and str(evil) not in form
    assert '<option value="weighted_sum" selected>' in form and 'value="0.9"' not in form
    # the model page's LoRA link: /jobs/new/lora-bake?lora=FILE fills the LoRA list
    r = rw.get("/jobs/new/lora-bake", params={"lora": str(lora), "output": str(evil)})
    form = form_of(r.text)
    assert re.search(r'<textarea id="f-loras" name="loras"[^>]*>' + re.escape(str(lora)) + "</textarea>", form)
    assert str(evil) not in form


def test_form_values_take_only_existing_input_fields():
    from ckptlab.web.job_kinds import KINDS, form_values

    for kind, spec in KINDS.items():
        if spec.internal:
            continue
        query = {f.name: "/x/given" for f in spec.fields} | {"path": "/x/given", "lora": "/x/given"}
        values = form_values(kind, query)
        for f in spec.fields:
            given = values[f.name] == "/x/given"
            # an oracle from the field definitions: inputs that must exist, never a switch or an output
            assert given == (f.type in ("path", "paths") and f.must_exist), (kind, f.name)


# ------------------------------------------------------------------------------ 3. secrets in download URLs


class _Files(http.server.BaseHTTPRequestHandler):
    body = b""
    seen: list[str] = []

    def do_HEAD(self):  # noqa: N802
        self.seen.append(self.path)
        self._head()

    def do_GET(self):  # noqa: N802
        self.seen.append(self.path)
        self._head()
        self.wfile.write(self.body)

    def _head(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def file_server(lib):
    handler = type("H", (_Files,), {"body": (lib / LORA).read_bytes(), "seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_download_token_is_neither_stored_nor_logged_nor_shown(rw, db, lib, tmp_path, file_server):
    """Before: the full URL with ?token= went into the row, the job's log and the job page."""
    server, handler = file_server
    secret = "SECRETtoken123"
    url = f"http://127.0.0.1:{server.server_address[1]}/files/my_lora.safetensors?token={secret}"
    dest = tmp_path / "dl"
    dest.mkdir()
    r = rw.post("/jobs", data={"kind": "download", "source": url, "dest": str(dest), "layout": "flat"})
    assert r.status_code == 303, r.text[:800]
    job_id = int(r.headers["location"].rsplit("/", 1)[1])
    job = wait_final(db, job_id)
    # the worker used the full URL (the server saw the token) ...
    assert any(f"token={secret}" in p for p in handler.seen), handler.seen
    assert job.status == "done", job.error
    # ... but it is nowhere the app keeps or shows
    for kind, _, _, params in [(k, i, s, p) for i, k, s, p in rows(db)]:
        assert secret not in params, kind
    assert json.loads(rows(db)[0][3])["source"] == url.split("?")[0]
    assert secret not in jobs.log_path(db, job_id).read_text()
    assert secret not in rw.get(f"/jobs/{job_id}").text
    assert secret not in rw.get("/jobs").text


# ------------------------------------------------------------------------------ 4. finished work stays done


def _insert(db: Path, *, pid: int | None, result: dict | None, cancel_requested: int = 0,
            status: str = "running") -> int:
    jobs._conn(db)  # the table exists
    conn = sqlite3.connect(str(db), isolation_level=None)
    try:
        return conn.execute("INSERT INTO web_jobs(kind, params, status, pid, result, made, cancel_requested, "
                            "created, started, heartbeat) VALUES ('convert', '{}', ?, ?, ?, '[]', ?, ?, ?, ?)",
                            (status, pid, json.dumps(result) if result is not None else None, cancel_requested,
                             time.time(), time.time(), time.time())).lastrowid
    finally:
        conn.close()


def _pretend_worker(db: Path, job_id: int) -> subprocess.Popen:
    """A process whose command line is the worker's of ``job_id`` (what ``_is_worker_of`` reads)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", str(db), str(job_id)],
                            start_new_session=True)


def test_a_worker_killed_after_its_work_returned_is_done_not_cancelled(db):
    """Before: the escalation's SIGKILL during cataloguing turned a finished job (output on disk) into
    cancelled, or lost without a cancel."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    asked = _insert(db, pid=dead.pid, result={"output": "/x.safetensors"}, cancel_requested=1)
    silent = _insert(db, pid=dead.pid, result={"output": "/y.safetensors"})
    unfinished = _insert(db, pid=dead.pid, result=None, cancel_requested=1)
    assert jobs.get(db, asked).status == "done"
    assert jobs.get(db, silent).status == "done" and jobs.get(db, silent).error is None
    assert jobs.get(db, unfinished).status == "cancelled"  # a cancel that did stop the work


def test_cancel_of_a_job_whose_work_returned_is_refused(db):
    """Before: cancel said True and signalled the worker while it catalogued the finished output."""
    job_id = _insert(db, pid=None, result={"output": "/x.safetensors"})
    proc = _pretend_worker(db, job_id)
    try:
        conn = sqlite3.connect(str(db), isolation_level=None)
        conn.execute("UPDATE web_jobs SET pid = ? WHERE id = ?", (proc.pid, job_id))
        conn.close()
        assert jobs.get(db, job_id).status == "running"
        assert jobs.cancel(db, job_id) is False
        assert proc.poll() is None  # not signalled
        job = jobs.get(db, job_id)
        assert job.status == "running" and not job.cancel_requested
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ 5. catalogue only the outputs


def test_convert_catalogues_its_output_without_walking_the_root(rw, db, lib):
    """Before: the worker re-scanned the whole root after every job (a file copied there meanwhile was
    catalogued too). The output's row is the one a scan of the root gives (same root and folder)."""
    stray = lib / "a1111/models/Lora/stray.safetensors"
    shutil.copy2(lib / LORA, stray)
    job_id = jobs.submit(db, "convert", {"path": str(lib / CKPT)})
    job = wait_final(db, job_id)
    assert job.status == "done", job.error
    out = lib / "a1111/models/Stable-diffusion/v1-5-pruned.safetensors"
    assert job.made == [str(out)]
    conn = sqlite3.connect(str(db))
    got = {r[0]: r[1:] for r in conn.execute("SELECT display, root, folder, kind FROM files WHERE status = 'present'")}
    conn.close()
    assert str(stray) not in got
    # oracle: a full scan of the root into a fresh catalog
    fresh = lib / "fresh.db"
    ckptlab.scan(lib / "a1111", db=fresh)
    conn = sqlite3.connect(str(fresh))
    want = {r[0]: r[1:] for r in conn.execute("SELECT display, root, folder, kind FROM files")}
    conn.close()
    assert got[str(out)] == want[str(out)]
    assert got[str(out)][0] == str(lib / "a1111")


def test_scanner_under_records_the_given_root(lib, tmp_path):
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan

    root = lib / "a1111"
    extra = root / "models/Lora/extra.safetensors"
    shutil.copy2(lib / LORA, extra)
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        summary = scan([extra], cat, under=root)
    assert summary.files == 1
    conn = sqlite3.connect(str(db))
    (row,) = conn.execute("SELECT display, root, folder FROM files").fetchall()
    conn.close()
    assert row == (str(extra), str(root), "Lora")


# ------------------------------------------------------------------------------ 6. catalog write errors


def test_a_busy_catalog_is_a_catalog_write_error_and_leaves_no_open_transaction(db):
    """Before: a raw sqlite3.OperationalError (a 500), and a failed COMMIT left the connection in a transaction."""
    from ckptlab.errors import CatalogWriteError

    job_id = _insert(db, pid=None, result=None, status="queued")
    conn = jobs._conn(db)  # this thread's connection, the one the app's writes use
    conn.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CatalogWriteError):
            jobs.cancel(db, job_id)
        assert not conn.in_transaction
    finally:
        other.execute("ROLLBACK")
        other.close()
        conn.execute("PRAGMA busy_timeout = 30000")
    assert jobs.cancel(db, job_id) is True  # the connection works again
    assert jobs.get(db, job_id).status == "cancelled"


# ------------------------------------------------------------------------------ 7. signal only our worker


def test_signal_skips_a_process_that_is_not_the_worker(db):
    """Before: any live pid got the job's signals (a pid reused during the grace period)."""
    job_id = _insert(db, pid=None, result=None)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    mine = _pretend_worker(db, job_id)
    try:
        assert jobs._signal(db, job_id, other.pid, signal.SIGTERM) is False
        assert other.poll() is None
        assert jobs._signal(db, job_id, mine.pid, signal.SIGTERM) is True
        assert mine.wait(timeout=30) == -signal.SIGTERM
    finally:
        for p in (other, mine):
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------ 8. downloads off loopback


def test_off_loopback_downloads_from_internal_addresses_are_refused(db, tmp_path):
    token = "t0ken-for-tests"
    with make_client(db, host="192.0.2.10", token=token) as c:
        c.headers["authorization"] = f"Bearer {token}"
        for url in ("http://127.0.0.1:9/x.safetensors", "http://localhost/x.safetensors",
                    "http://10.1.2.3/x.safetensors", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/x.safetensors"):
            r = c.post("/jobs", data={"kind": "download", "source": url, "dest": str(tmp_path)})
            assert r.status_code == 400, (url, r.text[:300])
            assert "local network" in r.text
    assert rows(db) == []
