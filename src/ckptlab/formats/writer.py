"""``SafetensorsWriter``: the only way ckptlab writes a model file.

The header is computed from the planned keys, dtypes and shapes before the first byte; tensors
are then appended in plan order, one at a time, so no whole-model buffer ever exists. The file is
written as a hidden temporary in the target folder, fsync'ed and put in place only when every
planned tensor has been written (``ckptlab.atomic.Staged``, the placing every writer shares): a
crash, a kill or Ctrl-C never leaves a partial file under the final name. The same plan, metadata and tensors give byte-identical output.

Bytes go through ``FileSink``: a small page-aligned staging buffer written with direct I/O
(``O_DIRECT``) where the filesystem allows it. A model written once is not worth the page cache: on
Linux, buffered writing of a 2 GB file then ``fsync`` costs several seconds of kernel CPU (allocating
and copying into page-cache pages, then writeback), direct writes a fraction of that. Where direct
I/O is refused (tmpfs, other systems) or ``CKPTLAB_DIRECT_IO=0`` is set, the same sink writes
normally.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from ckptlab.atomic import Staged
from ckptlab.errors import OutputError
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.dtypes import dtype_of

ALIGN = 8
#: direct I/O wants buffer address, file offset and length aligned to the device's logical block size;
#: 4096 covers 512-byte and 4K devices
BLOCK = 4096
#: staging buffer of ``FileSink`` (a multiple of BLOCK)
STAGE = 8 << 20


def _direct_wanted() -> bool:
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get("CKPTLAB_DIRECT_IO", "1").strip().lower() not in (
        "0", "no", "off", "false")


def _pwrite_at(fd: int, data, offset: int) -> int:
    """``os.pwrite``, or seek + write where there is none (Windows)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


class FileSink:
    """Sequential writing to ``fd`` through a page-aligned staging buffer, with direct I/O when the
    filesystem takes it (``self.direct`` says whether it is on). ``patch`` overwrites earlier bytes (a
    header rewritten at the end); ``finish`` writes the rest, sets the exact length and fsyncs."""

    def __init__(self, fd: int, *, direct: bool | None = None, stage: int | None = None):
        self.fd = fd
        self.stage = stage or STAGE
        if self.stage % BLOCK:
            raise ValueError(f"stage must be a multiple of {BLOCK}")
        self.buf = mmap.mmap(-1, self.stage)  # anonymous mappings are page-aligned
        self.fill = 0   # bytes staged in buf
        self.base = 0   # file offset of buf[0]
        self.direct = False
        if _direct_wanted() if direct is None else direct:
            self._set_direct(True)

    @property
    def size(self) -> int:
        return self.base + self.fill

    def _set_direct(self, on: bool) -> None:
        import fcntl

        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
            self.direct = on
        except OSError:
            self.direct = False

    def _pwrite(self, view, offset: int) -> None:
        view = memoryview(view)
        while len(view):
            try:
                n = _pwrite_at(self.fd, view, offset)
            except OSError as e:
                if self.direct and e.errno == errno.EINVAL:  # this filesystem takes no direct I/O after all
                    self._set_direct(False)
                    continue
                raise
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view, offset = view[n:], offset + n

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            if not self.fill and len(mv) >= self.stage and not self.direct:
                self._pwrite(mv, self.base)  # buffered: big writes need no staging
                self.base += len(mv)
                return
            n = min(len(mv), self.stage - self.fill)
            self.buf[self.fill:self.fill + n] = mv[:n]
            self.fill += n
            mv = mv[n:]
            if self.fill == self.stage:
                self._pwrite(self.buf, self.base)
                self.base += self.stage
                self.fill = 0

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite ``data`` at ``offset`` (inside what was already written or staged)."""
        end = offset + len(data)
        if end > self.size:
            raise ValueError("patch beyond the written bytes")
        if end > self.base:  # the staged part
            lo = max(offset, self.base)
            self.buf[lo - self.base:end - self.base] = data[lo - offset:]
        if offset < self.base and not self.direct:  # already written: overwrite in place
            self._pwrite(memoryview(data)[:min(end, self.base) - offset], offset)
        elif offset < self.base:  # already written with direct I/O: read-modify-write whole blocks
            lo = offset // BLOCK * BLOCK
            hi = min(self.base, -(-min(end, self.base) // BLOCK) * BLOCK)
            block = mmap.mmap(-1, hi - lo)
            try:
                got = os.preadv(self.fd, [block], lo)
                if got != hi - lo:
                    raise OSError(errno.EIO, "short read of the written header")
                block[offset - lo:min(end, self.base) - lo] = data[:min(end, self.base) - offset]
                self._pwrite(block, lo)
            finally:
                block.close()

    def finish(self) -> None:
        """Write the staged tail, cut the file to its exact length and fsync it."""
        size = self.size
        if self.fill:
            n = self.fill
            if self.direct:  # whole blocks only: pad here, cut the padding off below
                pad = -n % BLOCK
                self.buf[n:n + pad] = bytes(pad)
                n += pad
            with memoryview(self.buf) as v:
                self._pwrite(v[:n], self.base)
            self.base, self.fill = size, 0
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass


def build_header(plan: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out contiguously in plan order."""
    obj: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str (got {k!r}: {type(v).__name__})")
        obj["__metadata__"] = dict(metadata)
    pos = 0
    for key, info in plan.items():
        if key == "__metadata__":
            raise ValueError("a tensor cannot be named __metadata__")
        obj[key] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [pos, pos + info.nbytes]}
        pos += info.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(len(text) + 8) % ALIGN)  # data buffer starts 8-aligned, like safetensors does
    return struct.pack("<Q", len(text)) + text


