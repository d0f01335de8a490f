"""Verified, resumable downloads into the model library.

``DownloadResult`` is what every downloader (CivitAI, plain URL, Hugging Face) returns once a file
sits under its final name, verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.display import human_size
from ckptlab.errors import CkptlabError, NetworkError, OutputError
from ckptlab.hub.http import VerificationError, backoff_delay, redact, retryable
from ckptlab.library.hashes import Hashes, MultiHasher, hash_file
from ckptlab.progress import Progress, null_progress


@dataclass
class DownloadResult:
    """One downloaded, verified file.

    ``sha256`` is lower-case hex of the bytes on disk; ``expected_sha256`` what the source published
    (None when it published nothing, then only the size was checked). ``resumed_from`` is the size of
    the partial file the transfer continued from (0 for a fresh download). ``source`` is
    ``"civitai"``, ``"hf"`` or ``"url"``; ``extra`` holds source-specific ids (version id, repo,
    revision, commit...).
    """

    path: Path
    url: str
    size: int
    sha256: str
    source: str
    expected_sha256: str | None = None
    resumed_from: int = 0
    skipped: bool = False  # the verified file was already there; nothing was transferred
    extra: dict = field(default_factory=dict)
    hashes: Hashes | None = None  # all six CivitAI hashes, computed from the transfer stream (no second read)


# -- file names --------------------------------------------------------------------------------


def _lock_exclusive(fd: int) -> None:
    """Take an exclusive lock on the open partial file without waiting; OSError if another process holds it
    (flock on POSIX, msvcrt's byte-range lock on Windows). The lock goes with the descriptor."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

def safe_filename(name: str | None) -> str | None:
    """A server-suggested name reduced to a plain basename (no separators, no ``..``, no control
    characters, no leading dots); None if nothing usable is left."""
    if not name:
        return None
    name = name.replace("\\", "/").split("/")[-1]
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f").strip().lstrip(".").strip()
    if name in ("", ".", "..") or len(name.encode("utf-8", "surrogatepass")) > 255:
        return None
    return name


def _fix_mojibake(text: str) -> str:
    """UTF-8 bytes that were decoded as latin-1 ('cafÃ©' -> 'café'); unchanged when that is not the case."""
    if all(ord(c) < 128 for c in text):
        return text
    try:
        fixed = text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text
    return fixed


def content_disposition_filename(value: str | bytes | None) -> str | None:
    """The file name in a ``Content-Disposition`` header, sanitised.

    ``filename*=UTF-8''<percent-encoded>`` (RFC 5987/6266) wins over ``filename=``; a plain
    ``filename`` given as raw UTF-8 bytes, or as UTF-8 mis-decoded as latin-1, is repaired.
    """
    from urllib.parse import unquote_to_bytes

    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
    params: dict[str, str] = {}
    for m in _CD_PARAM.finditer(value):
        key = m.group(1).lower()
        raw = m.group(2)
        if raw.startswith('"'):
            raw = re.sub(r'\\(.)', r'\1', raw[1:-1])
        params.setdefault(key, raw.strip())
    ext = params.get("filename*")
    if ext and "'" in ext:
        charset, _, rest = ext.partition("'")
        _lang, _, encoded = rest.partition("'")
        try:
            name = unquote_to_bytes(encoded).decode(charset.strip() or "utf-8")
        except (LookupError, UnicodeDecodeError):
            name = unquote_to_bytes(encoded).decode("latin-1")
        if safe := safe_filename(name):
            return safe
    plain = params.get("filename")
    if plain:
        return safe_filename(_fix_mojibake(plain))
    return None


_CD_PARAM = re.compile(r';\s*([A-Za-z0-9_.\-]+\*?)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def response_filename(resp) -> str | None:
    """Name from the response's Content-Disposition (raw header bytes, decoded here), else the URL path."""
    from urllib.parse import unquote

    for k, v in resp.headers.raw:
        if k.lower() == b"content-disposition":
            if name := content_disposition_filename(v):
                return name
    return safe_filename(unquote(resp.url.path.rsplit("/", 1)[-1]))


# -- the transfer ------------------------------------------------------------------------------

class CancelledError(CkptlabError):
    """The transfer was stopped on request (Ctrl-C in another thread); the partial is kept."""

    exit_code = 130


CHUNK = 1024 * 1024
_RAW_BYTES = {"Accept-Encoding": "identity", "Accept": "*/*"}  # the file's own bytes, never re-encoded
FREE_SPACE_MARGIN = 64 * 1024 * 1024


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse before writing when the folder's file system cannot hold ``needed`` more bytes."""
    free = shutil.disk_usage(folder).free
    if needed + FREE_SPACE_MARGIN > free:
        raise OutputError(f"not enough free space: need {human_size(needed)} (+{human_size(FREE_SPACE_MARGIN)} margin), "
                          f"{human_size(free)} free", folder)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from ``bytes a-b/total`` or ``bytes */total``."""
    if not value:
        return None, None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def sha256_file(path: Path, upto: int | None = None):
    h = hashlib.sha256()
    remaining = upto
    with open(path, "rb") as fh:
        while remaining is None or remaining > 0:
            buf = fh.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not buf:
                break
            h.update(buf)
            if remaining is not None:
                remaining -= len(buf)
    return h


def transfer(http, url: str, dest_dir: Path, *, filename: str | None = None, expected_sha256: str | None = None,
             expected_size: int | None = None, progress: Progress | None = None, source: str = "url",
             retries: int = 5, extra: dict | None = None, cancel=None) -> DownloadResult:
    """Download ``url`` into ``dest_dir`` as ``filename`` (default: the server's name) and verify it.

    Bytes go to ``<target>.part`` (locked against a second ckptlab). A partial file from an earlier
    run is resumed with ``Range``: 206 appends, 200 restarts from zero, 416 means the partial is
    already whole (or wrong, then it is restarted). Dropped connections are resumed up to
    ``retries`` times. The SHA-256 is computed while streaming (a resumed prefix is re-read once).
    All six CivitAI hashes (``result.hashes``) come from the same stream (``library.hashes.MultiHasher``),
    so the catalog never reads the file again. Only a file whose size and hash match what the source published is renamed into place; a
    mismatch deletes the partial and raises ``VerificationError``. ``cancel`` (a
    ``threading.Event``) stops the transfer between chunks, keeping the partial for a later resume.
    """
    import httpx

    progress = progress or null_progress
    what = f"download {redact(url)}"
    dest_dir = Path(dest_dir)
    exp_sha = expected_sha256.lower() if expected_sha256 else None
    resp = None
    if filename is None:
        resp = http.request("GET", url, what=what, stream=True, headers=dict(_RAW_BYTES), allow=(416,))
        filename = response_filename(resp)
        if not filename:
            resp.close()
            raise CkptlabError(f"{what}: the server gave no usable file name; pass one explicitly")
    name = safe_filename(filename)
    if not name:
        raise CkptlabError(f"unusable file name {filename!r}")
    target = dest_dir / name
    part = target.with_name(target.name + ".part")
    result = DownloadResult(path=target, url=redact(url), size=0, sha256="", source=source,
                            expected_sha256=exp_sha, extra=dict(extra or {}))
    if target.exists():
        if resp is not None:
            resp.close()
        if exp_sha:
            try:
                h = hash_file(target)
            except CkptlabError:
                h = None
            if h is not None and h.sha256.lower() == exp_sha:
                result.size, result.sha256, result.skipped, result.hashes = h.size, exp_sha, True, h
                return result
        raise OutputError("already exists and is not the file being downloaded; move it away first", target)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if resp is not None:
            resp.close()
        raise OutputError(f"cannot write: {e.strerror or e}", part) from None
    hasher: MultiHasher | None = None
    try:
        try:
            _lock_exclusive(fd)
        except OSError:
            raise OutputError("another ckptlab is downloading this file right now", part) from None
        hashed = -1
        attempt = 0
        started_with = os.fstat(fd).st_size
        result.resumed_from = started_with
        total: int | None = None
        shown = 0
        while True:
            have = os.fstat(fd).st_size
            if resp is not None and have and resp.status_code == 200:
                resp.close()  # the name probe answered with the whole file but we hold a partial
                resp = None
            if resp is None:
                headers = dict(_RAW_BYTES)
                if have:
                    headers["Range"] = f"bytes={have}-"
                resp = http.request("GET", url, what=what, stream=True, headers=headers, allow=(416,))
            status = resp.status_code
            if status == 416:
                _, total = _content_range(resp.headers.get("content-range"))
                resp.close()
                resp = None
                if total is not None and have == total:
                    break
                os.ftruncate(fd, 0)  # partial is longer than the file, or the server cannot say: start over
                attempt += 1
                if attempt > retries:
                    raise NetworkError(f"{what}: server keeps refusing the byte range")
                continue
            if status == 206:
                start, total = _content_range(resp.headers.get("content-range"))
                if start != have:
                    resp.close()
                    resp = None
                    os.ftruncate(fd, 0)
                    attempt += 1
                    if attempt > retries:
                        raise NetworkError(f"{what}: server answers ranges that do not match the request")
                    continue
            elif status == 200:
                if have:
                    os.ftruncate(fd, 0)
                    have = 0
                cl = resp.headers.get("content-length")
                total = int(cl) if cl and cl.isdigit() else None
            else:
                resp.close()
                raise NetworkError(f"{what}: unexpected HTTP {status}")
            if expected_size is not None and total is not None and total != expected_size:
                resp.close()
                raise VerificationError(f"{what}: server offers {total} bytes, expected {expected_size}")
            if total is not None:
                check_free_space(dest_dir, total - have)
            if hasher is None or hashed != have:
                hasher = _restart_hasher(hasher, part, have)  # a resumed prefix is read once, here
                hashed = have
            progress(have - shown, total=total if total is not None else expected_size)
            shown = have
            os.lseek(fd, have, os.SEEK_SET)
            try:
                for chunk in resp.iter_raw():  # as received: nothing buffered is lost on a drop
                    if cancel is not None and cancel.is_set():
                        raise CancelledError(f"{what}: cancelled; {os.fstat(fd).st_size} bytes kept in {part.name}")
                    _write_all(fd, chunk, part)
                    hasher.update(chunk)
                    hashed += len(chunk)
                    shown += len(chunk)
                    progress(len(chunk))
                resp.close()
                resp = None
                done = os.fstat(fd).st_size
                if total is not None and done < total:
                    raise httpx.RemoteProtocolError("connection closed before the end of the file")
                break
            except (httpx.TransportError, httpx.TimeoutException, httpx.StreamError) as e:
                if resp is not None:
                    resp.close()
                    resp = None
                if not retryable(e):
                    raise NetworkError(f"{what}: {type(e).__name__}: {e}") from None
                attempt += 1
                if attempt > retries:
                    raise NetworkError(f"{what}: connection lost {attempt} times; {os.fstat(fd).st_size} bytes kept "
                                       f"in {part.name}, run the same command again to resume") from None
                http.sleep(backoff_delay(attempt - 1, http.backoff, http.max_backoff, None))
        os.fsync(fd)
        size = os.fstat(fd).st_size
        if hasher is None or hashed != size:
            hasher, hashed = _restart_hasher(hasher, part, size), size
        hashes = hasher.result()
        digest = hashes.sha256.lower()
        if (total is not None and size != total) or (expected_size is not None and size != expected_size):
            _discard(part)
            raise VerificationError(f"{what}: got {size} bytes, expected {expected_size or total}; the download was "
                                    "deleted")
        if exp_sha and digest != exp_sha:
            _discard(part)
            raise VerificationError(f"{what}: SHA256 mismatch (expected {exp_sha[:16]}..., got {digest[:16]}...); "
                                    "the download was deleted")
        _publish(part, target)
        result.size, result.sha256, result.hashes = size, digest, hashes
        return result
    finally:
        if hasher is not None:
            hasher.close()
        if resp is not None:
            resp.close()
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_size == 0 and part.exists():
                part.unlink()  # nothing was received: leave no empty partial behind
        os.close(fd)


def _restart_hasher(old: MultiHasher | None, part: Path, upto: int) -> MultiHasher:
    """A fresh ``MultiHasher`` that has seen the first ``upto`` bytes of ``part``."""
    if old is not None:
        old.close()
    mh = MultiHasher()
    if upto:
        try:
            with open(part, "rb", buffering=0) as fh:
                got = mh.update_from_file(fh, upto=upto)
        except OSError as e:
            mh.close()
            raise OutputError(f"cannot read the partial download: {e.strerror or e}", part) from None
        if got != upto:
            mh.close()
            raise OutputError(f"the partial download shrank while it was read ({got} of {upto} bytes)", part)
    return mh


def _write_all(fd: int, data, part: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except OSError as e:  # disk full, I/O error: the bytes so far stay for a resume
        raise OutputError(f"cannot write: {e.strerror or e} ({os.fstat(fd).st_size} bytes kept; run again to resume)",
                          part) from None


def _discard(part: Path) -> None:
    with contextlib.suppress(OSError):
        part.unlink()


def _publish(part: Path, target: Path) -> None:
    """Move the verified partial into place without ever replacing an existing file."""
    try:
        os.link(part, target)
    except FileExistsError:
        raise OutputError("appeared while downloading; the download stays in the .part file", target) from None
    except OSError:
        if target.exists():
            raise OutputError("appeared while downloading; the download stays in the .part file", target) from None
        os.replace(part, target)  # file systems without hard links
    else:
        part.unlink()
    with contextlib.suppress(OSError):
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
