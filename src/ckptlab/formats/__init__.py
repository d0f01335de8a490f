"""The model-file layer: ``open_model(path)`` returns a ``TensorSource`` for any supported format.

Format is decided from the bytes (magic numbers), not from the file name. Nothing here imports
torch; pickles are only ever read by ckptlab's own data-only reader (``formats.pickle``).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from ckptlab.errors import CkptlabError, FormatError, UnsupportedFormatError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.remote import RemoteURL, as_path

#: files that may hold a model (ComfyUI's extension list + GGUF); the one list every command uses
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".gguf")

__all__ = ["MODEL_SUFFIXES", "TensorInfo", "TensorSource", "detect_format", "open_model", "require_regular_file"]


def require_regular_file(path: Path) -> None:
    """Refuse FIFOs, sockets and devices before opening: reading one would block or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the open that follows reports the problem
    if not stat.S_ISREG(mode):
        raise UnsupportedFormatError("not a regular file", path)


def detect_format(path: str | Path) -> str:
    """'safetensors' | 'pickle' | 'diffusers' | 'gguf' from the file's bytes; raise if unknown."""
    p = as_path(path)
    if type(p) is RemoteURL:
        return _detect_remote(p)
    if p.is_dir():
        if (p / "model_index.json").is_file() or (p / "config.json").is_file():
            return "diffusers"
        raise UnsupportedFormatError("folder is not a diffusers model (no model_index.json or config.json)", p)
    require_regular_file(p)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
            size = os.fstat(fh.fileno()).st_size
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror or e}", p) from None
    return _detect_bytes(p, head, size)


def _detect_remote(p) -> str:
    """``detect_format`` of a remote object: its first block (one ranged GET, kept for the reads that follow in
    the same ``remote.session()``); a URL ending in ``/`` or naming no object but holding ``model_index.json`` is a
    diffusers folder."""
    from ckptlab.errors import NotFoundError
    from ckptlab.remote.reader import open_remote

    if p.endswith("/"):
        return _detect_remote_folder(p)
    rf = open_remote(p)
    try:
        head = rf.pread(0, 16)
    except NotFoundError:
        if p.suffix.lower() not in MODEL_SUFFIXES:
            try:
                return _detect_remote_folder(p)
            except NotFoundError:
                pass
        raise
    return _detect_bytes(p, head, rf.size)


def _detect_remote_folder(p) -> str:
    """A prefix holding ``model_index.json`` (or ``config.json``): from the prefix's listing (one LIST per session);
    http(s) cannot list, so there one ranged GET probes each name."""
    from ckptlab.remote.reader import open_remote

    for name in ("model_index.json", "config.json"):
        try:
            if (p / name).is_file():
                return "diffusers"
            continue
        except CkptlabError:
            pass
        try:
            open_remote(p / name).pread(0, 1)
            return "diffusers"
        except CkptlabError:
            continue
    raise UnsupportedFormatError("prefix is not a diffusers model (no model_index.json or config.json)", p)


def _detect_bytes(p, head: bytes, size: int) -> str:
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "pickle"  # torch zip checkpoint (the pickle lives inside)
    # safetensors before the pickle check: a header length such as 0x280 starts with the bytes
    # 80 02, which also open a protocol-2 pickle; a pickle never has '{' at byte 8 after a length
    # that fits in the file.
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"  # pickle protocol 2+ (also legacy torch serialization)
    if p.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") and head[:1] in (b"(", b"c", b"}", b"]"):
        return "pickle"  # protocol 0/1 pickle
    if p.suffix.lower() in (".safetensors", ".sft"):
        # claims to be safetensors: let the strict parser say exactly what is wrong
        return "safetensors"
    if size == 0:
        raise FormatError("file is empty", p)
    raise UnsupportedFormatError("not a recognised model file format", p)


def open_model(path: str | Path, *, variant: str | None = None) -> TensorSource:
    """Open any supported model file lazily. Raises ``CkptlabError`` subclasses with one-line messages.

    ``variant`` picks the weight variant of a diffusers folder (``"fp16"``; ``""`` for the plain
    files; ``None`` chooses one consistently); other formats ignore it.
    """
    fmt = detect_format(path)
    if fmt in ("safetensors", "gguf"):
        from ckptlab.formats.polyglot import polyglot_findings

        bad = polyglot_findings(as_path(path))  # torch.load would read this file as a pickle from byte 0
        if bad:
            from ckptlab.errors import UnsafeFileError

            raise UnsafeFileError(f"refused: malicious pickle content ({bad[0].detail}); run `ckptlab check` for "
                                  "details", path)
    if fmt == "safetensors":
        from ckptlab.formats.safetensors import SafetensorsSource

        return SafetensorsSource(path)
    if fmt == "diffusers":
        from ckptlab.formats.diffusers import DiffusersSource

        return DiffusersSource(path, variant=variant)
    if fmt == "gguf":
        from ckptlab.formats.gguf import GGUFSource

        return GGUFSource(path)
    from ckptlab.formats.pickle import PickleSource

    return PickleSource(path)
