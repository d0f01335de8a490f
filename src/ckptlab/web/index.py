"""The library page's index: one derived row per present catalogued file with what a card shows and a filter
tests (display name, sub-type, family and base-model labels, precision, UI folder, tags, CivitAI link and update
state, preview, duplicates), plus an FTS5 table over the names, tags, trigger words and hashes people type.

A registered catalog component (``web_index``), created by its migration in every catalog a process that imported
this module opens. It is kept current without the CLI knowing about the web: SQLite triggers on ``files``,
``content``, ``previews`` and the hub's ``civitai_links`` / ``civitai_records`` put the ids of the files whose row
may have changed into ``web_index_dirty``; ``refresh(cat)`` (called first by every ``web.query`` answer) rebuilds
exactly those rows, in batches (one SQL pass for the rows, one for the CivitAI records they name, bulk inserts),
and recounts the duplicate groups they touch. Nothing rescans files: the index is derived from the catalog only.
The first build of an existing catalog is the same refresh over every file (the migration marks them all dirty).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sqlite3
import unicodedata

from ckptlab.display import short_text
from ckptlab.errors import CatalogWriteError
from ckptlab.hub import store as _hub_store  # noqa: F401 - registers the hub's tables before ours (triggers on them)
from ckptlab.hub.store import newer_version_available
from ckptlab.library.catalog import BUSY_TIMEOUT_S, Catalog, register_migrations
from ckptlab.library.precision import precision_of  # noqa: F401 - the index's precision word (re-exported)
from ckptlab.library.show import SIDECAR_ROLES, family_of_base_model, sidecar_naming_model
from ckptlab.library.sql_dialect import is_pg_connection
from ckptlab.library.ui_folders import kind_label  # noqa: F401 - the one kind label table (re-exported)

COMPONENT = "web_index"
log = logging.getLogger(__name__)

#: columns of ``files`` whose change can change an index row (``last_seen``/``last_scan``, which every scan
#: touches on every row, are not among them: a rescan that changes nothing marks nothing dirty)
_FILE_COLS = ("path", "display", "name", "root", "folder", "dev", "ino", "size", "mtime_ns", "format", "kind",
              "family", "variant", "dtypes", "safety", "sidecars", "status", "first_seen", "triggers")
_CHANGED = " OR ".join(f"old.{c} IS NOT new.{c}" for c in _FILE_COLS)
_DIRTY_BY_SHA = ("INSERT OR IGNORE INTO web_index_dirty(file_id) SELECT f.id FROM content c JOIN files f ON "
                 "f.dev = c.dev AND f.ino = c.ino AND f.size = c.size AND f.mtime_ns = c.mtime_ns "
                 "WHERE c.sha256 = {sha}")
_DIRTY_BY_KEY = ("INSERT OR IGNORE INTO web_index_dirty(file_id) SELECT id FROM files WHERE dev = {p}.dev AND "
                 "ino = {p}.ino AND size = {p}.size AND mtime_ns = {p}.mtime_ns")

MIGRATIONS = [
    f"""
    CREATE TABLE web_index (
        file_id INTEGER PRIMARY KEY,
        name TEXT NOT NULL, sort_name TEXT NOT NULL, file_name TEXT NOT NULL, path TEXT NOT NULL,
        version_name TEXT, kind TEXT, subtype TEXT, family TEXT, family_key TEXT NOT NULL, base_model TEXT,
        format TEXT, precision TEXT, safety TEXT, safety_key TEXT NOT NULL, folder TEXT, folder_label TEXT,
        tags TEXT, linked INTEGER NOT NULL, update_available INTEGER NOT NULL, has_preview INTEGER NOT NULL,
        size INTEGER NOT NULL, added REAL NOT NULL, sha256 TEXT, dups INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX web_index_name ON web_index(sort_name, file_id);
    CREATE INDEX web_index_size ON web_index(size, sort_name, file_id);
    CREATE INDEX web_index_added ON web_index(added, sort_name, file_id);
    CREATE INDEX web_index_family_sort ON web_index(family_key, sort_name, file_id);
    CREATE INDEX web_index_kind ON web_index(kind);
    CREATE INDEX web_index_family ON web_index(family);
    CREATE INDEX web_index_safety ON web_index(safety_key);
    CREATE INDEX web_index_format ON web_index(format);
    CREATE INDEX web_index_precision ON web_index(precision);
    CREATE INDEX web_index_folder ON web_index(folder);
    CREATE INDEX web_index_flags ON web_index(linked, update_available);
    CREATE INDEX web_index_updates ON web_index(update_available);
    CREATE INDEX web_index_dups ON web_index(dups);
    CREATE INDEX web_index_sha ON web_index(sha256);
    CREATE TABLE web_index_tags (tag TEXT NOT NULL, file_id INTEGER NOT NULL, label TEXT NOT NULL,
                                 PRIMARY KEY (tag, file_id)) WITHOUT ROWID;
    CREATE INDEX web_index_tags_file ON web_index_tags(file_id);
    CREATE VIRTUAL TABLE web_index_fts USING fts5(names, tags, words, hashes,
                                                  tokenize = 'unicode61 remove_diacritics 2');
    CREATE TABLE web_index_dirty (file_id INTEGER PRIMARY KEY);
    CREATE TABLE web_index_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE web_index_cache (key TEXT PRIMARY KEY, generation INTEGER NOT NULL, value TEXT NOT NULL);
    INSERT INTO web_index_meta(key, value) VALUES ('generation', 0);
    CREATE INDEX IF NOT EXISTS web_index_links_model ON civitai_links(model_id);

    CREATE TRIGGER web_index_files_ins AFTER INSERT ON files BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) VALUES (new.id);
    END;
    CREATE TRIGGER web_index_files_upd AFTER UPDATE OF {", ".join(_FILE_COLS)} ON files WHEN {_CHANGED} BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) VALUES (new.id);
    END;
    CREATE TRIGGER web_index_files_del AFTER DELETE ON files BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) VALUES (old.id);
    END;
    CREATE TRIGGER web_index_content_ins AFTER INSERT ON content BEGIN
        {_DIRTY_BY_KEY.format(p="new")};
    END;
    CREATE TRIGGER web_index_content_upd AFTER UPDATE OF sha256, autov2 ON content
        WHEN old.sha256 IS NOT new.sha256 OR old.autov2 IS NOT new.autov2 BEGIN
        {_DIRTY_BY_KEY.format(p="new")};
    END;
    CREATE TRIGGER web_index_content_del AFTER DELETE ON content BEGIN
        {_DIRTY_BY_KEY.format(p="old")};
    END;
    CREATE TRIGGER web_index_links_ins AFTER INSERT ON civitai_links BEGIN
        {_DIRTY_BY_SHA.format(sha="new.sha256")};
    END;
    CREATE TRIGGER web_index_links_upd AFTER UPDATE OF sha256, version_id, model_id ON civitai_links BEGIN
        {_DIRTY_BY_SHA.format(sha="old.sha256")};
        {_DIRTY_BY_SHA.format(sha="new.sha256")};
    END;
    CREATE TRIGGER web_index_links_del AFTER DELETE ON civitai_links BEGIN
        {_DIRTY_BY_SHA.format(sha="old.sha256")};
    END;
    CREATE TRIGGER web_index_records_ins AFTER INSERT ON civitai_records BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) SELECT f.id FROM civitai_links l
            JOIN content c ON c.sha256 = l.sha256
            JOIN files f ON f.dev = c.dev AND f.ino = c.ino AND f.size = c.size AND f.mtime_ns = c.mtime_ns
            WHERE (new.kind = 'version' AND l.version_id = new.remote_id)
               OR (new.kind = 'model' AND l.model_id = new.remote_id);
    END;
    CREATE TRIGGER web_index_previews_ins AFTER INSERT ON previews BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) VALUES (new.file_id);
    END;
    CREATE TRIGGER web_index_previews_del AFTER DELETE ON previews BEGIN
        INSERT OR IGNORE INTO web_index_dirty(file_id) VALUES (old.file_id);
    END;

    INSERT INTO web_index_dirty(file_id) SELECT id FROM files;
    """,
]
register_migrations(COMPONENT, MIGRATIONS)

BATCH = 5000  # dirty rows rebuilt per SQL pass
BULK = 2000  # this many dirty rows, and at least half the index: drop its indexes, rebuild, index again (faster)
_SHA = 23  # position of sha256 in a web_index row

# -- labels: the names UIs use --------------------------------------------------------------------------------
#: a family's name in UIs where its CivitAI base-model list does not start with the one people mean
_FAMILY_UI = {"sd1": "SD 1.5", "sd2": "SD 2.1", "sdxl": "SDXL 1.0", "sd3": "SD 3.5", "flux": "Flux.1 D"}
_SUBTYPES = {"locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA", "oft": "OFT", "boft": "BOFT",
             "glora": "GLoRA", "ia3": "(IA)³", "full": "Full", "norm": "Norm"}
_UI_LABELS = {"a1111": "A1111/Forge", "comfyui": "ComfyUI", "sdnext": "SD.Next"}


@functools.lru_cache(maxsize=256)
def family_label(family: str | None) -> str | None:
    """The name UIs use for a family (``sd1`` -> ``SD 1.5``, ``sdxl`` -> ``SDXL 1.0``): its CivitAI base model,
    else its short name; an id no family record knows is shown as it is."""
    from ckptlab.arch.families import get

    if not family:
        return None
    if family in _FAMILY_UI:
        return _FAMILY_UI[family]
    fam = get(family)
    if fam is None:
        return family
    return fam.civitai[0] if fam.civitai else fam.display_name


@functools.lru_cache(maxsize=256)
def subtype_label(kind: str | None, variant: str | None) -> str | None:
    """LoCon / LoHa / LoKr / DoRA ... for LoRAs and LyCORIS (a plain LoRA, whatever its key format, has none);
    the variant (``inpaint``, ``schnell``...) for anything else."""
    if not variant:
        return None
    if kind in ("lora", "lycoris"):
        return _SUBTYPES.get(variant.lower(), "LyCORIS" if kind == "lycoris" else None)
    return variant


@functools.lru_cache(maxsize=1024)
def folder_label(folder: str | None) -> str | None:
    """``Lora (A1111/Forge)``, ``loras (ComfyUI)``: the UI folder and the UI that reads it."""
    from ckptlab.library.ui_folders import FOLDERS

    if not folder:
        return None
    ui = (FOLDERS.get(folder.lower()) or (None, None))[0]
    return f"{folder} ({_UI_LABELS[ui]})" if ui in _UI_LABELS else folder


# -- search text ----------------------------------------------------------------------------------------------
#: what FTS5's unicode61 tokenizer keeps together: letters, digits, marks (every other character separates)
_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
MAX_TERMS = 16


def match_expression(q: str) -> str | None:
    """The FTS5 query for search-box text: every word (letters/digits) must start a word of the file's text
    (``detai lor`` finds ``sdxl_detail_lora``). Each word is quoted, so nothing typed - quotes, ``*``, ``OR``,
    ``NEAR``, column filters, parentheses - is FTS syntax. None when the text has no word at all."""
    words = _TOKEN.findall(q or "")[:MAX_TERMS]
    if not words:
        return None
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)


def fold(text: str) -> str:
    """Text as FTS5's ``unicode61 remove_diacritics 2`` tokenizer sees it, for the PostgreSQL index: lower case,
    accents removed, one space before each word (so that ``' ' || word`` finds a word's start)."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if not unicodedata.combining(c))
    return "".join(" " + w for w in _TOKEN.findall(text))


def text_condition(cat: Catalog, q: str) -> tuple[str, list] | None:
    """The condition on ``web_index_fts`` rows (and its arguments) that search-box text ``q`` sets: every word must
    start a word of the file's text. SQLite: FTS5 ``MATCH`` (``match_expression``). PostgreSQL (no FTS5): the
    rows hold ``fold``ed words, each query word is found by ``strpos`` of its folded form after a space (a scan
    of the text table: fine for tens of thousands of files; no index). None when ``q`` has no word."""
    if not getattr(cat, "postgres", False):
        match = match_expression(q)
        return None if match is None else ("web_index_fts MATCH ?", [match])
    words = [w for w in (fold(w) for w in _TOKEN.findall(q or "")[:MAX_TERMS]) if w]
    if not words:
        return None
    cond = " AND ".join("strpos(names || tags || words || hashes, ?) > 0" for _ in words)
    return f"({cond})", words


#: a name from a record or a sidecar (untrusted: a list or a number where a string belongs), as short text
_text = functools.partial(short_text, limit=500)


def _words(v) -> list[str]:
    return [w if isinstance(w, str) else str(w) for w in v if w is not None] if isinstance(v, list) else []


def _loads(text):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


# -- refresh --------------------------------------------------------------------------------------------------
_ROWS = ("SELECT f.id, f.display, f.name, f.folder, f.format, f.kind, f.family, f.variant, f.dtypes, f.safety, "
         "f.sidecars, f.triggers, f.size, f.first_seen, c.sha256, c.autov2, l.version_id, l.model_id, "
         "EXISTS (SELECT 1 FROM previews p WHERE p.file_id = f.id) "
         "FROM files f LEFT JOIN content c ON c.dev = f.dev AND c.ino = f.ino AND c.size = f.size "
         "AND c.mtime_ns = f.mtime_ns LEFT JOIN civitai_links l ON l.sha256 = c.sha256 "
         "WHERE f.status = 'present' AND f.id IN (SELECT value FROM json_each(?))")
_LATEST = ("SELECT r.remote_id, {cols} FROM civitai_records r WHERE r.kind = ? AND r.remote_id IN "
           "(SELECT value FROM json_each(?)) AND json_valid(r.data) AND r.revision = (SELECT max(r2.revision) FROM civitai_records r2 "
           "WHERE r2.kind = r.kind AND r2.remote_id = r.remote_id)")
# json_extract / json_type rather than the -> operators, and no UPDATE ... FROM: SQLite 3.31+ (older distributions)


def _array(path: str) -> str:
    return f"CASE json_type(r.data, '{path}') WHEN 'array' THEN json_extract(r.data, '{path}') END"


_VERSION_COLS = (f"json_extract(r.data, '$.name'), json_extract(r.data, '$.baseModel'), {_array('$.trainedWords')}, "
                 "json_extract(r.data, '$.model.name')")
_MODEL_COLS = (f"json_extract(r.data, '$.name'), {_array('$.tags')}, (SELECT json_group_array(json_extract(v.value, "
               "'$.id')) FROM json_each(r.data, '$.modelVersions') v WHERE json_type(r.data, '$.modelVersions') = "
               "'array' AND v.type = 'object')")


#: how long a page waits for another writer (a scan's batch, a job) before answering from the rows it has
WAIT_MS = 1500


@contextlib.contextmanager
def short_wait(cat: Catalog, ms: int | None = None):
    """Wait at most ``ms`` for the catalog's write lock inside this block (the catalog's own busy timeout is for
    commands, which may wait long; a page should rather answer slightly stale and catch up on the next one)."""
    cat.conn.execute(f"PRAGMA busy_timeout = {int(WAIT_MS if ms is None else ms)}")
    try:
        yield
    finally:
        cat.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")


def pending(cat: Catalog) -> int:
    """How many files wait for their index row to be rebuilt."""
    return cat.conn.execute("SELECT count(*) FROM web_index_dirty").fetchone()[0]


def generation(cat: Catalog) -> int:
    """A number that changes whenever ``refresh`` changed the index (caches of facets key on it)."""
    return cat.conn.execute("SELECT value FROM web_index_meta WHERE key = 'generation'").fetchone()[0]


def refresh(cat: Catalog) -> int:
    """Rebuild the index rows of the files marked dirty (by the triggers, or all of them by the first build);
    returns how many were rebuilt. Cheap when none are. A catalog that cannot be written (read-only, or locked by
    another writer for more than ``WAIT_MS``) keeps answering from the rows it has."""
    if cat.conn.execute("SELECT 1 FROM web_index_dirty LIMIT 1").fetchone() is None:
        return 0
    try:
        with short_wait(cat), cat.transaction() as conn:
            ids = [r[0] for r in conn.execute("SELECT file_id FROM web_index_dirty")]
            have = conn.execute("SELECT count(*) FROM web_index").fetchone()[0]
            indexes = []
            if len(ids) >= BULK and len(ids) * 2 >= have:  # a first build, or a rescan that changed most files
                indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND "
                                       "tbl_name = 'web_index' AND sql IS NOT NULL").fetchall()
                for name, _sql in indexes:
                    conn.execute(f'DROP INDEX "{name}"')
            for i in range(0, len(ids), BATCH):
                _rebuild(conn, ids[i:i + BATCH], recount=not indexes)
            for _name, sql in indexes:
                conn.execute(sql)
            if indexes:
                _recount(conn, None)
                conn.execute("ANALYZE web_index")  # the planner's row counts: scan the name order for kind=lora
            conn.execute("DELETE FROM web_index_dirty")
            conn.execute("UPDATE web_index_meta SET value = value + 1 WHERE key = 'generation'")
    except CatalogWriteError:
        return 0
    return len(ids)


