"""Strict ``.safetensors`` reader: header parsed and validated by us, tensors through mmap.

File structure: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. Each
tensor entry is ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the buffer; the
optional ``__metadata__`` maps strings to strings. We require what the reference implementation
requires (and a little more): known dtypes, non-negative integer shapes, ``end - begin`` equal to
the element count times the item size, offsets that tile the buffer with no gap or overlap, and a
buffer that ends exactly at the end of the file.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
from operator import itemgetter
from pathlib import Path

from ckptlab.errors import FormatError
from ckptlab.formats.base import MAX_RANK, TensorInfo, TensorSource, brief, checked_numel
from ckptlab.formats.dtypes import DTYPES
from ckptlab.remote import RemoteURL, as_path

#: The reference implementation refuses a header above 100,000,000 bytes (``MAX_HEADER_SIZE`` in
#: safetensors/src/tensor.rs): a file it refuses must not be rated ``safe`` here.
MAX_HEADER = 100_000_000


MAX_DIM = 2**63 - 1  # what torch (and a signed 64-bit size) can hold
MAX_BYTES = 2**64 - 1  # the reference implementation computes sizes in a u64


_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


class _HeaderJSONError(ValueError):
    """A header problem found while decoding the JSON (duplicate key, lone surrogate, NaN)."""


def _strict_pairs(pairs):
    """Object hook: build the dict in C, and name the key when two share a name."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _HeaderJSONError(f"duplicate key {brief(k)} in header")
            seen.add(k)
    return d


# A lone surrogate can only come from a \uD800-\uDFFF escape; scan for those only when present.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_strings(obj) -> None:
    """Reject strings holding a lone UTF-16 surrogate (valid JSON escapes, not valid Unicode)."""
    stack = [obj]
    while stack:
        o = stack.pop()
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in items:
            for s in (k, v):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        raise _HeaderJSONError(f"string {brief(s)} holds a lone UTF-16 surrogate escape "
                                               "(not valid Unicode)") from None
            if isinstance(v, (dict, list)):
                stack.append(v)


def _reject_constant(name: str):
    raise _HeaderJSONError(f"{name} is not valid JSON")


class SafetensorsHeader:
    """The parsed, validated header of one file."""

    def __init__(self, tensors: dict[str, TensorInfo], offsets: dict[str, tuple[int, int]],
                 metadata: dict[str, str], data_start: int, file_size: int):
        self.tensors = tensors
        self.offsets = offsets
        self.metadata = metadata
        self.data_start = data_start
        self.file_size = file_size


def header_length(head: bytes, file_size: int, path) -> int:
    """The header length the first 8 bytes ``head`` give, checked against the limit and the file's size."""
    if len(head) < 8:
        raise FormatError(f"not a safetensors file: {file_size} bytes, too short for a header", path)
    (n,) = struct.unpack("<Q", head)
    if n == 0:
        raise FormatError("safetensors header length is 0", path)
    if n > MAX_HEADER:
        raise FormatError(f"safetensors header length {n} exceeds the {MAX_HEADER} byte limit", path)
    if 8 + n > file_size:
        raise FormatError(f"safetensors header length {n} runs past the end of the file ({file_size} bytes)", path)
    return n


