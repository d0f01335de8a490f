"""Smoke test of ``benchmarks/scale.py`` (not its timings): the counting object server counts what a client
fetched (boto3's own view of the responses is the oracle), and ``scale.py --quick`` at a tiny size writes the
JSON the cost model in docs/scale.md is built from, with ckptlab's own request counters equal to the server's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

pytest.importorskip("s3fs", reason="the scale benchmark needs the remote extra")
pytest.importorskip("boto3", reason="the server test reads through boto3")


def _object_server():
    spec = importlib.util.spec_from_file_location("_object_server", BENCH / "_object_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def object_server(tmp_path):
    mod = _object_server()
    (tmp_path / "bkt" / "loras").mkdir(parents=True)
    srv = mod.Server(tmp_path)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv, tmp_path / "bkt"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_object_server_counts_what_boto3_received(object_server):
    import boto3

    srv, bucket = object_server
    body = bytes(range(256)) * 40  # 10,240 bytes
    (bucket / "loras" / "a.safetensors").write_bytes(body)
    with open(bucket / "loras" / "big.safetensors", "wb") as fh:  # sparse: 64 MiB, 5 bytes on disk
        fh.write(b"hello")
        fh.truncate(64 << 20)
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{srv.server_address[1]}", region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="y")

    listed = s3.list_objects_v2(Bucket="bkt", Prefix="loras/", MaxKeys=1)  # paged: one key per page
    page2 = s3.list_objects_v2(Bucket="bkt", Prefix="loras/", MaxKeys=1,
                               ContinuationToken=listed["NextContinuationToken"])
    keys = [c["Key"] for c in listed["Contents"] + page2["Contents"]]
    assert keys == ["loras/a.safetensors", "loras/big.safetensors"]
    assert page2["Contents"][0]["Size"] == 64 << 20 and not page2["IsTruncated"]
    head = s3.head_object(Bucket="bkt", Key="loras/big.safetensors")
    part = s3.get_object(Bucket="bkt", Key="loras/a.safetensors", Range="bytes=100-1123")["Body"].read()
    tail = s3.get_object(Bucket="bkt", Key="loras/a.safetensors", Range="bytes=-16")["Body"].read()
    whole = s3.get_object(Bucket="bkt", Key="loras/big.safetensors")["Body"].read()

    assert head["ContentLength"] == 64 << 20
    assert part == body[100:1124] and tail == body[-16:]
    assert whole[:5] == b"hello" and len(whole) == 64 << 20 and whole.count(0) == len(whole) - 5
    c = srv.counts.snapshot()
    assert c["objects"]["bkt/loras/a.safetensors"] == {"requests": 2, "bytes": len(part) + len(tail), "GET": 2,
                                                       "HEAD": 0}
    assert c["objects"]["bkt/loras/big.safetensors"] == {"requests": 2, "bytes": len(whole), "GET": 1, "HEAD": 1}
    assert c["total"]["LIST"] == 2 and c["total"]["requests"] == 6


def test_scale_quick_writes_the_figures(tmp_path):
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--quick", "--files", "8", "--hash-mib", "4",
                        "--repeat", "1", "--no-ray", "--no-pickles", "--latency-ms", "0", "--cache", str(tmp_path / "cache"),
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep) >= {"machine", "config", "requests", "scan", "hash"}
    assert "1. header-only reads" in r.stdout and "3. hashing" in r.stdout

    files = {p.name: p for p in (tmp_path / "cache" / "models").iterdir()}
    rows = rep["requests"]
    assert {row["file"] for row in rows} == {n for n in files if n.endswith(".safetensors")}
    ours = [row for row in rows if row["reader"].startswith("ckptlab")]
    assert ours and all(row["error"] is None and row["client_counts"] for row in ours)
    for row in rows:
        path = files[row["file"]]
        assert row["size"] == path.stat().st_size
        with open(path, "rb") as fh:  # the header length, read here
            header = 8 + int.from_bytes(fh.read(8), "little")
        assert row["header_bytes"] == header
        if row["error"] is None and row["requests"]:
            assert row["bytes"] >= header  # nothing parses a header it did not receive
    for row in ours:  # ckptlab's own counters agree with the server's
        mine = row["client_counts"]
        assert (mine["requests"], mine["bytes"]) == (row["requests"], row["bytes"]), row

    scans = {row["run"]: row for row in rep["scan"] if "files_per_s" in row}
    bare = scans["bare s3fs header loop (I/O floor, 1 process)"]
    assert bare["files"] == 8 and scans["local disk scan (ckptlab scan FOLDER, 1 process)"]["files"] == 8
    assert bare["get"] == 2 * 8  # the 8-byte length, then the header: one ranged GET each
    assert bare["list"] >= 1 and bare["requests"] == bare["get"] + bare["head"] + bare["list"]

    hashes = {row["reader"]: row for row in rep["hash"]}
    size = (tmp_path / "cache" / "hash" / "blob_4MiB.safetensors").stat().st_size
    plain = hashes["plain streamed GET (urllib, raw I/O)"]
    assert (plain["requests"], plain["bytes"], plain["size"]) == (1, size, size)
    block = rep["config"]["read_ahead"] or 0
    for row in rep["hash"]:
        if row["remote"] and row["error"] is None:  # streamed once: every byte, and at most a first block twice
            assert size <= row["bytes"] <= size + block, row  # (a URL without its size: a first ranged GET learns it)
    assert hashes["ckptlab hash_file, local file"]["requests"] == 0
