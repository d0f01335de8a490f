"""``check --deep``: read every tensor byte once and report damage a header cannot show.

- Zip pickles: each storage record's CRC-32 against the one the archive recorded (torch.load never
  checks it, so a damaged download loads wrong values silently). Deflated records are inflated first.
- Every format: float tensors holding NaN or Inf, found from the bit patterns (exponent all ones) with
  numpy, so no torch import; such a model renders black or noise.

Both are reported as ``corrupt`` findings naming the tensor or record. GGUF files (quantized blocks)
are not read.
"""

from __future__ import annotations

import zlib

from ckptlab.checksum import crc32
from ckptlab.formats.dtypes import itemsize
from ckptlab.formats.pickle_archive import zip_record_pieces
from ckptlab.formats.pickle_vm import CORRUPT, Finding

#: (unsigned type, exponent mask, NaN-only) per float dtype: a value is NaN or Inf when all its exponent
#: bits are set (float8 e4m3 has no Inf: only S.1111.111 is NaN)
_BITS = {"F16": ("u2", 0x7C00), "BF16": ("u2", 0x7F80), "F32": ("u4", 0x7F800000),
         "F64": ("u8", 0x7FF0000000000000), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F)}
_CHUNK = 1 << 22  # elements per numpy pass
LIST_MAX = 5


def count_nonfinite(buf, dtype: str, big_endian: bool = False) -> int:
    """How many NaN/Inf values the raw little-endian (or big-endian) bytes of a ``dtype`` tensor hold;
    0 for dtypes that cannot hold them (integers, bool)."""
    import numpy as np

    spec = _BITS.get(dtype)
    if spec is None:
        return 0
    kind, mask = spec
    arr = np.frombuffer(buf, dtype=np.dtype(("<" if not big_endian else ">") + kind))
    m = arr.dtype.type(mask)
    bad = 0
    for i in range(0, arr.size, _CHUNK):
        part = arr[i:i + _CHUNK]
        bad += int(np.count_nonzero((part & m) == m))
    return bad


def safetensors_findings(path) -> list[Finding]:
    from ckptlab.formats.safetensors import SafetensorsSource

    out: list[Finding] = []
    bad_keys: list[str] = []
    with SafetensorsSource(path) as src:
        for key in src.keys():
            info = src.info(key)
            if info.dtype not in _BITS:
                continue
            view = src.raw_bytes(key)
            try:
                if count_nonfinite(view, info.dtype):
                    bad_keys.append(key)
            finally:
                view.release()
    if bad_keys:
        out.append(_nonfinite(bad_keys))
    return out


def pickle_findings(scan) -> list[Finding]:
    """CRC and NaN/Inf findings for the storages of a ``pickle_archive.Scan`` (its mmap still open). Zip
    records are read in bounded pieces (a deflated record is never inflated whole), and one that inflates
    to another size than its headers declare is reported."""
    out: list[Finding] = []
    bad_storages: list[str] = []
    mm = scan.mm
    for st in scan.storages:
        if not st.valid or st.backing is None or st.dtype is None:
            continue
        nbytes = st.numel * itemsize(st.dtype)
        if st.backing[0] == "view":
            data = st.backing[1][st.backing[2]:st.backing[2] + nbytes]
            if len(data) == nbytes and count_nonfinite(data, st.dtype, st.byteswap):
                bad_storages.append(f"data/{st.key}")
            continue
        if mm is None:
            continue
        try:
            got, bad, want = _stream_record(mm, st, nbytes)
        except zlib.error as err:
            out.append(Finding("bad_record", CORRUPT, f"storage record data/{st.key} does not inflate: {err}",
                               f"data/{st.key}"))
            continue
        if got != want:
            out.append(Finding("bad_record_crc", CORRUPT, f"storage record data/{st.key} fails its zip CRC-32 "
                               f"({got:08x}, recorded {want:08x}): the file is damaged", f"data/{st.key}"))
        elif bad:
            bad_storages.append(f"data/{st.key}")
    if bad_storages:
        out.append(_nonfinite(bad_storages, what="storage records"))
    return out


def _stream_record(mm, st, nbytes: int) -> tuple[int, int, int]:
    """(CRC-32, NaN/Inf count, recorded CRC-32) of a zip record, read piece by piece; pieces are re-cut at
    element boundaries for the NaN/Inf count."""
    isz = itemsize(st.dtype)
    crc = 0
    bad = 0
    carry = b""
    for piece in zip_record_pieces(mm, st, nbytes):
        crc = crc32(piece, crc)
        if carry:
            piece = carry + bytes(piece)
        cut = len(piece) - len(piece) % isz
        if cut:
            bad += count_nonfinite(piece[:cut], st.dtype, st.byteswap)
        carry = bytes(piece[cut:])
        if isinstance(piece, memoryview):
            piece.release()
    return crc & 0xFFFFFFFF, bad, st.backing[2] if st.backing[0] == "file" else st.backing[1].crc


def _nonfinite(names: list[str], what: str = "tensors") -> Finding:
    shown = ", ".join(names[:LIST_MAX]) + (f" and {len(names) - LIST_MAX} more" if len(names) > LIST_MAX else "")
    return Finding("nonfinite_values", CORRUPT, f"{len(names)} {what} hold NaN or Inf values ({shown}): the "
                   "model will render black or noise", names[0])
