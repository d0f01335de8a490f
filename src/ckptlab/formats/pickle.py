"""``PickleSource``: legacy ``.ckpt/.pt/.pth/.bin`` files read by ckptlab's data-only reader.

``pickle_archive.scan`` reads the file (torch zip, legacy torch, plain pickle) without executing
anything and computes a verdict; this module unwraps the object the way the field does
(``state_dict``, nested ``state_dict``, single-key dicts, Lightning checkpoints) into flat
``key -> tensor`` plus ``extra`` (non-tensor values such as ``global_step``), and materialises
tensors as mmap-backed numpy views of the storage records (``array``; ``get`` adds torch on top).
``torch.load`` is never called.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

from ckptlab.checksum import crc32
from ckptlab.errors import FormatError, UnsafeFileError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.formats.dtypes import itemsize
from ckptlab.formats.pickle_archive import Scan, scan, zip_record
from ckptlab.formats.pickle_vm import (
    CORRUPT,
    MALICIOUS,
    SUSPICIOUS,
    BytesRef,
    Call,
    DtypeTag,
    Global,
    TensorRef,
)
from ckptlab.remote.reader import RemoteBuffer

#: top-level keys of training checkpoints that hold training state, never model weights
TRAINING_STATE = ("optimizer_states", "optimizer", "optimizer_state_dict", "lr_schedulers", "scheduler",
                  "callbacks", "loops", "amp_scaler", "native_amp_scaling_state", "grad_scaler")
MAX_WALK_NODES = 2_000_000
MAX_DEPTH = 32


class PickleSource(TensorSource):
    """A pickle-based model file. ``verdict``/``findings`` hold the safety scan's result.

    Raises ``UnsafeFileError`` for a malicious file (and a suspicious one unless
    ``allow_suspicious``) and ``FormatError`` for a corrupt one, unless ``scan_only`` is set, in
    which case whatever could be read is exposed.
    """

    format = "pickle"

    def __init__(self, path: str | Path, *, allow_suspicious: bool = True, scan_only: bool = False):
        super().__init__(path)
        self.scan: Scan = scan(self.path)
        self._crc_ok: set[int] = set()  # storages whose record passed its CRC check
        self.verdict = self.scan.verdict
        self.findings = self.scan.findings
        self.container = self.scan.container
        if not scan_only:
            worst = next((f for f in self.findings if f.severity == self.verdict), None)
            detail = f" ({worst.detail})" if worst else ""
            if self.verdict == MALICIOUS:
                self.scan.close()
                raise UnsafeFileError(f"refused: malicious pickle content{detail}; run `ckptlab check` for details",
                                      self.path)
            unread = self.scan.unverified
            if unread is not None:
                # part of what torch.load would run was not read: no option opens such a file
                self.scan.close()
                raise UnsafeFileError(f"refused: ckptlab could not read all of this file ({unread.detail}); "
                                      "torch.load would run what was not checked", self.path)
            if self.verdict == SUSPICIOUS and not allow_suspicious:
                self.scan.close()
                raise UnsafeFileError(f"refused: suspicious pickle content{detail}", self.path)
            if self.verdict == CORRUPT:
                self.scan.close()
                raise FormatError(f"cannot read pickle: {worst.detail if worst else 'unreadable'}", self.path)
        if self.verdict == SUSPICIOUS:
            self.warnings += [f"suspicious: {f.detail} [{f.location}]" for f in self.findings
                              if f.severity == SUSPICIOUS]
        self._tensors, self.extra, self.dropped, self.wrapper = unwrap(self.scan.root)
        self._infos: dict[str, TensorInfo] = {}
        for key, ref in self._tensors.items():
            if ref.dtype is None:
                self.warnings.append(f"tensor {key!r}: {ref.storage.storage_type} cannot be represented; skipped")
                continue
            self._infos[key] = TensorInfo(ref.dtype, ref.shape)
        self.metadata = {k: v for k, v in ((k, _meta_str(v)) for k, v in self.extra.items()) if v is not None}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def storage_key(self, key: str) -> tuple[int, int]:
        """An id of the storage behind ``key`` and the view's element offset (shared storages)."""
        ref = self._tensors[key]
        return id(ref.storage), ref.offset

    def array(self, key: str):
        import numpy as np

        from ckptlab.formats.dtypes import to_numpy

        ref = self._tensors[key]
        info = self._infos[key]
        st = ref.storage
        if not st.valid or st.backing is None:
            raise FormatError(f"tensor {key!r}: its storage record is missing or inconsistent", self.path)
        dt = to_numpy(info.dtype)
        isz = itemsize(info.dtype)
        nbytes = st.numel * itemsize(st.dtype)
        count = nbytes // isz
        if info.numel == 0:
            return np.empty(info.shape, dtype=dt)
        if nbytes % isz:
            raise FormatError(f"tensor {key!r}: storage size mismatch", self.path)
        kind = st.backing[0]
        remote = type(self.scan.mm) is RemoteBuffer
        if kind == "view":
            buf, off = st.backing[1], st.backing[2]
            if type(buf) is RemoteBuffer:  # a legacy file over a URL: one ranged GET of exactly this record
                chunk = bytearray(buf.rf.pread(off, nbytes, exact=True))
                if len(chunk) != nbytes:
                    raise FormatError(f"tensor {key!r}: the object ends inside its storage record (it changed?)",
                                      self.path)
            else:  # a memoryview of the local file's map (a read-only one is copied: the array is writable)
                chunk = buf[off:off + nbytes]
                if chunk.readonly:
                    chunk = bytearray(chunk)
            base = np.frombuffer(chunk, dtype=np.uint8, count=nbytes)
        else:  # a zip record, stored (mmapped in place) or deflated (inflate this one tensor)
            if self.scan.mm is None:
                raise FormatError("file is closed", self.path)
            try:
                data, crc = zip_record(self.scan.mm, st, nbytes)
            except zlib.error as err:
                raise FormatError(f"tensor {key!r}: its compressed record does not inflate ({err})", self.path) from None
            try:
                if len(data) != nbytes:
                    raise FormatError(f"tensor {key!r}: compressed record inflates to the wrong size", self.path)
                self._check_crc(key, st, data, crc)
                if kind != "file" or remote:  # inflated, or fetched bytes (a remote object has no map to view)
                    base = np.frombuffer(bytearray(data), dtype=np.uint8, count=nbytes)
            finally:
                if isinstance(data, memoryview):
                    data.release()  # an export left on the mmap would block closing it
            if kind == "file" and not remote:
                base = np.frombuffer(self.scan.mm, dtype=np.uint8, count=nbytes, offset=st.backing[1])
        if st.byteswap and isz > 1:  # a big-endian legacy file: swapped into a native copy
            base = base.reshape(-1, isz)[:, ::-1].copy().reshape(-1)
        flat = base.view(dt)  # count elements: nbytes is a multiple of the item size (checked above)
        # the view must stay inside its storage (checked when the pickle was read; numpy's as_strided does not)
        if len(ref.stride) != len(info.shape) or ref.offset < 0 or any(s < 0 for s in ref.stride) or \
                ref.offset + sum((n - 1) * s for n, s in zip(info.shape, ref.stride, strict=True)) >= count:
            raise FormatError(f"tensor {key!r}: view (offset {ref.offset}, size {list(info.shape)}, stride "
                              f"{list(ref.stride)}) reaches past its storage of {count} elements", self.path)
        return np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=info.shape,
                                               strides=tuple(s * isz for s in ref.stride))

    def _check_crc(self, key: str, storage, data, expected: int) -> None:
        """The zip record's CRC-32 over its bytes, once per storage: torch.load never checks it, so a
        damaged download would load (and convert) wrong values without a word."""
        if id(storage) in self._crc_ok:
            return
        got = crc32(data)
        if got != expected:
            raise FormatError(f"tensor {key!r}: its storage record fails the zip CRC-32 check "
                              f"({got:08x}, recorded {expected:08x}): the file is damaged", self.path)
        self._crc_ok.add(id(storage))

    def close(self) -> None:
        self.scan.close()


