"""Verified, resumable downloads into the model library.

``DownloadResult`` is what every downloader (CivitAI, plain URL, Hugging Face) returns once a file
sits under its final name, verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.atomic import write_atomic
from ckptlab.display import human_size
from ckptlab.errors import (
    BusyError,
    CkptlabError,
    DownloadCancelled,
    NetworkError,
    OutputError,
    VerificationError,
)
from ckptlab.hashes import Hashes, MultiHasher, hash_file
from ckptlab.hub.http import backoff_delay, describe_transport_error, redact, retryable
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
    """A server-suggested name reduced to a plain basename: the last path component only (no
    separators, no ``..``), without control characters or invisible format characters such as
    right-to-left overrides (``display.strip_unsafe``), without leading dots (no hidden files) and
    trailing dots/spaces, NFC-normalised; None if nothing usable is left (or it is over 255 bytes)."""
    import unicodedata

    from ckptlab.display import strip_unsafe

    if not name or not isinstance(name, str):
        return None
    name = strip_unsafe(unicodedata.normalize("NFC", name))
    name = name.replace("\\", "/").split("/")[-1]
    name = name.strip().lstrip(".").strip().rstrip(". ")
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

CHUNK = 1024 * 1024
_RAW_BYTES = {"Accept-Encoding": "identity", "Accept": "*/*"}  # the file's own bytes, never re-encoded
FREE_SPACE_MARGIN = 64 * 1024 * 1024
FREE_SPACE_EVERY = 64 * 1024 * 1024  # an answer of unknown length re-checks the free space this often
META_SUFFIX = ".json"  # <name>.part.json: the validators (ETag / Last-Modified) the partial was fetched under
MAX_META_BYTES = 64 * 1024


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
    m = re.fullmatch(r"\s*bytes\s+(?:([0-9]{1,20})-[0-9]{1,20}|\*)/([0-9]{1,20}|\*)\s*", value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


# -- validators: what the partial was fetched under --------------------------------------------------

@dataclass
class Validators:
    """What identifies one version of the remote file: a strong ``ETag`` and/or ``Last-Modified``,
    and the total size. ``If-Range`` sends one of them; a 206 must carry the same ones."""

    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None

    @classmethod
    def of(cls, resp, total: int | None) -> Validators:
        etag = _header_token(resp.headers.get("etag"), 1024)
        if etag and etag.startswith("W/"):  # weak ETags cannot be used with If-Range
            etag = None
        return cls(etag, _header_token(resp.headers.get("last-modified"), 100), total)

    @property
    def usable(self) -> bool:
        return bool(self.etag or self.last_modified)

    def if_range(self) -> str | None:
        return self.etag or self.last_modified

    def changed(self, new: Validators) -> str | None:
        """Why ``new`` (from an answer to a resumed request) is another version of the file, or None."""
        if self.etag and new.etag and self.etag != new.etag:
            return "its ETag changed"
        if self.last_modified and new.last_modified and self.last_modified != new.last_modified:
            return "its Last-Modified date changed"
        if self.total is not None and new.total is not None and self.total != new.total:
            return "its size changed"
        return None


def _header_token(value: str | None, limit: int) -> str | None:
    """A validator we can send back in ``If-Range``: printable ASCII, at most ``limit`` characters;
    anything else (control characters, non-ASCII a header cannot carry) counts as absent."""
    value = (value or "").strip()
    if not value or len(value) > limit or not all(" " <= c <= "~" for c in value):
        return None
    return value


def _url_key(url: str) -> str:
    """Which URL a partial belongs to, without writing the URL (it may hold a token) to disk."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


