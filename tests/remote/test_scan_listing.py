"""``list_objects``: paged and streamed, ETags and version ids as boto3 sees them, folder semantics; the
grouping of a listing into units (sidecars, diffusers folders) against ``sidecars.find`` over whole folders;
the scan starting work before the listing ends."""

from __future__ import annotations

import pytest

from ckptlab.library import sidecars
from ckptlab.library.remote_scan import group_units
from ckptlab.remote import RemoteEntry


@pytest.fixture
def proxy(s3_server, monkeypatch):
    import fsspec.config
    from fakes.s3_proxy import S3Proxy

    p = S3Proxy(s3_server.endpoint)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": p.endpoint})
    yield p
    p.close()


def _fs(endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)


def test_pages_stream_and_match_boto3(s3, proxy):
    from ckptlab.remote.listing import list_objects

    keys = [f"m/{i:03d}.safetensors" for i in range(9)] + ["m-old/x.safetensors", "m/sub/y.ckpt"]
    for i, k in enumerate(keys):
        s3.put(k, bytes([i]) * (i + 1))
    proxy.reset()
    it = list_objects(s3.url("m"), page_size=2, fs=_fs(proxy.endpoint))
    first = next(it)
    lists_for_first = sum(1 for kind, p in proxy.events if kind == "list" and "list-type" in p)
    rest = list(it)
    assert lists_for_first == 1  # the first object came with the first page
    got = [first, *rest]
    client = s3.server.client()
    listed = client.list_objects_v2(Bucket=s3.bucket_name, Prefix="m/")["Contents"]  # boto3 is the oracle
    assert [e.url for e in got] == [s3.url(o["Key"]) for o in listed]  # not m-old/: the folder m/
    for e, o in zip(got, listed, strict=True):
        assert e.size == o["Size"] and e.etag == o["ETag"].strip('"') and e.version_id is None
        assert e.last_modified == o["LastModified"].timestamp()
    assert sum(1 for kind, p in proxy.events if kind == "list" and "list-type" in p) == 5  # 10 keys under m/, 2 a page
    one = list(list_objects(s3.url("m/003.safetensors"), fs=_fs(proxy.endpoint)))
    assert [e.url for e in one] == [s3.url("m/003.safetensors")]


def test_versioned_bucket_gives_version_ids(s3_server, monkeypatch):
    from ckptlab.remote.listing import list_objects

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    b = s3_server.bucket(versioned=True)
    c = s3_server.client()
    c.put_object(Bucket=b, Key="k/a.safetensors", Body=b"1")
    latest = c.put_object(Bucket=b, Key="k/a.safetensors", Body=b"22")["VersionId"]
    c.put_object(Bucket=b, Key="k/gone.safetensors", Body=b"3")
    c.delete_object(Bucket=b, Key="k/gone.safetensors")  # a delete marker: not listed
    got = list(list_objects(f"s3://{b}/k", fs=_fs(s3_server.endpoint)))
    assert [(e.url, e.version_id, e.size) for e in got] == [(f"s3://{b}/k/a.safetensors", latest, 2)]


def _entries(names):
    return [RemoteEntry(url=f"s3://b/r/{n}", size=len(n), etag=n, last_modified=1.0) for n in sorted(names)]


def test_units_carry_the_sidecars_a_folder_listing_would_give():
    names = ["a.safetensors", "a.civitai.info", "a.preview.png", "a.b.safetensors", "a.b.json", "a.json",
             "z.ckpt", "z.txt", "sub/a.safetensors", "sub/a.yaml", ".hidden/x.safetensors", "c.safetensors.json",
             "c.safetensors", "readme.md"]
    units = list(group_units(_entries(names), "s3://b/r", lambda folder: False))
    got = {u.url: {r: e.name for r, e in u.sidecar_entries.items()} for u in units}
    # the oracle: sidecars.find over each folder's full name list
    folders: dict[str, set[str]] = {}
    for n in names:
        d, _, base = n.rpartition("/")
        folders.setdefault(d, set()).add(base)
    want = {}
    for n in names:
        d, _, base = n.rpartition("/")
        if n.startswith(".") or not base.endswith((".safetensors", ".ckpt")):
            continue
        want[f"s3://b/r/{n}"] = sidecars.find(base, folders[d])
    assert got == want


def test_a_prefix_holding_model_index_json_is_one_unit():
    names = ["pipe/feature_extractor/preprocessor_config.json", "pipe/model_index.json",
             "pipe/unet/diffusion_pytorch_model.safetensors", "pipe/vae/diffusion_pytorch_model.safetensors",
             "pipe.safetensors", "pipe2/x.safetensors"]
    asked = []

    def is_diffusers(folder):
        asked.append(folder)
        return folder == "s3://b/r/pipe"

    units = list(group_units(_entries(names), "s3://b/r", is_diffusers))
    by = {u.url: u for u in units}
    assert sorted(by) == ["s3://b/r/pipe", "s3://b/r/pipe.safetensors", "s3://b/r/pipe2/x.safetensors"]
    pipe = by["s3://b/r/pipe"]
    assert sorted(m.url for m in pipe.members) == sorted(f"s3://b/r/{n}" for n in names[:4])
    assert pipe.size == sum(len(n) for n in names[:4])
    assert asked.count("s3://b/r/pipe") == 1 and asked.count("s3://b/r") == 1  # once per folder


