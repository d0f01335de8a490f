"""Previews ``ckptlab preview`` rendered, recorded in the catalog: which image shows which model, made how.

A registered catalog component (``catalog.PREVIEWS_COMPONENT``, its own table keyed by ``files.id``), like the
LoRA triggers: a catalog that has it still opens in an older ckptlab, which ignores components it does not know.
``show`` prints the recorded preview (``preview_of``); the preview file itself is also found as a sidecar
(``<stem>.preview.png``) by ``library.sidecars`` whoever wrote it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ckptlab.library.catalog import Catalog, display_path


def record_preview(catalog: Catalog, model: str | Path, preview: str | Path, *, seed: int | None = None,
                   infotext: str | None = None) -> bool:
    """Record ``preview`` (an image file) as the preview of the catalogued ``model`` (a file or diffusers folder,
    by path). Returns False, changing nothing, when the catalog has no row for ``model``."""
    rec = catalog.get_by_path(Path(model))
    if rec is None:
        return False
    with catalog.transaction() as conn:
        conn.execute(
            "INSERT INTO previews(file_id, path, made, seed, infotext) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(file_id) DO UPDATE SET path = excluded.path, made = excluded.made, seed = excluded.seed, "
            "infotext = excluded.infotext",
            (rec.id, display_path(os.path.abspath(preview)), time.time(), seed, infotext))
    return True


def preview_of(catalog: Catalog, file_id: int) -> dict | None:
    """``{"path", "made", "seed", "infotext", "exists"}`` of the preview recorded for ``file_id``, or None."""
    import sqlite3

    try:
        row = catalog.conn.execute("SELECT path, made, seed, infotext FROM previews WHERE file_id = ?",
                                   (file_id,)).fetchone()
    except sqlite3.OperationalError:  # opened before this component registered (no table yet): none recorded
        return None
    if row is None:
        return None
    path, made, seed, infotext = row
    return {"path": path, "made": made, "seed": seed, "infotext": infotext, "exists": os.path.exists(path)}