# ---------------------------------------------------------------------------------------------
# unwrapping

def _is_tensorish(v, depth: int = 0) -> bool:
    """Does ``v`` (a dict/list) contain tensors somewhere (bounded)?"""
    if isinstance(v, TensorRef):
        return True
    if depth > 4:
        return False
    if isinstance(v, dict):
        return any(_is_tensorish(x, depth + 1) for x in list(v.values())[:10000])
    if isinstance(v, (list, tuple)):
        return any(_is_tensorish(x, depth + 1) for x in v[:10000])
    return False


def unwrap(root: Any) -> tuple[dict[str, TensorRef], dict[str, Any], list[str], list[str]]:
    """``(tensors, extra, dropped, wrapper)`` from a checkpoint object.

    ``wrapper`` lists the keys descended through (``["state_dict"]``); ``dropped`` names the
    training-state entries left out (optimizer states, callbacks...).
    """
    tensors: dict[str, TensorRef] = {}
    extra: dict[str, Any] = {}
    dropped: list[str] = []
    wrapper: list[str] = []
    if isinstance(root, TensorRef):
        return {"tensor": root}, extra, dropped, wrapper
    if isinstance(root, Call):  # e.g. an nn.Module pickled whole: never rebuilt, its tensors are read
        if _module_state(root) is not None:
            _flatten_module(root, "", tensors, 0, [0])
            return tensors, {"object": root.qualname}, dropped, wrapper
        return tensors, {"object": _plain(root)}, dropped, wrapper
    if isinstance(root, (list, tuple)) and _is_tensorish(root):
        root = dict(enumerate(root))  # torch.save([t0, t1]): keys "0", "1"
    if not isinstance(root, dict):
        return tensors, ({"object": _plain(root)} if root is not None else {}), dropped, wrapper
    d = root
    for _ in range(4):
        inner = d.get("state_dict") if isinstance(d.get("state_dict"), dict) else None
        if inner is None and len(d) == 1:
            (k, v), = d.items()
            inner = v if isinstance(k, str) and isinstance(v, dict) and _is_tensorish(v) else None
            if inner is not None:
                wrapper.append(k)
                d = inner
                continue
        if inner is None:
            break
        wrapper.append("state_dict")
        for k, v in d.items():
            if k == "state_dict":
                continue
            _side(str(k), v, extra, dropped)
        d = inner
    _flatten(d, "", tensors, extra, dropped, 0, [0])
    return tensors, extra, dropped, wrapper


