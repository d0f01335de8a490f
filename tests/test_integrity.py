"""``check --deep`` (``ckptlab.integrity``): NaN/Inf counts against torch's own ``isfinite``, zip record
CRCs of damaged pickles, and the CLI's verdicts and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ckptlab.integrity import count_nonfinite
from ckptlab.security import check

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_nonfinite_count_equals_torch_isfinite(name):
    dt = DTYPES[name]
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(10_000, generator=g) * 100).to(torch.float32)
    t[[3, 77, 512]] = float("nan")
    if name != "F8_E4M3":  # e4m3fn has no infinity (casting one gives NaN)
        t[[10, 9999]] = float("inf")
        t[20] = float("-inf")
    x = t.to(dt)
    want = int((~torch.isfinite(x.float())).sum())
    assert want >= 3
    raw = x.view(torch.uint8).numpy().tobytes()
    assert count_nonfinite(raw, name) == want
    assert count_nonfinite(x[:0].view(torch.uint8).numpy().tobytes(), name) == 0


def test_integers_have_no_nonfinite_values():
    assert count_nonfinite(torch.full((64,), -1, dtype=torch.int64).numpy().tobytes(), "I64") == 0


def _sd_tensors():
    g = torch.Generator().manual_seed(0)
    return {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(32, 32, 1, 1, generator=g).half(),
            "model.diffusion_model.out.2.bias": torch.randn(4, generator=g).half(),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


def test_safetensors_with_nan_is_corrupt_only_when_deep(tmp_path):
    ts = _sd_tensors()
    clean = tmp_path / "clean.safetensors"
    save_file(ts, str(clean))
    ts["model.diffusion_model.out.2.bias"][1] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(ts, str(broken))
    assert check(clean, deep=True).verdict == "safe"
    assert check(broken).verdict == "safe"  # the header alone cannot tell
    r = check(broken, deep=True)
    assert r.verdict == "corrupt"
    f = next(f for f in r.findings if f.kind == "nonfinite_values")
    assert "model.diffusion_model.out.2.bias" in f.detail and f.location == "model.diffusion_model.out.2.bias"


def _torch_ckpt(path, tensors):
    torch.save({"state_dict": tensors}, path)
    return path


def test_damaged_zip_record_and_nan_storage(tmp_path):
    ts = _sd_tensors()
    good = _torch_ckpt(tmp_path / "good.ckpt", ts)
    assert check(good, deep=True).verdict == "safe"
    # flip one bit inside the first tensor's bytes
    raw = bytearray(good.read_bytes())
    needle = ts["model.diffusion_model.input_blocks.1.1.proj_in.weight"].numpy().tobytes()
    at = raw.index(needle) + 7
    raw[at] ^= 0x10
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(raw))
    assert check(damaged).verdict == "safe"  # torch.load would load it too, with a wrong value
    r = check(damaged, deep=True)
    assert r.verdict == "corrupt" and any(f.kind == "bad_record_crc" and "damaged" in f.detail for f in r.findings)
    # NaN inside a storage of a well-formed archive
    ts["model.diffusion_model.out.2.bias"][0] = float("inf")
    nan = _torch_ckpt(tmp_path / "inf.ckpt", ts)
    r = check(nan, deep=True)
    assert r.verdict == "corrupt" and any(f.kind == "nonfinite_values" for f in r.findings)


def test_cli_deep_exit_code_and_no_torch_import(tmp_path, cli):
    ts = _sd_tensors()
    ts["model.diffusion_model.out.2.bias"][2] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(ts, str(broken))
    r = cli("check", broken)
    assert r.returncode == 0
    r = cli("check", "--deep", broken)
    assert r.returncode == 5 and "nonfinite_values" in r.stdout and "render black" in r.stdout
    # the deep check reads bytes with numpy; like the header path, it never imports torch
    code = ("import sys; from ckptlab.security import check; "
            f"r = check({str(broken)!r}, deep=True); print(r.verdict, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["corrupt", "False"]


# -- deflated records: bounded pieces, sizes checked against both headers -------------------------------------

def _deflated_zip(values: bytes, numel: int, *, declare: int | None = None, local_declare: int | None = None):
    """A torch zip whose record data/0 is DEFLATE-compressed; ``declare``/``local_declare`` overwrite the
    inflated size the central directory / the local header record (offsets found with zipfile, a peer)."""
    import io
    import struct
    import zipfile

    from hostile.corpus import p2, state_dict, tensor_v2
    from hostile.zipbuild import Member, build_zip, torch_members

    ms = torch_members("archive", p2(state_dict(("w", tensor_v2("0", numel, size=(numel,))))))
    ms.insert(4, Member("archive/data/0", values, method=8))
    data = bytearray(build_zip(ms))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("archive/data/0")
    if local_declare is not None:
        data[info.header_offset + 22:info.header_offset + 26] = struct.pack("<I", local_declare)
    if declare is not None:
        cd = bytes(data).index(b"PK\x01\x02")
        while True:  # the central entry of archive/data/0
            nlen = struct.unpack("<H", data[cd + 28:cd + 30])[0]
            if bytes(data[cd + 46:cd + 46 + nlen]) == b"archive/data/0":
                break
            cd = bytes(data).index(b"PK\x01\x02", cd + 4)
        data[cd + 24:cd + 28] = struct.pack("<I", declare)
        if local_declare is None:
            data[info.header_offset + 22:info.header_offset + 26] = struct.pack("<I", declare)
    return bytes(data)


def test_deep_check_inflates_a_big_record_in_bounded_pieces(tmp_path):
    """64 MiB of zeros deflate to ~64 KiB: --deep must CRC and scan them without holding them whole
    (tracemalloc sees every Python and numpy allocation; the mmap of the file is not one)."""
    import tracemalloc

    numel = 16 << 20
    p = tmp_path / "bomb.ckpt"
    p.write_bytes(_deflated_zip(b"\0" * (numel * 4), numel))
    assert p.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        r = check(p, deep=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.verdict == "suspicious", [f.detail for f in r.issues]  # compressed records are unusual, not damage
    assert not [f for f in r.issues if f.kind in ("bad_record", "bad_record_crc")]
    assert peak < 24 << 20, peak


def test_record_inflating_past_its_declared_size_is_refused(tmp_path):
    p = tmp_path / "more.ckpt"
    p.write_bytes(_deflated_zip(b"\0" * (1 << 20), 3, declare=12))  # header and pickle say 12 bytes
    r = check(p, deep=True)
    assert any(f.kind == "bad_record" and "more than the 12 bytes" in f.detail for f in r.issues), r.issues
    from ckptlab.errors import FormatError
    from ckptlab.formats import open_model

    with open_model(p) as src, pytest.raises(FormatError):
        src.get("w")


def test_local_and_central_sizes_must_agree(tmp_path):
    import struct

    vals = struct.pack("<3f", 1, 2, 3)
    p = tmp_path / "lie.ckpt"
    p.write_bytes(_deflated_zip(vals, 3, local_declare=4096))
    r = check(p)
    assert any(f.kind == "zip_size_mismatch" and "4096" in f.detail for f in r.issues), r.issues
    from ckptlab.errors import FormatError
    from ckptlab.formats import open_model

    with open_model(p) as src, pytest.raises(FormatError):
        src.get("w")  # the record is not read at all
    p2_ = tmp_path / "ok.ckpt"
    p2_.write_bytes(_deflated_zip(vals, 3))
    with open_model(p2_) as src:
        assert src.get("w").tolist() == [1.0, 2.0, 3.0]
