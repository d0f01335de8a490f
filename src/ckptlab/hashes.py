"""All six hashes CivitAI stores, computed from one sequential read of the file.

One reader thread reads the file in large chunks and hands each chunk (shared, never copied) to
one worker thread per hasher: SHA-256 of the whole file, SHA-256 of the bytes after a safetensors
header (AutoV3), BLAKE3 and CRC-32. ``hashlib``, ``blake3`` and ``zlib`` release the GIL on large
buffers, so the hashers run on separate cores and the wall time is close to the slowest one.
AutoV1 (SHA-256 of the 64 KiB at offset 1 MiB) is taken from the same chunks as they pass.

Definitions (A1111's ``modules/hashes.py`` and ``sd_models.model_hash``, CivitAI's file hashes; docs/library.md),
all shown UPPER-case as CivitAI shows them:

- ``sha256``: SHA-256 of the whole file, 64 hex.
- ``autov1``: first 8 hex of SHA-256 over ``file[0x100000:0x110000]``. Files of 1 MiB or less hash an
  empty slice (``E3B0C442``), so all small files share one AutoV1; shorter than 1 MiB + 64 KiB hash
  what there is.
- ``autov2``: first 10 hex of ``sha256``.
- ``autov3``: first 12 hex of SHA-256 over ``file[8 + N:]`` where ``N`` is the little-endian u64
  at the start of a safetensors file; ``None`` for files whose bytes are not safetensors.
- ``crc32``: CRC-32 (zlib's polynomial) of the whole file, 8 hex; computed with ISA-L when the
  ``isal`` package is installed (same values, ~4x faster), else with ``zlib``.
- ``blake3``: BLAKE3-256 of the whole file, 64 hex.
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ckptlab.checksum import crc32
from ckptlab.errors import FormatError
from ckptlab.progress import Progress, null_progress

CHUNK = 2 * 1024 * 1024  # 2 MiB reads stay in cache for the hashing threads: ~15% faster than 8 MiB
AUTOV1_OFFSET = 0x100000
AUTOV1_LENGTH = 0x10000
_QUEUE_DEPTH = 4


@dataclass(frozen=True)
class Hashes:
    """The six CivitAI hashes of one file (UPPER-case hex; ``autov3`` None for non-safetensors) and its size."""

    sha256: str
    autov1: str
    autov2: str
    autov3: str | None
    crc32: str
    blake3: str
    size: int

    def names(self) -> dict[str, str]:
        """``{"SHA256": ..., "AutoV1": ...}`` with CivitAI's type names (None values left out)."""
        out = {"SHA256": self.sha256, "AutoV1": self.autov1, "AutoV2": self.autov2, "AutoV3": self.autov3,
               "CRC32": self.crc32, "BLAKE3": self.blake3}
        return {k: v for k, v in out.items() if v}


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value & 0xFFFFFFFF:08x}"


class _Worker(threading.Thread):
    """Feeds chunks ``(offset, buffer)`` to one hasher; ``start_at`` skips the bytes before it."""

    def __init__(self, hasher, start_at: int = 0):
        super().__init__(daemon=True)
        self.hasher = hasher
        self.start_at = start_at
        self.q: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            offset, buf = item
            try:
                end = offset + len(buf)
                if end <= self.start_at:
                    continue
                skip = max(0, self.start_at - offset)
                self.hasher.update(buf[skip:] if skip else buf)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self.error = e


def safetensors_data_offset(head: bytes, size: int) -> int | None:
    """``8 + N`` when ``head`` (the first bytes of a file of ``size`` bytes) starts a safetensors file."""
    if len(head) < 9:
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0 or 8 + n > size or head[8:9] != b"{":
        return None
    return 8 + n


