"""One exception hierarchy and one exit-code table. Every error carries a one-line, user-facing message.

The CLI turns a ``CkptlabError`` into ``ckptlab: error: <message>`` on stderr and exits with
``exit_code``; nothing the user can cause should ever surface as a traceback. Every error class the
user can meet is defined here (the modules that raise them import them from here), so the whole set,
and the exit code of each, reads in one place; ``tests/test_errors.py`` keeps it so.

``EXIT_CODES`` is the table of exit statuses, one meaning each; ``docs/cli-errors.md`` shows the same
table (the test compares them).

Left where they are, because they never reach the user (each is caught by its own module and turned
into a result or a ``CkptlabError``): ``formats.pickle_vm`` ``_Broken``/``_Limit``/``_Reject`` (the
pickle machine's control flow), ``formats.safetensors._HeaderJSONError``, ``jsonable.JSONDepthError``,
``hashes.HashCancelled``, ``merging.graph.Stopped`` and ``cli.common.StdoutClosed`` (the reader closed
the pipe: exit 0).
"""

from __future__ import annotations

from pathlib import Path

#: The longest message an error carries (then "… [N more characters]").
MAX_MESSAGE_CHARS = 2000

# -- exit codes: one meaning each ------------------------------------------------------------------
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SUSPICIOUS = 3
EXIT_UNSAFE = 4
EXIT_CORRUPT = 5
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

#: Every exit status a ckptlab command ends with, and its one meaning (the first words of the row of
#: docs/cli-errors.md's table). A command over several files or sources that fails on some of them
#: (``inspect``, ``hash``, ``download``, ``civitai link``) exits with the highest code among its failures.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_ERROR: "refused input or output",
    EXIT_USAGE: "usage error",
    EXIT_SUSPICIOUS: "suspicious file",
    EXIT_UNSAFE: "unsafe file",
    EXIT_CORRUPT: "unreadable file in a report",
    EXIT_INTERNAL: "internal error",
    EXIT_INTERRUPTED: "interrupted",
}


class CkptlabError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, path: str | Path | None = None):
        from ckptlab.display import cap

        self.path = str(path) if path is not None else None
        # capped where it is made: the message is printed, stored in the catalog (scan) and put in JSON output, and a
        # hostile file must not make any of those megabytes long (quote untrusted values with formats.base.brief)
        self.message = cap(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{self.path}: {self.message}" if self.path else self.message)


# -- model files ----------------------------------------------------------------------------------

class FormatError(CkptlabError):
    """A model file is malformed, truncated or not what it claims to be."""


class UnsupportedFormatError(CkptlabError):
    """A file ckptlab recognises but cannot read (or does not recognise at all)."""


class UnsafeFileError(CkptlabError):
    """A file's content is hostile or suspicious; it is refused rather than read."""

    exit_code = EXIT_UNSAFE


class MismatchError(CkptlabError):
    """Inputs that do not fit together (families, shapes, components)."""


class OverflowRefused(MismatchError):  # (a refusal, named for what the user sees)
    """Values do not fit the target dtype and ``clamp`` was not given (``precision``)."""


class OutputError(CkptlabError):
    """The output cannot be written (exists, read-only folder, disk full...)."""


# -- usage: exit 2 --------------------------------------------------------------------------------

class UsageError(CkptlabError):
    """A value on the command line (or in a recipe) that the command cannot use: exit 2, as typer's own
    usage errors. The message says what would work."""

    exit_code = EXIT_USAGE


class BadChoiceError(UsageError):
    """An option value outside its fixed set (``--sort``, ``--format``, ``--to``, ``--only``); the message
    lists the valid values."""


class UnknownChoiceError(BadChoiceError):
    """A ``--kind``/``--family`` value that names nothing ckptlab knows."""


class SpecError(UsageError):
    """A download source that is not ``civitai:…``, ``hf:…`` or an http(s) URL, or is malformed."""


class RecipeError(UsageError):
    """A merge recipe (or the merge options standing for one) that cannot be run as written."""


class MethodError(UsageError):
    """An unknown merge method, or a parameter outside its range."""


class BlockSpecError(UsageError):
    """A block-weight string that cannot be understood."""


# -- the library ----------------------------------------------------------------------------------

class CatalogError(CkptlabError):
    """The catalog file cannot be opened, is not a ckptlab catalog, or is newer than this version."""


class CatalogWriteError(CatalogError):
    """The catalog cannot be written: a read-only file or folder, a full disk, a lock held too long."""


class NotInCatalogError(CkptlabError):
    """``show``: nothing in the catalog matches the path or hash (exit 1, as a missing file)."""


class StaleStep(MismatchError):  # (a plan step, named for what the user sees)
    """``apply-plan``: the file changed since the plan was made."""


# -- the hub --------------------------------------------------------------------------------------

class NetworkError(CkptlabError):
    """A remote service failed or refused the request."""


class HTTPStatusError(NetworkError):
    """The server answered with an error status (kept on ``status``)."""

    def __init__(self, message: str, status: int):
        self.status = status
        super().__init__(message)


class NotFoundError(HTTPStatusError):
    """404: the thing asked for does not exist upstream (not an outage)."""


class AuthError(HTTPStatusError):
    """401/403: a token is missing, wrong, or does not grant access."""


class VerificationError(NetworkError):
    """Downloaded bytes do not match the published size or hash; nothing was kept."""


class ResponseShapeError(NetworkError):
    """The server answered, but not with what its API promises (not JSON, wrong types, too big)."""


class ConfigError(CkptlabError):
    """The hub config file cannot be read or holds a bad value."""


class InvalidHashError(CkptlabError):
    """A value that cannot be a CivitAI hash."""


class DownloadCancelled(CkptlabError):  # not "CancelledError": asyncio and concurrent.futures own that name
    """The transfer was stopped on request (Ctrl-C in another thread); the partial is kept."""

    exit_code = EXIT_INTERRUPTED


class BusyError(OutputError):
    """Another ckptlab process (or thread) is downloading the same file into the same folder."""


class TorchMissingError(CkptlabError):
    """A command that needs PyTorch ran where only the core is installed; the message names the extra
    (``pip install 'ckptlab[torch]'``). Raised by ``formats.arrays.import_torch``."""