def _side(key: str, v: Any, extra: dict, dropped: list) -> None:
    """A sibling of the weights in a training checkpoint."""
    if key in TRAINING_STATE or _is_tensorish(v):
        dropped.append(key)
    else:
        extra[key] = _plain(v)


def _flatten(d: dict, prefix: str, tensors: dict, extra: dict, dropped: list, depth: int, count: list) -> None:
    for k, v in d.items():
        count[0] += 1
        if count[0] > MAX_WALK_NODES:
            return
        key = f"{prefix}{k}"
        if isinstance(v, TensorRef):
            tensors[key] = v
        elif isinstance(v, Call) and _module_state(v) is not None and depth < MAX_DEPTH:
            _flatten_module(v, key + ".", tensors, depth + 1, count)
        elif not prefix and str(k) in TRAINING_STATE:
            dropped.append(key)
        elif isinstance(v, dict) and depth < MAX_DEPTH and _is_tensorish(v):
            _flatten(v, key + ".", tensors, extra, dropped, depth + 1, count)
        elif isinstance(v, (list, tuple)) and depth < MAX_DEPTH and _is_tensorish(v):
            _flatten(dict(enumerate(v)), key + ".", tensors, extra, dropped, depth + 1, count)
        else:
            extra[key] = _plain(v)


def _module_state(v: Call) -> dict | None:
    """The ``__dict__`` of a pickled ``torch.nn.Module`` (an inert record), if ``v`` is one."""
    st = v.state
    if isinstance(st, dict) and isinstance(st.get("_parameters"), dict) and isinstance(st.get("_modules"), dict):
        return st
    return None


def _flatten_module(v: Call, prefix: str, tensors: dict, depth: int, count: list) -> None:
    """Tensors of a whole pickled module, named as ``Module.state_dict()`` names them."""
    st = _module_state(v)
    if st is None or depth > MAX_DEPTH:
        return
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            count[0] += 1
            if isinstance(t, TensorRef) and count[0] <= MAX_WALK_NODES:
                tensors[f"{prefix}{name}"] = t
    for name, child in st["_modules"].items():
        if isinstance(child, Call):
            _flatten_module(child, f"{prefix}{name}.", tensors, depth + 1, count)


def _plain(v: Any, depth: int = 0, budget: list | None = None) -> Any:
    """A JSON-friendly, bounded rendering of a non-tensor value (nothing is called)."""
    budget = budget if budget is not None else [10000]
    budget[0] -= 1
    if budget[0] < 0 or depth > 16:
        return "..."
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    if isinstance(v, BytesRef):
        return f"<{v.length} bytes>"
    if isinstance(v, complex):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _plain(x, depth + 1, budget) for k, x in list(v.items())[:1000]}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_plain(x, depth + 1, budget) for x in list(v)[:1000]]
    if isinstance(v, TensorRef):
        return f"<tensor {v.dtype} {list(v.shape)}>"
    if isinstance(v, DtypeTag):
        return v.name
    if isinstance(v, Global):
        return f"<{v.qualname}>"
    if isinstance(v, Call):
        if v.qualname == "argparse.Namespace" and isinstance(v.state, dict):
            return _plain(v.state, depth + 1, budget)
        out: dict[str, Any] = {"__class__": v.qualname}
        if v.state is not None:
            out["state"] = _plain(v.state, depth + 1, budget)
        return out
    return f"<{type(v).__name__}>"


def _meta_str(v: Any) -> str | None:
    """Non-tensor info as a safetensors metadata string (scalars as text, others as JSON)."""
    import json

    if isinstance(v, str):
        return v
    if isinstance(v, bool | int | float):
        return json.dumps(v)
    if v is None:
        return None
    try:
        s = json.dumps(v, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return s if len(s) <= 65536 else None
