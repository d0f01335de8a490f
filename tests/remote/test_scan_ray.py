"""``scan s3://... --ray ADDRESS`` on a real local Ray cluster (``tests/fakes/ray_cluster.py``, two workers): the
rows equal a local scan's of the same files, and a worker SIGKILLed while it runs a task costs nothing: Ray
re-runs the task and every object still has exactly one row."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import SRC, run_cli
from fakes.remote_library import build_library, rows

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    return build_library(root / "lib", root / "canary")


def _local(lib, db, **kw):
    with Catalog(db) as cat:
        scan([lib], cat, workers=1, **kw)
    return rows(db, strip=str(lib))


def test_ray_scan_rows_equal_the_local_scan(ray_cluster, s3, library, tmp_path):
    s3.put_tree("lib", library)
    local = _local(library, tmp_path / "local.db", hash=True, fingerprint=True)
    r = run_cli("scan", "--json", "--hash", "--fingerprint", "--ray", ray_cluster.address, "--db",
                tmp_path / "r.db", s3.url("lib"), env=s3.server.env, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    remote = rows(tmp_path / "r.db", strip=s3.url("lib"))
    assert remote == local
    assert s["new"] == len(local) and s["status"] == "complete"


def test_killed_worker_still_gives_every_row_once(ray_cluster, s3_server, s3, library, tmp_path):
    from fakes.s3_proxy import S3Proxy

    s3.put_tree("lib", library)
    local = _local(library, tmp_path / "local.db")
    proxy = S3Proxy(s3_server.endpoint, delay_gets=0.05)  # tasks last seconds: time to catch one running
    env = {**os.environ, **proxy.env(s3_server.env), "PYTHONPATH": str(SRC)}
    db = tmp_path / "r.db"
    proc = subprocess.Popen([sys.executable, "-m", "ckptlab", "scan", "--json", "--ray", ray_cluster.address,
                             "--db", str(db), s3.url("lib")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            busy = ray_cluster.task_workers("read_task")
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed = busy[0]
            time.sleep(0.05)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert killed is not None, "no worker was seen running a task"
    assert proc.returncode == 0, err
    s = json.loads(out.strip().splitlines()[-1])
    con = sqlite3.connect(db)
    paths = [bytes(p) for (p,) in con.execute("SELECT path FROM files")]
    assert len(paths) == len(set(paths)) == len(local)  # every object once
    assert rows(db, strip=s3.url("lib")) == local
    # without the re-run the killed task's objects would carry "task failed: ... WorkerCrashedError" rows and
    # differ from the oracle above; with it, every object was written once, as new
    assert s["new"] == len(local) and s["errors"] == sum(1 for r in local.values() if r["error"])
