"""Object storage and web servers as model sources: ``s3://``, ``gs://``, ``az://`` and ``https://`` paths.

This package is the layer between the base modules and ``formats``: it turns a URL into ranged reads (through
fsspec: s3fs, gcsfs, adlfs, HTTP) and lists prefixes page by page. Nothing here parses model files; ``formats``,
``security`` and ``hashes`` read a remote object through ``RemoteFile`` exactly as they read a local one.

The identity of an object in the catalog is the object-store analogue of a file's ``(dev, ino, size, mtime_ns)``:
``remote_stat_key(entry)`` = ``(REMOTE_DEV, a 63-bit number from the URL and its ETag or version id, size,
Last-Modified in ns)``. A re-scan re-reads an object only when that key changed; the ``content`` table (hashes,
fingerprints) is keyed on it like a local file's.

fsspec and the protocol packages are imported lazily: ``import ckptlab`` and every local command work without
the ``remote`` extra; a remote path without it is one line asking to install ``ckptlab[remote]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

#: URL schemes read as remote objects (fsspec protocol names; ``gcs`` and ``abfs``/``az`` are aliases)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss", "http", "https")

#: ``files.dev`` and ``content.dev`` of every remote object: no local device has this number
REMOTE_DEV = -1


def is_remote(path) -> bool:
    """True for a string naming an object behind one of ``REMOTE_SCHEMES`` (``s3://bucket/key``...). Paths,
    ``Path`` objects and ``file://`` URLs are local."""
    if not isinstance(path, str):
        return False
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


@dataclass(frozen=True)
class RemoteEntry:
    """One object as a listing (or a HEAD) describes it: everything a scan needs before reading a byte."""

    url: str  # the full URL, scheme included (``s3://bucket/prefix/model.safetensors``)
    size: int
    etag: str | None = None  # as the server gives it, quotes stripped
    version_id: str | None = None  # S3 version id / GCS generation, when the store versions objects
    last_modified: float | None = None  # seconds since the epoch

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def remote_stat_key(entry: RemoteEntry) -> tuple[int, int, int, int]:
    """The catalog identity of ``entry``: ``(REMOTE_DEV, ino, size, mtime_ns)`` where ``ino`` is a signed 63-bit
    number from the URL and its version id (or ETag when the store does not version), and ``mtime_ns`` its
    Last-Modified. Same URL + same version/ETag + same size + same Last-Modified = nothing to re-read."""
    version = entry.version_id or entry.etag or ""
    digest = hashlib.blake2b(f"{entry.url}\0{version}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    ino = int.from_bytes(digest, "big") >> 1  # 63 bits: fits SQLite's and PostgreSQL's signed 64-bit integers
    mtime_ns = int(round((entry.last_modified or 0.0) * 1e9))
    return (REMOTE_DEV, ino, int(entry.size), mtime_ns)


class RemoteURL(str):
    """A remote URL kept as a ``str`` (``Path`` would turn ``s3://b/k`` into ``s3:/b/k``) with the few ``Path``
    attributes the format layer and the commands use: ``name``, ``suffix``, ``stem``, ``parent``, ``/``."""

    __slots__ = ()

    def __new__(cls, url):
        check_url(url)
        return super().__new__(cls, url)

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        n = self.name
        i = n.rfind(".")
        return n[i:] if 0 < i < len(n) - 1 else ""

    @property
    def stem(self) -> str:
        s = self.suffix
        return self.name[:-len(s)] if s else self.name

    @property
    def parent(self) -> RemoteURL:
        return RemoteURL(self.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, other) -> RemoteURL:
        return RemoteURL(self.rstrip("/") + "/" + str(other).lstrip("/"))

    def as_posix(self) -> str:
        return str(self)

    # -- the folder view of a prefix (a diffusers pipeline in a bucket), from one listing per session
    def is_file(self) -> bool:
        from ckptlab.remote.reader import tree_lookup

        return tree_lookup(self)[0] == "file"

    def is_dir(self) -> bool:
        from ckptlab.remote.reader import tree_lookup

        return tree_lookup(self)[0] == "dir"

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def iterdir(self):
        from ckptlab.remote.reader import tree_children

        return iter([RemoteURL(u) for u in tree_children(self)])

    def stat(self):
        from ckptlab.remote.reader import tree_lookup

        kind, size = tree_lookup(self)
        if kind != "file":
            raise FileNotFoundError(2, "no such object", str(self))
        import os

        return os.stat_result((0o100444, 0, REMOTE_DEV, 1, 0, 0, size, 0, 0, 0))

    def read_bytes(self) -> bytes:
        from ckptlab.remote.reader import open_remote

        rf = open_remote(self)
        return rf.pread(0, rf.size)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


def expand_targets(args, expand_local) -> list:
    """Command-line arguments in order: remote URLs as ``RemoteURL`` (never globbed), the rest through
    ``expand_local`` (the CLI's glob/folder expansion)."""
    out: list = []
    for a in args:
        if isinstance(a, str) and is_remote(a):
            out.append(RemoteURL(a))
        else:
            out.extend(expand_local([a]))
    return out


def check_url(url: str) -> None:
    """Refuse a URL the standard parser cannot read (``https://[::1/x``, a port above 65535) in one line, with any
    ``user:password@`` left out of the message."""
    from urllib.parse import urlsplit

    try:
        urlsplit(url).port  # noqa: B018 - .port validates the number
    except ValueError as e:
        import re

        from ckptlab.errors import UsageError

        raise UsageError(f"not a valid URL ({e})", re.sub(r"//[^/@]*@", "//", url)) from None


def as_path(path):
    """``RemoteURL`` for a remote URL string, else ``Path(path)`` (what the format layer holds as ``.path``)."""
    from pathlib import Path

    if type(path) is RemoteURL:
        return path
    if isinstance(path, str) and "://" in path and is_remote(path):
        return RemoteURL(path)
    return Path(path)


def __getattr__(name):  # the reader's API, imported on first use (no fsspec import either way)
    if name in ("RemoteFile", "RemoteBuffer", "open_remote", "session", "stats", "counting", "READAHEAD",
                "filesystem"):
        from ckptlab.remote import reader

        return getattr(reader, name)
    raise AttributeError(name)
