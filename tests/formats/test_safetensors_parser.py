"""The strict safetensors header parser: every violation is refused with a one-line error naming
the file and the problem, and the reference ``safetensors`` library serves as the oracle - every
header it rejects we reject too, and the few we reject beyond it are listed (``STRICTER``)."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors import SafetensorError, safe_open

from ckptlab.errors import CkptlabError, FormatError
from ckptlab.formats import detect_format, open_model
from ckptlab.formats.safetensors import MAX_HEADER, SafetensorsSource, read_header

KEY = "model.diffusion_model.input_blocks.0.0.weight"
KEY2 = "model.diffusion_model.input_blocks.0.0.bias"


def entry(dtype="F32", shape=(1,), offs=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def frame(raw: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(raw)) + raw + data


def hdr(obj, data: bytes = b"") -> bytes:
    return frame(json.dumps(obj).encode(), data)


Z4 = b"\0" * 4

# name -> (file bytes, fragment the error message must contain)
BAD = {
    "empty_file": (b"", "too short"),
    "seven_bytes": (b"\x05\0\0\0\0\0\0", "too short"),
    "length_zero": (struct.pack("<Q", 0), "header length is 0"),
    "length_huge": (struct.pack("<Q", MAX_HEADER + 1) + b"{}", "exceeds"),
    "length_past_eof": (struct.pack("<Q", 100) + b"{}", "past the end of the file"),
    "bad_utf8": (frame(b'{"a\xff": 1}'), "not valid UTF-8"),
    "lone_surrogate_key": (frame(b'{"\\ud800": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', Z4),
                           "surrogate"),
    "lone_surrogate_meta": (frame(b'{"__metadata__": {"a": "\\udc00"}}'), "surrogate"),
    "json_list": (hdr([1, 2]), "not a JSON object"),
    "json_string": (hdr("x"), "not a JSON object"),
    "json_garbage": (frame(b"{not json"), "not valid JSON"),
    "json_trailing_nul": (frame(b"{}\0\0"), "not valid JSON"),
    "json_nan": (frame(b'{"__metadata__": {"a": NaN}}'), "NaN"),
    "duplicate_tensor_key": (frame(json.dumps({KEY: entry()}).encode()[:-1] + b", "
                                   + json.dumps(KEY).encode() + b": " + json.dumps(entry()).encode() + b"}", Z4),
                             "duplicate key"),
    "duplicate_metadata_key": (frame(b'{"__metadata__": {"a": "1", "a": "2"}}'), "duplicate key"),
    "metadata_list": (hdr({"__metadata__": ["a"]}), "__metadata__ is not an object"),
    "metadata_int_value": (hdr({"__metadata__": {"epoch": 1}}), "not a string"),
    "metadata_nested": (hdr({"__metadata__": {"ss_tags": {"a": 1}}}), "not a string"),
    "entry_not_object": (hdr({KEY: 1}), "entry is not an object"),
    "entry_missing_offsets": (hdr({KEY: {"dtype": "F32", "shape": [1]}}, Z4), "missing ['data_offsets']"),
    "entry_unknown_field": (hdr({KEY: {**entry(), "x": 1}}, Z4), "unknown fields ['x']"),
    "unknown_dtype": (hdr({KEY: entry(dtype="F99")}, Z4), "unknown dtype 'F99'"),
    "lowercase_dtype": (hdr({KEY: entry(dtype="f32")}, Z4), "unknown dtype 'f32'"),
    "shape_negative": (hdr({KEY: entry(shape=(-1,))}, Z4), "non-negative integers"),
    "shape_float": (hdr({KEY: entry(shape=(1.0,))}, Z4), "non-negative integers"),
    "shape_bool": (hdr({KEY: entry(shape=(True,))}, Z4), "non-negative integers"),
    "shape_not_list": (hdr({KEY: {**entry(), "shape": 4}}, Z4), "non-negative integers"),
    "shape_dim_too_big": (hdr({KEY: entry(shape=(2**64, 0), offs=(0, 0))}), "too large"),
    "shape_bytes_overflow": (hdr({KEY: entry(shape=(2**32, 2**32), offs=(0, 0))}), "overflows"),
    "offsets_three": (hdr({KEY: entry(offs=(0, 4, 4))}, Z4), "is not [begin, end]"),
    "offsets_float": (hdr({KEY: entry(offs=(0, 4.0))}, Z4), "is not [begin, end]"),
    "offsets_negative": (hdr({KEY: entry(offs=(-4, 0))}, Z4), "is not [begin, end]"),
    "offsets_reversed": (hdr({KEY: entry(shape=(0,), offs=(4, 0))}, Z4), "before begin"),
    "offsets_wrong_size": (hdr({KEY: entry(shape=(2,), offs=(0, 4))}, Z4), "needs 8"),
    "offsets_overlap": (hdr({KEY: entry(), KEY2: entry()}, Z4), "overlaps"),
    "offsets_gap_at_start": (hdr({KEY: entry(offs=(4, 8))}, Z4 * 2), "gap of 4 bytes"),
    "offsets_gap_between": (hdr({KEY: entry(), KEY2: entry(offs=(8, 12))}, Z4 * 3), "gap of 4 bytes"),
    "offsets_out_of_range": (hdr({KEY: entry(shape=(4,), offs=(0, 16))}, Z4), "past the end of the data buffer"),
    "trailing_bytes": (hdr({KEY: entry()}, Z4 + b"\0\0"), "does not match the header"),
    # hostile headers of the attack run (issue 12): a dtype that is not a string cost a TypeError (exit 70), a shape
    # list of a million dimensions cost a quadratic product; the reference multiplies with checked_mul from the
    # first dimension, so an overflow before a later 0 is refused too
    "dtype_list": (hdr({KEY: entry(dtype=["F32"])}, Z4), "unknown dtype ['F32']"),
    "dtype_object": (hdr({KEY: entry(dtype={"F32": 4})}, Z4), "unknown dtype"),
    "dtype_null": (hdr({KEY: entry(dtype=None)}, Z4), "unknown dtype None"),
    "shape_rank_65": (hdr({KEY: entry(shape=(1,) * 65)}, Z4), "65 dimensions (at most 64)"),
    "shape_rank_100k_huge_dims": (hdr({KEY: entry(shape=(2**62,) * 100_000, offs=(0, 0))}),
                                  "100000 dimensions (at most 64)"),
    "shape_overflow_before_zero": (hdr({KEY: entry(shape=(2**62, 2**62, 0), offs=(0, 0))}), "overflows"),
    "shape_bytes_overflow_itemsize": (hdr({KEY: entry(shape=(2**62,), offs=(0, 0))}), "overflows"),
    "shape_nested": (hdr({KEY: entry(shape=[[[1]]])}, Z4), "non-negative integers"),
    "truncated_data": (hdr({KEY: entry(shape=(2,), offs=(0, 8)), KEY2: entry(offs=(8, 12))}, Z4 * 2),
                       "file truncated?"),
}

# Violations the reference library tolerates but we refuse on purpose (ambiguous or sloppy files).
# A shape of more than 64 dimensions (formats.base.MAX_RANK: NumPy's limit, which the reference's numpy loader
# enforces, see test_safetensors_hostile.py) is refused as a resource bomb although torch would load it.
STRICTER = {"duplicate_tensor_key", "duplicate_metadata_key", "entry_unknown_field", "shape_rank_65"}


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(data)
    return p


def _library_accepts(p) -> bool:
    try:
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except (SafetensorError, TypeError, RuntimeError, ValueError, OverflowError):
        return False


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_header_violation_is_refused_with_a_clear_error(tmp_path, name):
    data, fragment = BAD[name]
    p = _write(tmp_path, name, data)
    with pytest.raises(FormatError) as ei:
        SafetensorsSource(p)
    msg = str(ei.value)
    assert fragment in msg
    assert str(p) in msg and "\n" not in msg
    # open_model goes the same way for a file that says it is safetensors
    with pytest.raises(CkptlabError):
        open_model(p)


@pytest.mark.parametrize("name", sorted(BAD))
def test_reference_library_agrees(tmp_path, name):
    p = _write(tmp_path, name, BAD[name][0])
    assert _library_accepts(p) == (name in STRICTER)


GOOD = {
    "empty_object": hdr({}),
    "metadata_only": hdr({"__metadata__": {"modelspec.architecture": "stable-diffusion-v1"}}),
    "metadata_null": hdr({"__metadata__": None}),
    "leading_and_trailing_spaces": frame(b"  {}   "),
    "empty_key": hdr({"": entry()}, Z4),
    "zero_numel_tensor_shares_offset": hdr({KEY: entry(shape=(3, 0), offs=(0, 0)), KEY2: entry()}, Z4),
    "unordered_offsets": hdr({KEY2: entry(offs=(4, 8)), KEY: entry()}, Z4 * 2),
    "shape_rank_64": hdr({KEY: entry(shape=(1,) * 64)}, Z4),
    "huge_dim_times_zero": hdr({KEY: entry(shape=(2**62, 0), offs=(0, 0)), KEY2: entry()}, Z4),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_edge_cases_the_library_accepts_we_accept_too(tmp_path, name):
    p = _write(tmp_path, name, GOOD[name])
    assert _library_accepts(p)
    src = SafetensorsSource(p)
    with safe_open(str(p), "pt") as f:
        assert sorted(src.keys()) == sorted(f.keys())
        assert src.metadata == (f.metadata() or {})
        for k in src.keys():
            assert tuple(f.get_slice(k).get_shape()) == src.info(k).shape


def test_header_order_is_kept_and_data_ranges_are_absolute(tmp_path):
    p = _write(tmp_path, "order", hdr({KEY2: entry(offs=(4, 8)), KEY: entry()}, b"\1\0\0\0\2\0\0\0"))
    src = SafetensorsSource(p)
    assert src.keys() == [KEY2, KEY]
    n = struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert src.data_range(KEY) == (8 + n, 8 + n + 4)
    assert bytes(src.raw_bytes(KEY2)) == b"\2\0\0\0"
    src.close()


def test_read_header_reports_sizes(tmp_path):
    p = _write(tmp_path, "sizes", hdr({KEY: entry(shape=(2, 2), offs=(0, 16))}, b"\0" * 16))
    h = read_header(p)
    assert h.file_size == p.stat().st_size
    assert h.data_start == p.stat().st_size - 16
    assert h.tensors[KEY].nbytes == 16 and h.tensors[KEY].numel == 4


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        SafetensorsSource(tmp_path / "nope.safetensors")


def test_file_that_changed_size_after_open_is_refused(tmp_path):
    p = _write(tmp_path, "shrinks", hdr({KEY: entry()}, Z4))
    src = SafetensorsSource(p)
    with open(p, "ab") as fh:
        fh.write(b"\0" * 4)
    with pytest.raises(FormatError, match="changed size"):
        src.get(KEY)


def test_detect_format_by_bytes_not_name(tmp_path):
    p = tmp_path / "model.ckpt"  # misleading suffix, safetensors bytes
    p.write_bytes(hdr({KEY: entry()}, Z4))
    assert detect_format(p) == "safetensors"
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(struct.pack("<Q", 0))
    assert detect_format(bad) == "safetensors"  # so the strict parser names the problem
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(CkptlabError, match="not a recognised model file"):
        detect_format(junk)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        detect_format(empty)


@pytest.mark.parametrize("length", [0x280, 0x380, 0x580])
def test_header_length_that_looks_like_a_pickle_opcode_is_still_safetensors(tmp_path, length):
    """A header length whose first bytes are 80 0N (the protocol-N pickle opener) is safetensors."""
    raw = json.dumps({KEY: entry()}).encode()
    raw += b" " * (length - len(raw))
    p = _write(tmp_path, "looks_like_pickle", frame(raw, Z4))
    assert p.read_bytes()[:2] == bytes([0x80, length >> 8])
    assert detect_format(p) == "safetensors"
    assert open_model(p).keys() == [KEY]


def test_cli_reports_each_corrupt_file_on_one_line_and_goes_on(tmp_path, cli):
    """Through the real CLI: one ``ckptlab: error: PATH: problem`` line per bad file, no traceback,
    the good file still reported, exit status non-zero."""
    names = ["length_past_eof", "json_nan", "duplicate_tensor_key", "offsets_gap_between", "truncated_data"]
    bad = [_write(tmp_path, n, BAD[n][0]) for n in names]
    good = _write(tmp_path, "good", hdr({KEY: entry()}, Z4))
    r = cli("inspect", "--json", *bad, good)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ckptlab: error:")]
    assert len(lines) == len(bad)
    for p, n in zip(bad, names, strict=True):
        assert any(str(p) in ln and BAD[n][1] in ln for ln in lines), n
    out = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    assert [o["path"] for o in out] == [str(p) for p in [*bad, good]]  # one JSON line per path, in order
    assert all(BAD[n][1] in o["error"] for n, o in zip(names, out, strict=False))
    assert "error" not in out[-1] and out[-1]["tensors"] == 1


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CkptlabError, match="not a regular file"):
        open_model(fifo)
    with pytest.raises(CkptlabError, match="not a regular file"):
        SafetensorsSource(fifo)
    from ckptlab.formats.gguf import GGUFSource

    with pytest.raises(CkptlabError, match="not a regular file"):
        GGUFSource(fifo)
