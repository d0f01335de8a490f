"""Many writers on one PostgreSQL catalog: scans in separate processes (different roots at once, the same root
waiting for the other), threads writing hashes, per-root scan locks. Every row once, no error. The oracle: the
files on disk and plain Python over the rows."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from conftest import SRC
from fakes.library_files import a1111_library, tensors, write_st

from ckptlab.hashes import Hashes
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan_lock

pytestmark = pytest.mark.xdist_group("test_pg_concurrency")  # one module per worker: its module fixtures built once


def _scan_proc(root, url):
    import os

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "ckptlab", "scan", str(root), "--hash", "--json", "--db", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _two_libraries(tmp_path):
    a = a1111_library(tmp_path / "a")
    b = a1111_library(tmp_path / "b")
    for i in range(6):  # a few more files each, so that the two scans overlap in time
        a[f"x{i}"] = write_st(tmp_path / "a" / "models" / "Lora" / f"extra{i}.safetensors", tensors("sd1_vae", seed=10 + i))
        b[f"x{i}"] = write_st(tmp_path / "b" / "models" / "Lora" / f"extra{i}.safetensors", tensors("sd1_vae", seed=30 + i))
    return a, b


def _rows(url):
    with Catalog(url) as c:
        return [(r.path, r.status, r.sha256) for r in c.files(status=None, sort="path")]


@pytest.mark.parametrize("same_root", [False, True], ids=["different-roots", "same-root"])
def test_two_scan_processes_at_once(tmp_path, pg_url, same_root):
    a, b = _two_libraries(tmp_path)
    roots = (tmp_path / "a", tmp_path / "a") if same_root else (tmp_path / "a", tmp_path / "b")
    procs = [_scan_proc(r, pg_url) for r in roots]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    want = sorted(str(p) for p in (*a.values(), *(() if same_root else b.values())))
    rows = _rows(pg_url)
    assert [r[0] for r in rows] == want  # every file once
    assert all(r[1] == "present" and r[2] for r in rows)
    summaries = [json.loads(o) for o, _ in outs]
    if same_root:  # the second scan waited, then found the first one's work done: nothing is new twice
        assert sorted(s["new"] for s in summaries) == [0, len(a)]
    else:
        assert [s["new"] for s in summaries] == [len(a), len(b)]


def test_threads_writing_hashes_at_once(pg_url):
    n_threads, per_thread = 8, 40
    errors: list = []
    Catalog(pg_url).close()

    def work(t: int) -> None:
        try:
            with Catalog(pg_url) as c:
                for i in range(per_thread):
                    key = (1, i, 1000 + i, 7)  # every thread writes the same keys (upserts on one row each)...
                    h = Hashes(sha256=f"{i:064X}", autov1=None, autov2=None, autov3=None, crc32=None, blake3=None,
                               size=1000 + i)
                    with c.transaction():
                        c.put_hashes(key, h)
                        c.put_hashes((2, t, i, 7), h)  # ...and keys of its own
        except Exception as e:  # noqa: BLE001 - collected, the assertion below shows them
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert errors == []
    with Catalog(pg_url) as c:
        shared = c.conn.execute("SELECT ino, sha256 FROM content WHERE dev = 1 ORDER BY ino").fetchall()
        own = c.conn.execute("SELECT count(*) FROM content WHERE dev = 2").fetchone()[0]
    assert shared == [(i, f"{i:064X}") for i in range(per_thread)]
    assert own == n_threads * per_thread


def test_scan_lock_per_root(pg_url):
    """The same root waits (``on_wait`` is called, then it gets the lock once the holder lets go); another root
    does not wait at all."""
    with Catalog(pg_url) as holder, Catalog(pg_url) as other:
        waited = threading.Event()
        got = threading.Event()
        with scan_lock(holder, roots=["/lib/a", "s3://bucket/x/"]):
            with scan_lock(other, on_wait=lambda: pytest.fail("a different root waited"), roots=["/lib/b"]):
                pass

            def same():
                with Catalog(pg_url) as third, scan_lock(third, on_wait=waited.set, roots=["s3://bucket/x/"]):
                    got.set()

            th = threading.Thread(target=same)
            th.start()
            assert waited.wait(60)
            assert not got.is_set()  # it is waiting for the holder
        th.join(60)
        assert got.is_set()


def test_sqlite_scan_lock_ignores_roots(tmp_path):
    with Catalog(tmp_path / "c.db") as c, scan_lock(c, roots=["/x"]):
        assert (tmp_path / "c.db.scan-lock").exists()
