"""``scan s3://bucket/prefix`` against moto: the rows equal a local scan's of the same files (the oracle), the
incremental rule, missing objects, sidecars, throttling."""

from __future__ import annotations

import pytest
from fakes.remote_library import build_library, rows

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    return build_library(root / "lib", root / "canary")


def _local(library, db, **kw):
    with Catalog(db) as cat:
        s = scan([library], cat, workers=1, **kw)
    return s, rows(db, strip=str(library))


def test_remote_rows_equal_the_local_scan(s3, library, tmp_path):
    s3.put_tree("lib", library)
    s_local, local = _local(library, tmp_path / "local.db", hash=True, fingerprint=True)
    with Catalog(tmp_path / "remote.db") as cat:
        s = scan([s3.url("lib")], cat, hash=True, fingerprint=True)
    remote = rows(tmp_path / "remote.db", strip=s3.url("lib"))
    assert sorted(remote) == sorted(local)
    for k in local:
        assert remote[k] == local[k], k
    assert s.files == s_local.files and s.new == len(local)


@pytest.fixture
def proxy(s3_server):
    from fakes.s3_proxy import S3Proxy

    p = S3Proxy(s3_server.endpoint)
    yield p
    p.close()


def _cli_scan(env, *args):
    import json

    from conftest import run_cli

    r = run_cli("scan", "--json", *args, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_rescan_reads_only_what_changed(s3, proxy, tmp_path):
    """Through a counting proxy: a re-run GETs no object; a replaced object (new ETag) alone is read again;
    a deleted one becomes missing (its row kept)."""
    import sqlite3

    lib = build_library(tmp_path / "lib", tmp_path / "canary", hostile=False)
    s3.put_tree("lib", lib)
    env = proxy.env(s3.server.env)
    db = tmp_path / "c.db"
    first = _cli_scan(env, "--db", db, s3.url("lib"))
    n = len(rows(db))
    assert first["new"] == n and first["files"] == n and sum(proxy.gets.values()) > 0
    # as in a local scan, a row with an error (the garbage file) is read again by every scan
    broken = {f"{s3.bucket_name}/{k[len('s3://' + s3.bucket_name) + 1:]}" for k, r in rows(db).items() if r["error"]}
    assert len(broken) == 1

    proxy.reset()
    again = _cli_scan(env, "--db", db, s3.url("lib"))
    assert again["unchanged"] == n - 1 and again["new"] == 0 and again["changed"] == 1
    assert set(proxy.gets) == broken, proxy.gets  # nothing else read: only listed

    client = s3.server.client()
    vae = "lib/models/VAE/vae-ft-mse.safetensors"
    emb = f"{s3.bucket_name}/lib/embeddings/easyneg.safetensors"
    client.put_object(Bucket=s3.bucket_name, Key=vae,
                      Body=(lib / "models" / "Stable-diffusion" / "sd15.safetensors").read_bytes())
    client.delete_object(Bucket=s3.bucket_name, Key="lib/embeddings/easyneg.safetensors")
    proxy.reset()
    third = _cli_scan(env, "--db", db, s3.url("lib"))
    assert third["changed"] == 2 and third["missing"] == 1 and third["unchanged"] == n - 3
    assert set(proxy.gets) == {f"{s3.bucket_name}/{vae}"} | broken, proxy.gets
    con = sqlite3.connect(db)
    st = dict(con.execute("SELECT display, status FROM files"))
    assert st[f"s3://{emb}"] == "missing" and st[s3.url(vae)] == "present"
    # the replaced object's row now describes the checkpoint that was put there (boto3's upload is the oracle)
    kind, size = con.execute("SELECT kind, size FROM files WHERE display = ?", (s3.url(vae),)).fetchone()
    head = client.head_object(Bucket=s3.bucket_name, Key=vae)
    assert kind == "checkpoint" and size == head["ContentLength"]


def test_throttled_store_still_gives_every_row(s3_server, s3, tmp_path):
    """The first requests get 503 SlowDown (listing and reads): the scan backs off and completes with every
    row, equal to the local scan's."""
    from fakes.s3_proxy import S3Proxy

    lib = build_library(tmp_path / "lib", tmp_path / "canary", hostile=False)
    s3.put_tree("lib", lib)
    _, local = _local(lib, tmp_path / "local.db")
    p = S3Proxy(s3_server.endpoint, fail_first=12)
    try:
        s = _cli_scan(p.env(s3_server.env), "--db", tmp_path / "r.db", s3.url("lib"))
    finally:
        p.close()
    assert p.throttled == 12
    remote = rows(tmp_path / "r.db", strip=s3.url("lib"))
    assert remote == local and s["errors"] == len([r for r in local.values() if r["error"]])


def test_ctrl_c_cancels_and_records_the_scan_interrupted(s3_server, s3, library, tmp_path):
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from conftest import SRC
    from fakes.s3_proxy import S3Proxy

    s3.put_tree("lib", library)
    p = S3Proxy(s3_server.endpoint, delay_gets=0.2)
    db = tmp_path / "c.db"
    env = {**os.environ, **p.env(s3_server.env), "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "ckptlab", "scan", "--workers", "2", "--db", str(db),
                             s3.url("lib")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not p.gets and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        p.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    con = sqlite3.connect(db)
    assert [s for (s,) in con.execute("SELECT status FROM scans")] == ["interrupted"]
    n_objects = sum(1 for f in library.rglob("*") if f.is_file())
    assert sum(p.gets.values()) < n_objects  # the outstanding tasks were not run
    assert con.execute("SELECT COUNT(*) FROM files WHERE status = 'missing'").fetchone()[0] == 0


def test_edited_sidecar_is_picked_up_without_rereading_the_model(s3, proxy, tmp_path):
    import json
    import sqlite3

    from fakes.library_files import tensors, write_st

    lib = tmp_path / "lib"
    write_st(lib / "models" / "Lora" / "x.safetensors", tensors("sd1_kohya_lora", seed=1))
    (lib / "models" / "Lora" / "x.civitai.info").write_text(json.dumps({"id": 1, "modelId": 2, "name": "v1",
                                                                         "trainedWords": ["old"]}))
    s3.put_tree("lib", lib)
    env = proxy.env(s3.server.env)
    db = tmp_path / "c.db"
    _cli_scan(env, "--db", db, s3.url("lib"))
    s3.put("lib/models/Lora/x.civitai.info", json.dumps({"id": 1, "modelId": 2, "name": "v1",
                                                           "trainedWords": ["new", "words"]}).encode())
    proxy.reset()
    s = _cli_scan(env, "--db", db, s3.url("lib"))
    (sc,) = sqlite3.connect(db).execute("SELECT sidecars FROM files").fetchone()
    assert json.loads(sc)["trigger_words"] == ["new", "words"] and s["unchanged"] == 1 and s["changed"] == 0
    assert set(proxy.gets) == {f"{s3.bucket_name}/lib/models/Lora/x.civitai.info"}  # not the model


def test_ray_option_without_the_ray_package_is_one_line(tmp_path):
    from conftest import SRC, run_cli

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "ray.py").write_text("raise ImportError('no ray here')\n")
    r = run_cli("scan", "--ray", "auto", "s3://bucket/models", env={"PYTHONPATH": f"{SRC}:{shim}"}, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["ckptlab: error: --ray needs the ray package: pip install 'ckptlab[ray]'"]
