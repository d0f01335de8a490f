"""Request and byte budgets of a legacy (pre-1.6, non-zip) torch pickle read over a URL, counted by ``ckptlab.remote``
AND by the loopback server itself: the walk over the storage records reads their 8-byte length headers (not a
64 KiB read-ahead block of tensor data per record), and ``read_file_facts`` (check + reader: two passes over the
same object in one session) costs what one pass costs.

Oracles: the record layout walked here with ``pickletools`` + ``struct`` on the local file (not ckptlab), the server's
log of ranges and bytes, and the local code path (``read_file_facts``/``check`` of the same bytes on disk)."""

from __future__ import annotations

import json
import pickletools
import socketserver
import struct

import pytest
import torch
from fakes.http_range_server import serve
from fakes.library_files import tensors

from ckptlab import remote
from ckptlab.jsonable import to_jsonable
from ckptlab.library.scanner import read_file_facts
from ckptlab.remote.reader import READAHEAD, session
from ckptlab.security import check

pytestmark = pytest.mark.xdist_group("remote-io")

#: float32 elements per storage of the "spread" file: each record (80 KB) is longer than a read-ahead block
SPREAD_NUMEL = 20000
N_SPREAD = 100


@pytest.fixture
def http(monkeypatch):
    # TCP_NODELAY on the loopback server's sockets (as benchmarks/_object_server.py and real stores do): its
    # headers and body are two writes, and an 8-byte body would wait 40 ms for the client's delayed ACK
    monkeypatch.setattr(socketserver.StreamRequestHandler, "disable_nagle_algorithm", True)
    servers = []

    def start(files, behaviour=None):
        s = serve(files, behaviour)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _save_legacy(path, sd):
    torch.save({"state_dict": sd, "global_step": 1234}, str(path), _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy-budget")
    sd1 = {k: v.float() for k, v in tensors("sd1_checkpoint", seed=1, dim_cap=16).items()}  # float32 records
    weights = [k for k in sd1 if k.endswith(".weight")][:N_SPREAD]
    spread = {k: torch.full((SPREAD_NUMEL,), float(i)) for i, k in enumerate(weights)}
    return {
        # every record is longer than a read-ahead block: one small exact GET per length header
        "spread.ckpt": _save_legacy(root / "spread.ckpt", spread),
        # 1143 small records packed together (real SD1.5 key names, dims capped): runs of them per GET
        "dense.ckpt": _save_legacy(root / "dense.ckpt", sd1),
    }


def _layout(path) -> tuple[int, list[tuple[int, int]]]:
    """(offset of the first storage record, [(header offset, count)...]) from the local bytes, without ckptlab:
    the five pickles skipped with pickletools, then the records walked with their own 8-byte counts (float32)."""
    with open(path, "rb") as fh:
        for _ in range(5):
            for _op in pickletools.genops(fh):
                pass
        start = fh.tell()
        data = fh.read()
    out, p = [], 0
    while p < len(data):
        (count,) = struct.unpack("<q", data[p:p + 8])
        out.append((start + p, count))
        p += 8 + count * 4
    assert p == len(data)
    return start, out


def _range(hit) -> tuple[int, int]:
    a, b = hit.range.removeprefix("bytes=").split("-")
    return int(a), int(b) + 1


def _same(result, path) -> str:
    return json.dumps(result, sort_keys=True, default=str).replace(json.dumps(str(path))[1:-1], "<path>")


def _check(path):
    r = check(path)
    return {"format": r.format, "verdict": r.verdict, "container": r.container, "globals": r.globals,
            "findings": [to_jsonable(f) for f in r.findings]}


def test_spread_records_cost_their_length_headers(http, files):
    path = files["spread.ckpt"]
    start, records = _layout(path)
    assert len(records) == N_SPREAD and all(c == SPREAD_NUMEL for _, c in records)
    headers = {off + 8 for off, _ in records}  # where each length header ends
    srv = http({"spread.ckpt": path})
    url = srv.url("spread.ckpt")
    with remote.counting() as c, session():
        r = check(url)
    assert r.verdict == "safe"
    hits = srv.hits()
    assert c.requests == len(hits) and c.bytes == sum(h.sent for h in hits)
    # past the first two blocks (the pickles and the tail of their newline searches) every GET is one length
    # header: exactly 8 bytes, ending where a header ends
    walk = [h for h in hits if _range(h)[0] >= 2 * READAHEAD]
    assert len(walk) >= len(records) - 2 and all(h.sent == 8 and _range(h)[1] in headers for h in walk), walk[:3]
    assert len(hits) <= len(records) + 8
    assert c.bytes <= 2 * READAHEAD + 8 * len(records)  # was one 64 KiB block per record (6.5 MB here)


def test_facts_read_the_records_once(http, files):
    """check + reader in one session: the second pass over the records is served from the file's cache."""
    path = files["spread.ckpt"]
    srv = http({"spread.ckpt": path})
    url = srv.url("spread.ckpt")
    with remote.counting() as one, session():
        check(url)
    srv.clear()
    with remote.counting() as c:
        facts = read_file_facts(url)
    hits = srv.hits()
    assert c.requests == len(hits) == one.requests  # was twice as many (every record read again)
    assert c.bytes == sum(h.sent for h in hits) == one.bytes
    assert len({_range(h) for h in hits}) == len(hits)  # no range asked for twice
    assert _same(facts, url) == _same(read_file_facts(str(path)), path)


def test_dense_records_share_requests(http, files):
    """Small records packed together: a run of length headers within one read-ahead span costs one GET (no more
    requests than the 64 KiB blocks took), and no GET fetches data past the last header it needs."""
    path = files["dense.ckpt"]
    start, records = _layout(path)
    headers = {off + 8 for off, _ in records}
    srv = http({"dense.ckpt": path})
    url = srv.url("dense.ckpt")
    with remote.counting() as c:
        facts = read_file_facts(url)
    hits = srv.hits()
    assert c.requests == len(hits)
    walk = [h for h in hits if _range(h)[0] >= start + 2 * READAHEAD]
    assert walk and all(_range(h)[1] in headers and h.sent <= READAHEAD + 8 for h in walk), walk[:3]
    # about one request per read-ahead span of the file, as the block reads cost before (the pickles' newline
    # searches add a few small ones); the bytes are those up to the last length header, no block past it
    assert len(hits) <= -(-path.stat().st_size // READAHEAD) + 8
    assert c.bytes <= records[-1][0] + 8 + 8 * READAHEAD
    assert len({_range(h) for h in hits}) == len(hits)
    assert _same(facts, url) == _same(read_file_facts(str(path)), path)
    assert _same(_check(url), url) == _same(_check(str(path)), path)


@pytest.mark.parametrize("name", ["spread.ckpt", "dense.ckpt"])
@pytest.mark.parametrize("which", [3, -1])
def test_storage_size_lie_is_found_remotely(http, files, tmp_path, name, which):
    """A record whose count is not the pickle's numel (mid-file: the walk leaves the prefetched span; last:
    trailing bytes): the remote findings are the local ones, the lie among them."""
    start, records = _layout(files[name])
    off, count = records[which]
    data = bytearray(files[name].read_bytes())
    data[off:off + 8] = struct.pack("<q", count - 1)
    path = tmp_path / f"lie-{name}"
    path.write_bytes(bytes(data))
    srv = http({path.name: path})  # the same name: findings' locations carry it
    url = srv.url(path.name)
    local = _check(str(path))
    assert any(f["kind"] == "storage_size_lie" for f in local["findings"]), local["findings"]
    with session():
        assert _same(_check(url), url) == _same(local, path)
    lf = read_file_facts(str(path))
    assert _same(read_file_facts(url), url) == _same(lf, path)


def test_torch_zip_pickle_and_small_records_in_one_get(http, tmp_path):
    """A torch zip: the first block (format sniffing, the start of data.pkl), the tail (end record + central
    directory), then ONE GET for the rest of data.pkl and the small records stored right after it (.format_version,
    byteorder...), which took a read-ahead block of their own before; the local verdict and facts."""
    import zipfile

    path = tmp_path / "sd15.ckpt"
    torch.save({"state_dict": tensors("sd1_checkpoint", seed=1, dim_cap=16), "global_step": 1}, str(path))
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    pkl = next(i for i in infos if i.filename.endswith("/data.pkl"))
    assert READAHEAD < pkl.header_offset + pkl.compress_size < size - 256 * 1024  # data.pkl spans two reads
    after = [i for i in infos if i.header_offset > pkl.header_offset and "/data/" not in i.filename
             and i.header_offset < size - 256 * 1024]
    assert after  # small records between data.pkl and the tensors
    srv = http({path.name: path})
    url = srv.url(path.name)
    with remote.counting() as c:
        facts = read_file_facts(url)
    hits = srv.hits()
    assert c.requests == len(hits) == 3, hits  # was 4
    last = _range(hits[2])
    assert last[0] == READAHEAD and last[1] >= max(i.header_offset for i in after) + 30
    assert c.bytes <= READAHEAD + 256 * 1024 + sum(30 + len(i.filename) + 256 + i.compress_size
                                                   for i in [pkl, *after])
    assert _same(facts, url) == _same(read_file_facts(str(path)), path)
    assert _same(_check(url), url) == _same(_check(str(path)), path)