class MultiHasher:
    """All six hashes over a byte stream fed in order with ``update`` - the file read of
    ``hash_file`` or a download's transfer stream. One worker thread per hasher; chunks are shared
    with the workers, never copied, so the caller must not modify a buffer after passing it (``bytes``
    or a fresh ``bytearray`` per call). Small chunks (network reads) are gathered into ``BATCH``-byte
    blocks first so the thread hand-offs stay cheap. Use as a context manager (``close`` stops the
    workers when the stream is abandoned) and call ``result()`` at the end."""

    BATCH = 1024 * 1024

    def __init__(self) -> None:
        try:
            import blake3 as _blake3

            self._b3 = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        except ImportError:  # pragma: no cover - blake3 is a dependency
            self._b3 = None
        self._sha = hashlib.sha256()
        self._crc = _Crc32()
        self._workers = [_Worker(self._sha), _Worker(self._crc)] + ([_Worker(self._b3)] if self._b3 else [])
        for w in self._workers:
            w.start()
        self._v3: _Worker | None = None
        self._head = bytearray()  # the first bytes, until AutoV3's start is known
        self._decided = False
        self._v1 = bytearray()
        self._pending = bytearray()
        self._pos = 0  # bytes dispatched to the workers
        self._closed = False

    @property
    def count(self) -> int:
        """Bytes fed so far."""
        return self._pos + len(self._pending)

    def update(self, data) -> None:
        if not data:
            return
        if len(data) >= self.BATCH and not self._pending:
            self._dispatch(data)
            return
        self._pending += data
        if len(self._pending) >= self.BATCH:
            self._flush()

    def update_from_file(self, fh, upto: int | None = None, progress: Progress | None = None) -> int:
        """Feed ``upto`` bytes (default: to EOF) read from the binary file object ``fh``; returns the
        count read. Raises ``OSError`` on read errors."""
        progress = progress or null_progress
        got = 0
        while upto is None or got < upto:
            buf = bytearray(CHUNK if upto is None else min(CHUNK, upto - got))
            n = fh.readinto(buf)
            if not n:
                break
            self.update(memoryview(buf)[:n])
            got += n
            progress(n)
        return got

    def _flush(self) -> None:
        if self._pending:
            buf, self._pending = self._pending, bytearray()
            self._dispatch(memoryview(buf))

    def _dispatch(self, chunk) -> None:
        pos, n = self._pos, len(chunk)
        if not self._decided:
            self._head += chunk[:16 - len(self._head)] if len(self._head) < 16 else b""
            if len(self._head) >= 9:
                self._decide()
        lo, hi = max(pos, AUTOV1_OFFSET), min(pos + n, AUTOV1_OFFSET + AUTOV1_LENGTH)
        if lo < hi:
            self._v1 += chunk[lo - pos:hi - pos]
        for w in self._all():
            w.q.put((pos, chunk))
        self._pos += n

    def _decide(self) -> None:
        """AutoV3 hashes from ``8 + N`` on when the stream starts like a safetensors file. ``8 + N`` is
        at least 9, so no byte it needs has passed before the 9 bytes that decide it."""
        self._decided = True
        data_at = safetensors_data_offset(bytes(self._head), 1 << 62)  # the size is checked in result()
        if data_at is not None:
            self._v3 = _Worker(hashlib.sha256(), start_at=data_at)
            self._v3.start()

    def _all(self) -> list[_Worker]:
        return self._workers + ([self._v3] if self._v3 is not None else [])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._all():
            w.q.put(None)
        for w in self._all():
            w.join()

    def __enter__(self) -> MultiHasher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def result(self) -> Hashes:
        """Wait for the workers and return the hashes of everything fed."""
        self._flush()
        if not self._decided and len(self._head) >= 9:
            self._decide()
        self.close()
        for w in self._all():
            if w.error is not None:
                raise w.error
        size = self._pos
        v3 = self._v3 is not None and self._v3.start_at <= size
        digest = self._sha.hexdigest().upper()
        return Hashes(
            sha256=digest,
            autov1=hashlib.sha256(bytes(self._v1)).hexdigest()[:8].upper(),
            autov2=digest[:10],
            autov3=self._v3.hasher.hexdigest()[:12].upper() if v3 else None,
            crc32=self._crc.hexdigest().upper(),
            blake3=self._b3.hexdigest().upper() if self._b3 is not None else "",
            size=size,
        )


def hash_file(path: str | Path, progress: Progress | None = None) -> Hashes:
    """Compute every CivitAI hash of ``path`` in one read. Raises ``FormatError`` if the file cannot
    be read or changes size while it is read. ``progress`` is advanced by the bytes read; its total is
    the caller's (one bar over many files: ``hash``, ``scan --hash``), never reset here."""
    from ckptlab.formats import require_regular_file

    progress = progress or null_progress
    if isinstance(path, str) and "://" in path:
        from ckptlab.remote import is_remote

        if is_remote(path):
            return hash_remote(path, progress=progress)
    path = Path(path)
    require_regular_file(path)  # a FIFO would block, /dev/zero never end
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", path) from None
    with fh, MultiHasher() as mh:
        size = os.fstat(fh.fileno()).st_size
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        try:
            mh.update_from_file(fh, progress=progress)
        except OSError as e:
            raise FormatError(f"read error at byte {mh.count}: {e.strerror or e}", path) from None
        h = mh.result()
        if h.size != size or os.fstat(fh.fileno()).st_size != size:
            raise FormatError(f"file changed while it was hashed ({size} bytes at start, {h.size} read)", path)
    return h


