"""Preview images of catalogued files (``GET /media/preview/{file_id}``).

The URL names a catalog row, never a path: the image is the one the catalog knows for that row, either the
preview ``ckptlab preview`` recorded (``previews`` table, ``library.previews``) or the sidecar preview the scanner
found next to the model (``files.sidecars["files"]["preview"|"thumb"]``: a bare file name in the model's own
folder). Whatever the catalog says is still checked before a byte is sent, because a catalog is only as
trustworthy as the folders it was scanned from:

- the name ends in an image extension (png, jpg, jpeg, webp, gif) and the first bytes are that kind of image
  (a ``.png`` that is really a text file is refused; the Content-Type comes from the bytes);
- a sidecar name is a bare name (no separator, not ``..``) resolved in the model's folder;
- the file is a regular file (not a FIFO or device), opened without following a final symlink; a symlink is
  served only when it points at a file in its own folder (a link to ``/etc/passwd`` or another tree is not);
- at most ``MAX_BYTES``.

Anything else is a plain 404 with no detail (nothing says whether a path exists). Responses carry an ETag built
from the file's mtime and size and ``Cache-Control: private, no-cache`` (the browser keeps the image and asks
again with ``If-None-Match``: a replaced preview shows at once, an unchanged one costs a 304).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ckptlab.library.catalog import Catalog
from ckptlab.web.deps import catalog_at

router = APIRouter()

IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
               "gif": "image/gif"}
MAX_BYTES = 32 * 1024 * 1024  # a preview is an image for a card, not a 1 GB file someone named .png


def _sniff(head: bytes) -> str | None:
    """The image type of a file from its first bytes, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _image_ext(path: str) -> bool:
    return os.path.splitext(path)[1][1:].lower() in IMAGE_TYPES


def _bare(name: object) -> bool:
    """A plain file name: no directory part, not ``.``/``..``, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and os.path.basename(name) == name)


def candidates(model_path: str, sidecars: dict | None, recorded: str | None) -> list[str]:
    """The image paths the catalog names for one file, best first: the recorded preview, then the scanner's
    sidecar preview and thumbnail (bare names in the model's folder). Only names with an image extension."""
    out: list[str] = []
    if recorded and os.path.isabs(recorded) and _image_ext(recorded) and "\0" not in recorded:
        out.append(recorded)
    found = (sidecars or {}).get("files") if isinstance(sidecars, dict) else None
    if isinstance(found, dict):
        folder = os.path.dirname(model_path)
        for role in ("preview", "thumb"):
            name = found.get(role)
            if _bare(name) and _image_ext(name):
                out.append(os.path.join(folder, name))
    return out


def _link_ok(path: str) -> bool:
    """A final-component symlink is accepted only when it points at a file in its own folder."""
    try:
        real = os.path.realpath(path)
        return os.path.dirname(real) == os.path.realpath(os.path.dirname(path))
    except (OSError, ValueError):
        return False


def usable(path: str) -> os.stat_result | None:
    """The stat of ``path`` when it may be served (a regular image file, not a symlink pointing elsewhere)."""
    try:
        lst = os.lstat(path)
        if stat.S_ISLNK(lst.st_mode) and not _link_ok(path):
            return None
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES or st.st_size == 0:
        return None
    return st


def _rows(cat: Catalog, ids: list[int]) -> list[tuple[int, str, str | None, str | None]]:
    import json
    import sqlite3

    marks = ",".join("?" * len(ids))
    try:
        rows = cat.conn.execute(f"SELECT f.id, f.display, f.sidecars, p.path FROM files f LEFT JOIN previews p "
                                f"ON p.file_id = f.id WHERE f.id IN ({marks})", ids).fetchall()
    except sqlite3.OperationalError:  # a catalog without the previews table: sidecars only
        rows = [(*r, None) for r in cat.conn.execute(
            f"SELECT id, display, sidecars FROM files WHERE id IN ({marks})", ids).fetchall()]
    out = []
    for fid, display, sidecars, recorded in rows:
        try:
            sc = json.loads(sidecars) if sidecars else None
        except ValueError:
            sc = None
        out.append((fid, display, sc, recorded))
    return out


def preview_paths(cat: Catalog, ids: Iterable[int]) -> dict[int, str]:
    """``{file id: image path}`` for those of ``ids`` with a preview that ``/media/preview/ID`` would serve
    (existence, type and symlink checks; the bytes are sniffed only when served). One query for all ids."""
    ids = sorted({int(i) for i in ids})
    out: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        for fid, display, sc, recorded in _rows(cat, ids[start:start + 500]):
            for path in candidates(display, sc, recorded):
                if usable(path) is not None:
                    out[fid] = path
                    break
    return out


def _not_found() -> Response:
    return Response("not found", status_code=404, media_type="text/plain")


def _read(path: str) -> tuple[bytes, os.stat_result] | None:
    """The bytes and stat of ``path`` read through one descriptor (no swap between the checks and the read)."""
    if usable(path) is None:
        return None
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not stat.S_ISLNK(os.lstat(path).st_mode):
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return None
    return data, st


@router.get("/media/preview/{file_id}")
def preview(file_id: str, request: Request):
    """The preview image of catalogued file ``file_id`` (digits only), or 404."""
    # the catalog is opened here, in the thread that runs this route: FastAPI runs a sync dependency and the sync
    # route in separate pool calls, which may be different threads (sqlite3 connections stay in their thread;
    # several previews load at once, so it happens)
    cat = catalog_at(request.app.state.db)
    if not file_id.isascii() or not file_id.isdigit() or len(file_id) > 18:
        return _not_found()
    rows = _rows(cat, [int(file_id)])
    if not rows:
        return _not_found()
    _fid, display, sc, recorded = rows[0]
    for path in candidates(display, sc, recorded):
        got = _read(path)
        if got is None:
            continue
        data, st = got
        ctype = _sniff(data[:16])
        if ctype is None:
            continue
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=ctype, headers=headers)
    return _not_found()
