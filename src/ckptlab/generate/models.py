"""What a MODEL argument of ``generate``/``grid``/``preview`` names: a file, a diffusers folder, or a catalog hash.

(skeleton: paths only; catalog hashes and diffusers folders are being added)
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.formats.base import TensorSource


def resolve_model(text: str | Path, *, db: Path | None = None) -> Path:
    """The path ``text`` names: an existing path as is; else a catalog hash (sha256 prefix, AutoV2/AutoV3...)
    looked up in the catalog ``db``."""
    return Path(text)


def open_model_source(path: Path) -> TensorSource:
    """The model at ``path`` as a ``TensorSource`` with single-file key names (a diffusers folder is mapped the
    way ``from-diffusers`` maps it, in memory); hostile pickles refused."""
    from ckptlab.ops.run import open_checked

    return open_checked(Path(path))
