"""Request and byte budgets of remote reads, counted by ``ckptlab.remote`` AND by the server itself, and hashes /
fingerprints of a remote object equal to those of the same bytes on disk (hashlib and the local code path as
oracles)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
from fakes.http_range_server import serve
from fakes.library_files import tensors, write_ckpt, write_st

from ckptlab import remote
from ckptlab.formats import detect_format, open_model
from ckptlab.formats.pickle_archive import ZIP_TAIL
from ckptlab.hashes import hash_file
from ckptlab.library.fingerprint import fingerprint_file, stream_content
from ckptlab.library.scanner import read_file_facts
from ckptlab.remote import RemoteEntry
from ckptlab.remote.reader import READAHEAD, STREAM_CHUNK, session
from ckptlab.sample.build import write_model

pytestmark = pytest.mark.xdist_group("remote-io")


@pytest.fixture
def http():
    servers = []

    def start(files, behaviour=None):
        s = serve(files, behaviour)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _header_len(path) -> int:
    with open(path, "rb") as fh:
        return struct.unpack("<Q", fh.read(8))[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    out = {
        "lora.safetensors": write_st(root / "lora.safetensors", tensors("sd1_kohya_lora", seed=3),
                                     {"ss_network_module": "networks.lora"}),
        "embedding.safetensors": write_st(root / "emb.safetensors", tensors("sd1_embedding", seed=4)),
        "sd15.safetensors": write_st(root / "sd15.safetensors", tensors("sd1_checkpoint", seed=1)),
        "sd15.ckpt": write_ckpt(root / "sd15.ckpt", tensors("sd1_checkpoint", seed=1, dim_cap=16)),
        # real-size SDXL header, sparse data: gigabytes on the listing, a few blocks on disk
        "sdxl-real.safetensors": write_model(root / "sdxl-real.safetensors", "sdxl_checkpoint", small=False,
                                             sparse=True),
    }
    return out


def test_safetensors_header_budget_small_header(http, files):
    """A header shorter than the read-ahead block: ONE request, bytes = the block (or the whole small file)."""
    path = files["embedding.safetensors"]
    assert 8 + _header_len(path) <= READAHEAD
    srv = http({"lora.safetensors": path})
    url = srv.url("lora.safetensors")
    size = path.stat().st_size
    with remote.counting() as c, session():
        assert detect_format(RemoteEntry(url, size).url) == "safetensors"
        with open_model(url) as src:
            assert src.keys() == open_model(str(path)).keys()
    hits = srv.hits()
    assert c.requests == len(hits) == 1
    assert c.bytes == sum(h.sent for h in hits) == min(size, READAHEAD)
    assert hits[0].range == f"bytes=0-{READAHEAD - 1}"


def test_safetensors_header_budget_real_size_sdxl(http, files):
    """A real-size SDXL checkpoint (header ~ 100+ KiB, sparse data): TWO requests, the second exactly the rest of
    the header; bytes = header + 8 rounded up to the first block, never the tensor data; size from the listing
    means no HEAD either (the server refuses HEAD: it would show in the log)."""
    path = files["sdxl-real.safetensors"]
    n = _header_len(path)
    size = path.stat().st_size
    assert 8 + n > READAHEAD and size > 1 << 30  # a header longer than one block, a multi-GB object
    srv = http({"sdxl.safetensors": path})
    url = srv.url("sdxl.safetensors")
    with remote.counting() as c:
        facts = read_file_facts(RemoteEntry(url, size))
    hits = srv.hits()
    assert [h.method for h in hits] == ["GET", "GET"]
    assert hits[0].range == f"bytes=0-{READAHEAD - 1}"
    assert hits[1].range == f"bytes={READAHEAD}-{8 + n - 1}"
    assert c.requests == 2 and c.bytes == sum(h.sent for h in hits) == 8 + n
    assert c.bytes <= 8 + n + READAHEAD
    local = read_file_facts(str(path))
    assert json.dumps(facts, sort_keys=True).replace(url, "P") == \
        json.dumps(local, sort_keys=True).replace(str(path), "P")


def test_torch_zip_is_checked_from_its_directory_and_data_pkl(http, files):
    """A torch zip checkpoint: the end record + central directory in one tail GET, data.pkl with its local header,
    and nothing of the tensor records: bytes far below the object's size."""
    path = files["sd15.ckpt"]
    size = path.stat().st_size
    srv = http({"m.ckpt": path})
    url = srv.url("m.ckpt")
    from ckptlab.security import check

    with remote.counting() as c:
        r = check(url)
    assert r.verdict == check(str(path)).verdict == "safe"
    hits = srv.hits()
    assert c.requests == len(hits) and c.bytes == sum(h.sent for h in hits)
    import zipfile

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
    others = [i for i in infos if not i.filename.endswith(".pkl") and "/data/" not in i.filename]
    ranges = [tuple(int(x) for x in h.range.split("=")[1].split("-")) for h in hits]
    # the first block; then the end of the file (end record + central directory); then members read with their
    # local headers (data.pkl and the small non-tensor records): no tensor record is fetched on its own
    assert ranges[0] == (0, READAHEAD - 1)
    assert ranges[1] == (size - ZIP_TAIL, size - 1)
    member_starts = {i.header_offset for i in [pkl, *others]}
    for i, (a, _b) in enumerate(ranges[2:], 2):  # a member, or the rest of one that began in a block read before
        assert a in member_starts or any(a == b + 1 for _, b in ranges[:i]), (a, member_starts, ranges)
    assert c.requests <= 2 + len(member_starts)
    assert c.bytes <= READAHEAD + ZIP_TAIL + sum(30 + len(i.filename) + 256 + i.compress_size
                                                 for i in [pkl, *others])


