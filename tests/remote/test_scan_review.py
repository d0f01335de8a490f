"""Review fixes of the distributed scan (library/remote_scan.py): a crafted object cannot wipe its neighbours'
verdicts, nested prefixes scanned at once do not mark each other's objects missing, Ray workers get only the
variables they need, a failing diffusers probe is that folder's error (not a split pipeline)."""

from __future__ import annotations

import sqlite3
import struct

from fakes.remote_library import rows

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan


def _crafted_header(n: int) -> bytes:
    """A safetensors file whose 8-byte header length is ``n`` (the digits of 503 inside it)."""
    return struct.pack("<Q", n) + b'{"__metadata__":{}}' + b"\0" * 64


def _local_facts(tmp_path, name: str, data: bytes) -> dict:
    """A local scan of the same bytes: the oracle for the crafted object's row."""
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / name).write_bytes(data)
    with Catalog(tmp_path / "local.db") as cat:
        scan([folder], cat, workers=1)
    return rows(tmp_path / "local.db", strip=str(folder))[name]


def test_crafted_header_length_does_not_wipe_neighbours_verdicts(s3, tmp_path):
    """The reviewer's reproduction: scan 1 with hostile pickles; a neighbouring ``x.safetensors`` whose header
    length is 150300000000 ("503" in the error text) is uploaded; scan 2 with ``--hash`` (every unchanged object
    in the task for its hashes). The malicious rows keep their verdicts and the summary counts them; the crafted
    object's row is the local scan's; no task-wide network error."""
    from hostile.corpus import build_hostile

    folder = tmp_path / "h"
    cases = build_hostile(folder, tmp_path / "canary")
    s3.put_tree("h", folder)
    db = tmp_path / "r.db"
    with Catalog(db) as cat:
        first = scan([s3.url("h")], cat)
    before = rows(db, strip=s3.url("h"))
    malicious = {k for k, r in before.items() if r["safety"] == "malicious"}
    assert malicious and first.malicious == len(malicious)
    assert all(not (tmp_path / "canary" / c.name).exists() for c in cases)

    crafted = _crafted_header(150300000000)
    assert b"503" in str(150300000000).encode()
    s3.put("h/x.safetensors", crafted)
    with Catalog(db) as cat:
        second = scan([s3.url("h")], cat, hash=True)
    after = rows(db, strip=s3.url("h"))
    for k in before:
        for col in ("format", "family", "safety", "safety_detail", "kind"):
            assert after[k][col] == before[k][col], (k, col)
    assert {k for k, r in after.items() if r["safety"] == "malicious"} == malicious
    assert second.malicious == len(malicious)
    local = _local_facts(tmp_path, "x.safetensors", crafted)
    assert local["error"] and "150300000000" in local["error"]
    got = after["x.safetensors"]
    assert {c: got[c] for c in ("format", "kind", "safety", "error")} == \
        {c: local[c] for c in ("format", "kind", "safety", "error")}
    assert not any("throttl" in (e["error"] or "").lower() or "task failed" in (e["error"] or "")
                   for e in second.error_list), second.error_list


def test_is_throttle_reads_types_and_statuses_not_text():
    from ckptlab.errors import FormatError, HTTPStatusError, NetworkError
    from ckptlab.library.remote_scan import is_throttle

    assert not is_throttle(FormatError("safetensors header length 150300000000 exceeds the limit (429)"))
    assert not is_throttle(NetworkError("503 SlowDown 429 TooManyRequests"))  # text alone: no
    assert is_throttle(HTTPStatusError("busy", 503)) and is_throttle(HTTPStatusError("slow", 429))
    assert not is_throttle(HTTPStatusError("gone", 404))
    retry = NetworkError("x")
    retry.retryable = True
    assert is_throttle(retry)

    class ClientError(Exception):  # botocore's shape: the code and status on ``response``
        def __init__(self, code, status):
            super().__init__("An error occurred")
            self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}

    assert is_throttle(ClientError("SlowDown", 503)) and is_throttle(ClientError("Other", 429))
    assert not is_throttle(ClientError("NoSuchKey", 404))
    wrapped = OSError("translated")
    wrapped.__cause__ = ClientError("SlowDown", 503)
    assert is_throttle(wrapped)


def test_worker_env_is_an_allow_list(monkeypatch):
    from ckptlab.library.remote_scan import worker_env

    keep = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_SECRET_ACCESS_KEY": "s", "FSSPEC_S3_ANON": "0",
            "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "AZURE_STORAGE_ACCOUNT": "a",
            "CKPTLAB_REMOTE_STAGE": "1", "CKPTLAB_REMOTE_MAX_TRIES": "3", "CKPTLAB_DIRECT_IO": "1"}
    drop = {"CKPTLAB_TOKEN": "secret-token", "CKPTLAB_DB": "postgresql://u:pw@h/db", "CKPTLAB_HOME": "/x",
            "HOME_SECRET": "z", "CKPTLAB_CIVITAI_TOKEN": "t"}
    for k, v in {**keep, **drop}.items():
        monkeypatch.setenv(k, v)
    env = worker_env()
    assert {k: env.get(k) for k in keep} == keep
    assert not set(drop) & set(env)
    assert not [k for k in env if k.startswith("CKPTLAB_") and not (k.startswith("CKPTLAB_REMOTE_")
                                                                    or k == "CKPTLAB_DIRECT_IO")]


