"""PickleSource details: byte order, compressed records, whole pickled modules, the verdict gates
(``scan_only``, ``allow_suspicious``). Oracles: the values written (struct/numpy) and the original
torch objects; nothing hostile is loaded."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hostile.corpus import binint, call, g, legacy_file, os_system, p2, state_dict, tensor_v2, tup, u
from hostile.zipbuild import Member, build_zip, torch_members
from safetensors.torch import load_file

from ckptlab.errors import UnsafeFileError
from ckptlab.formats import open_model
from ckptlab.formats.pickle import PickleSource
from ckptlab.ops.convert import convert


def _zip_with(tmp_path, name: str, data_pkl: bytes, records: dict, byteorder: bytes = b"little", method: int = 0):
    ms = torch_members("archive", data_pkl, records)
    for m in ms:
        if m.name.endswith("byteorder"):
            m.data = byteorder
        if "/data/" in m.name:
            m.method = method
    p = tmp_path / name
    p.write_bytes(build_zip(ms))
    return p


def test_big_endian_records_are_swapped(tmp_path):
    vals = np.array([1.5, -2.0, 1e-3], dtype=">f4")
    halves = np.array([0.5, -4.0], dtype=">f2")
    pkl = p2(state_dict(("w", tensor_v2("0", 3)), ("h", tensor_v2("1", 2, "HalfStorage", size=(2,)))))
    p = _zip_with(tmp_path, "be.ckpt", pkl, {"0": vals.tobytes(), "1": halves.tobytes()}, byteorder=b"big")
    with open_model(p) as src:
        assert src.verdict == "safe"
        assert src.get("w").tolist() == vals.astype("<f4").tolist()
        assert src.get("h").tolist() == [0.5, -4.0] and src.get("h").dtype == torch.float16


def test_legacy_big_endian(tmp_path):
    pid = tup(u("storage"), g("torch", "DoubleStorage"), u("9"), u("cpu"), binint(2), b"N")
    t = call(g("torch._utils", "_rebuild_tensor_v2"), pid + b"Q", binint(0), tup(binint(2)), tup(binint(1)), b"\x89",
             call(g("collections", "OrderedDict")))
    sysinfo = p2(b"}(" + u("protocol_version") + b"M\xe9\x03" + u("little_endian") + b"\x89" + b"u")
    data = legacy_file(p2(b"}(" + u("w") + t + b"u"), sys_stream=sysinfo, keys_stream=p2(b"](" + u("9") + b"e"),
                       records=struct.pack("<q", 2) + struct.pack(">2d", 3.25, -1.0))
    p = tmp_path / "be_legacy.pt"
    p.write_bytes(data)
    with open_model(p) as src:
        assert src.get("w").tolist() == [3.25, -1.0]


def test_deflated_records_are_read_but_suspicious(tmp_path):
    vals = struct.pack("<3f", 7, 8, 9)
    p = _zip_with(tmp_path, "deflate.ckpt", p2(state_dict(("w", tensor_v2("0", 3)))), {"0": vals}, method=8)
    with open_model(p) as src:
        assert src.verdict == "suspicious"
        assert any("compressed" in w for w in src.warnings)
        assert src.get("w").tolist() == [7.0, 8.0, 9.0]
    with pytest.raises(UnsafeFileError):
        convert(p, out_dir=tmp_path)
    [r] = convert(p, out_dir=tmp_path, allow_suspicious=True)
    assert load_file(str(r.output))["w"].tolist() == [7.0, 8.0, 9.0]
    assert any("ignored (suspicious)" in w and "compressed" in w for w in r.warnings)


def test_whole_pickled_module_yields_its_state_dict(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                            torch.nn.Sequential(torch.nn.Linear(2, 3)))
    p = tmp_path / "RealESRGAN_whole.pth"
    torch.save(m, p)
    want = m.state_dict()
    with open_model(p) as src:
        assert src.verdict == "suspicious"  # torch.nn classes are not data
        assert src.keys() == list(want)
        assert all(torch.equal(src.get(k), want[k]) for k in want)


def test_scan_only_and_allow_suspicious_gates(tmp_path):
    mal = tmp_path / "mal.pt"
    mal.write_bytes(p2(os_system(tmp_path / "canary")))
    with pytest.raises(UnsafeFileError):
        PickleSource(mal)
    src = PickleSource(mal, scan_only=True)
    assert src.verdict == "malicious" and len(src) == 0
    src.close()
    sus = tmp_path / "sus.pt"
    sus.write_bytes(p2(b"}(" + u("x") + call(g("mylib.models", "Thing")) + b"u"))
    with pytest.raises(UnsafeFileError):
        PickleSource(sus, allow_suspicious=False)
    with PickleSource(sus) as s:
        assert s.verdict == "suspicious" and s.extra["x"] == {"__class__": "mylib.models.Thing"}
    assert not (tmp_path / "canary").exists()


def test_deflated_member_inside_zip_member_list(tmp_path):
    # Member helper sanity: a deflated data.pkl is still read (torch accepts DEFLATE)
    ms = torch_members("archive", p2(state_dict(("w", tensor_v2("0", 3)))), {"0": struct.pack("<3f", 1, 2, 3)})
    ms[0] = Member(ms[0].name, ms[0].data, method=8)
    p = tmp_path / "dpkl.ckpt"
    p.write_bytes(build_zip(ms))
    with open_model(p) as src:
        assert src.get("w").tolist() == [1.0, 2.0, 3.0]


def test_list_root_gets_index_keys(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(2), {"a": torch.zeros(3)}], p)
    with open_model(p) as src:
        assert src.keys() == ["0", "1.a"]
        assert src.get("0").tolist() == [1.0, 1.0]


def test_zip64_archives_from_another_writer(tmp_path, monkeypatch):
    """Files over 4 GiB use zip64 records (sizes/offsets in extra fields, zip64 end records). CPython's
    zipfile, with its limits lowered, writes them for a small file: every member and the directory."""
    import zipfile

    src = tmp_path / "small.ckpt"
    sd = {"model.diffusion_model.out.2.weight": torch.randn(3, 4), "model.diffusion_model.out.2.bias": torch.ones(3)}
    torch.save({"state_dict": sd}, src)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    p = tmp_path / "zip64.ckpt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            with zout.open(info.filename, "w", force_zip64=True) as fh:
                fh.write(zin.read(info.filename))
    assert b"PK\x06\x06" in p.read_bytes()  # a zip64 end record was written
    with open_model(p) as s:
        assert s.verdict == "safe", [f.detail for f in s.findings if f.severity != "info"]
        assert all(torch.equal(s.get(k), v) for k, v in sd.items())
