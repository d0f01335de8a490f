"""``SafetensorsWriter``: the only way ckptlab writes a model file.

The header is computed from the planned keys, dtypes and shapes before the first byte; tensors
are then appended in plan order, one at a time, so no whole-model buffer ever exists. The file is
written as a hidden temporary in the target folder, fsync'ed and renamed into place only when
every planned tensor has been written: a crash, a kill or Ctrl-C never leaves a partial file
under the final name. The same plan, metadata and tensors give byte-identical output.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from ckptlab.errors import OutputError
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.dtypes import from_torch

ALIGN = 8


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
    """The raw little-endian bytes of a CPU tensor, without copying when already contiguous."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(__import__("torch").uint8).numpy())


class SafetensorsWriter:
    """Write ``plan`` (ordered key -> TensorInfo) to ``path``.

    Use as a context manager: leaving the block normally commits (after checking every planned
    tensor was written); leaving it with an exception removes the temporary file.
    """

    def __init__(self, path: str | Path, plan: Mapping[str, TensorInfo],
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False):
        self.path = Path(path)
        self.plan = dict(plan)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self._order = list(self.plan)
        self._next = 0
        self._fh = None
        self._tmp: Path | None = None
        self.bytes_written = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def open(self) -> SafetensorsWriter:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if self.path.exists() and not self.overwrite:
            raise OutputError("output already exists (use --overwrite to replace it)", self.path)
        if not folder.is_dir():
            raise OutputError(f"output folder {folder} does not exist", self.path)
        header = build_header(self.plan, self.metadata)
        fd = None
        try:  # __exit__ does not run when __enter__ fails: clean up here (Ctrl-C included)
            fd = self._create_tmp(folder)
            self._fh = os.fdopen(fd, "wb")
            self._write(header)
        except BaseException:
            if self._fh is None and fd is not None:
                os.close(fd)
            self.abort()
            raise
        self._header_len = len(header)
        return self

    def _create_tmp(self, folder: Path) -> int:
        """Like ``mkstemp``, but the name is tracked *before* the file exists: a Ctrl-C raised as the
        ``open`` call returns (Python checks signals there) cannot leave an untracked temp file."""
        for _ in range(100):
            self._tmp = folder / f".{self.path.name}.{secrets.token_hex(6)}.tmp"
            try:
                return os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:
                self._tmp = None  # someone else's file: never ours to remove
            except OSError as e:
                self._tmp = None
                raise OutputError(f"cannot create a file in {folder}: {e.strerror or e}", self.path) from None
        raise OutputError(f"cannot create a temporary file in {folder}", self.path)

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
        self._fh.flush()
        os.pwrite(self._fh.fileno(), header, 0)
        self.metadata = dict(metadata)

    def _write(self, data) -> None:
        try:
            self._fh.write(data)
        except OSError as e:
            self.abort()
            raise OutputError(f"write failed: {e.strerror or e}", self.path) from None
        self.bytes_written += len(data)

    def write(self, key: str, tensor) -> None:
        """Append ``tensor`` as ``key``; keys must come in plan order with planned dtype/shape."""
        if self._fh is None:
            raise RuntimeError("writer is not open")
        if self._next >= len(self._order):
            raise ValueError(f"tensor {key!r} is not in the plan (all planned tensors written)")
        expected = self._order[self._next]
        if key != expected:
            raise ValueError(f"tensor {key!r} written out of order; expected {expected!r}")
        info = self.plan[key]
        dtype = from_torch(tensor.dtype)
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
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            os.chmod(self._tmp, 0o644 & ~_umask())
            if self.overwrite:
                os.replace(self._tmp, self.path)
            else:
                _place_no_clobber(self._tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot finish writing: {e.strerror or e}", self.path) from None
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.path

    def abort(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
            self._tmp = None

    def __enter__(self) -> SafetensorsWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _place_no_clobber(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` unless something appeared there meanwhile (atomic via a hard link)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputError("output appeared while writing; not replaced", final) from None
    except OSError:  # no hard links on this filesystem: check, then rename
        if final.exists():
            raise OutputError("output appeared while writing; not replaced", final) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, object]] | Mapping[str, object],
                      metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Convenience for small in-memory dicts (tests, fixtures): plan from the tensors and write."""
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    plan = {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in items}
    with SafetensorsWriter(path, plan, metadata, overwrite=overwrite) as w:
        for k, t in items:
            w.write(k, t)
    return Path(path)
