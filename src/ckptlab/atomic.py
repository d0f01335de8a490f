"""The one way ckptlab puts an output in place: a hidden temporary next to the target, filled, fsync'ed,
then put in place (a rename, or a hard link when an existing name must not be replaced), then the folder
fsync'ed. A crash or Ctrl-C never leaves a half-written output under the final name, and the temporary is
removed on any failure.

``Staged`` is the shared part: the temporary name (chosen and tracked *before* the file or folder exists, so
a Ctrl-C at any moment leaves nothing), the no-clobber placing, the folder fsync and the cleanup. Every
writer uses it: model files (``formats.writer.SafetensorsWriter``, which streams through its own direct-I/O
sink into the temporary), diffusers folders (``ops.diffusers_io``) and small files (``write_atomic``:
reports, plans, recipes, sidecars).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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


def umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(final: str | os.PathLike, token_bytes: int = 6) -> Path:
    """A hidden name next to ``final`` for its temporary: ``.<name>.<random>.tmp``."""
    final = Path(final)
    return final.with_name(f".{final.name}.{secrets.token_hex(token_bytes)}.tmp")


class Staged:
    """One output being made under a temporary name next to ``final``.

    ``create_file()`` / ``create_folder()`` make the temporary (``O_EXCL``: never someone else's file);
    the caller fills and fsyncs it; ``commit()`` puts it in place - replacing an existing ``final`` only with
    ``overwrite``, else refusing with ``FileExistsError`` even if the name appeared meanwhile (a hard link for
    files; for folders, which cannot be hard-linked, an existence check then a rename) - and fsyncs the
    folder. ``discard()`` removes the temporary (also what leaving a ``with`` block by an exception does).
    Raises ``OSError``; callers turn it into their own one-line error."""

    def __init__(self, final: str | os.PathLike, *, overwrite: bool = False, token_bytes: int = 6):
        self.final = Path(final)
        self.overwrite = overwrite
        self.token_bytes = token_bytes
        self.tmp: Path | None = None
        self.is_folder = False

    def _create(self, make: Callable[[Path], object]):
        """``make(name)`` under a fresh temporary name (``O_EXCL``/``mkdir``: never someone else's file)."""
        for _ in range(100):
            self.tmp = temp_name(self.final, self.token_bytes)  # tracked before it exists
            try:
                return make(self.tmp)
            except FileExistsError:
                self.tmp = None  # someone else's file: never ours to remove
            # any other exception keeps the name tracked: a Ctrl-C raised as the create call returns arrives
            # after the file exists (and O_EXCL made it ours), so discard() must still remove it
        raise FileExistsError(17, "cannot find a free temporary name", str(self.final.parent))

    def create_file(self, perm: int = 0o600, flags: int = os.O_RDWR) -> int:
        """Create the temporary file (``perm`` before the umask) and return its descriptor."""
        return self._create(lambda tmp: os.open(tmp, flags | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                                                perm))

    def create_folder(self, perm: int = 0o700) -> Path:
        """Create the temporary folder and return its path."""
        self.is_folder = True
        self._create(lambda tmp: os.mkdir(tmp, perm))
        return self.tmp

    def commit(self, mode: int | None = None) -> Path:
        """Put the filled temporary in place (``mode``: its permissions before the umask, if given)."""
        tmp = self.tmp
        if tmp is None:
            raise RuntimeError("nothing staged")
        if mode is not None:
            os.chmod(tmp, mode & ~umask())
        if self.is_folder:
            self._place_folder(tmp)
        else:
            self._place_file(tmp)
        self.tmp = None
        fsync_dir(self.final.parent)
        return self.final

    def _place_file(self, tmp: Path) -> None:
        if self.overwrite:
            os.replace(tmp, self.final)
            return
        try:
            os.link(tmp, self.final)  # fails if the name exists, even if it appeared a moment ago
        except FileExistsError:
            raise
        except OSError:  # no hard links here: the check and the rename are the best we have
            if os.path.lexists(self.final):
                raise FileExistsError(17, "File exists", str(self.final)) from None
            os.replace(tmp, self.final)
            return
        os.unlink(tmp)

    def _place_folder(self, tmp: Path) -> None:
        old = None
        if os.path.lexists(self.final):
            if not self.overwrite:
                raise FileExistsError(17, "File exists", str(self.final))
            old = self.final.with_name(f".{self.final.name}.old-{secrets.token_hex(4)}")
            os.replace(self.final, old)
        os.replace(tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove the temporary, if any (never raises)."""
        tmp, self.tmp = self.tmp, None
        if tmp is None:
            return
        if self.is_folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *,
                 overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; ``data`` is the bytes, or a function that writes them to the
    open file. With ``overwrite`` an existing file is replaced (rename); without it the final step is a hard
    link, which raises ``FileExistsError`` if the name exists, even if it appeared meanwhile (on a file system
    without hard links, an existence check and a rename). The new file gets the permissions any new file
    gets (0666 less the umask). Raises ``OSError``; the caller turns it into its own one-line error."""
    with Staged(path, overwrite=overwrite, token_bytes=4) as st:
        fd = st.create_file(0o666, os.O_WRONLY)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        st.commit()