def hash_remote(url, progress: Progress | None = None, *, size: int | None = None, on_chunk=None) -> Hashes:
    """Every hash of a remote object (a URL or a ``remote.RemoteEntry``) from ONE streamed GET, piece by piece
    (never the whole object in memory). ``on_chunk(pos, piece)`` sees each piece too (the fingerprint of
    ``library.fingerprint.stream_content`` rides on the same stream). Raises ``CkptlabError`` (one line) when the
    object cannot be read or the server sends another length than it has."""
    from ckptlab.remote.reader import open_remote

    progress = progress or null_progress
    rf = open_remote(url, size)
    pos = 0
    with MultiHasher() as mh:
        for piece in rf.stream():
            mh.update(piece)
            if on_chunk is not None:
                on_chunk(pos, piece)
            pos += len(piece)
            progress(len(piece))
        h = mh.result()
    if h.size != rf.size:
        raise FormatError(f"object changed while it was hashed ({rf.size} bytes listed, {h.size} read)", rf.url)
    return h


SHA256_CHUNK = 1 << 20  # stays in L2 between the read and the hash: ~20% faster than 8 MiB reads


class HashCancelled(Exception):
    """A ``sha256_file`` was told to stop (the work it served failed or was interrupted)."""


def sha256_file(path: str | Path, cancel: threading.Event | None = None, start: int = 0) -> str:
    """SHA-256 of a file's bytes alone (the input pins of merges and transforms); from byte ``start`` on (AutoV3:
    ``8 + N``, the bytes after a safetensors header). ``cancel``: an event that, once set, stops the reading with
    ``HashCancelled``. Raises ``OSError`` on read errors."""
    h = hashlib.sha256()
    buf = bytearray(SHA256_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        try:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        if start:
            fh.seek(start)
        while True:
            if cancel is not None and cancel.is_set():
                raise HashCancelled(str(path))
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL on big buffers: files hash in parallel
    return h.hexdigest()


# -- the hash cache ------------------------------------------------------------------------------------------
class HashCache(Protocol):
    """Where writers look up sha256s already known, so an input is not read twice. ``known_sha256`` answers
    only for this exact file (same device, inode, size and mtime), lower case, or None; ``path_with_sha256``
    finds a present, unchanged file with that content, or None. Any failure is a miss, never an error.

    Transforms and merges take one as ``cache=`` and never look one up by themselves: the default is
    ``NO_CACHE`` (every input is hashed). The CLI builds one from ``--db``
    (``ckptlab.library.catalog.hash_cache``)."""

    def known_sha256(self, path: str | Path, st: os.stat_result | None = None) -> str | None: ...

    def path_with_sha256(self, sha256: str) -> Path | None: ...


class _NoCache:
    """The cache that knows nothing: every input is hashed."""

    def known_sha256(self, path: str | Path, st: os.stat_result | None = None) -> str | None:
        return None

    def path_with_sha256(self, sha256: str) -> Path | None:
        return None

    def __repr__(self) -> str:
        return "NO_CACHE"


NO_CACHE: HashCache = _NoCache()


class VerifiedFile:
    """A cache that knows one file's sha256, just re-verified by the caller (``apply-plan`` hashes the file it
    rewrites before the rewrite): answers for that very file (same device, inode, size and mtime) only."""

    def __init__(self, path: str | Path, sha256: str):
        st = os.stat(path)
        self._id = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.path, self.sha256 = Path(path), sha256.lower()

    def known_sha256(self, path: str | Path, st: os.stat_result | None = None) -> str | None:
        try:
            st = st or os.stat(path)
        except OSError:
            return None
        return self.sha256 if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == self._id else None

    def path_with_sha256(self, sha256: str) -> Path | None:
        return self.path if sha256.lower() == self.sha256 and self.known_sha256(self.path) else None