def tensor_bytes(tensor) -> memoryview:
    """The raw little-endian bytes of a numpy array or a torch tensor, without copying when already contiguous
    (torch is not imported for an array)."""
    from ckptlab.formats.arrays import is_tensor

    if is_tensor(tensor):
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.reshape(-1).view(__import__("torch").uint8).numpy())
    import numpy as np

    a = tensor
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.size == 0:
        return memoryview(b"")
    a = np.ascontiguousarray(a).reshape(-1)
    return memoryview(a.view(np.uint8))


class SafetensorsWriter:
    """Write ``plan`` (ordered key -> TensorInfo) to ``path``.

    Use as a context manager: leaving the block normally commits (after checking every planned
    tensor was written); leaving it with an exception removes the temporary file.
    """

    def __init__(self, path: str | Path, plan: Mapping[str, TensorInfo],
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False, hash_data: bool = False):
        """``hash_data``: keep a SHA-256 of the tensor data written (the bytes after the header: AutoV3,
        kohya's ``sshs_model_hash``), read back with ``data_sha256()``."""
        self.path = Path(path)
        self.plan = dict(plan)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self._order = list(self.plan)
        self._next = 0
        self._fh: FileSink | None = None
        self._fd: int | None = None
        self._staged: Staged | None = None
        self.bytes_written = 0
        self._hash_data = hash_data
        self._data_hash = None

    def data_sha256(self) -> str:
        """Hex SHA-256 of the tensor data written so far (``hash_data=True`` only)."""
        if self._data_hash is None:
            raise RuntimeError("data_sha256() needs a writer opened with hash_data=True")
        return self._data_hash.hexdigest()

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> SafetensorsWriter:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if self.path.exists() and not self.overwrite:
            raise OutputError("output already exists (use --overwrite to replace it)", self.path)
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist", self.path)
        header = build_header(self.plan, self.metadata)
        try:  # __exit__ does not run when __enter__ fails: clean up here (Ctrl-C included)
            self._fd = self._create_tmp(folder)
            self._fh = FileSink(self._fd)
            self._write(header)
        except BaseException:
            self.abort()
            raise
        self._header_len = len(header)
        if self._hash_data:
            import hashlib

            self._data_hash = hashlib.sha256()
        return self

    def _create_tmp(self, folder: Path) -> int:
        """The temporary file (``Staged``: the name is tracked *before* the file exists, so a Ctrl-C raised
        as the ``open`` call returns cannot leave an untracked temp file)."""
        self._staged = Staged(folder / self.path.name, overwrite=self.overwrite)
        try:
            return self._staged.create_file(0o600)
        except FileExistsError:
            raise OutputError(f"cannot create a temporary file in {folder}", self.path) from None
        except OSError as e:
            raise OutputError(f"cannot create a file in {folder}: {e.strerror or e}", self.path) from None

    @property
    def _tmp(self) -> Path | None:
        """The temporary file's path while one exists."""
        return self._staged.tmp if self._staged is not None else None

    def rewrite_metadata(self, metadata: Mapping[str, str]) -> None:
        """Replace ``__metadata__`` in the already-written header before ``commit()`` (for values known only
        at the end, such as input hashes computed while writing). The new header may not be longer than
        the old one; a shorter one is padded with spaces so every data offset stays where it was."""
        if self._fh is None:
            raise RuntimeError("rewrite_metadata() needs an open writer")
        new = build_header(self.plan, metadata)
        old_len = self._header_len
        if len(new) > old_len:
            raise ValueError(f"new header is {len(new)} bytes, longer than the {old_len} already written")
        header = struct.pack("<Q", old_len - 8) + new[8:] + b" " * (old_len - len(new))
        try:
            self._fh.patch(0, header)
        except OSError as e:
            self.abort()
            raise OutputError(f"write failed: {e.strerror or e}", self.path) from None
        self.metadata = dict(metadata)

    def _write(self, data) -> None:
        try:
            self._fh.write(data)
        except OSError as e:
            self.abort()
            raise OutputError(f"write failed: {e.strerror or e}", self.path) from None
        self.bytes_written += len(data)
        if self._data_hash is not None:
            self._data_hash.update(data)

    def write(self, key: str, tensor) -> None:
        """Append ``tensor`` (a numpy array or a torch tensor) as ``key``; keys must come in plan order with
        planned dtype/shape."""
        if self._fh is None:
            raise RuntimeError("writer is not open")
        if self._next >= len(self._order):
            raise ValueError(f"tensor {key!r} is not in the plan (all planned tensors written)")
        expected = self._order[self._next]
        if key != expected:
            raise ValueError(f"tensor {key!r} written out of order; expected {expected!r}")
        info = self.plan[key]
        dtype = dtype_of(tensor)
        if dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise ValueError(f"tensor {key!r} is {dtype}{list(tensor.shape)}, planned "
                             f"{info.dtype}{list(info.shape)}")
        self._write(tensor_bytes(tensor))
        self._next += 1

    def write_raw(self, key: str, data) -> None:
        """Append already-encoded bytes for ``key`` (a zero-copy path for unchanged tensors)."""
        if self._fh is None:
            raise RuntimeError("writer is not open")
        expected = self._order[self._next] if self._next < len(self._order) else None
        if key != expected:
            raise ValueError(f"tensor {key!r} written out of order; expected {expected!r}")
        if len(data) != self.plan[key].nbytes:
            raise ValueError(f"tensor {key!r}: {len(data)} bytes, planned {self.plan[key].nbytes}")
        self._write(data)
        self._next += 1

    def commit(self) -> Path:
        if self._next != len(self._order):
            missing = self._order[self._next]
            self.abort()
            raise RuntimeError(f"writer closed before tensor {missing!r} was written")
        try:
            self._fh.finish()
            self._close_fd()
            self._staged.commit(0o644)
        except FileExistsError:
            self.abort()
            raise OutputError("output appeared while writing; not replaced", self.path) from None
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot finish writing: {e.strerror or e}", self.path) from None
        except BaseException:
            self.abort()
            raise
        self._staged = None
        return self.path

    def _close_fd(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    @property
    def direct(self) -> bool:
        """Whether bytes go to disk with direct I/O (see ``FileSink``)."""
        return self._fh is not None and self._fh.direct

    def abort(self) -> None:
        """Close and remove the temporary file. The removal runs whatever closing raised: an interrupt can leave
        the sink half-way through a write, and its close may then fail with more than an OSError."""
        try:
            self._close_fd()
        except OSError:
            pass
        finally:
            if self._staged is not None:
                staged, self._staged = self._staged, None
                staged.discard()

    def __enter__(self) -> SafetensorsWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, object]] | Mapping[str, object],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Convenience for small in-memory dicts of numpy arrays or torch tensors (tests, fixtures): plan from the
    tensors and write."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    plan = {k: TensorInfo(dtype_of(t), tuple(t.shape)) for k, t in items}
    with SafetensorsWriter(path, plan, metadata, overwrite=overwrite) as w:
        for k, t in items:
            w.write(k, t)
    return Path(path)
