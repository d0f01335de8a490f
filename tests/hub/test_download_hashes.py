"""After a download the catalog gets all six CivitAI hashes from the transfer stream itself: the file
is never read again, and a resumed ``.part`` prefix is read exactly once. Values are checked against
hashlib / zlib / blake3 over the served bytes."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import blake3
import pytest
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes

import ckptlab.hashes as lib_hashes
import ckptlab.hub.download as hub_download
from ckptlab.hub.config import load_hub_config
from ckptlab.hub.fetch import download
from ckptlab.library.catalog import Catalog


def oracle(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    sha = hashlib.sha256(data).hexdigest().upper()
    return {"sha256": sha, "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8].upper(),
            "autov2": sha[:10], "autov3": hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper(),
            "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08X}", "blake3": blake3.blake3(data).hexdigest().upper()}


@pytest.fixture
def world(tmp_path, monkeypatch):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.lora = lora_bytes(seed=1, dim=20_000)  # > 1 MiB + 64 KiB: AutoV1 hashes a real window
    assert len(fake.lora) > 0x110000
    fake.add_version(1000, 100, [(5000, "detail_tweaker.safetensors", fake.lora)])
    monkeypatch.setenv("CKPTLAB_HTTP_BACKOFF", "0")
    config = load_hub_config(base_url=fake.api_url, token=fake.token)

    def no_second_read(path, progress=None):
        raise AssertionError(f"{path} was read again to hash it")

    monkeypatch.setattr(lib_hashes, "hash_file", no_second_read)
    monkeypatch.setattr(hub_download, "hash_file", no_second_read)
    prefix_reads = []
    real = lib_hashes.MultiHasher.update_from_file

    def spy(self, fh, upto=None, progress=None):
        prefix_reads.append(upto)
        return real(self, fh, upto, progress)

    monkeypatch.setattr(lib_hashes.MultiHasher, "update_from_file", spy)
    yield fake, tmp_path / "lib", config, prefix_reads
    fake.stop()


def catalogued(path) -> dict:
    with Catalog(os.environ["CKPTLAB_DB"]) as cat:
        rec = cat.get_by_path(path)
        assert rec is not None and rec.hashes is not None, "not catalogued with hashes"
        return {k: getattr(rec.hashes, k) for k in ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")}


def test_fresh_download_catalogued_with_all_six_hashes_from_the_stream(world):
    fake, root, config, prefix_reads = world
    res = download("civitai:1000", dest=root, layout="flat", config=config)
    assert not res.extra.get("warning"), res.extra
    assert res.path.read_bytes() == fake.lora
    assert catalogued(res.path) == oracle(fake.lora)
    assert prefix_reads == []  # nothing on disk was read


def test_resumed_download_reads_the_partial_prefix_once(world):
    fake, root, config, prefix_reads = world
    root.mkdir(parents=True)
    # an earlier run left a partial of 5 bytes (AutoV3's start is not known yet) ...
    (root / "detail_tweaker.safetensors.part").write_bytes(fake.lora[:5])
    fake.drop_after[5000] = 700_000  # ... and this run's connection drops once mid-file (resumed in-run)
    res = download("civitai:1000", dest=root, layout="flat", config=config)
    assert not res.extra.get("warning"), res.extra
    assert res.resumed_from == 5 and res.path.read_bytes() == fake.lora
    ranges = [q.headers.get("range") for q in fake.requests if q.server == "storage"]
    assert ranges[0] == "bytes=5-" and len(ranges) == 2
    assert prefix_reads == [5]  # the prefix once; the in-run resume needs no re-read
    assert catalogued(res.path) == oracle(fake.lora)


def test_multihasher_fed_in_odd_chunks_matches_the_oracle():
    data = lora_bytes(seed=2, dim=20_000)
    mh = lib_hashes.MultiHasher()
    pos, sizes = 0, [1, 3, 4, 1, 7, 65_536, 1_048_575, 3, 2_000_000]
    for s in sizes:
        mh.update(data[pos:pos + s])
        pos += s
    mh.update(data[pos:])
    h = mh.result()
    assert {k: getattr(h, k) for k in oracle(data)} == oracle(data) and h.size == len(data)
    # not safetensors: no AutoV3; a header claiming more bytes than the stream has: no AutoV3
    mh = lib_hashes.MultiHasher()
    mh.update(b"\x80\x02" + bytes(100))
    assert mh.result().autov3 is None
    mh = lib_hashes.MultiHasher()
    mh.update(struct.pack("<Q", 1000) + b"{" + bytes(50))
    assert mh.result().autov3 is None
