"""Hub-scale questions answered in SQL: a catalog of millions of rows is never loaded whole.

``report``, ``dupes`` and ``ls`` ask the catalog for aggregates (``GROUP BY``, ``count``, ``sum``) and for the
few rows they show, streamed from a cursor. The SQL is plain and portable (``?`` parameters, standard
aggregates, ``CASE``, ``EXISTS``/``IN`` subqueries): the same text runs on SQLite and, through the catalog's
translation layer, on PostgreSQL.

Remote rows (objects in ``s3://``... listed by a remote scan: ``files.dev = REMOTE_DEV``, the path a URL) are
counted and reported like local files, but never handed to code that acts on a local file (``os.stat``,
links, ``plan-space``/``apply-plan``): ``is_remote_record`` tells them apart.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator

from ckptlab.library.catalog import SELECT_RECORDS, Catalog, FileRecord, json_column, record_of
from ckptlab.remote import REMOTE_DEV, is_remote

#: rows fetched from a cursor at a time, and ids per ``IN (...)`` (under SQLite's and PostgreSQL's limits)
FETCH = 1000
IN_CHUNK = 500

#: the stat key join of ``files f`` and ``content c``
KEY_JOIN = "c.dev = f.dev AND c.ino = f.ino AND c.size = f.size AND c.mtime_ns = f.mtime_ns"


def qualifies(f: str = "f") -> str:
    """SQL: file row ``f`` may be in a duplicate group (``find_dupes``'s rule): present, readable, with a stat
    identity, and not a pickle that ``check`` did not call safe."""
    return (f"{f}.status = 'present' AND {f}.error IS NULL AND {f}.dev IS NOT NULL AND "
            f"({f}.format IS NULL OR {f}.format != 'pickle' OR {f}.safety = 'safe')")


#: SQL: the row is not a remote object (its local-file identity may be stat'ed, linked, rewritten)
LOCAL_SQL = f"(f.dev IS NULL OR f.dev != {REMOTE_DEV})"


def is_remote_record(rec) -> bool:
    """An object in object storage (``dev == REMOTE_DEV`` or a URL path): reported, never acted on locally."""
    return getattr(rec, "dev", None) == REMOTE_DEV or is_remote(getattr(rec, "path", None))


#: a JSON column's value, None when empty or not JSON (as the catalog reads its records)
loads = json_column


def open_rows(catalog: Catalog, sql: str, args: Iterable = ()):
    """A cursor over ``sql``'s rows meant to be read ``FETCH`` at a time: SQLite's own (it steps through the
    rows as they are read); on PostgreSQL a server-side cursor (``PgConnection.stream``), since a plain
    PostgreSQL cursor receives the whole answer at once."""
    from ckptlab.library.sql_dialect import is_pg_connection

    if is_pg_connection(catalog.conn):
        return catalog.conn.stream(sql, list(args), size=FETCH)
    return catalog.conn.execute(sql, list(args))


def _drain(cur) -> Iterator[tuple]:
    try:
        while True:
            rows = cur.fetchmany(FETCH)
            if not rows:
                return
            yield from rows
    finally:  # stopped early (a page, a limit): the server-side cursor is closed now
        with contextlib.suppress(sqlite3.Error):  # the connection closed first (a broken pipe ended the command):
            cur.close()  # the cursor went with it


def iter_records(catalog: Catalog, where: str = "", args: Iterable = (), order: str = "f.id",
                 limit: int | None = None, offset: int = 0) -> Iterator[FileRecord]:
    """``FileRecord``s matching ``where`` (SQL over ``files f`` / ``content c``) in ``order``, streamed from the
    cursor ``FETCH`` rows at a time."""
    sql = f"{SELECT_RECORDS}{' WHERE ' + where if where else ''} ORDER BY {order}"
    args = list(args)
    skip = 0
    if limit is not None:
        sql += " LIMIT ? OFFSET ?"
        args += [int(limit), int(offset)]
    else:  # OFFSET without LIMIT is not portable (SQLite needs a LIMIT, PostgreSQL has no LIMIT -1)
        skip = int(offset)
    for row in _drain(open_rows(catalog, sql, args)):
        if skip:
            skip -= 1
            continue
        yield record_of(row)


def records_by_ids(catalog: Catalog, ids: list[int]) -> dict[int, FileRecord]:
    """``{id: record}`` for ``ids`` (queried ``IN_CHUNK`` at a time)."""
    out: dict[int, FileRecord] = {}
    for i in range(0, len(ids), IN_CHUNK):
        part = ids[i:i + IN_CHUNK]
        for r in iter_records(catalog, f"f.id IN ({', '.join('?' for _ in part)})", part):
            out[r.id] = r
    return out


def scalar_rows(catalog: Catalog, sql: str, args: Iterable = ()) -> Iterator[tuple]:
    """The rows of an aggregate query, streamed."""
    yield from _drain(open_rows(catalog, sql, args))


# -- dedup figures (report) -------------------------------------------------------------------------------------

#: what ``dedup_figures`` groups by: same bytes, same weights (fp16 rounding), same weights (bf16 rounding)
DEDUP_KEYS = ("sha256", "fingerprint", "fingerprint_bf16")


def dedup_figures(catalog: Catalog) -> dict[str, dict[str, int]]:
    """Per key of ``DEDUP_KEYS``: ``{"groups", "copies", "bytes_saved"}`` over the physical files (content rows:
    hard links and symlinks to one file are one) of the files ``dupes`` compares (``qualifies``), local and
    remote alike. A group is every physical file with one value of the key, when there are two or more;
    ``bytes_saved`` is what keeping one copy of each group (the largest: the highest precision of a weights
    group) would save. Fingerprints count only for files with component fingerprints (as ``dupes``). Each key
    on its own, not joined transitively (``dupes`` joins them)."""
    exists = f"EXISTS (SELECT 1 FROM files f WHERE {KEY_JOIN} AND {qualifies('f')})"
    fingerprinted = "q.components IS NOT NULL AND q.components NOT IN ('', '{}', 'null')"
    parts = []
    for key in DEDUP_KEYS:  # one pass over the compared content rows (q), grouped three ways
        extra = "" if key == "sha256" else f" AND {fingerprinted}"
        parts.append(
            f"SELECT '{key}' AS k, count(*), coalesce(sum(n), 0), coalesce(sum(total - biggest), 0) FROM ("
            f"SELECT q.{key}, count(*) AS n, sum(q.size) AS total, max(q.size) AS biggest FROM q "
            f"WHERE q.{key} IS NOT NULL AND q.{key} != ''{extra} GROUP BY q.{key} HAVING count(*) > 1) g{len(parts)}")
    sql = (f"WITH q AS (SELECT c.sha256, c.fingerprint, c.fingerprint_bf16, c.components, coalesce(c.size, 0) AS size "
           f"FROM content c WHERE {exists}) " + " UNION ALL ".join(parts))
    out = {key: {"groups": 0, "copies": 0, "bytes_saved": 0} for key in DEDUP_KEYS}
    for key, groups, copies, saved in catalog.conn.execute(sql).fetchall():
        out[key] = {"groups": int(groups or 0), "copies": int(copies or 0), "bytes_saved": int(saved or 0)}
    return out


# -- the moderation queue and ls --------------------------------------------------------------------------------

#: ``ls --unsafe`` order: the verdicts that need a moderator first
VERDICT_ORDER = ("malicious", "suspicious", "corrupt", "unchecked")
VERDICT_RANK_SQL = ("CASE f.safety WHEN 'malicious' THEN 0 WHEN 'suspicious' THEN 1 WHEN 'corrupt' THEN 2 "
                    "ELSE 3 END")

SORTS = {"name": "f.name, f.display, f.id", "size": "f.size DESC, f.display, f.id",
         "mtime": "f.mtime_ns DESC, f.display, f.id", "path": "f.display, f.id"}


def listing_where(*, kinds: list[str] | None = None, missing: bool = False, errors: bool = False,
                  unsafe: bool = False) -> tuple[str, list]:
    """The WHERE clause (and its parameters) of ``ls``'s filters that SQL can apply."""
    where, args = ["f.status = ?"], ["missing" if missing else "present"]
    if kinds:
        where.append(f"lower(f.kind) IN ({', '.join('lower(?)' for _ in kinds)})")
        args += list(kinds)
    if errors:
        where.append("f.error IS NOT NULL AND f.error != ''")
    if unsafe:
        where.append("(f.safety IS NULL OR f.safety != 'safe')")
    return " AND ".join(where), args


def listing_order(sort: str, *, unsafe: bool = False) -> str:
    """``ls``'s ORDER BY: ``sort`` (size | name | mtime | path), behind the verdict rank for the moderation
    queue (``unsafe``: malicious, suspicious, corrupt, then unchecked). Raises ``BadChoiceError``."""
    from ckptlab.errors import BadChoiceError

    order = SORTS.get(sort)
    if order is None:
        raise BadChoiceError(f"--sort {sort!r}: use one of size, name, mtime, path")
    if sort == "name":  # as Catalog.files: names case-insensitively (lower() is portable, COLLATE NOCASE is not)
        order = "lower(f.name), f.display, f.id"
    return f"{VERDICT_RANK_SQL}, {order}" if unsafe else order


def iter_listed(catalog: Catalog, *, kind: str | None = None, family: str | None = None, search: str | None = None,
                sort: str = "name", missing: bool = False, errors: bool = False, unsafe: bool = False,
                civitai=None, limit: int | None = None, offset: int = 0) -> Iterator[tuple[FileRecord, dict | None]]:
    """``ls``'s files (``show.list_files``'s filters and briefs), streamed: the status, kind, error and verdict
    filters, the order and the page (``offset``, ``limit``) run in SQL, so a page of a million-row catalog reads
    a page of rows. The family (with its CivitAI base-model fallback) and the text search look at each streamed
    row in Python, the page then counted after them. ``unsafe``: the moderation queue - malicious first, then
    suspicious, corrupt, then unchecked (or never checked), each in ``sort`` order. Raises ``BadChoiceError``
    (an unknown kind, family or sort)."""
    from ckptlab.library.ui_folders import resolve_family, resolve_kind

    order = listing_order(sort, unsafe=unsafe)
    kinds = resolve_kind(kind, catalog.kinds()) if kind else None
    families = resolve_family(family, catalog.families()) if family else None
    where, args = listing_where(kinds=kinds, missing=missing, errors=errors, unsafe=unsafe)
    in_python = bool(families or search)
    needle = search.casefold() if search else None
    recs = iter_records(catalog, where, args, order, limit=None if in_python else limit,
                        offset=0 if in_python else offset)
    try:
        yield from _page(recs, civitai, families, needle, in_python, offset, limit)
    finally:
        recs.close()  # a page shown: the rest of the answer stays on the server


def _page(recs, civitai, families, needle, in_python, offset, limit):
    from ckptlab.library.show import base_model_family, civitai_brief, search_text

    skipped = shown = 0
    for r in recs:
        civ = civitai_brief(r, civitai(r) if civitai is not None and r.sha256 else None)
        if families and not ((r.family or "").lower() in families
                             or (not r.family and base_model_family(civ) in families)):
            continue
        if needle and needle not in search_text(r, civ):
            continue
        if in_python and skipped < offset:
            skipped += 1
            continue
        yield r, civ
        shown += 1
        if in_python and limit is not None and shown >= limit:
            return