def test_hash_is_one_get_and_equals_hashlib(http, files):
    path = files["sd15.safetensors"]
    size = path.stat().st_size
    srv = http({"m.safetensors": path})
    url = srv.url("m.safetensors")
    with remote.counting() as c:
        h, fp = stream_content(RemoteEntry(url, size), hash=True, fingerprint=False)
    assert fp is None
    assert [x.range for x in srv.hits()] == [None] and srv.hits()[0].sent == size
    assert c.requests == 1 and c.bytes == size
    assert h.sha256 == hashlib.sha256(path.read_bytes()).hexdigest().upper()
    assert h == hash_file(path)


def test_hash_and_fingerprint_share_one_stream(http, files):
    """hash + fingerprint of a safetensors object: one GET in all (the header comes from the stream too), and the
    results equal the local hash and fingerprint."""
    path = files["sd15.safetensors"]
    size = path.stat().st_size
    assert size > 2 * STREAM_CHUNK or True
    srv = http({"m.safetensors": path})
    url = srv.url("m.safetensors")
    with remote.counting() as c:
        h, fp = stream_content(RemoteEntry(url, size))
    assert c.requests == len(srv.hits()) == 1 and c.bytes == size
    assert h == hash_file(path)
    assert fp == fingerprint_file(path)


def test_fingerprint_without_hash_streams_once(http, files):
    path = files["lora.safetensors"]
    srv = http({"l.safetensors": path})
    url = srv.url("l.safetensors")
    h, fp = stream_content(url, hash=False)
    assert h is None and fp == fingerprint_file(path)
    assert sum(1 for x in srv.hits() if x.range is None) == 1


def test_pickle_content_over_s3_matches_local(s3, files):
    path = files["sd15.ckpt"]
    url = s3.put("m/sd15.ckpt", path)
    h, fp = stream_content(url)
    assert h == hash_file(path) and fp == fingerprint_file(path)


def test_safetensors_content_over_s3_is_one_get(s3, files):
    path = files["sd15.safetensors"]
    url = s3.put("m/sd15.safetensors", path)
    size = path.stat().st_size
    with remote.counting() as c:
        h, fp = stream_content(RemoteEntry(url, size))
    assert c.requests == 1 and c.bytes == size
    assert h == hash_file(path) and fp == fingerprint_file(path)


def test_s3_header_budget(s3, files):
    """Over S3 (moto): the header read of a listed object is one GET of the first block (no HEAD)."""
    path = files["embedding.safetensors"]
    url = s3.put("l/emb.safetensors", path)
    with remote.counting() as c:
        read_file_facts(RemoteEntry(url, path.stat().st_size))
    assert c.requests == 1 and c.bytes == min(path.stat().st_size, READAHEAD)


def test_tensor_array_is_one_ranged_get(http, files):
    path = files["sd15.safetensors"]
    srv = http({"m.safetensors": path})
    url = srv.url("m.safetensors")
    local = open_model(str(path))
    key = max(local.keys(), key=lambda k: local.info(k).nbytes)
    with session(), open_model(url) as src:
        srv.clear()
        a = src.array(key)
    assert (a == local.array(key)).all()
    (hit,) = srv.hits()
    start, end = local.data_range(key)
    assert hit.range == f"bytes={start}-{end - 1}" and hit.sent == end - start


def test_generic_fsspec_transport_reads_ranges_and_streams(files):
    """The gs:// / az:// transport (fsspec ``cat_file`` ranges, ``size`` when unknown), exercised on fsspec's
    in-memory filesystem: the same bytes as the file, the hash of one pass equal to hashlib's."""
    import fsspec

    from ckptlab.hashes import hash_remote
    from ckptlab.remote.reader import RemoteFile

    data = files["embedding.safetensors"].read_bytes()
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ckptlab-test/emb.safetensors", data)
    try:
        url = "memory://ckptlab-test/emb.safetensors"
        rf = RemoteFile(url)
        assert rf.size == len(data)
        assert rf.pread(3, 100) == data[3:103] and rf.pread(len(data) - 5, 50) == data[-5:]
        assert hash_remote(RemoteFile(url, len(data))).sha256 == hashlib.sha256(data).hexdigest().upper()
    finally:
        fs.rm("/ckptlab-test", recursive=True)


def test_stats_count_every_thread(http, files):
    """stats() is per process and thread-safe: four threads hashing at once add exactly the server's own count of
    requests and body bytes."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptlab.hashes import hash_remote

    path = files["embedding.safetensors"]
    srv = http({f"m{i}.safetensors": path for i in range(4)})
    before = remote.stats()
    with ThreadPoolExecutor(4) as ex:
        hashes = list(ex.map(lambda i: hash_remote(srv.url(f"m{i}.safetensors")), range(4)))
    after = remote.stats()
    hits = srv.hits()
    assert after["requests"] - before["requests"] == len(hits) == 4  # one streamed GET each (size from its reply)
    assert after["bytes"] - before["bytes"] == sum(h.sent for h in hits)
    assert {h.sha256 for h in hashes} == {hashlib.sha256(path.read_bytes()).hexdigest().upper()}
