"""Helpers shared by the command modules: JSON Lines output, rich consoles, progress bars,
and expanding PATH arguments (globs, folders). Commands import heavy modules inside their
functions so that ``ckptlab inspect`` starts without torch."""

from __future__ import annotations

import contextlib
import glob
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from ckptlab.jsonable import dumps


# emoji=False: file names and messages are user text, and rich would turn "civitai:-1:" into a thumbs-down.
# soft_wrap=True: rich hard-wraps at the console width (80 columns when stdout is a file or a pipe), which
# split long paths over two lines in `ckptlab ... > out.txt`; a line is one line, the terminal wraps it.
class StdoutClosed(Exception):  # noqa: N818 - not an error: the reader went away (`ckptlab ls | head -1`)
    """stdout's reader closed the pipe. Not an ``OSError`` on purpose: typer turns an ``OSError(EPIPE)``
    from a command into ``sys.exit(1)``; this one reaches ``cli.main.main``, which ends quietly with 0."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's default points stdout at /dev/null and raises SystemExit(1): `ls | head -1` exited 1
        self.quiet = True
        raise StdoutClosed()


console = _Console(emoji=False, soft_wrap=True)
err_console = Console(stderr=True, emoji=False, soft_wrap=True)  # a closed stderr is not a closed stdout


DB_HELP = "Catalog file, or a postgresql://user@host/db URL (default: $CKPTLAB_DB or the platform data dir)."


def db_option():
    """The ``--db`` option every command that reads or writes the catalog takes (one spelling, one help)."""
    return typer.Option(None, "--db", help=DB_HELP)


def numbers(values: list[str] | None, option: str) -> list[float] | None:
    """A repeatable option's values, each possibly comma-separated (``-s 0.8,0.5 -s 1``), as floats; None when
    the option was not given."""
    from ckptlab.errors import UsageError

    if not values:
        return None
    out: list[float] = []
    for v in values:
        for part in str(v).split(","):
            try:
                out.append(float(part))
            except ValueError:
                raise UsageError(f"{option}: {part!r} is not a number") from None
    return out


def emit_json(obj) -> None:
    """One JSON object per line on stdout (JSON Lines)."""
    sys.stdout.write(dumps(obj) + "\n")
    sys.stdout.flush()


def error_line(message: str) -> None:
    """The one-line error format every command uses."""
    from ckptlab.display import whole_line

    # the whole line, prefix included, is at most MAX_LINE_CHARS (README's promise)
    err_console.print(whole_line("ckptlab: error: ", message), markup=False, highlight=False, soft_wrap=True)


def warning_line(message: str) -> None:
    """The one-line warning format: control characters shown, capped like errors."""
    from ckptlab.display import whole_line

    # the whole line, prefix included, is at most MAX_LINE_CHARS (README's promise)
    err_console.print(whole_line("ckptlab: warning: ", message), markup=False, highlight=False, soft_wrap=True)


def expand_paths(args: list[str], suffixes: tuple[str, ...] | None = None, recurse: bool = True) -> list[Path]:
    """Expand globs and folders (recursively, model files only) in argument order.

    A diffusers folder (``model_index.json`` or ``config.json`` inside) is one model, not a tree
    to recurse into. Arguments that match nothing are returned as-is so the caller reports them.
    """
    from ckptlab.formats import MODEL_SUFFIXES

    suffixes = suffixes or MODEL_SUFFIXES
    out: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg, recursive=True)) if glob.has_magic(arg) else [arg]
        if not matches:
            out.append(Path(arg))
            continue
        for m in matches:
            p = Path(m)
            if p.is_dir() and not _is_diffusers_dir(p):
                if recurse:
                    out.extend(_walk_models(p, suffixes))
            else:
                out.append(p)
    return out


def expand_inputs(args: list[str], suffixes: tuple[str, ...] | None = None, what: str = "model files") -> list[Path]:
    """``expand_paths`` for commands that need model files: a folder argument with no model file in it
    (or a glob matching nothing) is a one-line error naming it, instead of a silent "nothing done"."""
    from ckptlab.errors import CkptlabError

    out: list[Path] = []
    for arg in args:
        found = expand_paths([arg], suffixes)
        if not found or (len(found) == 1 and str(found[0]) == arg and glob.has_magic(arg) and not found[0].exists()):
            raise CkptlabError(f"no {what} match {arg}" if glob.has_magic(arg) else f"{arg}: no {what} found in "
                               "this folder")
        out.extend(found)
    return out


def _is_diffusers_dir(p: Path) -> bool:
    from ckptlab.formats.diffusers import is_diffusers_folder

    return is_diffusers_folder(p)


def _walk_models(root: Path, suffixes: tuple[str, ...], seen: set | None = None) -> Iterator[Path]:
    seen = set() if seen is None else seen  # (device, inode) of folders walked: a symlink loop is walked once
    try:
        st = root.stat()
    except OSError:
        return
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_diffusers_dir(entry):
                yield entry
            else:
                yield from _walk_models(entry, suffixes, seen)
        elif entry.suffix.lower() in suffixes:
            yield entry


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, *, unit_bytes: bool = True, enabled: bool = True):
    """Yield a ``Progress`` callback rendered as a rich bar on stderr (files/bytes, rate, ETA)."""
    if not enabled or not err_console.is_terminal:
        def quiet(advance=0, *, total=None, description=None):
            return None
        yield quiet
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if unit_bytes else [MofNCompleteColumn()]
    cols += [TimeRemainingColumn()]
    with Progress(*cols, console=err_console, transient=True) as prog:
        task = prog.add_task(description, total=total)

        def cb(advance=0, *, total=None, description=None):
            kw = {}
            if total is not None:
                kw["total"] = total
            if description is not None:
                kw["description"] = description
            prog.update(task, advance=advance, **kw)

        yield cb


@contextlib.contextmanager
def progress_phases(enabled: bool = True):
    """For one library call that works in phases, each reported to its own ``progress`` callback: yields
    ``phase(description, unit_bytes=...)``, which returns a callback whose bar opens on its first call
    and closes the previous phase's bar (rich shows one live bar at a time)."""
    shown = contextlib.ExitStack()  # the bar open now (at most one)

    def phase(name: str, *, unit_bytes: bool = True):
        bar = []

        def cb(advance=0, *, total=None, description=None):
            if not bar:
                shown.close()
                bar.append(shown.enter_context(progress_bar(name, unit_bytes=unit_bytes, enabled=enabled)))
            bar[0](advance, total=total, description=description)

        return cb

    with shown:
        yield phase