def test_scan_reads_before_the_listing_ends(s3, tmp_path, monkeypatch):
    """Tasks start while the listing is still streaming (the real listing of moto, 2 keys a page; the events
    are recorded around the real list_objects and read_task)."""
    import threading

    from fakes.library_files import tensors, write_st

    from ckptlab.library import remote_scan
    from ckptlab.library.catalog import Catalog
    from ckptlab.remote import listing

    for i in range(12):
        s3.put(f"lib/m{i:02d}.safetensors", write_st(tmp_path / f"m{i}.safetensors", tensors("sd1_vae", seed=i)))
    events: list[str] = []
    lock = threading.Lock()
    real_list, real_task = listing.list_objects, remote_scan.read_task

    def recorded_list(url, page_size=1000):
        for e in real_list(url, page_size=page_size):
            with lock:
                events.append("listed")
            yield e

    def recorded_task(units):
        with lock:
            events.append("read")
        return real_task(units)

    monkeypatch.setattr(listing, "list_objects", recorded_list)
    monkeypatch.setattr(remote_scan, "read_task", recorded_task)
    monkeypatch.setattr(remote_scan, "LOOKUP_BATCH", 2)
    monkeypatch.setattr(remote_scan, "TASK_FILES", 2)
    with Catalog(tmp_path / "c.db") as cat:
        s = remote_scan.scan_remote([s3.url("lib")], cat, workers=2, page_size=2)
    assert s.new == 12 and s.errors == 0
    assert events.count("listed") == 12 and events.count("read") == 6
    last_listed = len(events) - 1 - events[::-1].index("listed")
    assert events.index("read") < last_listed  # a task was out before the last object was listed


def test_objects_in_flight_stay_bounded_on_a_long_listing(tmp_path, monkeypatch):
    """A 20,000-object listing (synthetic; no server): at any moment the driver holds at most one lookup batch
    plus the in-flight tasks' objects beyond what it has written, and every object gets its row."""
    import sqlite3
    import threading

    from ckptlab.library import remote_scan
    from ckptlab.library.catalog import Catalog
    from ckptlab.remote import listing

    n = 20_000
    state = {"listed": 0, "written": 0, "peak": 0}
    lock = threading.Lock()

    def fake_list(url, page_size=1000):
        for i in range(n):
            with lock:
                state["listed"] += 1
                state["peak"] = max(state["peak"], state["listed"] - state["written"])
            yield RemoteEntry(url=f"{url}/m{i:06d}.safetensors", size=100, etag=f"e{i}", last_modified=1.0)

    def fake_task(units):
        return [{"url": u.url, "facts": {"format": "safetensors", "safety": "safe"}} for u in units]

    real_write = remote_scan._Driver._write

    def counting_write(self, task, results):
        real_write(self, task, results)
        with lock:
            state["written"] += len(task)

    monkeypatch.setattr(listing, "list_objects", fake_list)
    monkeypatch.setattr(remote_scan, "read_task", fake_task)
    monkeypatch.setattr(remote_scan._Driver, "_is_diffusers", lambda self, folder: False)
    monkeypatch.setattr(remote_scan._Driver, "_write", counting_write)
    with Catalog(tmp_path / "c.db") as cat:
        s = remote_scan.scan_remote(["s3://b/r"], cat, workers=2)
    assert s.new == n and state["written"] == n
    bound = remote_scan.LOOKUP_BATCH + 2 * 2 * remote_scan.TASK_FILES + remote_scan.TASK_FILES + 1
    assert 0 < state["peak"] <= bound, state
    con = sqlite3.connect(tmp_path / "c.db")
    assert con.execute("SELECT COUNT(DISTINCT path) FROM files").fetchone()[0] == n


def test_an_https_url_is_scanned_as_one_object(tmp_path):
    """HTTP has no listing: ``scan http://host/x.safetensors`` catalogues that object, its row equal to the local
    scan's of the same file (remote-io's loopback Range server)."""
    from fakes.http_range_server import serve
    from fakes.library_files import tensors, write_st
    from fakes.remote_library import rows

    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan

    f = write_st(tmp_path / "lib" / "models" / "Lora" / "x.safetensors", tensors("sd1_kohya_lora", seed=5))
    srv = serve({"/models/Lora/x.safetensors": f})
    try:
        url = srv.url("/models/Lora/x.safetensors")
        with Catalog(tmp_path / "r.db") as cat:
            s = scan([url], cat)
    finally:
        srv.stop()
    with Catalog(tmp_path / "l.db") as cat:
        scan([f], cat, workers=1)
    assert s.new == 1 and s.errors == 0
    remote = rows(tmp_path / "r.db", strip=url.rsplit("/", 1)[0])
    local = rows(tmp_path / "l.db", strip=str(f.parent))
    assert list(remote) == list(local) == ["x.safetensors"]
    assert remote["x.safetensors"] | {"folder": None} == local["x.safetensors"] | {"folder": None}