def _read_meta(meta: Path, url: str) -> Validators | None:
    """The validators stored beside a partial, if that file is ours, regular, small, well-formed and
    about this URL; None otherwise (then the partial's origin is unknown)."""
    try:
        fd = os.open(meta, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
            return None
        data = os.read(fd, MAX_META_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("url") != _url_key(url):
        return None
    etag, lm, total = obj.get("etag"), obj.get("last_modified"), obj.get("total")
    if not (etag is None or isinstance(etag, str)) or not (lm is None or isinstance(lm, str)):
        return None
    etag, lm = _header_token(etag, 1024), _header_token(lm, 100)
    if total is not None and (type(total) is not int or total < 0):
        return None
    return Validators(etag or None, lm or None, total)


def _write_meta(meta: Path, url: str, v: Validators) -> None:
    """Store the validators beside the partial, atomically, never through a link planted there."""
    data = json.dumps({"url": _url_key(url), "etag": v.etag, "last_modified": v.last_modified,
                       "total": v.total}).encode()
    try:  # the temporary is created O_EXCL (never through a link); the rename replaces a link at ``meta`` itself
        write_atomic(meta, data)
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror or e}", meta) from None


# -- the partial file ----------------------------------------------------------------------------

def _open_part(part: Path) -> int:
    """Open (create) ``part`` for appending, locked by us, without following a link.

    Refused: a symbolic link (``O_NOFOLLOW``), anything that is not a regular file (FIFO, device,
    folder), a file with other hard links (appending would change the other name's file too). A
    partial locked by another process raises ``BusyError``. After the lock is taken, the name must
    still be the file we hold (the previous owner may have published and removed it meanwhile);
    otherwise it is opened again."""
    flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(8):
        if part.is_symlink():  # O_NOFOLLOW says so too; this also covers systems without it
            raise OutputError("is a symbolic link; refusing to write through it (remove it to download)", part)
        try:
            fd = os.open(part, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputError("is a symbolic link; refusing to write through it (remove it to download)",
                                  part) from None
            raise OutputError(f"cannot write: {e.strerror or e}", part) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError("is not a regular file; refusing to write to it (remove it to download)", part)
            try:
                _lock_exclusive(fd)
            except OSError:
                raise BusyError("is already being downloaded by another ckptlab; run the same command again "
                                "when that download has finished", part) from None
            if st.st_nlink > 1 or os.fstat(fd).st_nlink > 1:
                raise OutputError("has other hard links; refusing to append to a file that has another name too "
                                  "(remove it to download)", part)
            try:
                cur = os.stat(part, follow_symlinks=False)
            except FileNotFoundError:
                cur = None
        except BaseException:
            os.close(fd)
            raise
        if cur is not None and (cur.st_dev, cur.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # published or removed by the process that held it: open the name again
    raise BusyError("keeps changing while it is opened; is another program writing it?", part)


def transfer(http, url: str, dest_dir: Path, *, filename: str | None = None, expected_sha256: str | None = None,
             expected_size: int | None = None, max_size: int | None = None, progress: Progress | None = None,
             source: str = "url", retries: int = 5, extra: dict | None = None, cancel=None) -> DownloadResult:
    """Download ``url`` into ``dest_dir`` as ``filename`` (default: the server's name) and verify it.

    Bytes go to ``<target>.part``, opened without following links and locked against a second
    ckptlab (which gets ``BusyError`` and leaves the partial alone). The validators of the first
    answer (strong ``ETag``, ``Last-Modified``, total size) are stored beside it in
    ``<target>.part.json``. A partial is resumed with ``Range`` plus ``If-Range``: 206 with the same
    validators appends; 200 (the file changed, or ranges are ignored) or 206 with other validators
    restarts from zero. A partial whose origin is unknown (no stored validators) is resumed only when
    a published SHA-256 will check the result, else it is restarted. 416 means the partial is
    already whole (only trusted under If-Range or a hash), else it is restarted.

    The transfer never takes more than ``expected_size`` (exact size the source published),
    ``max_size`` (an upper bound, e.g. CivitAI's rounded ``sizeKB``) or the answer's own length: a
    server that sends more is cut off and the partial deleted. An answer of unknown length stops,
    and is deleted, when the disk is down to the free-space margin.

    Dropped connections and timeouts are resumed up to ``retries`` times (each said through
    ``http.log``). The SHA-256 (all six CivitAI hashes, ``result.hashes``) is computed while
    streaming. Only a file whose size and hash match what the source published is renamed into
    place (never over an existing file or link); a mismatch deletes the partial and raises
    ``VerificationError``. ``cancel`` (a ``threading.Event``) stops between chunks, keeping the partial.
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
        if resp is not None:
            resp.close()
        raise CkptlabError(f"unusable file name {filename!r}")
    target = dest_dir / name
    part = target.with_name(target.name + ".part")
    meta = part.with_name(part.name + META_SUFFIX)
    result = DownloadResult(path=target, url=redact(url), size=0, sha256="", source=source,
                            expected_sha256=exp_sha, extra=dict(extra or {}))
    caps = [x for x in (expected_size, max_size) if x is not None]
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if resp is not None:
            resp.close()
        raise OutputError(f"cannot create the folder: {e.strerror or e}", dest_dir) from None
    try:
        fd = _open_part(part)
    except CkptlabError:
        if resp is not None:
            resp.close()
        raise
    hasher: MultiHasher | None = None
    owned = True  # whether the partial is still ours to clean up
    try:
        if os.path.lexists(target):  # checked under the lock: a finished concurrent download is seen here
            if resp is not None:
                resp.close()
                resp = None
            return _existing(target, exp_sha, result)
        hashed = -1
        attempt = 0
        have = os.fstat(fd).st_size
        known = _read_meta(meta, url) if have else None
        if have and known is None and not exp_sha:
            os.ftruncate(fd, 0)  # a partial of unknown origin that no hash will check: start over
            have = 0
        if have == 0:
            _discard(meta)
            known = None
        result.resumed_from = have
        total: int | None = None
        shown = 0
        while True:
            have = os.fstat(fd).st_size
            if resp is not None and have and resp.status_code == 200:
                resp.close()  # the name probe answered with the whole file but we hold a partial
                resp = None
            ranged = False
            if resp is None:
                headers = dict(_RAW_BYTES)
                if have:
                    headers["Range"] = f"bytes={have}-"
                    ranged = True
                    if known is not None and known.if_range():
                        headers["If-Range"] = known.if_range()
                resp = http.request("GET", url, what=what, stream=True, headers=headers, allow=(416,))
            status = resp.status_code
            if status == 416:
                _, total = _content_range(resp.headers.get("content-range"))
                resp.close()
                resp = None
                trusted = exp_sha is not None or (known is not None and known.usable)
                if total is not None and have == total and trusted and not any(have > c for c in caps):
                    break
                os.ftruncate(fd, 0)  # longer than the file, unknown total, or nothing vouches for it: start over
                _discard(meta)
                known = None
                attempt += 1
                if attempt > retries:
                    raise NetworkError(f"{what}: server keeps refusing the byte range")
                continue
            if status == 206:
                start, total = _content_range(resp.headers.get("content-range"))
                why = None
                if start != have:
                    why = "answers a byte range that was not asked for"
                elif known is not None:
                    why = known.changed(Validators.of(resp, total))
                    why = f"the file changed on the server ({why})" if why else None
                if why:
                    resp.close()
                    resp = None
                    os.ftruncate(fd, 0)
                    _discard(meta)
                    known = None
                    attempt += 1
                    http.log(f"{what}: {why}; starting again from byte 0")
                    if attempt > retries:
                        raise NetworkError(f"{what}: {why}, {attempt} times")
                    continue
            elif status == 200:
                if have:
                    if ranged:
                        http.log(f"{what}: the server sent the whole file instead of the rest "
                                 "(it changed, or ignores ranges); starting again from byte 0")
                    os.ftruncate(fd, 0)
                    have = 0
                    _discard(meta)
                    known = None
                cl = resp.headers.get("content-length")
                total = int(cl) if cl and re.fullmatch(r"[0-9]{1,20}", cl) else None
            else:
                resp.close()
                raise NetworkError(f"{what}: unexpected HTTP {status}")
            if expected_size is not None and total is not None and total != expected_size:
                resp.close()
                raise VerificationError(f"{what}: server offers {total} bytes, expected {expected_size}")
            if max_size is not None and total is not None and total > max_size:
                resp.close()
                raise VerificationError(f"{what}: server offers {total} bytes, more than the {max_size} published")
            limit = min([*caps, *([total] if total is not None else [])], default=None)
            if known is None:  # the first answer for this partial: remember what it was fetched under
                known = Validators.of(resp, total)
                _write_meta(meta, url, known)
            need = (limit - have) if limit is not None else None
            if need is not None:
                check_free_space(dest_dir, max(0, need))
            if hasher is None or hashed != have:
                hasher = _restart_hasher(hasher, part, have, fd)  # a resumed prefix is read once, here
                hashed = have
            progress(have - shown, total=total if total is not None else (expected_size or max_size))
            shown = have
            os.lseek(fd, have, os.SEEK_SET)
            next_space_check = hashed + FREE_SPACE_EVERY
            try:
                for chunk in resp.iter_raw():  # as received: nothing buffered is lost on a drop
                    if cancel is not None and cancel.is_set():
                        raise DownloadCancelled(f"{what}: cancelled; {os.fstat(fd).st_size} bytes kept in {part.name}")
                    if limit is not None and hashed + len(chunk) > limit:
                        owned = _drop_part(part, meta, fd)
                        raise VerificationError(f"{what}: the server sent more than the {limit} bytes "
                                                f"{'published' if caps and limit == min(caps) else 'it announced'}; "
                                                "stopped, and the download was deleted")
                    _write_all(fd, chunk, part)
                    hasher.update(chunk)
                    hashed += len(chunk)
                    shown += len(chunk)
                    progress(len(chunk))
                    if limit is None and hashed >= next_space_check:
                        next_space_check = hashed + FREE_SPACE_EVERY
                        if shutil.disk_usage(dest_dir).free < FREE_SPACE_MARGIN:
                            owned = _drop_part(part, meta, fd)
                            raise OutputError(f"the server sent {human_size(hashed)} without saying how much "
                                              f"more would come and the disk is down to {human_size(FREE_SPACE_MARGIN)}"
                                              "; stopped, and the download was deleted", target)
                resp.close()
                resp = None
                done = os.fstat(fd).st_size
                if total is not None and done < total:
                    raise httpx.RemoteProtocolError("connection closed before the end of the file")
                break
            except httpx.HTTPError as e:
                if resp is not None:
                    resp.close()
                    resp = None
                kept = os.fstat(fd).st_size
                if not retryable(e):
                    raise NetworkError(f"{what}: {describe_transport_error(e, url)}; {kept} bytes kept in "
                                       f"{part.name}, run the same command again to resume") from None
                attempt += 1
                if attempt > retries:
                    raise NetworkError(f"{what}: connection lost {attempt} times; {kept} bytes kept "
                                       f"in {part.name}, run the same command again to resume") from None
                wait = backoff_delay(attempt - 1, http.backoff, http.max_backoff, None)
                http.log(f"{what}: {describe_transport_error(e, url)} after {kept} bytes; attempt {attempt} of "
                         f"{retries + 1} failed, resuming in {wait:g} s")
                http.sleep(wait)
        os.fsync(fd)
        size = os.fstat(fd).st_size
        if hasher is None or hashed != size:
            hasher, hashed = _restart_hasher(hasher, part, size, fd), size
        hashes = hasher.result()
        digest = hashes.sha256.lower()
        if (total is not None and size != total) or (expected_size is not None and size != expected_size) \
                or (max_size is not None and size > max_size):
            owned = _drop_part(part, meta, fd)
            raise VerificationError(f"{what}: got {size} bytes, expected {expected_size or total or max_size}; "
                                    "the download was deleted")
        if exp_sha and digest != exp_sha:
            owned = _drop_part(part, meta, fd)
            raise VerificationError(f"{what}: SHA256 mismatch (expected {exp_sha[:16]}..., got {digest[:16]}...); "
                                    "the download was deleted")
        publish(part, target)
        owned = False
        _discard(meta)
        result.size, result.sha256, result.hashes = size, digest, hashes
        return result
    finally:
        if hasher is not None:
            hasher.close()
        if resp is not None:
            resp.close()
        if owned:  # we hold the lock: an empty partial (nothing received) is ours to remove
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_size == 0 and _still_ours(part, fd):
                    part.unlink()
                    _discard(meta)
        os.close(fd)


def _still_ours(part: Path, fd: int) -> bool:
    try:
        a, b = os.stat(part, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _drop_part(part: Path, meta: Path, fd: int) -> bool:
    """Delete a partial that cannot be used (while still holding its lock); returns False (no longer owned)."""
    if _still_ours(part, fd):
        _discard(part)
    _discard(meta)
    return False


def _existing(target: Path, exp_sha: str | None, result: DownloadResult) -> DownloadResult:
    """``target`` exists already: the same file (by the published SHA-256) is ``skipped``; anything
    else, including a symbolic link to something else, is left alone and refused."""
    if exp_sha and target.is_file():
        try:
            h = hash_file(target)
        except CkptlabError:
            h = None
        if h is not None and h.sha256.lower() == exp_sha:
            result.size, result.sha256, result.skipped, result.hashes = h.size, exp_sha, True, h
            return result
    if not exp_sha:  # nothing published to compare with: say so rather than guess
        raise OutputError("already exists (the source publishes no hash to tell whether it is the same file); "
                          "move it away or choose another --dir", target)
    raise OutputError("already exists and is not the file being downloaded; move it away first", target)


class _FdReader:
    """A file-object view (``readinto``) of an open descriptor from offset 0, so the partial is read
    back through the descriptor we hold and locked, never by name (the name could be swapped)."""

    def __init__(self, fd: int):
        self.fd, self.pos = fd, 0

    def readinto(self, buf) -> int:
        if hasattr(os, "pread"):
            data = os.pread(self.fd, len(buf), self.pos)
        else:  # Windows: the write position is set again (lseek) before every write
            os.lseek(self.fd, self.pos, os.SEEK_SET)
            data = os.read(self.fd, len(buf))
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _restart_hasher(old: MultiHasher | None, part: Path, upto: int, fd: int) -> MultiHasher:
    """A fresh ``MultiHasher`` that has seen the first ``upto`` bytes of the partial."""
    if old is not None:
        old.close()
    mh = MultiHasher()
    if upto:
        try:
            got = mh.update_from_file(_FdReader(fd), upto=upto)
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


def publish(part: Path, target: Path) -> None:
    """Move the verified partial into place without ever replacing an existing file, and without
    following a link: neither ``part`` (``link`` without ``AT_SYMLINK_FOLLOW``) nor a link planted
    under the final name (``link`` fails on any existing name, dangling links included)."""
    try:
        os.link(part, target, follow_symlinks=False)
    except FileExistsError:
        raise OutputError("appeared while downloading; the download stays in the .part file", target) from None
    except (OSError, NotImplementedError):
        if os.path.lexists(target):
            raise OutputError("appeared while downloading; the download stays in the .part file", target) from None
        try:
            os.rename(part, target)  # file systems without hard links (a rename never follows a link)
        except OSError as e:
            raise OutputError(f"cannot move the download into place: {e.strerror or e}", target) from None
    else:
        part.unlink()
    with contextlib.suppress(OSError):
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
