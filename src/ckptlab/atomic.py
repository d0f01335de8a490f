"""The one way a small file (a report, a plan, a recipe, a sidecar) is written: a hidden temporary file
in the target's folder, created with the permissions any new file gets (0666 less the umask), fsync'ed,
then put in place, then the folder fsync'ed. A crash or Ctrl-C never leaves a half-written file under
the final name, and the temporary file is removed on any failure. Model files have their own streaming
writer (``formats.writer``), which follows the same rules."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a rename in it survives a crash (best effort: some systems refuse)."""
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


def write_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically. With ``overwrite`` an existing file is replaced (rename);
    without it the final step is a hard link, which raises ``FileExistsError`` if the name exists, even if
    it appeared meanwhile (on a file system without hard links, an existence check and a rename).
    Raises ``OSError``; the caller turns it into its own one-line error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    placed = False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            placed = True
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links here: the check and the rename are the best we have
                if os.path.lexists(path):
                    raise FileExistsError(17, "File exists", str(path)) from None
                os.replace(tmp, path)
                placed = True
        fsync_dir(path.parent)
    finally:
        if not placed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
