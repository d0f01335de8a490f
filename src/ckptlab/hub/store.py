"""CivitAI links and records in the library catalog (tables owned by the hub, added through the
catalog's migration hook).

- ``civitai_records``: every version/model record ever fetched, as revisions. A record whose content
  (ignoring the volatile ``stats`` counters) differs from the latest stored one becomes a new revision;
  older revisions are never changed or deleted. An upstream 404 or outage stores nothing, so what we
  had stays: metadata never regresses.
- ``civitai_links``: local file content (SHA256) -> CivitAI version. ``matched_by`` says how
  (``sha256``, ``autov3``, ``download``, or ``fingerprint`` for an inherited link, with
  ``inherited_from`` naming the directly linked file's SHA256). ``upstream_status`` is the outcome of
  the last refresh (``ok``, ``not_found``, ``unreachable``); a link is never removed by a refresh.
- ``civitai_misses``: SHA256s CivitAI did not know, with the time they were asked.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from ckptlab.library.catalog import Catalog, register_migrations

COMPONENT = "hub"
MIGRATIONS = [
    """
    CREATE TABLE civitai_records (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        remote_id INTEGER NOT NULL,
        revision INTEGER NOT NULL,
        digest TEXT NOT NULL,
        data TEXT NOT NULL,
        fetched_at REAL NOT NULL,
        checked_at REAL NOT NULL,
        UNIQUE (kind, remote_id, revision)
    );
    CREATE TABLE civitai_links (
        sha256 TEXT PRIMARY KEY,
        version_id INTEGER NOT NULL,
        model_id INTEGER,
        file_id INTEGER,
        matched_by TEXT NOT NULL,
        inherited_from TEXT,
        linked_at REAL NOT NULL,
        checked_at REAL,
        upstream_status TEXT
    );
    CREATE INDEX civitai_links_version ON civitai_links(version_id);
    CREATE TABLE civitai_misses (sha256 TEXT PRIMARY KEY, checked_at REAL NOT NULL);
    """,
]
register_migrations(COMPONENT, MIGRATIONS)

_VOLATILE = frozenset({"stats"})


def open_catalog(path=None, *, must_exist: bool = False) -> Catalog:
    """The catalog, with the hub's tables guaranteed present (``must_exist``: refuse a catalog that is not
    there rather than create an empty one)."""
    return Catalog(path, must_exist=must_exist)


def record_digest(data) -> str:
    """SHA-256 of the record's canonical JSON without the volatile ``stats`` counters (any depth)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in _VOLATILE}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    text = json.dumps(strip(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Link:
    sha256: str
    version_id: int
    model_id: int | None
    file_id: int | None
    matched_by: str
    inherited_from: str | None
    linked_at: float
    checked_at: float | None
    upstream_status: str | None

    @property
    def inherited(self) -> bool:
        return self.matched_by == "fingerprint"


