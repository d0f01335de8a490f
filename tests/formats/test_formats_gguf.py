"""GGUF header reading, checked against files written (and read back) by the ``gguf`` package,
the reference implementation from llama.cpp."""

from __future__ import annotations

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFEndian, GGUFReader, GGUFWriter  # noqa: E402

from ckptlab.errors import CkptlabError, FormatError, UnsupportedFormatError  # noqa: E402
from ckptlab.formats import detect_format, open_model  # noqa: E402
from ckptlab.formats.gguf import GGML_TYPES, QUANTIZED_MESSAGE, GGUFSource  # noqa: E402

# Real Flux transformer key names (the layout city96's ComfyUI-GGUF files use), small shapes.
NORM = "double_blocks.0.img_attn.norm.key_norm.scale"
QKV = "double_blocks.0.img_attn.qkv.weight"
MLP = "double_blocks.0.img_mlp.0.weight"
BIAS = "double_blocks.0.img_mlp.0.bias"
IMG_IN = "img_in.weight"
CONV = "final_layer.adaLN_modulation.1.weight"


def _rng(i=0):
    return np.random.default_rng(i)


def _write(path, endian=GGUFEndian.LITTLE):
    w = GGUFWriter(str(path), "flux", endianess=endian)
    w.add_string("general.name", "flux1-dev-test")
    w.add_uint32("general.quantization_version", 2)
    w.add_float32("test.scale", 0.5)
    w.add_bool("test.flag", True)
    w.add_int64("test.big", -(2**40))
    w.add_array("test.strings", ["a", "bé", ""])
    w.add_array("test.ints", [1, 2, 3])
    tensors = {
        NORM: _rng(1).standard_normal(128).astype(np.float32),
        BIAS: _rng(2).standard_normal(64).astype(np.float16),
        QKV: _rng(3).standard_normal((96, 64)).astype(np.float32),     # Q8_0
    }
    w.add_tensor(NORM, tensors[NORM])
    w.add_tensor(BIAS, tensors[BIAS])
    q = gguf.quants.quantize(tensors[QKV], Q.Q8_0)
    w.add_tensor(QKV, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
    q = _rng(6).integers(0, 255, (8, 144), dtype=np.uint8)  # gguf-py cannot quantize K types: raw blocks
    w.add_tensor(MLP, q, raw_shape=q.shape, raw_dtype=Q.Q4_K)
    # ComfyUI-GGUF flattens odd shapes before quantizing and records the original shape
    img_in = _rng(5).standard_normal((3, 64, 4)).astype(np.float32)
    flat = img_in.reshape(-1, 256)
    w.add_array(f"comfy.gguf.orig_shape.{IMG_IN}", list(img_in.shape))
    q = gguf.quants.quantize(flat, Q.Q8_0)
    w.add_tensor(IMG_IN, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
    tensors[IMG_IN] = img_in
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture
def flux_gguf(tmp_path):
    p = tmp_path / "flux1-dev-Q8_0.gguf"
    return p, _write(p)


def test_ggml_type_table_matches_the_reference():
    ref = {int(t): (t.name, *gguf.constants.GGML_QUANT_SIZES[t]) for t in Q}
    for tid, row in GGML_TYPES.items():
        if tid in ref:
            assert ref[tid] == row
    missing = set(ref) - set(GGML_TYPES)
    assert not missing, f"types the reference knows and we do not: {sorted(missing)}"


def test_header_matches_gguf_reader(flux_gguf):
    p, _ = flux_gguf
    assert detect_format(p) == "gguf"
    src = open_model(p)
    assert isinstance(src, GGUFSource)
    reader = GGUFReader(str(p))
    assert src.version == 3 and src.architecture == "flux"
    assert src.keys() == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = src.info(t.name)
        assert info.ggml_type == t.tensor_type.name
        assert info.ne == tuple(int(d) for d in t.shape)
        assert info.nbytes == int(t.n_bytes)
        assert info.numel == int(t.n_elements)
        assert info.offset == int(t.data_offset)
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own pseudo-fields (version, counts)
        assert src.fields[name] == pytest.approx(field.contents()) if isinstance(field.contents(), float) \
            else src.fields[name] == field.contents(), name


def test_shapes_dtypes_and_metadata(flux_gguf):
    p, tensors = flux_gguf
    src = GGUFSource(p)
    assert src.info(NORM).dtype == "F32" and src.info(NORM).shape == (128,)
    assert src.info(BIAS).dtype == "F16"
    assert src.info(QKV).dtype == "Q8_0" and src.info(QKV).shape == (96, 64)  # torch order, not ne order
    assert src.info(QKV).nbytes == 96 * 64 // 32 * 34
    assert src.info(MLP).dtype == "Q4_K" and src.info(MLP).shape == (8, 256)
    assert src.info(IMG_IN).shape == (3, 64, 4)  # comfy.gguf.orig_shape honoured
    assert src.metadata["general.architecture"] == "flux"
    assert src.metadata["general.name"] == "flux1-dev-test"
    assert src.metadata["test.flag"] == "true"
    assert src.metadata["test.strings"] == '["a", "bé", ""]'
    assert src.fields["test.big"] == -(2**40)
    assert src.quantized_types == {"F32": 1, "F16": 1, "Q8_0": 2, "Q4_K": 1}
    assert src.extra["gguf_alignment"] == 32 and src.size == p.stat().st_size


def test_get_returns_unquantized_and_refuses_quantized(flux_gguf):
    p, tensors = flux_gguf
    with GGUFSource(p) as src:
        np.testing.assert_array_equal(src.get(NORM).numpy(), tensors[NORM])
        np.testing.assert_array_equal(src.get(BIAS).numpy(), tensors[BIAS])
        with pytest.raises(UnsupportedFormatError) as ei:
            src.get(QKV)
        assert QUANTIZED_MESSAGE in str(ei.value) and str(p) in str(ei.value)


def test_big_endian_file(tmp_path):
    p = tmp_path / "be.gguf"
    tensors = _write(p, GGUFEndian.BIG)
    src = GGUFSource(p)
    assert src.extra["gguf_endian"] == "big"
    assert src.fields["test.ints"] == [1, 2, 3] and src.fields["test.big"] == -(2**40)
    assert src.info(QKV).shape == (96, 64)
    np.testing.assert_array_equal(src.get(NORM).numpy(), tensors[NORM])


def _v3(kv: bytes = b"", n_kv: int = 0, infos: bytes = b"", n_tensors: int = 0, data: bytes = b"") -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + infos
    return head + b"\0" * (-len(head) % 32) + data


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _info(name, ne, tid, offset):
    return _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", tid, offset)


BAD = {
    "truncated_in_metadata": (_v3(_s("general.architecture") + struct.pack("<I", 8), 1)[:-3], FormatError,
                              "truncated"),
    "huge_counts": (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62), FormatError, "more than the file can hold"),
    "huge_string": (_v3(struct.pack("<Q", 2**40) + b"x", 1), FormatError, "runs past the end"),
    "huge_array": (_v3(_s("a") + struct.pack("<IIQ", 9, 4, 2**40), 1), FormatError, "runs past the end"),
    "unknown_value_type": (_v3(_s("a") + struct.pack("<I", 99), 1), FormatError, "unknown metadata value type"),
    "bad_utf8_key": (_v3(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), 1), FormatError,
                     "not valid UTF-8"),
    "duplicate_key": (_v3((_s("a") + struct.pack("<IB", 0, 1)) * 2, 2), FormatError, "appears twice"),
    "bad_alignment": (_v3(_s("general.alignment") + struct.pack("<II", 4, 3), 1), FormatError, "power of two"),
    "too_many_dims": (_v3(infos=_info(NORM, (1, 1, 1, 1, 1), 0, 0), n_tensors=1, data=b"\0" * 32), FormatError,
                      "dimensions"),
    "unaligned_offset": (_v3(infos=_info(NORM, (1,), 0, 4), n_tensors=1, data=b"\0" * 64), FormatError,
                         "not a multiple of the alignment"),
    "data_truncated": (_v3(infos=_info(NORM, (128,), 0, 0), n_tensors=1, data=b"\0" * 100), FormatError,
                       "past the end of the file"),
    "block_mismatch": (_v3(infos=_info(QKV, (33, 2), 8, 0), n_tensors=1, data=b"\0" * 200), FormatError,
                       "multiple of 32"),
    "version_9": (b"GGUF" + struct.pack("<IQQ", 9, 0, 0), UnsupportedFormatError, "version 9"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_corrupt_headers_are_refused(tmp_path, name):
    data, exc, fragment = BAD[name]
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(data)
    with pytest.raises(exc) as ei:
        open_model(p)
    assert fragment in str(ei.value) and str(p) in str(ei.value)
    assert "\n" not in str(ei.value)


def test_hand_built_minimal_file_and_reference_agree(tmp_path):
    """Our spec-following builder and the reference reader agree, so the BAD cases are real GGUF."""
    p = tmp_path / "min.gguf"
    p.write_bytes(_v3(_s("general.architecture") + struct.pack("<I", 8) + _s("sdxl"), 1,
                      _info("input_blocks.0.0.bias", (4,), 0, 0), 1, np.arange(4, dtype=np.float32).tobytes()))
    reader = GGUFReader(str(p))
    src = GGUFSource(p)
    assert src.architecture == reader.fields["general.architecture"].contents() == "sdxl"
    assert src.get("input_blocks.0.0.bias").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_every_truncation_of_the_header_is_refused(flux_gguf):
    """Each prefix of a real file that cuts into the header or data is a CkptlabError, not a crash."""
    p, _ = flux_gguf
    data = p.read_bytes()
    full = GGUFSource(p)
    last_end = max(i.offset + i.nbytes for i in full.infos().values())
    cut = p.with_name("cut.gguf")
    for n in [*range(0, full.data_start, 5), last_end - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(CkptlabError):
            GGUFSource(cut)


def test_version_1_uses_32_bit_sizes(tmp_path):
    """GGUF v1 (Aug 2023): counts, string lengths and dimensions are u32 (v2 widened them)."""
    def s32(text):
        b = text.encode()
        return struct.pack("<I", len(b)) + b

    head = b"GGUF" + struct.pack("<III", 1, 1, 1) + s32("general.architecture") + struct.pack("<I", 8) + s32("sd1")
    head += s32("input_blocks.0.0.weight") + struct.pack("<I", 2) + struct.pack("<II", 2, 3) + struct.pack("<IQ", 0, 0)
    data = np.arange(6, dtype=np.float32)
    p = tmp_path / "v1.gguf"
    p.write_bytes(head + b"\0" * (-len(head) % 32) + data.tobytes())
    src = GGUFSource(p)
    assert src.version == 1 and src.architecture == "sd1"
    assert src.info("input_blocks.0.0.weight").shape == (3, 2)
    assert src.get("input_blocks.0.0.weight").flatten().tolist() == data.tolist()


def test_huge_numeric_array_is_skipped_not_decoded(tmp_path, monkeypatch):
    import ckptlab.formats.gguf as g

    monkeypatch.setattr(g, "DECODE_NUMBERS_UP_TO", 100)
    n = 1000
    kv = _s("tokenizer.ggml.token_type") + struct.pack("<IIQ", 9, 5, n) + struct.pack(f"<{n}i", *range(n))
    kv += _s("general.architecture") + struct.pack("<I", 8) + _s("flux")
    p = tmp_path / "big_array.gguf"
    p.write_bytes(_v3(kv, 2))
    src = GGUFSource(p)
    assert src.architecture == "flux"  # parsing continued right after the skipped array
    assert src.metadata["tokenizer.ggml.token_type"] == "<array of 1000 int32>"
    assert GGUFReader(str(p)).fields["general.architecture"].contents() == "flux"