def rebuild_all(cat: Catalog) -> int:
    """Mark every file dirty and refresh (what the first build does; for tests and the benchmark)."""
    with cat.transaction() as conn:
        conn.execute("INSERT OR IGNORE INTO web_index_dirty(file_id) SELECT id FROM files")
    return refresh(cat)


def _rebuild(conn: sqlite3.Connection, ids: list[int], recount: bool = True) -> None:
    """Replace the index rows of ``ids`` (inside the caller's transaction); recount their duplicate groups
    (``recount``; else the caller recounts all of them once)."""
    id_json = json.dumps(ids)
    old_shas = [r[0] for r in conn.execute(
        "SELECT DISTINCT sha256 FROM web_index WHERE sha256 IS NOT NULL AND file_id IN (SELECT value FROM "
        "json_each(?))", (id_json,))]
    conn.execute("DELETE FROM web_index WHERE file_id IN (SELECT value FROM json_each(?))", (id_json,))
    old_text = {r[0]: r for r in conn.execute(
        "SELECT rowid, names, tags, words, hashes FROM web_index_fts WHERE rowid IN (SELECT value FROM json_each(?))",
        (id_json,))}
    conn.execute("DELETE FROM web_index_tags WHERE file_id IN (SELECT value FROM json_each(?))", (id_json,))
    rows = conn.execute(_ROWS, (id_json,)).fetchall()
    versions = {r[0]: r[1:] for r in conn.execute(
        _LATEST.format(cols=_VERSION_COLS), ("version", json.dumps(sorted({r[16] for r in rows if r[16]}))))}
    models = {r[0]: r[1:] for r in conn.execute(
        _LATEST.format(cols=_MODEL_COLS), ("model", json.dumps(sorted({r[17] for r in rows if r[17]}))))}
    out, fts, tags = [], [], []
    for row in rows:
        try:
            rec, text, tag_list = _derive(row, versions, models)
        except Exception:  # noqa: BLE001 - one hostile row must not keep every other row dirty (and pages 500)
            log.warning("web index: file %s indexed without derived fields", row[0], exc_info=True)
            rec, text, tag_list = _bare(row)
        out.append(rec)
        fts.append(text)
        tags += [(key, rec[0], label) for key, label in tag_list]
    conn.executemany(f"INSERT INTO web_index VALUES ({', '.join('?' * 25)})", out)
    # the text rarely changes with the rest (a safety verdict, a size): rewrite only the rows whose text did
    if is_pg_connection(conn):  # no FTS5 there: the words stored folded, searched by text_condition
        fts = [(t[0], *(fold(x) for x in t[1:])) for t in fts]
    fts = [t for t in fts if old_text.pop(t[0], None) != t]
    gone = json.dumps([*old_text, *(t[0] for t in fts)])
    conn.execute("DELETE FROM web_index_fts WHERE rowid IN (SELECT value FROM json_each(?))", (gone,))
    conn.executemany("INSERT INTO web_index_fts(rowid, names, tags, words, hashes) VALUES (?, ?, ?, ?, ?)", fts)
    conn.executemany("INSERT OR IGNORE INTO web_index_tags(tag, file_id, label) VALUES (?, ?, ?)", tags)
    if recount:
        shas = sorted({*old_shas, *(r[_SHA] for r in out if r[_SHA])})
        if shas:
            _recount(conn, shas)


