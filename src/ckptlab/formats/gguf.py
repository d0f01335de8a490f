"""GGUF files (llama.cpp / ComfyUI-GGUF quantized models), read from the header only.

File structure (all little-endian unless the file is big-endian, detected from the version field):
``"GGUF"``, version u32 (1, 2 or 3), tensor count and metadata count (u64; u32 in version 1),
metadata key/value pairs (key string, value type u32, value), then one info per tensor (name,
``n_dims`` u32, ``n_dims`` dimensions (u64; u32 in v1), GGML type u32, data offset u64), then padding to
``general.alignment`` (default 32) and the data. Strings are a length (u64; u32 in v1) and UTF-8.

Dimensions are stored innermost-first (GGML ``ne`` order); ``infos()`` reports them reversed, as
torch and safetensors shapes are written, and honours ComfyUI-GGUF's
``comfy.gguf.orig_shape.<name>`` (the shape a tensor had before it was flattened for quantizing).
Quantized data is never decoded here: ``get()`` returns only the unquantized tensors (F32, F16,
BF16, F64, integers; ``array()`` as numpy, ``get()`` as torch) and refuses the quantized ones with a clear error.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptlab.errors import FormatError, UnsupportedFormatError
from ckptlab.formats.base import MAX_RANK, TensorInfo, TensorSource, brief, checked_numel
from ckptlab.remote import RemoteURL

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8
SUMMARISE_ARRAYS_OVER = 1024  # longer arrays appear in ``metadata`` as a one-line summary
DECODE_NUMBERS_UP_TO = 1 << 20  # longer numeric arrays are skipped, not turned into Python ints
MAX_STRING_ARRAY = 1 << 22  # tokenizer vocabularies are ~250k; millions of strings means a hostile file
#: values decoded from all the metadata together (strings, numbers, arrays; numeric arrays skipped as too long do not
#: count): an LLM's tokenizer holds ~1.5 M, an image model's GGUF a few dozen. Beyond this the file is a memory bomb.
MAX_METADATA_VALUES = 1 << 22
#: tensors in one file: an LLM has ~1,000, Flux ~800, the largest known models ~10^4; a million tensor records of
#: 24 bytes each would cost gigabytes of memory, so more is refused as implausible.
MAX_TENSORS = 1 << 20
MAX_UNKNOWN_TYPE_WARNINGS = 5  # tensors of unknown GGML types named one by one; the rest are counted

# GGML type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
UNQUANTIZED = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})  # = safetensors names

# metadata value type id -> (name, struct code or None for string/array)
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"), 4: ("uint32", "I"),
    5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"), 8: ("string", None), 9: ("array", None),
    10: ("uint64", "Q"), 11: ("int64", "q"), 12: ("float64", "d"),
}
_STRING, _ARRAY = 8, 9

QUANTIZED_MESSAGE = "GGUF tensors are quantized; not supported for this operation"


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """A GGUF tensor: ``dtype`` is the safetensors name when unquantized, else the GGML name
    (``Q4_K``, ``Q8_0``...); ``nbytes`` is its size on disk; ``offset`` is absolute in the file."""

    ggml_type: str = ""
    offset: int = 0
    disk_bytes: int = 0
    ne: tuple[int, ...] = ()  # dimensions as stored (innermost first)

    @property
    def nbytes(self) -> int:
        return self.disk_bytes

    @property
    def quantized(self) -> bool:
        return self.ggml_type not in UNQUANTIZED


class _Cursor:
    """Bounds-checked reads from the mapped file; every overrun is a truncated-file error."""

    def __init__(self, buf, path: Path, endian: str, size_code: str):
        self.buf, self.path, self.e, self.size_code = buf, path, endian, size_code
        self.pos = 0
        self.end = len(buf)
        self.values = 0  # metadata values decoded so far (MAX_METADATA_VALUES)

    def _spend(self, n: int, what: str) -> None:
        self.values += n
        if self.values > MAX_METADATA_VALUES:
            raise FormatError(f"GGUF {what}: metadata holds more than {MAX_METADATA_VALUES} values "
                              "(implausibly large)", self.path)

    def _unpack(self, code: str, what: str):
        n = struct.calcsize(code)
        if self.pos + n > self.end:
            raise FormatError(f"GGUF file truncated while reading {what} at byte {self.pos}", self.path)
        (v,) = struct.unpack_from(self.e + code, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self._unpack("I", what)

    def u64(self, what: str) -> int:
        return self._unpack("Q", what)

    def count(self, what: str) -> int:
        return self._unpack(self.size_code, what)

    def string(self, what: str) -> str:
        n = self.count(f"the length of {what}")
        if n > self.end - self.pos:
            raise FormatError(f"GGUF {what}: string length {n} runs past the end of the file", self.path)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"GGUF {what}: string is not valid UTF-8", self.path) from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype not in _VALUE_TYPES:
            raise FormatError(f"GGUF {what}: unknown metadata value type {vtype}", self.path)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise FormatError(f"GGUF {what}: arrays nested more than {MAX_NESTING} deep", self.path)
            etype = self.u32(f"{what} element type")
            n = self.count(f"{what} element count")
            if etype not in _VALUE_TYPES:
                raise FormatError(f"GGUF {what}: unknown array element type {etype}", self.path)
            code = _VALUE_TYPES[etype][1]
            min_size = struct.calcsize(code) if code else (4 if etype == _ARRAY else 1) + 3
            if n * min_size > self.end - self.pos:
                raise FormatError(f"GGUF {what}: array of {n} elements runs past the end of the file",
                                  self.path)
            if code:  # fixed-size elements: one unpack for the whole array
                width = struct.calcsize(code)
                if n > DECODE_NUMBERS_UP_TO:
                    self.pos += n * width
                    return SkippedArray(_VALUE_TYPES[etype][0], n)
                self._spend(n, what)
                vals = struct.unpack_from(f"{self.e}{n}{code}", self.buf, self.pos)
                self.pos += n * width
                return list(vals)
            if n > MAX_STRING_ARRAY:
                raise FormatError(f"GGUF {what}: array of {n} strings/arrays is implausibly large", self.path)
            self._spend(n, what)
            return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(n)]
        return self._unpack(_VALUE_TYPES[vtype][1], what)


@dataclass(frozen=True)
class SkippedArray:
    """A numeric metadata array too long to be worth decoding (kept as its type and length)."""

    element_type: str
    count: int

    def __str__(self) -> str:
        return f"<array of {self.count} {self.element_type}>"


def _too_long_to_show(value: list) -> bool:
    """Whether an array, counting the elements of the arrays nested in it, holds more than
    ``SUMMARISE_ARRAYS_OVER`` values or an array skipped as too long (walked without recursion)."""
    count, stack = 0, [value]
    while stack:
        for v in stack.pop():
            count += 1
            if count > SUMMARISE_ARRAYS_OVER or isinstance(v, SkippedArray):
                return True
            if isinstance(v, list):
                stack.append(v)
    return False


def _metadata_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, SkippedArray):
        return str(value)
    if isinstance(value, list) and _too_long_to_show(value):
        return f"<array of {len(value)} values>"
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


class GGUFSource(TensorSource):
    format = "gguf"

    def __init__(self, path: str | Path):
        super().__init__(path)
        #: every metadata value as decoded (lists for arrays, Python numbers, bools, strings)
        self.fields: dict[str, Any] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_start = 0
        self._infos: dict[str, GGUFTensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._parse()

    # -- header -------------------------------------------------------------------------------
    def _parse(self) -> None:
        if type(self.path) is RemoteURL:
            return self._parse_remote()
        from ckptlab.formats import require_regular_file

        require_regular_file(self.path)
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror or e}", self.path) from None
        with fh:
            self._file_size = os.fstat(fh.fileno()).st_size
            if self._file_size < 8:
                raise FormatError(f"GGUF file truncated: {self._file_size} bytes", self.path)
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse_buffer(mm)
        finally:
            mm.close()

    def _parse_remote(self) -> None:
        """The header of a remote GGUF: its first block, then twice as much each time the parser runs off the end
        of what was read (one GET per doubling, each of exactly the bytes not yet read)."""
        from ckptlab.remote.reader import open_remote

        rf = open_remote(self.path)
        self._file_size = rf.size
        if self._file_size < 8:
            raise FormatError(f"GGUF file truncated: {self._file_size} bytes", self.path)
        buf = rf.pread(0, min(self._file_size, rf._readahead))
        while True:
            self.fields, self._infos = {}, {}  # a retry on a longer prefix starts over
            try:
                return self._parse_buffer(buf)
            except FormatError as e:
                if len(buf) >= self._file_size or not ("truncated" in e.message or "past the end" in e.message):
                    raise
            buf += rf.pread(len(buf), min(len(buf), self._file_size - len(buf)))

    def _parse_buffer(self, buf) -> None:
        path = self.path
        if bytes(buf[:4]) != MAGIC:
            raise FormatError("not a GGUF file (magic is not 'GGUF')", path)
        (v_le,) = struct.unpack_from("<I", buf, 4)
        (v_be,) = struct.unpack_from(">I", buf, 4)
        endian = "<" if v_le in (1, 2, 3) else ">" if v_be in (1, 2, 3) else None
        if endian is None:
            raise UnsupportedFormatError(f"GGUF version {v_le} is not supported (1, 2 or 3)", path)
        self.version = v_le if endian == "<" else v_be
        cur = _Cursor(buf, path, endian, "I" if self.version == 1 else "Q")
        cur.pos = 8
        n_tensors = cur.count("the tensor count")
        n_kv = cur.count("the metadata count")
        # every entry needs a few bytes: a count beyond the file size is corrupt, not a loop to run
        if n_tensors > self._file_size or n_kv > self._file_size:
            raise FormatError(f"GGUF header claims {n_tensors} tensors and {n_kv} metadata entries; "
                              f"more than the file can hold", path)
        if n_tensors > MAX_TENSORS:
            raise FormatError(f"GGUF header claims {n_tensors} tensors (at most {MAX_TENSORS})", path)
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            cur._spend(1, f"metadata key #{i}")
            shown = brief(key)  # named in every message about the value (and its elements): never the whole key
            vtype = cur.u32(f"metadata {shown} type")
            if key in self.fields:
                raise FormatError(f"GGUF metadata key {shown} appears twice", path)
            self.fields[key] = cur.value(vtype, f"metadata {shown}")
        self.metadata = {k: _metadata_string(v) for k, v in self.fields.items()}

        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise FormatError(f"GGUF general.alignment {brief(align)} is not a positive power of two", path)
        self.alignment = align

        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name")
            shown = brief(name)
            n_dims = cur.u32(f"tensor {shown} dimension count")
            if n_dims > MAX_DIMS:
                raise FormatError(f"GGUF tensor {shown}: {n_dims} dimensions (at most {MAX_DIMS})", path)
            ne = tuple(cur.count(f"tensor {shown} dimensions") for _ in range(n_dims))  # u32 in v1
            tid = cur.u32(f"tensor {shown} type")
            offset = cur.u64(f"tensor {shown} offset")
            if name in seen:
                raise FormatError(f"GGUF tensor {shown} appears twice", path)
            seen.add(name)
            raw.append((name, ne, tid, offset))
        self.data_start = -(-cur.pos // align) * align
        data_len = self._file_size - self.data_start
        if data_len < 0:
            raise FormatError("GGUF file truncated: it ends before its tensor data begins", path)

        # sizes of unknown types are the distance to the next tensor's data
        by_offset = sorted(o for *_, o in raw)
        unknown: list[str] = []
        for name, ne, tid, offset in raw:
            shown = brief(name)
            if offset % align:
                raise FormatError(f"GGUF tensor {shown}: offset {offset} is not a multiple of the "
                                  f"alignment {align}", path)
            numel = math.prod(ne)
            if tid in GGML_TYPES:
                tname, block, bsize = GGML_TYPES[tid]
                if ne and ne[0] % block:
                    raise FormatError(f"GGUF tensor {shown}: {tname} needs the first dimension to be a "
                                      f"multiple of {block}, got {ne[0]}", path)
                nbytes = numel // block * bsize
            else:
                tname = f"GGML_TYPE_{tid}"
                nxt = bisect.bisect_right(by_offset, offset)  # the next tensor's data (a scan per tensor is quadratic)
                nbytes = (by_offset[nxt] if nxt < len(by_offset) else data_len) - offset
                unknown.append(f"tensor {shown} has an unknown GGML type {tid}")
                if numel > 8 * nbytes:  # no GGML type stores an element in less than a bit (IQ1_S: 1.56)
                    raise FormatError(f"GGUF tensor {shown}: {numel} elements of unknown type {tid} cannot fit in "
                                      f"{nbytes} bytes", path)
            if offset + nbytes > data_len:
                raise FormatError(f"GGUF tensor {shown}: data ends at byte {self.data_start + offset + nbytes}, "
                                  f"past the end of the file ({self._file_size} bytes; truncated?)", path)
            shape = tuple(reversed(ne))
            orig = self.fields.get(f"comfy.gguf.orig_shape.{name}")
            if (isinstance(orig, list) and len(orig) <= MAX_RANK and all(type(d) is int and d >= 0 for d in orig)
                    and checked_numel(orig) == numel):
                shape = tuple(orig)
            self._infos[name] = GGUFTensorInfo(tname, shape, ggml_type=tname, offset=self.data_start + offset,
                                               disk_bytes=nbytes, ne=ne)
        self.warnings += unknown[:MAX_UNKNOWN_TYPE_WARNINGS]
        if len(unknown) > MAX_UNKNOWN_TYPE_WARNINGS:
            self.warnings.append(f"{len(unknown) - MAX_UNKNOWN_TYPE_WARNINGS} more tensors have unknown GGML types")
        self.extra = {"gguf_version": self.version, "gguf_alignment": align,
                      "gguf_endian": "little" if endian == "<" else "big"}
        self._endian = endian

    # -- TensorSource -------------------------------------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos  # type: ignore[return-value]

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def size(self) -> int:
        return self._file_size

    @property
    def quantized_types(self) -> dict[str, int]:
        """GGML type name -> number of tensors stored that way."""
        out: dict[str, int] = {}
        for info in self._infos.values():
            out[info.ggml_type] = out.get(info.ggml_type, 0) + 1
        return out

    def array(self, key: str):
        info = self._infos[key]
        if info.quantized:
            raise UnsupportedFormatError(f"{QUANTIZED_MESSAGE} (tensor {brief(key)} is {info.ggml_type})",
                                         self.path)
        import numpy as np

        from ckptlab.formats.dtypes import to_numpy, uint_of_width

        if type(self.path) is RemoteURL:
            from ckptlab.remote.reader import open_remote

            mm = bytearray(open_remote(self.path, self._file_size).pread(info.offset, info.disk_bytes, exact=True))
            if len(mm) != info.disk_bytes:
                raise FormatError(f"object ends before the data of tensor {brief(key)} (it changed?)", self.path)
            off = 0
        elif self._mm is None:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != self._file_size:
                    raise FormatError("file changed size since its header was read", self.path)
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            mm, off = self._mm, info.offset
        else:
            mm, off = self._mm, info.offset
        dt = to_numpy(info.dtype)
        if info.disk_bytes == 0:
            return np.empty(info.shape, dtype=dt)
        count = info.disk_bytes // dt.itemsize
        if self._endian == ">" and dt.itemsize > 1:  # big-endian file: swapped into a native copy
            raw = np.frombuffer(mm, dtype=uint_of_width(dt.itemsize).newbyteorder(">"), count=count, offset=off)
            return raw.astype(uint_of_width(dt.itemsize)).view(dt).reshape(info.shape)
        return np.frombuffer(mm, dtype=dt, count=count, offset=off).reshape(info.shape)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