def store_record(cat: Catalog, kind: str, remote_id: int, data: dict) -> tuple[int, bool]:
    """Keep ``data`` as the newest revision of (kind, id): ``(revision, is_new_revision)``."""
    digest = record_digest(data)
    now = time.time()
    with cat.transaction() as conn:
        row = conn.execute("SELECT revision, digest FROM civitai_records WHERE kind = ? AND remote_id = ? "
                           "ORDER BY revision DESC LIMIT 1", (kind, remote_id)).fetchone()
        if row and row[1] == digest:
            conn.execute("UPDATE civitai_records SET checked_at = ? WHERE kind = ? AND remote_id = ? AND revision = ?",
                         (now, kind, remote_id, row[0]))
            return row[0], False
        rev = (row[0] + 1) if row else 1
        conn.execute("INSERT INTO civitai_records(kind, remote_id, revision, digest, data, fetched_at, checked_at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (kind, remote_id, rev, digest, json.dumps(data, ensure_ascii=False), now, now))
        return rev, True


def latest_record(cat: Catalog, kind: str, remote_id: int | None) -> dict | None:
    if remote_id is None:
        return None
    row = cat.conn.execute("SELECT data FROM civitai_records WHERE kind = ? AND remote_id = ? "
                           "ORDER BY revision DESC LIMIT 1", (kind, remote_id)).fetchone()
    data = _loads(row[0]) if row else None
    return data if isinstance(data, dict) else None


def _loads(text):
    """A stored record (written by us from a server's answer; a damaged or hand-edited row is None)."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def revisions(cat: Catalog, kind: str, remote_id: int) -> list[dict]:
    """All stored revisions, oldest first: ``{"revision", "fetched_at", "checked_at", "data"}``."""
    rows = cat.conn.execute("SELECT revision, fetched_at, checked_at, data FROM civitai_records "
                            "WHERE kind = ? AND remote_id = ? ORDER BY revision", (kind, remote_id)).fetchall()
    return [{"revision": r, "fetched_at": f, "checked_at": c, "data": _loads(d)} for r, f, c, d in rows]


def get_link(cat: Catalog, sha256: str) -> Link | None:
    row = cat.conn.execute("SELECT sha256, version_id, model_id, file_id, matched_by, inherited_from, linked_at, "
                           "checked_at, upstream_status FROM civitai_links WHERE sha256 = ?",
                           (sha256.upper(),)).fetchone()
    return Link(*row) if row else None


def put_link(cat: Catalog, sha256: str, version_id: int, model_id: int | None, *, matched_by: str,
             file_id: int | None = None, inherited_from: str | None = None) -> Link:
    """Link a file to a version. A direct link is never replaced by an inherited one."""
    sha256 = sha256.upper()
    existing = get_link(cat, sha256)
    if existing and not existing.inherited and matched_by == "fingerprint":
        return existing
    now = time.time()
    with cat.transaction() as conn:
        conn.execute(
            "INSERT INTO civitai_links(sha256, version_id, model_id, file_id, matched_by, inherited_from, linked_at, "
            "checked_at, upstream_status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok') ON CONFLICT(sha256) DO UPDATE SET "
            "version_id = excluded.version_id, model_id = excluded.model_id, file_id = excluded.file_id, "
            "matched_by = excluded.matched_by, inherited_from = excluded.inherited_from, "
            "checked_at = excluded.checked_at, upstream_status = 'ok'",
            (sha256, version_id, model_id, file_id, matched_by, inherited_from.upper() if inherited_from else None,
             now, now))
        conn.execute("DELETE FROM civitai_misses WHERE sha256 = ?", (sha256,))
    return get_link(cat, sha256)


def set_upstream_status(cat: Catalog, sha256: str, status: str) -> None:
    cat.conn.execute("UPDATE civitai_links SET upstream_status = ?, checked_at = ? WHERE sha256 = ?",
                     (status, time.time(), sha256.upper()))


def note_miss(cat: Catalog, sha256: str) -> None:
    cat.conn.execute("INSERT INTO civitai_misses(sha256, checked_at) VALUES (?, ?) ON CONFLICT(sha256) DO UPDATE "
                     "SET checked_at = excluded.checked_at", (sha256.upper(), time.time()))


def recent_miss(cat: Catalog, sha256: str, max_age_s: float) -> float | None:
    """When CivitAI last said it does not know this SHA256, if within ``max_age_s``; else None."""
    row = cat.conn.execute("SELECT checked_at FROM civitai_misses WHERE sha256 = ?", (sha256.upper(),)).fetchone()
    return row[0] if row and time.time() - row[0] < max_age_s else None


def direct_links_by_fingerprint(cat: Catalog, fingerprint: str, fingerprint_bf16: str | None = None) -> list[Link]:
    """Direct (not inherited) links of catalogued files whose tensor fingerprint is ``fingerprint``, or
    whose bf16 fingerprint is ``fingerprint_bf16`` (a bf16 copy of a linked fp32 file, or the reverse)."""
    rows = cat.conn.execute(
        "SELECT DISTINCT l.sha256, l.version_id, l.model_id, l.file_id, l.matched_by, l.inherited_from, l.linked_at, "
        "l.checked_at, l.upstream_status FROM content c JOIN civitai_links l ON l.sha256 = c.sha256 "
        "WHERE (c.fingerprint = ?1 OR (?2 IS NOT NULL AND c.fingerprint_bf16 = ?2)) AND l.matched_by != 'fingerprint' "
        "ORDER BY l.linked_at", (fingerprint, fingerprint_bf16)).fetchall()
    return [Link(*r) for r in rows]


def has_tables(cat: Catalog) -> bool:
    """Whether the hub's tables exist in this catalog (a catalog only ever used by the library has none)."""
    return cat.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'civitai_links'").fetchone() \
        is not None


def newer_version_available(version_id: int | None, version_ids: list) -> bool:
    """Whether CivitAI lists a newer version than the linked ``version_id``, from the model record's
    ``modelVersions`` ids (newest first): the linked one is listed but not first, or it is not listed and the
    first is a higher id. The one rule the model page and the library index use."""
    ids = [i for i in version_ids if isinstance(i, int) and not isinstance(i, bool)]
    if version_id is None or not ids or ids[0] == version_id:
        return False
    return version_id in ids[1:] or ids[0] > version_id


def _str(v) -> str | None:
    """A name from a record: a non-empty string, else None (a list or a number where a name belongs)."""
    return v if isinstance(v, str) and v else None


def link_summary(cat: Catalog, sha256: str | None) -> dict | None:
    """What ``ckptlab show`` prints about a file's CivitAI link, from stored data only (no network):
    ids, model/version names, how it was matched (and whether it is inherited through the tensor
    fingerprint, from which SHA256), trigger words, base model, the number of stored revisions of the
    version record, the last upstream status and the model page URL. None when the file is not linked."""
    if not sha256 or not has_tables(cat):
        return None
    link = get_link(cat, sha256)
    if link is None:
        return None
    v = latest_record(cat, "version", link.version_id) or {}
    m = latest_record(cat, "model", link.model_id) or {}
    n_revs = cat.conn.execute("SELECT count(*) FROM civitai_records WHERE kind = 'version' AND remote_id = ?",
                              (link.version_id,)).fetchone()[0]
    vm = v.get("model") if isinstance(v.get("model"), dict) else {}  # records are a stranger's JSON: check shapes
    model_name = _str(vm.get("name")) or _str(m.get("name"))
    words = v.get("trainedWords")
    url = None
    if link.model_id is not None:
        url = f"https://civitai.com/models/{link.model_id}?modelVersionId={link.version_id}"
    return {"model_id": link.model_id, "version_id": link.version_id, "file_id": link.file_id,
            "model_name": model_name, "version_name": _str(v.get("name")),
            "type": _str(vm.get("type")) or _str(m.get("type")), "base_model": _str(v.get("baseModel")),
            "matched_by": link.matched_by, "inherited": link.inherited, "inherited_from": link.inherited_from,
            "trigger_words": [str(w) for w in words if w is not None] if isinstance(words, list) else [],
            "revisions": n_revs,
            "upstream_status": link.upstream_status, "url": url}
