"""Bounds and resource limits: hostile sizes, counts and nesting give a verdict, never a crash or a
hang. File-level cases run the real CLI in a subprocess with a timeout (a hang fails the test)."""

from __future__ import annotations

import json
import struct

import pytest
from hostile.corpus import binint, call, g, legacy_file, p2, state_dict, tensor_v2, tup, u
from hostile.zipbuild import build_zip, torch_members

from ckptlab.errors import CkptlabError, FormatError
from ckptlab.formats import open_model, pickle_vm
from ckptlab.ops.convert import convert
from ckptlab.security import check

REC = {"0": struct.pack("<3f", 1, 2, 3)}


def _nested_legacy(levels: int) -> bytes:
    inner = p2(b"}")
    for _ in range(levels):
        blob = legacy_file(inner)
        inner = p2(call(g("torch.storage", "_load_from_bytes"), b"B" + struct.pack("<I", len(blob)) + blob))
    return inner


CASES = {
    # name: (bytes, acceptable verdicts)
    # CPython's memo is an array grown to the index (a 4G index fails there for memory); ours is sparse
    "memo_index_4g": (b"\x80\x02}r\xff\xff\xff\xff.", {"safe"}),
    # CPython has no MARK limit: 200k MARKs read, and the pickle's object (None) is no torch file
    "marks_200k": (b"\x80\x02" + b"(" * 200_000 + b"N.", {"corrupt"}),
    "nested_lists_50k": (b"\x80\x02" + b"(" * 50_000 + b"l" * 50_000 + b".", {"safe"}),
    "self_cycle": (b"\x80\x02]q\x00h\x00a.", {"safe"}),
    "billion_laughs": (b"\x80\x02]q\x00" + b"".join(
        b"(" + (b"h" + bytes([i])) * 10 + b"lq" + bytes([i + 1]) for i in range(40)) + b".", {"safe"}),
    "binbytes8_2e62": (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"xx.", {"suspicious", "corrupt"}),
    "binunicode8_huge": (b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"xx.", {"suspicious", "corrupt"}),
    "long4_huge": (b"\x80\x02\x8b" + struct.pack("<i", 1 << 30) + b"\x01.", {"corrupt"}),
    # read, not refused: CPython reads it where PYTHONINTMAXSTRDIGITS=0 lifts the digit limit
    "text_long_many_digits": (b"L" + b"9" * 100_000 + b"L\n.", {"safe"}),
    "frame_2e63": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 63) + b"N.", {"malicious"}),
    "zip_too_many_entries": (build_zip(torch_members("archive", p2(b"}")))[:-22] + struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFE, 0xFFFE, 46, 0, 0), {"corrupt", "malicious"}),
    "zip64_locator_past_eof": (build_zip(torch_members("archive", p2(b"}")))[:-22] + b"PK\x06\x07" + struct.pack(
        "<IQI", 0, 1 << 50, 1) + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                                             0xFFFFFFFF, 0), {"corrupt"}),
    "zip_truncated_half": (build_zip(torch_members("archive", p2(state_dict(("w", tensor_v2("0", 3)))), REC))[:300],
                           {"corrupt"}),
    "legacy_count_lie": (legacy_file(p2(b"}(" + u("w") + call(
        g("torch._utils", "_rebuild_tensor_v2"), tup(u("storage"), g("torch", "FloatStorage"), u("1"), u("cpu"),
                                                     binint(3), b"N") + b"Q", binint(0), tup(binint(3)),
        tup(binint(1)), b"\x89", call(g("collections", "OrderedDict"))) + b"u"), keys_stream=p2(b"](" + u("1") + b"e"),
        records=struct.pack("<q", 1 << 40) + b"\0" * 12), {"corrupt", "malicious"}),
    "legacy_count_mismatch": (legacy_file(p2(b"}(" + u("w") + call(
        g("torch._utils", "_rebuild_tensor_v2"), tup(u("storage"), g("torch", "FloatStorage"), u("1"), u("cpu"),
                                                     binint(3), b"N") + b"Q", binint(0), tup(binint(3)),
        tup(binint(1)), b"\x89", call(g("collections", "OrderedDict"))) + b"u"), keys_stream=p2(b"](" + u("1") + b"e"),
        records=struct.pack("<q", 2) + b"\0" * 8), {"malicious"}),
    "negative_numel": (build_zip(torch_members("archive", p2(state_dict(("w", tensor_v2("0", -3)))), REC)),
                       {"suspicious", "corrupt"}),
    "stride_zero_2e40": (build_zip(torch_members("archive", p2(state_dict(
        ("w", tensor_v2("0", 3, size=(1 << 20, 1 << 20), stride=(0, 0))))), REC)), {"suspicious"}),
    "negative_stride": (build_zip(torch_members("archive", p2(state_dict(("w", tensor_v2("0", 3, stride=(-1,))))),
                                                REC)), {"suspicious"}),
    "missing_record": (build_zip(torch_members("archive", p2(state_dict(("w", tensor_v2("7", 3)))), REC)),
                       {"corrupt"}),
    # read 3 levels deep (the innermost object is a dict, not a storage: torch would refuse the magic)
    "nested_load_from_bytes_x3": (_nested_legacy(3), {"corrupt"}),
    "nested_load_from_bytes_x40": (_nested_legacy(40), {"suspicious"}),
    "junk": (b"\x00\x01\x02 not a model at all" * 10, {"corrupt"}),
    "empty": (b"", {"corrupt"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_sizes_get_a_verdict_not_a_crash(name, tmp_path, cli):
    data, allowed = CASES[name]
    p = tmp_path / f"{name}.ckpt"
    p.write_bytes(data)
    r = cli("check", p, "--json", timeout=90)
    assert "Traceback" not in r.stderr, r.stderr
    [rec] = [json.loads(x) for x in r.stdout.splitlines()]
    assert rec["verdict"] in allowed, (rec["verdict"], rec["findings"])
    assert r.returncode == {"safe": 0, "suspicious": 3, "malicious": 4, "corrupt": 5}[rec["verdict"]]


@pytest.mark.parametrize("name", ["zip_truncated_half", "missing_record", "junk", "empty", "legacy_count_lie"])
def test_corrupt_files_fail_with_one_line(name, tmp_path, cli):
    p = tmp_path / f"{name}.ckpt"
    p.write_bytes(CASES[name][0])
    with pytest.raises(CkptlabError):
        src = open_model(p)
        for k in src.keys():  # a file that opens must fail cleanly on the bad tensor
            src.get(k)
    r = cli("convert", p, "--out-dir", tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("ckptlab: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.safetensors"))


def test_memo_entry_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_vm, "MAX_MEMO", 1000)
    body = b"".join(b"Nr" + struct.pack("<I", i) + b"0" for i in range(1500))
    p = tmp_path / "memo.pt"
    p.write_bytes(b"\x80\x02" + body + b"N.")
    r = check(p)
    assert r.verdict == "suspicious" and any(f.kind == "resource_limit" for f in r.issues)


def test_stack_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(pickle_vm, "MAX_STACK", 1000)
    p = tmp_path / "stack.pt"
    p.write_bytes(b"\x80\x02" + b"N" * 2000 + b".")
    assert check(p).verdict == "suspicious"


def test_view_past_storage_is_refused_when_read(tmp_path):
    p = tmp_path / "view.ckpt"
    p.write_bytes(build_zip(torch_members("archive", p2(state_dict(("w", tensor_v2("0", 3, size=(4,))))), REC)))
    with open_model(p) as src:  # suspicious files open (inert data), but the bad tensor is never materialised
        assert src.verdict == "suspicious"
        with pytest.raises(FormatError):
            src.get("w")
    with pytest.raises(CkptlabError):
        convert(p, out_dir=tmp_path, allow_suspicious=True)
    assert not list(tmp_path.glob("*.safetensors"))


def test_payload_past_a_limit_is_still_rated_and_the_file_never_opens(tmp_path, monkeypatch):
    """Past a resource limit the values are lost, but the rest of the stream is skimmed for what it imports
    (STACK_GLOBAL operands through the memo too); and a file read only in part is never opened, whatever the
    verdict or --allow-suspicious."""
    from hostile.corpus import p0_payload, sh, short_u

    monkeypatch.setattr(pickle_vm, "MAX_MARKS", 1000)
    p = tmp_path / "marks.ckpt"
    p.write_bytes(b"(" * 1001 + p0_payload(tmp_path / "canary"))
    r = check(p)
    assert r.verdict == "malicious", [f.detail for f in r.issues]
    assert any(f.kind == "resource_limit" for f in r.issues)
    assert any("os.system" in f.detail and "past the resource limit" in f.detail for f in r.issues)
    q = tmp_path / "memo.ckpt"  # STACK_GLOBAL with both names fetched from the memo
    q.write_bytes(b"\x80\x04" + b"(" * 1001 + short_u("os") + b"\x94" + short_u("system") + b"\x94" + b"0" * 2 +
                  b"h\x00h\x01\x93(" + short_u(sh(tmp_path / "canary")) + b"tR.")
    assert check(q).verdict == "malicious"
    benign_past_limit = tmp_path / "benign.ckpt"
    benign_past_limit.write_bytes(b"(" * 1001 + b"N.")
    assert check(benign_past_limit).verdict == "suspicious"
    for f in (p, q, benign_past_limit):
        with pytest.raises(CkptlabError):
            open_model(f)
        with pytest.raises(CkptlabError):
            convert(f, out_dir=tmp_path, allow_suspicious=True)
    assert not (tmp_path / "canary").exists()
    assert not list(tmp_path.glob("*.safetensors"))


def test_nested_payload_deeper_than_the_limit_is_refused(tmp_path):
    """Past MAX_NESTED_DEPTH nested payloads are not read: the file is refused by every command."""
    p = tmp_path / "deep.ckpt"
    p.write_bytes(_nested_legacy(pickle_vm.MAX_NESTED_DEPTH + 2))
    r = check(p)
    assert r.verdict == "suspicious" and any(f.kind == "nested_depth" for f in r.issues)
    with pytest.raises(CkptlabError, match="could not read all"):
        open_model(p)
    with pytest.raises(CkptlabError):
        convert(p, out_dir=tmp_path, allow_suspicious=True)
