"""hash_file against independent computations written here from reference/hub.md §1."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import blake3
import pytest

from ckptlab.errors import FormatError
from ckptlab.hashes import CHUNK, hash_file


def oracle(data: bytes, safetensors: bool) -> dict:
    sha = hashlib.sha256(data).hexdigest().upper()
    out = {
        "sha256": sha,
        "autov2": sha[:10],
        # A1111 model_hash(): seek(0x100000); read(0x10000); sha256; [:8]
        "autov1": hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8].upper(),
        "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08X}",
        "blake3": blake3.blake3(data).hexdigest().upper(),
        "autov3": None,
    }
    if safetensors:
        n = struct.unpack("<Q", data[:8])[0]
        out["autov3"] = hashlib.sha256(data[8 + n:]).hexdigest()[:12].upper()
    return out


def st_bytes(payload: int, meta: dict | None = None) -> bytes:
    header = {"model.diffusion_model.input_blocks.0.0.weight": {"dtype": "U8", "shape": [payload],
                                                              "data_offsets": [0, payload]}}
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + os.urandom(payload)


def check(path, data, safetensors):
    got = hash_file(path)
    exp = oracle(data, safetensors)
    assert {k: getattr(got, k) for k in exp} == exp
    assert got.size == len(data)


@pytest.mark.parametrize("size", [0, 1, 1000, 0x100000, 0x100000 + 10, 0x100000 + 0x10000 + 5])
def test_plain_files_around_autov1_window(tmp_path, size):
    data = os.urandom(size)
    p = tmp_path / "x.ckpt"
    p.write_bytes(data)
    check(p, data, safetensors=False)


def test_small_files_share_the_empty_autov1(tmp_path):
    # every file of <= 1 MiB hashes an empty slice: SHA-256(b"")[:8]
    p = tmp_path / "emb.pt"
    p.write_bytes(os.urandom(5000))
    assert hash_file(p).autov1 == "E3B0C442"


def test_safetensors_multi_chunk_with_autov3(tmp_path):
    data = st_bytes(2 * CHUNK + 12345, {"ss_note": "x"})
    p = tmp_path / "lora.safetensors"
    p.write_bytes(data)
    check(p, data, safetensors=True)


def test_autov3_ignores_metadata_edits(tmp_path):
    a = st_bytes(3000, {"a": "1"})
    n = struct.unpack("<Q", a[:8])[0]
    body = a[8 + n:]
    header = json.loads(a[8:8 + n])
    header["__metadata__"] = {"a": "edited by SwarmUI", "b": "more"}
    h = json.dumps(header).encode()
    b = struct.pack("<Q", len(h)) + h + body
    (tmp_path / "a.safetensors").write_bytes(a)
    (tmp_path / "b.safetensors").write_bytes(b)
    ha, hb = hash_file(tmp_path / "a.safetensors"), hash_file(tmp_path / "b.safetensors")
    assert ha.autov3 == hb.autov3 == hashlib.sha256(body).hexdigest()[:12].upper()
    assert ha.sha256 != hb.sha256


def test_safetensors_real_file_from_peer_library(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    p = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.decoder.conv_in.weight": torch.randn(64, 4, 3, 3)}, str(p), {"k": "v"})
    check(p, p.read_bytes(), safetensors=True)


def test_progress_reports_every_byte(tmp_path):
    data = os.urandom(CHUNK + 17)
    p = tmp_path / "m.bin"
    p.write_bytes(data)
    seen = {"adv": 0, "total": None}

    def cb(advance=0, *, total=None, description=None):
        seen["adv"] += advance
        if total is not None:
            seen["total"] = total

    hash_file(p, progress=cb)
    assert seen == {"adv": len(data), "total": None}  # the total belongs to the caller's bar (many files)


def test_unreadable_file_is_a_one_line_error(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        hash_file(tmp_path / "missing.safetensors")


def test_cli_hash_json_matches_oracle(tmp_path, cli):
    data = st_bytes(4096)
    p = tmp_path / "m.safetensors"
    p.write_bytes(data)
    r = cli("hash", str(p), "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.splitlines()[0])
    exp = oracle(data, True)
    assert {k: obj[k] for k in exp} == exp


def test_cli_hash_uses_and_fills_the_catalog_cache(tmp_path, cli):
    p = tmp_path / "m.safetensors"
    p.write_bytes(st_bytes(2048))
    db = str(tmp_path / "c.db")
    first = json.loads(cli("hash", str(p), "--json", "--db", db).stdout)
    second = json.loads(cli("hash", str(p), "--json", "--db", db).stdout)
    assert (first["cached"], second["cached"]) == (False, True)
    assert {k: v for k, v in first.items() if k != "cached"} == {k: v for k, v in second.items() if k != "cached"}
    r = cli("hash", str(tmp_path / "nope.safetensors"), "--db", db)
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error:") and "Traceback" not in r.stderr
