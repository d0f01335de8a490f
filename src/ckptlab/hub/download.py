"""Verified, resumable downloads into the model library.

``DownloadResult`` is what every downloader (CivitAI, plain URL, Hugging Face) returns once a file
sits under its final name, verified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