def test_a_failed_task_keeps_unchanged_objects_verdicts(s3, tmp_path, monkeypatch):
    """A task that fails for good (here: every task of scan 2 raises) gives an error to the work it held; an
    unchanged object that was in it only for its hashes keeps its facts and verdict (plain SQL as the oracle)."""
    from hostile.corpus import build_hostile

    from ckptlab.library import remote_scan

    build_hostile(tmp_path / "h", tmp_path / "canary")
    s3.put_tree("h", tmp_path / "h")
    db = tmp_path / "r.db"
    with Catalog(db) as cat:
        scan([s3.url("h")], cat)
    before = rows(db, strip=s3.url("h"))

    def boom(units):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(remote_scan, "read_task", boom)
    with Catalog(db) as cat:
        second = scan([s3.url("h")], cat, hash=True)
    after = rows(db, strip=s3.url("h"))
    assert set(after) == set(before)
    for k, r in before.items():
        assert {c: after[k][c] for c in ("format", "family", "safety", "safety_detail")} == \
            {c: r[c] for c in ("format", "family", "safety", "safety_detail")}, k
        assert after[k]["content"] is None and "worker lost" in after[k]["error"]
    assert second.malicious == len([r for r in before.values() if r["safety"] == "malicious"]) > 0


def _status(db) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        return {bytes(p).decode(): st for p, st in con.execute("SELECT path, status FROM files")}
    finally:
        con.close()


def test_nested_prefix_scans_at_once_do_not_mark_each_other_missing(s3, tmp_path, monkeypatch):
    """``s3://b/m`` and ``s3://b/m/sub`` scanned at once (PostgreSQL locks per root): the inner scan restamps
    ``last_scan`` of the rows both list. Simulated deterministically: between the outer run's listing and its
    missing-marking, ``m/sub``'s row gets another scan's id (as the inner scan's write does). It stays present;
    an object really deleted is still marked missing by the same run."""
    from fakes.library_files import tensors, write_st

    from ckptlab.library import remote_scan

    lib = tmp_path / "lib"
    write_st(lib / "a.safetensors", tensors("sd1_kohya_lora", seed=1))
    write_st(lib / "gone.safetensors", tensors("sd1_kohya_lora", seed=2))
    write_st(lib / "sub" / "b.safetensors", tensors("sd1_kohya_lora", seed=3))
    s3.put_tree("m", lib)
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([s3.url("m")], cat)
    assert set(_status(db).values()) == {"present"} and len(_status(db)) == 3
    s3.server.client().delete_object(Bucket=s3.bucket_name, Key="m/gone.safetensors")

    finish = remote_scan._Driver._finish
    inner = s3.url("m/sub/b.safetensors").encode()

    def interleaved(self):
        con = sqlite3.connect(db)  # the other scan's connection: its own scans row id, its own stamp
        with con:
            con.execute("UPDATE files SET last_scan = ?, last_seen = 0 WHERE path = ?", (self.s.scan_id + 1000,
                                                                                        inner))
        con.close()
        return finish(self)

    monkeypatch.setattr(remote_scan._Driver, "_finish", interleaved)
    with Catalog(db) as cat:
        s = scan([s3.url("m")], cat)
    st = _status(db)
    assert st[inner.decode()] == "present"
    assert st[s3.url("m/a.safetensors")] == "present"
    assert st[s3.url("m/gone.safetensors")] == "missing" and s.missing == 1


def test_a_failing_diffusers_probe_is_that_folders_error_not_a_split_pipeline(s3, tmp_path, monkeypatch):
    """The probe (``exists(<folder>/model_index.json)``) fails for the pipeline folder (access denied, injected
    into the store's filesystem): the folder is one row with an error, its files are not catalogued as single
    models, nothing is marked missing; a known folder keeps its facts. The other model is scanned as usual."""
    from fakes.library_files import tensors, write_st
    from fakes.remote_library import diffusers_pipeline

    from ckptlab.library import remote_scan

    lib = tmp_path / "lib"
    diffusers_pipeline(lib / "tiny-sd15")
    write_st(lib / "z.safetensors", tensors("sd1_kohya_lora", seed=4))
    s3.put_tree("p", lib)
    folder = s3.url("p/tiny-sd15")

    real_fs = remote_scan._Driver._fs

    class Denied:
        def __init__(self, fs):
            self.fs = fs

        def exists(self, path):
            if path.rstrip("/").endswith("tiny-sd15/model_index.json"):
                raise PermissionError(13, "Access Denied")
            return self.fs.exists(path)

    def fresh(db):
        with Catalog(db) as cat:
            return scan([s3.url("p")], cat)

    good = tmp_path / "good.db"
    fresh(good)
    before = rows(good, strip=s3.url("p"))
    assert before["tiny-sd15"]["format"] == "diffusers" and before["tiny-sd15"]["error"] is None

    monkeypatch.setattr(remote_scan._Driver, "_fs", lambda self: Denied(real_fs(self)))
    s = fresh(good)  # a known pipeline: its row keeps its facts, gets the error, stays present
    after = rows(good, strip=s3.url("p"))
    assert set(after) == set(before) and s.missing == 0
    assert "Access" in after["tiny-sd15"]["error"] or "access" in after["tiny-sd15"]["error"]
    assert {c: after["tiny-sd15"][c] for c in ("format", "family", "safety")} == \
        {c: before["tiny-sd15"][c] for c in ("format", "family", "safety")}
    assert after["z.safetensors"] == before["z.safetensors"]
    assert any(e["path"] == folder for e in s.error_list)

    s = fresh(tmp_path / "new.db")  # a new catalog: one error row for the folder, no single-file rows under it
    new = rows(tmp_path / "new.db", strip=s3.url("p"))
    assert set(new) == {"tiny-sd15", "z.safetensors"}
    assert new["tiny-sd15"]["error"] and new["z.safetensors"] == before["z.safetensors"]
    assert s.errors == 1