def _recount(conn: sqlite3.Connection, shas: list[str] | None) -> None:
    """``dups`` (other present files with the same bytes) of the rows with these sha256 (None: of all rows)."""
    count = "(SELECT count(*) - 1 FROM web_index w2 WHERE w2.sha256 = web_index.sha256)"
    if shas is None:
        conn.execute("UPDATE web_index SET dups = 0 WHERE dups != 0")
        conn.execute(f"UPDATE web_index SET dups = {count} WHERE sha256 IN (SELECT sha256 FROM web_index "
                     "WHERE sha256 IS NOT NULL GROUP BY sha256 HAVING count(*) > 1)")
        return
    conn.execute(f"UPDATE web_index SET dups = {count} WHERE sha256 IN (SELECT value FROM json_each(?))",
                 (json.dumps(shas),))


def _derive(row, versions: dict, models: dict):
    """One ``web_index`` row, its FTS row and its tags, from a ``_ROWS`` row and the CivitAI records it names."""
    (fid, path, name, folder, fmt, kind, family, variant, dtypes, safety, sidecars, triggers, size, first_seen,
     sha256, autov2, version_id, model_id, has_preview_row) = row
    sc = _loads(sidecars)
    sc = sc if isinstance(sc, dict) else {}
    model_name = version_name = base_model = None
    words: list[str] = []
    tag_values: list[str] = []
    update = False
    if version_id is not None:  # linked: hub.store.link_summary's reading of the stored records
        v = versions.get(version_id)
        m = models.get(model_id) if model_id is not None else None
        if v:
            version_name, base_model = _text(v[0]), _text(v[1])
            words += _words(_loads(v[2]))
            model_name = _text(v[3])
        if m:
            model_name = model_name or _text(m[0])
            tag_values += _words(_loads(m[1]))
            ids = _loads(m[2])
            update = newer_version_available(version_id, ids if isinstance(ids, list) else [])
    else:  # a sidecar that names the model (library.show.civitai_brief's rule)
        named = sidecar_naming_model(sc)
        if named is not None:
            s = named[1]
            model_name, version_name, base_model = (_text(s.get("model_name")), _text(s.get("version_name")),
                                                    _text(s.get("base_model")))
    for role in SIDECAR_ROLES:
        s = sc.get(role)
        if isinstance(s, dict):
            tag_values += _words(s.get("tags"))
            words += _words(s.get("trained_words"))
            if role == "json" and isinstance(s.get("activation_text"), str):
                words.append(s["activation_text"])
    words += _words(sc.get("trigger_words"))
    for t in _loads(triggers) or []:
        if isinstance(t, dict) and t.get("word") is not None:
            words.append(str(t["word"]))
    stem = name if fmt == "diffusers" else os.path.splitext(name)[0]
    display = model_name or stem
    fam = family or (family_of_base_model(base_model) if base_model else None)
    fam_label = family_label(fam)
    files = sc.get("files") if isinstance(sc.get("files"), dict) else {}
    has_preview = bool(has_preview_row or files.get("preview") or files.get("thumb"))
    tags: dict[str, str] = {}
    for t in tag_values:
        t = t.strip()
        if t and len(tags) < 200:
            tags.setdefault(t.casefold(), t)
    rec = (fid, display, _sort_key(display), name, path, version_name, kind, subtype_label(kind, variant), fam,
           _sort_key(fam_label) if fam_label else "\U0010ffff", base_model or fam_label, fmt,
           precision_of(_loads(dtypes)), safety, safety or "unchecked", folder, folder_label(folder),
           json.dumps(list(tags.values()), ensure_ascii=False) if tags else None, int(version_id is not None),
           int(update), int(has_preview), size or 0, first_seen or 0.0, sha256, 0)
    names = " ".join(x for x in (name, display, model_name, version_name) if x)
    text = (fid, names, " ".join(tags.values()), " ".join(dict.fromkeys(words)),
            " ".join(x for x in (sha256, autov2) if x))
    return rec, text, list(tags.items())


def _bare(row):
    """The index row of a file whose derivation failed: its name, path, size and hash; every derived field
    (labels, precision, CivitAI, tags) null, so the file is still listed and found by name."""
    fid, path, name = row[0], row[1], row[2]
    name = name if isinstance(name, str) else str(name)
    size, first_seen, sha256 = row[12], row[13], row[14]
    size = size if isinstance(size, int) else 0
    first_seen = first_seen if isinstance(first_seen, int | float) else 0.0
    rec = (fid, name, _sort_key(name), name, path, None, None, None, None, "\U0010ffff", None, None, None, None,
           "unchecked", None, None, None, 0, 0, 0, size, first_seen, sha256 if isinstance(sha256, str) else None, 0)
    return rec, (fid, name, "", "", sha256 if isinstance(sha256, str) else ""), []


def _sort_key(text: str) -> str:
    """Names sort case- and accent-insensitively (``Élan`` beside ``elan``)."""
    if text.isascii():
        return text.lower()
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))