def read_header(path: str | Path, fh=None) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; raise ``FormatError`` naming the problem."""
    path = as_path(path)
    own = fh is None
    if own and type(path) is RemoteURL:
        from ckptlab.remote.reader import open_remote

        return _read_header_from(open_remote(path), path)
    if own:
        from ckptlab.formats import require_regular_file

        require_regular_file(path)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror or e}", path) from None
    try:
        file_size = os.fstat(fh.fileno()).st_size
        raw = fh.read(header_length(fh.read(8), file_size, path))
    finally:
        if own:
            fh.close()
    return parse_header_bytes(raw, file_size, path)


def _read_header_from(rf, path) -> SafetensorsHeader:
    """``read_header`` on a ``RemoteFile``: the first block (cached) holds the length; a header longer than that
    block costs one more GET of exactly the rest."""
    file_size = rf.size
    n = header_length(rf.pread(0, 8), file_size, path)
    return parse_header_bytes(rf.pread(8, n), file_size, path)


def parse_header_bytes(raw: bytes, file_size: int, path: str | Path = "<bytes>") -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"safetensors header is not valid UTF-8 (byte {e.start})", path) from None
    if not text.lstrip().startswith("{"):
        raise FormatError("safetensors header is not a JSON object", path)
    try:
        obj = json.loads(text, object_pairs_hook=_strict_pairs, parse_constant=_reject_constant)
        if _SURROGATE_ESCAPE.search(text):
            _check_strings(obj)
    except _HeaderJSONError as e:
        raise FormatError(f"safetensors header: {e}", path) from None
    except ValueError as e:
        raise FormatError(f"safetensors header is not valid JSON: {e}", path) from None
    except RecursionError:
        raise FormatError("safetensors header is nested too deeply", path) from None
    if not isinstance(obj, dict):
        raise FormatError("safetensors header is not a JSON object", path)

    metadata: dict[str, str] = {}
    raw_meta = obj.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise FormatError("safetensors __metadata__ is not an object", path)
        for k, v in raw_meta.items():
            if not isinstance(v, str):
                raise FormatError(f"safetensors __metadata__ value for {brief(k)} is not a string", path)
            metadata[k] = v

    data_start = 8 + len(raw)
    buffer_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    sizes = {k: v[0] for k, v in DTYPES.items()}
    seen: dict[tuple[str, tuple[int, ...]], tuple[TensorInfo, int]] = {}
    for key, entry in obj.items():
        if type(entry) is not dict:
            raise FormatError(f"tensor {brief(key)}: entry is not an object", path)
        if entry.keys() != _FIELDS:
            missing = _FIELDS - set(entry)
            what = f"missing {sorted(missing)}" if missing else \
                f"unknown fields {brief(sorted(set(entry) - _FIELDS))}"
            raise FormatError(f"tensor {brief(key)}: {what}", path)
        dtype = entry["dtype"]
        if type(dtype) is not str or dtype not in sizes:  # type first: a list or object is not hashable
            raise FormatError(f"tensor {brief(key)}: unknown dtype {brief(dtype)}", path)
        shape = entry["shape"]
        if type(shape) is not list:
            raise FormatError(f"tensor {brief(key)}: shape {brief(shape)} is not a list of non-negative integers",
                              path)
        if len(shape) > MAX_RANK:
            raise FormatError(f"tensor {brief(key)}: shape has {len(shape)} dimensions (at most {MAX_RANK})", path)
        for d in shape:
            if type(d) is not int or d < 0:
                raise FormatError(f"tensor {brief(key)}: shape {brief(shape)} is not a list of non-negative "
                                  "integers", path)
            if d > MAX_DIM:
                raise FormatError(f"tensor {brief(key)}: shape {brief(shape)} has a dimension too large to address",
                                  path)
        offs = entry["data_offsets"]
        if type(offs) is not list or len(offs) != 2:
            raise FormatError(f"tensor {brief(key)}: data_offsets {brief(offs)} is not [begin, end]", path)
        begin, end = offs
        if type(begin) is not int or type(end) is not int or begin < 0 or end < 0:
            raise FormatError(f"tensor {brief(key)}: data_offsets {brief(offs)} is not [begin, end]", path)
        if end < begin:
            raise FormatError(f"tensor {brief(key)}: data_offsets end {end} is before begin {begin}", path)
        ck = (dtype, tuple(shape))
        hit = seen.get(ck)  # TensorInfo is immutable: equal entries share one (a header repeats shapes a lot)
        if hit is None:
            # as the reference does: element count, then byte count, each refused once it passes 2**64 - 1
            numel = checked_numel(shape, MAX_BYTES)
            nbytes = None if numel is None else numel * sizes[dtype]
            if nbytes is None or nbytes > MAX_BYTES:
                raise FormatError(f"tensor {brief(key)}: shape {brief(shape)} x {dtype} overflows a 64-bit byte "
                                  "count", path)
            hit = seen[ck] = (TensorInfo(dtype, ck[1]), nbytes)
        info, expected = hit
        if end - begin != expected:
            raise FormatError(
                f"tensor {brief(key)}: {end - begin} bytes in data_offsets but dtype {dtype} x shape {brief(shape)} "
                f"needs {expected}", path)
        if end > buffer_len:
            raise FormatError(f"tensor {brief(key)}: data ends at {end}, past the end of the data buffer "
                              f"({buffer_len} bytes; file truncated?)", path)
        tensors[key] = info
        offsets[key] = (begin, end)

    # Offsets must tile [0, buffer_len) exactly: no overlap (aliasing) and no hidden gaps.
    pos = 0
    for key, (begin, end) in sorted(offsets.items(), key=itemgetter(1)):
        if begin != pos:
            problem = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise FormatError(f"tensor {brief(key)}: data at offset {begin} {problem}", path)
        pos = end
    if pos != buffer_len:
        raise FormatError(f"file length {file_size} does not match the header: data buffer holds "
                          f"{buffer_len} bytes but tensors cover {pos}", path)
    return SafetensorsHeader(tensors, offsets, metadata, data_start, file_size)


class SafetensorsSource(TensorSource):
    format = "safetensors"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.header = read_header(self.path)
        self.metadata = dict(self.header.metadata)
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()  # merge/convert read tensors from worker threads

    def infos(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def size(self) -> int:
        return self.header.file_size

    def data_range(self, key: str) -> tuple[int, int]:
        """Absolute byte range of ``key``'s data in the file."""
        begin, end = self.header.offsets[key]
        return self.header.data_start + begin, self.header.data_start + end

    def _map(self) -> mmap.mmap:
        if self._mm is not None:
            return self._mm
        with self._lock:
            if self._mm is not None:
                return self._mm
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size != self.header.file_size:
                    raise FormatError("file changed size since its header was read", self.path)
                # ACCESS_COPY: pages come from the file (page cache, not our anonymous memory);
                # a write to a tensor would touch a private copy, never the input file.
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    def raw_bytes(self, key: str) -> memoryview:
        start, end = self.data_range(key)
        if type(self.path) is RemoteURL:
            return memoryview(self._remote_read(start, end))
        return memoryview(self._map())[start:end]

    def _remote_read(self, start: int, end: int) -> bytearray:
        """One ranged GET of ``[start, end)`` into a writable buffer (a remote source has no map)."""
        from ckptlab.remote.reader import open_remote

        data = open_remote(self.path, self.header.file_size).pread(start, end - start, exact=True)
        if len(data) != end - start:
            raise FormatError(f"object ends before byte {end} (it changed?)", self.path)
        return bytearray(data)

    def array(self, key: str):
        import numpy as np

        from ckptlab.formats.dtypes import to_numpy

        info = self.header.tensors[key]
        dt = to_numpy(info.dtype)
        start, end = self.data_range(key)
        if end == start:
            return np.empty(info.shape, dtype=dt)
        if type(self.path) is RemoteURL:
            return np.frombuffer(self._remote_read(start, end), dtype=dt).reshape(info.shape)
        return np.frombuffer(self._map(), dtype=dt, count=(end - start) // dt.itemsize, offset=start).reshape(info.shape)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # tensors still reference the map; it is released when they are
            self._mm = None
