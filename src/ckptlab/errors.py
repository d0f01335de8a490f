"""One exception hierarchy. Every error carries a one-line, user-facing message.

The CLI turns a ``CkptlabError`` into ``ckptlab: error: <message>`` on stderr and exits with
``exit_code``; nothing the user can cause should ever surface as a traceback.
"""

from __future__ import annotations

from pathlib import Path

#: The longest message an error carries (then "… [N more characters]").
MAX_MESSAGE_CHARS = 2000


class CkptlabError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        from ckptlab.display import cap

        self.path = str(path) if path is not None else None
        # capped where it is made: the message is printed, stored in the catalog (scan) and put in JSON output, and a
        # hostile file must not make any of those megabytes long (quote untrusted values with formats.base.brief)
        self.message = cap(message, MAX_MESSAGE_CHARS)
        super().__init__(f"{self.path}: {self.message}" if self.path else self.message)


class FormatError(CkptlabError):
    """A model file is malformed, truncated or not what it claims to be."""


class UnsupportedFormatError(CkptlabError):
    """A file ckptlab recognises but cannot read (or does not recognise at all)."""


class UnsafeFileError(CkptlabError):
    """A file's content is hostile or suspicious; it is refused rather than read."""

    exit_code = 4


class MismatchError(CkptlabError):
    """Inputs that do not fit together (families, shapes, components)."""


class OutputError(CkptlabError):
    """The output cannot be written (exists, read-only folder, disk full...)."""


class NetworkError(CkptlabError):
    """A remote service failed or refused the request."""


class BadChoiceError(CkptlabError):
    """An option value outside its fixed set (``--sort``, ``--format``, ``--to``, ``--only``): a usage error,
    exit 2 as docs/cli-errors.md says; the message lists the valid values."""

    exit_code = 2


class TorchMissingError(CkptlabError):
    """A command that needs PyTorch ran where only the core is installed; the message names the extra
    (``pip install 'ckptlab[torch]'``). Raised by ``formats.arrays.import_torch``."""
