"""Images made with a model: the links ``ckptlab images`` records, and what ``show``/``ls`` print of them.

A registered catalog component (``images``), like ``triggers``: a catalog that has it still opens in an older
ckptlab. One table, ``image_links``: one row per (image, model content, role). The model side is the content's
SHA-256 (as ``content.sha256``, upper case), not a file row: every copy of the model, and the file after a move or
rename, shares the links, exactly as CivitAI links are keyed (``hub.store``). The image side is the image's
absolute path (raw bytes, as ``files.path``), so reading an image again replaces its links rather than adding
to them.

Importing this module registers the component, and the next ``Catalog(...)`` opened creates the table. Commands
that only read (``show``, ``ls``) import it after opening and check ``has_table`` first, so that a read never
writes a schema change into a catalog.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ckptlab.library.catalog import Catalog, display_path, path_key, register_migrations

COMPONENT = "images"
MIGRATIONS = [
    """
    CREATE TABLE image_links (
        image BLOB NOT NULL,
        display TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        role TEXT NOT NULL,
        matched_by TEXT,
        image_mtime_ns INTEGER,
        seen_at REAL NOT NULL,
        PRIMARY KEY (image, sha256, role)
    );
    CREATE INDEX image_links_sha256 ON image_links(sha256);
    """,
]
register_migrations(COMPONENT, MIGRATIONS)

#: how many image paths ``show`` lists (the count is always exact)
SHOW_PATHS = 5


def has_table(cat: Catalog) -> bool:
    return cat.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'image_links'").fetchone() \
        is not None


def record(cat: Catalog, images: Iterable[tuple[str | os.PathLike, list[tuple[str, str, str | None]]]]) -> int:
    """Replace the links of each image: ``images`` = ``[(image path, [(sha256, role, matched_by), ...])]``. An
    image with no resolved model keeps no links. One transaction for all. Returns the number of links written."""
    now, n = time.time(), 0
    with cat.transaction() as conn:
        for image, links in images:
            key = path_key(image)
            try:
                mtime = os.stat(image).st_mtime_ns
            except OSError:
                mtime = None
            conn.execute("DELETE FROM image_links WHERE image = ?", (key,))
            for sha256, role, matched_by in links:
                conn.execute("INSERT OR REPLACE INTO image_links(image, display, sha256, role, matched_by, "
                             "image_mtime_ns, seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (key, display_path(os.path.abspath(os.fspath(image))), sha256.upper(), role, matched_by,
                              mtime, now))
                n += 1
    return n


def images_for(cat: Catalog, sha256: str | None, limit: int = SHOW_PATHS) -> dict | None:
    """``{"count": N, "paths": [...the newest `limit` image paths...], "roles": [...]}`` for a model content, or
    None when no image is linked (or the catalog has no links table)."""
    if not sha256 or not has_table(cat):
        return None
    sha = sha256.upper()
    count = cat.conn.execute("SELECT count(DISTINCT image) FROM image_links WHERE sha256 = ?", (sha,)).fetchone()[0]
    if not count:
        return None
    # min(display): one display per image; an aggregate so that PostgreSQL (no bare columns) runs it too
    rows = cat.conn.execute("SELECT min(display), max(seen_at) FROM image_links WHERE sha256 = ? GROUP BY image "
                            "ORDER BY max(seen_at) DESC, min(display) LIMIT ?", (sha, limit)).fetchall()
    roles = [r[0] for r in cat.conn.execute("SELECT DISTINCT role FROM image_links WHERE sha256 = ? ORDER BY role",
                                            (sha,))]
    return {"count": count, "paths": [r[0] for r in rows], "roles": roles}


def counts(cat: Catalog) -> dict[str, int]:
    """``{sha256: number of images}`` for every linked model content (``ls``)."""
    if not has_table(cat):
        return {}
    return dict(cat.conn.execute("SELECT sha256, count(DISTINCT image) FROM image_links GROUP BY sha256"))
