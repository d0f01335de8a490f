"""The library catalog: one SQLite file (stdlib ``sqlite3``, WAL).

Tables (core schema, versioned by ``PRAGMA user_version``):

- ``files``: one row per model path ever seen, identified by ``id``. ``path`` is the absolute path
  as raw bytes (``os.fsencode``: non-UTF-8 names survive), ``display`` the same for humans.
  The stat identity ``(dev, ino, size, mtime_ns)`` decides whether a re-scan must re-read the file
  and lets a moved file keep its row. ``status`` is ``present`` or ``missing`` (never deleted).
- ``content``: hashes and tensor fingerprints keyed by the stat identity, so a file that did not
  change, or was renamed within its file system, is never hashed again.
- ``scans``: one row per scan (roots, status, summary).

Other modules add tables through ``register_migrations(component, [sql, ...])``; their versions are
kept in ``schema_versions``. Migrations run in order, each in its own transaction.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptlab.errors import BadChoiceError, CatalogError, CatalogWriteError
from ckptlab.hashes import Hashes
from ckptlab.library.sql_dialect import DbUrl, is_postgres

ENV_VAR = "CKPTLAB_DB"
BUSY_TIMEOUT_S = 30  # how long a connection waits for another writer (migrations, scans) before failing

_CORE_MIGRATIONS: list[str] = [
    # 1: initial schema
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        path BLOB NOT NULL UNIQUE,
        display TEXT NOT NULL,
        name TEXT NOT NULL,
        root TEXT,
        folder TEXT,
        dev INTEGER, ino INTEGER, size INTEGER, mtime_ns INTEGER,
        is_link INTEGER NOT NULL DEFAULT 0,
        format TEXT, kind TEXT, family TEXT, variant TEXT,
        n_tensors INTEGER, tensor_bytes INTEGER, ema_bytes INTEGER, fp32_bytes INTEGER,
        dtypes TEXT,
        info TEXT,
        safety TEXT, safety_detail TEXT,
        sidecars TEXT,
        error TEXT,
        status TEXT NOT NULL DEFAULT 'present',
        first_seen REAL NOT NULL, last_seen REAL NOT NULL, last_scan INTEGER
    );
    CREATE INDEX files_stat ON files(dev, ino, size, mtime_ns);
    CREATE INDEX files_status ON files(status);
    CREATE TABLE content (
        dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        sha256 TEXT, autov1 TEXT, autov2 TEXT, autov3 TEXT, crc32 TEXT, blake3 TEXT, hashed_at REAL,
        fingerprint TEXT, components TEXT, fingerprinted_at REAL,
        PRIMARY KEY (dev, ino, size, mtime_ns)
    );
    CREATE INDEX content_sha256 ON content(sha256);
    CREATE INDEX content_fingerprint ON content(fingerprint);
    CREATE TABLE scans (
        id INTEGER PRIMARY KEY,
        started REAL NOT NULL, finished REAL,
        roots TEXT NOT NULL, status TEXT NOT NULL, summary TEXT
    );
    CREATE TABLE schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
    """,
    # 2: bf16 fingerprints. Fingerprints cached before are dropped (a cache), so that the next
    # `scan --fingerprint` computes both kinds for every file.
    """
    ALTER TABLE content ADD COLUMN fingerprint_bf16 TEXT;
    ALTER TABLE content ADD COLUMN components_bf16 TEXT;
    CREATE INDEX content_fingerprint_bf16 ON content(fingerprint_bf16);
    UPDATE content SET fingerprint = NULL, components = NULL, fingerprinted_at = NULL;
    """,
]

_REGISTERED: dict[str, list[str]] = {}


def register_migrations(component: str, migrations: list[str]) -> None:
    """Let another module own tables in the catalog. ``migrations`` is the complete ordered list
    (append new ones, never edit old ones); version ``i`` means the first ``i`` have run."""
    if not component or component == "core":
        raise ValueError("component name must be non-empty and not 'core'")
    _REGISTERED[component] = list(migrations)


#: trigger words of LoRAs (``lora.info.trigger_words`` of the header metadata, filled by ``scan``): a JSON list of
#: ``{"word", "count", "sources"}`` in ``files.triggers``, NULL where never computed, ``[]`` where none. A
#: registered component rather than core migration 3: a catalog that has it still opens in an older ckptlab
#: (which knows core version 2 and ignores components it does not know).
TRIGGERS_COMPONENT = "triggers"
TRIGGERS_MIGRATIONS = ["ALTER TABLE files ADD COLUMN triggers TEXT;"]
register_migrations(TRIGGERS_COMPONENT, TRIGGERS_MIGRATIONS)

#: previews ``ckptlab preview`` rendered (``library.previews``): registered here, with the catalog, so that every
#: catalog has the table from its creation and a read-only one never needs this migration later
PREVIEWS_COMPONENT = "previews"
PREVIEWS_MIGRATIONS = ["""
    CREATE TABLE previews (
        file_id INTEGER PRIMARY KEY REFERENCES files(id) ON DELETE CASCADE,
        path TEXT NOT NULL, made REAL NOT NULL, seed INTEGER, infotext TEXT
    );
    """]
register_migrations(PREVIEWS_COMPONENT, PREVIEWS_MIGRATIONS)


def catalog_location(value: str | os.PathLike | None) -> Path | DbUrl:
    """The catalog a ``--db`` value (or ``$CKPTLAB_DB``) names: a ``DbUrl`` for ``postgresql://`` (also the
    ``postgresql:/...`` that a ``Path`` option makes of one), else a file path. None: the default."""
    if value is None:
        return default_db_path()
    if is_postgres(value):
        return value if isinstance(value, DbUrl) else DbUrl(value)
    return Path(value)


def default_db_path() -> Path | DbUrl:
    """``$CKPTLAB_DB`` if set (a file or a ``postgresql://`` URL), else ``<user data dir>/ckptlab/catalog.db``
    (platformdirs)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return DbUrl(env) if is_postgres(env) else Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("ckptlab", appauthor=False)) / "catalog.db"


def side_path(location, suffix: str) -> Path:
    """Where files that belong with a catalog live (``suffix`` = ``.plans``, ``.jobs``...): ``<catalog><suffix>``
    beside a catalog file; for a PostgreSQL catalog, which has no folder, ``<user data dir>/ckptlab/postgres/
    <host-port-database>-<digest of the URL without password><suffix>``."""
    loc = catalog_location(location)
    if not isinstance(loc, DbUrl):
        return Path(str(loc) + suffix)
    import hashlib
    import re
    from urllib.parse import urlsplit

    import platformdirs

    parts = urlsplit(loc.dsn)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{parts.hostname or 'local'}-{parts.port or 5432}-{parts.path.strip('/')}")
    digest = hashlib.sha256(str(loc).encode()).hexdigest()[:10]
    return Path(platformdirs.user_data_dir("ckptlab", appauthor=False)) / "postgres" / f"{name[:60]}-{digest}{suffix}"


def raw_connection(location, timeout: float = BUSY_TIMEOUT_S):
    """A plain connection to the catalog database (no migration): ``sqlite3`` for a file, the ``sql_dialect``
    connection (same interface) for a ``postgresql://`` URL. For helpers that only run a statement or two."""
    loc = catalog_location(location)
    if isinstance(loc, DbUrl):
        from ckptlab.library.sql_dialect import PgConnection

        return PgConnection(loc.dsn, busy_timeout_s=timeout)
    return sqlite3.connect(str(loc), isolation_level=None, timeout=timeout)


class CatalogHashCache:
    """The catalog file ``db`` as a ``ckptlab.hashes.HashCache`` for transforms and merges: read only, never
    created (a missing file is an empty cache, not an error), any failure a miss."""

    def __init__(self, db: str | Path):
        self.db = catalog_location(db)

    def known_sha256(self, path: str | Path, st: os.stat_result | None = None) -> str | None:
        """The sha256 (lower case) the catalog holds for this exact file - same device, inode, size and mtime -
        or None."""
        try:
            if not self.db.is_file():
                return None
            st = st if st is not None else os.stat(path)
            with Catalog(self.db) as cat:
                row = cat.content((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
            hashes = row and row.get("hashes")
            return hashes.sha256.lower() if hashes and hashes.sha256 else None
        except Exception:  # noqa: BLE001 - the catalog is an optional cache; the caller hashes the file
            return None

    def path_with_sha256(self, sha256: str) -> Path | None:
        """A present regular file the catalog records with this sha256, unchanged since (same size and
        mtime), or None."""
        import stat

        try:
            if not self.db.is_file():
                return None
            with Catalog(self.db) as cat:
                records = cat.find_by_sha256(sha256)
            for r in records:
                try:
                    st = os.stat(r.path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (r.size, r.mtime_ns):
                    return Path(r.path)
        except Exception:  # noqa: BLE001 - the catalog is an optional index; the caller tries the recorded path
            return None
        return None

    def __repr__(self) -> str:
        return f"CatalogHashCache({str(self.db)!r})"


def hash_cache(db: str | Path | None) -> CatalogHashCache:
    """The hash cache a command's ``--db`` names (None: ``$CKPTLAB_DB`` or the platform default, as for every
    other command that reads the catalog). Library code never calls this: it takes ``cache=``."""
    return CatalogHashCache(catalog_location(db))

#: SQLite's messages for a catalog that cannot be written for reasons outside ckptlab (sqlite3 has no
#: error codes before Python 3.11): these become one ``CatalogWriteError`` line, never an internal error
_WRITE_FAILURES = {"readonly": "the catalog is read-only", "read-only": "the catalog is read-only",
                   "disk is full": "the disk is full", "disk i/o error": "disk I/O error",
                   "unable to open": "the catalog cannot be opened for writing",
                   "locked": "the catalog is locked by another program", "busy": "the catalog is busy"}


def write_failure(e: sqlite3.Error, path) -> CatalogWriteError | None:
    """The ``CatalogWriteError`` for an environmental SQLite failure, or None for anything else (a bug)."""
    msg = str(e).lower()
    for needle, what in _WRITE_FAILURES.items():
        if needle in msg:
            return CatalogWriteError(f"cannot write the catalog: {what} ({e}); use a writable --db", path)
    return None


StatKey = tuple[int, int, int, int]  # (dev, ino, size, mtime_ns)


@dataclass
class FileRecord:
    """One catalogued file or diffusers folder: where it is, what it is, its hashes and safety verdict."""

    id: int
    path: str
    name: str
    root: str | None
    folder: str | None
    dev: int | None
    ino: int | None
    size: int | None
    mtime_ns: int | None
    is_link: bool
    format: str | None
    kind: str | None
    family: str | None
    variant: str | None
    n_tensors: int | None
    tensor_bytes: int | None
    ema_bytes: int | None
    fp32_bytes: int | None
    dtypes: dict[str, int] | None
    info: dict[str, Any] | None
    safety: str | None
    safety_detail: Any
    sidecars: dict[str, Any] | None
    error: str | None
    status: str
    first_seen: float
    last_seen: float
    hashes: Hashes | None = None
    fingerprint: str | None = None
    components: dict[str, str] | None = field(default=None)
    fingerprint_bf16: str | None = None  # see library.fingerprint: defined for F32/BF16 files only
    components_bf16: dict[str, str] | None = None
    triggers: list[dict[str, Any]] | None = None  # a LoRA's trigger words from its metadata (see TRIGGERS_COMPONENT)

    @property
    def stat_key(self) -> StatKey | None:
        if self.dev is None:
            return None
        return (self.dev, self.ino, self.size, self.mtime_ns)

    @property
    def sha256(self) -> str | None:
        return self.hashes.sha256 if self.hashes else None


_FILE_COLS = ("id, path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, format, kind, family, "
              "variant, n_tensors, tensor_bytes, ema_bytes, fp32_bytes, dtypes, info, safety, safety_detail, "
              "sidecars, error, status, first_seen, last_seen")
_JOIN_COLS = (", c.sha256, c.autov1, c.autov2, c.autov3, c.crc32, c.blake3, c.fingerprint, c.components, "
              "c.fingerprint_bf16, c.components_bf16, f.triggers")
_SELECT = (f"SELECT {', '.join('f.' + c.strip() for c in _FILE_COLS.split(','))}{_JOIN_COLS} FROM files f "
           "LEFT JOIN content c ON c.dev = f.dev AND c.ino = f.ino AND c.size = f.size AND c.mtime_ns = f.mtime_ns")


def _loads(text):
    """A JSON column's value; None when empty or not JSON (a row another tool or an older version wrote: the
    record is still readable, that field is just unknown)."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def _record(row) -> FileRecord:
    (fid, _path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, fmt, kind, family, variant,
     n_tensors, tensor_bytes, ema_bytes, fp32_bytes, dtypes, info, safety, safety_detail, sidecars, error,
     status, first_seen, last_seen, sha256, autov1, autov2, autov3, crc32, b3, fingerprint, components, fp_bf16,
     components_bf16, triggers) = row
    hashes = None
    if sha256:
        hashes = Hashes(sha256=sha256, autov1=autov1, autov2=autov2, autov3=autov3, crc32=crc32, blake3=b3,
                        size=size)
    return FileRecord(id=fid, path=display, name=name, root=root, folder=folder, dev=dev, ino=ino, size=size,
                      mtime_ns=mtime_ns, is_link=bool(is_link), format=fmt, kind=kind, family=family,
                      variant=variant, n_tensors=n_tensors, tensor_bytes=tensor_bytes, ema_bytes=ema_bytes,
                      fp32_bytes=fp32_bytes, dtypes=_loads(dtypes), info=_loads(info), safety=safety,
                      safety_detail=_loads(safety_detail), sidecars=_loads(sidecars), error=error, status=status,
                      first_seen=first_seen, last_seen=last_seen, hashes=hashes, fingerprint=fingerprint,
                      components=_loads(components), fingerprint_bf16=fp_bf16,
                      components_bf16=_loads(components_bf16), triggers=_loads(triggers))


def path_key(path: str | Path) -> bytes:
    """The catalog's key for a path: absolute, normalised, raw bytes."""
    return os.fsencode(os.path.abspath(os.fspath(path)))


def display_path(path: str | Path) -> str:
    """A printable form of a path (undecodable bytes shown as U+FFFD)."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "replace")


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (``executescript`` would commit the open transaction)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip().strip(";").strip():
                out.append(buf)
            buf = ""
    if buf.strip().strip(";").strip():
        out.append(buf)
    return out


class Catalog:
    """An open catalog. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | Path | None = None, *, must_exist: bool = False):
        """Open (and create, unless ``must_exist``) the catalog at ``path`` (default: ``default_db_path()``).
        Commands that only read the catalog pass ``must_exist=True``, so a mistyped ``--db`` is an error
        rather than a new empty catalog that answers "no files"."""
        self.path = catalog_location(path)
        self.postgres = isinstance(self.path, DbUrl)
        if self.postgres:
            self._open_postgres(must_exist)
            return
        if self.path.is_dir():
            raise CatalogError("is a folder, not a catalog file", self.path)
        if must_exist and not self.path.exists():
            raise CatalogError("no catalog here yet (make one with 'ckptlab scan FOLDER --db FILE')", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
        except (OSError, sqlite3.Error) as e:
            raise CatalogError(f"cannot open catalog: {e}", self.path) from None
        try:
            self._enable_wal()
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise write_failure(e, self.path) or CatalogError(f"not a usable ckptlab catalog: {e}", self.path) \
                from None

    def _open_postgres(self, must_exist: bool) -> None:
        """Connect (``sql_dialect.PgConnection``: the sqlite3 interface over psycopg), create SQLite's functions
        once, migrate. The same migrations as SQLite, translated."""
        from ckptlab.library.sql_dialect import PgConnection

        try:
            self.conn = PgConnection(self.path.dsn, busy_timeout_s=BUSY_TIMEOUT_S)
        except sqlite3.Error as e:
            raise CatalogError(f"cannot open catalog: {e}", self.path) from None
        try:
            if must_exist and self.conn.execute("SELECT to_regclass('ckptlab_meta') IS NULL").fetchone()[0]:
                raise CatalogError("no catalog in this database yet (make one with 'ckptlab scan FOLDER --db URL')",
                                   self.path)
            self.conn.ensure_compat()
            self._migrate()
        except CatalogError:
            self.conn.close()
            raise
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise write_failure(e, self.path) or CatalogError(f"not a usable ckptlab catalog: {e}", self.path) \
                from None

    def _enable_wal(self) -> None:
        """Switch to WAL. The switch needs an exclusive lock, and two connections switching a new
        file at once deadlock on it: SQLite then answers "database is locked" at once, without its
        busy handler. So retry (with jitter) up to the busy timeout."""
        import random

        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    # -- schema -------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def component_version(self, component: str) -> int:
        row = self.conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
        return row[0] if row else 0

    def _migrate(self) -> None:
        """Bring the schema up to date. Safe when several threads or processes open a new catalog at
        once: each migration runs inside ``BEGIN IMMEDIATE`` (one writer at a time, others wait up to
        the busy timeout) and the version is read again *inside* that transaction, so a migration
        another connection applied meanwhile is skipped instead of failing ("table already exists")."""
        if self._core_version() > len(_CORE_MIGRATIONS):
            raise CatalogError(f"catalog schema version {self._core_version()} is newer than this ckptlab "
                               f"({len(_CORE_MIGRATIONS)}); upgrade ckptlab", self.path)
        for version, sql in enumerate(_CORE_MIGRATIONS, start=1):
            self._apply(sql, version, self._core_version, f"PRAGMA user_version = {version}")
        for component, migrations in _REGISTERED.items():
            have = self._component_version_or_zero(component)
            if have > len(migrations):
                raise CatalogError(f"catalog schema for {component!r} is version {have}, newer than this "
                                   f"ckptlab knows ({len(migrations)})", self.path)
            for version, sql in enumerate(migrations, start=1):
                name = component.replace("'", "''")
                self._apply(sql, version, lambda c=component: self._component_version_or_zero(c),
                            f"INSERT INTO schema_versions(component, version) VALUES ('{name}', {version}) "
                            f"ON CONFLICT(component) DO UPDATE SET version = excluded.version")

    def _core_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _component_version_or_zero(self, component: str) -> int:
        if self._core_version() == 0:  # no schema_versions table yet
            return 0
        return self.component_version(component)

    def _apply(self, sql: str, version: int, current, bump: str) -> None:
        """Run migration ``version`` unless ``current()`` (read under the write lock) already has it."""
        if current() >= version:  # cheap check without the lock: the common case, nothing to do
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if current() < version:
                for stmt in _statements(sql):
                    self.conn.execute(stmt)
                self.conn.execute(bump)
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- plumbing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all (Ctrl-C included). A catalog that
        cannot be written (read-only, disk full, locked) raises ``CatalogWriteError``."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise write_failure(e, self.path) or e from None
        try:
            yield self.conn
        except sqlite3.OperationalError as e:
            self._rollback()
            failure = write_failure(e, self.path)
            if failure is None:
                raise
            raise failure from None
        except BaseException:
            self._rollback()
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                raise write_failure(e, self.path) or e from None

    def _rollback(self) -> None:
        if self.conn.in_transaction:  # SQLite may already have rolled back (disk full, I/O error)
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- files --------------------------------------------------------------------------------
    def get(self, file_id: int) -> FileRecord | None:
        row = self.conn.execute(f"{_SELECT} WHERE f.id = ?", (file_id,)).fetchone()
        return _record(row) if row else None

    def get_by_path(self, path: str | Path) -> FileRecord | None:
        row = self.conn.execute(f"{_SELECT} WHERE f.path = ?", (path_key(path),)).fetchone()
        return _record(row) if row else None

    def move_file(self, file_id: int, new_path: str | Path, stat_key: StatKey | None = None) -> bool:
        """Re-point row ``file_id`` at ``new_path`` (name and path; its id, and everything linked to it,
        kept). ``stat_key`` - the file's ``(dev, ino, size, mtime_ns)`` now - only for a plain move whose
        content is unchanged (its cached hashes follow it): left out, the next scan sees a changed identity
        and re-reads the file. Returns False, changing nothing, when another row already holds ``new_path``.
        Call it inside ``transaction()`` to make it atomic."""
        holder = self.conn.execute("SELECT id FROM files WHERE path = ?", (path_key(new_path),)).fetchone()
        if holder is not None and holder[0] != file_id:
            return False
        cols = {"path": path_key(new_path), "display": display_path(os.path.abspath(new_path)),
                "name": display_path(os.path.basename(os.fspath(new_path)))}
        key_cols = ("dev", "ino", "size", "mtime_ns")
        if stat_key is not None:
            cols.update(zip(key_cols, stat_key, strict=True))
            # same content under a new identity (e.g. a new inode): its hashes and fingerprints go along
            rest = [r[1] for r in self.conn.execute("PRAGMA table_info(content)") if r[1] not in key_cols]
            self.conn.execute(
                f"INSERT OR IGNORE INTO content({', '.join(key_cols)}, {', '.join(rest)}) "
                f"SELECT ?, ?, ?, ?, {', '.join('c.' + c for c in rest)} FROM content c JOIN files f ON "
                "c.dev = f.dev AND c.ino = f.ino AND c.size = f.size AND c.mtime_ns = f.mtime_ns WHERE f.id = ?",
                (*stat_key, file_id))
        self.conn.execute(f"UPDATE files SET {', '.join(c + ' = ?' for c in cols)} WHERE id = ?",
                          (*cols.values(), file_id))
        return True

    def find_by_hash(self, value: str) -> list[FileRecord]:
        """Files whose SHA256, AutoV1/V2/V3, CRC32 or BLAKE3 equals ``value`` (any case); a SHA-256
        prefix of 8+ hex digits also matches (the first 8 of the AutoV2 that ``ls`` shows find the file)."""
        v = value.strip().upper()
        if v.startswith("0X"):
            v = v[2:]
        rows = self.conn.execute(
            f"{_SELECT} WHERE c.sha256 = ?1 OR c.autov1 = ?1 OR c.autov2 = ?1 OR c.autov3 = ?1 OR c.crc32 = ?1 "
            f"OR c.blake3 = ?1 OR (length(?1) >= 8 AND substr(c.sha256, 1, length(?1)) = ?1) ORDER BY f.id",
            (v,)).fetchall()
        return [_record(r) for r in rows]

    def find_by_sha256(self, sha256: str) -> list[FileRecord]:
        rows = self.conn.execute(f"{_SELECT} WHERE c.sha256 = ? ORDER BY f.id", (sha256.upper(),)).fetchall()
        return [_record(r) for r in rows]

    def files(self, status: str | None = "present", kind: str | Sequence[str] | None = None,
              family: str | Sequence[str] | None = None, search: str | None = None, sort: str = "name",
              under: list[str] | None = None, unsafe: bool = False) -> list[FileRecord]:
        """Catalogued files. ``kind``/``family``: one value or several (any of them, case-insensitive);
        ``search``: text in the path or the sidecar summaries; ``unsafe``: only files whose safety
        verdict is not ``safe`` (malicious, suspicious, corrupt, unchecked or never checked)."""
        where, args = [], []
        if status:
            where.append("f.status = ?")
            args.append(status)
        for col, want in (("kind", kind), ("family", family)):
            if want:
                values = [want] if isinstance(want, str) else list(want)
                where.append(f"lower(f.{col}) IN ({', '.join('lower(?)' for _ in values)})")
                args += values
        if search:
            where.append("(instr(lower(f.display), lower(?)) > 0 OR instr(lower(coalesce(f.sidecars, '')), lower(?)) > 0)")
            args += [search, search]
        if unsafe:
            where.append("(f.safety IS NULL OR f.safety != 'safe')")
        order = {"name": "f.name COLLATE NOCASE, f.display", "size": "f.size DESC, f.display",
                 "mtime": "f.mtime_ns DESC, f.display", "path": "f.display", "id": "f.id"}.get(sort)
        if order is None:
            raise BadChoiceError(f"--sort {sort!r}: use one of size, name, mtime, path")
        sql = f"{_SELECT}{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {order}"
        return [_record(r) for r in self.conn.execute(sql, args)]

    def kinds(self) -> list[str]:
        """The kinds present in the catalog (what identification has recorded so far)."""
        return [r[0] for r in self.conn.execute("SELECT DISTINCT lower(kind) FROM files WHERE kind IS NOT NULL")]

    def families(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT lower(family) FROM files WHERE family IS NOT NULL")]

    def change_marker(self) -> tuple:
        """A value that changes whenever files or their hashes/fingerprints change in the catalog (a scan, a move,
        a verdict, a re-hash), for caches of things computed from the whole catalog. Two aggregate reads (tens of
        milliseconds at 50,000 files), comparable across connections (unlike ``PRAGMA data_version``)."""
        files = self.conn.execute(
            "SELECT count(*), max(id), total(size), max(mtime_ns), max(last_seen), max(last_scan), "
            "total(length(path)), total(status = 'present'), total(length(coalesce(safety, ''))) FROM files").fetchone()
        content = self.conn.execute(
            "SELECT count(*), max(hashed_at), max(fingerprinted_at) FROM content").fetchone()
        return (*files, *content)

    def counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())

    # -- content (hashes / fingerprints) ------------------------------------------------------
    def content(self, key: StatKey) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT sha256, autov1, autov2, autov3, crc32, blake3, fingerprint, components, fingerprint_bf16, "
            "components_bf16 FROM content WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ?", key).fetchone()
        if not row:
            return None
        sha256, autov1, autov2, autov3, crc32, b3, fingerprint, components, fp_bf16, components_bf16 = row
        hashes = None
        if sha256:
            hashes = Hashes(sha256=sha256, autov1=autov1, autov2=autov2, autov3=autov3, crc32=crc32, blake3=b3,
                            size=key[2])
        return {"hashes": hashes, "fingerprint": fingerprint, "components": _loads(components),
                "fingerprint_bf16": fp_bf16, "components_bf16": _loads(components_bf16)}

    def put_hashes(self, key: StatKey, h: Hashes) -> None:
        self.conn.execute(
            "INSERT INTO content(dev, ino, size, mtime_ns, sha256, autov1, autov2, autov3, crc32, blake3, hashed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dev, ino, size, mtime_ns) DO UPDATE SET "
            "sha256 = excluded.sha256, autov1 = excluded.autov1, autov2 = excluded.autov2, autov3 = excluded.autov3, "
            "crc32 = excluded.crc32, blake3 = excluded.blake3, hashed_at = excluded.hashed_at",
            (*key, h.sha256, h.autov1, h.autov2, h.autov3, h.crc32, h.blake3, time.time()))

    def put_fingerprint(self, key: StatKey, fingerprint: str, components: dict[str, str],
                        bf16: str | None = None, bf16_components: dict[str, str] | None = None) -> None:
        self.conn.execute(
            "INSERT INTO content(dev, ino, size, mtime_ns, fingerprint, components, fingerprint_bf16, components_bf16, "
            "fingerprinted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dev, ino, size, mtime_ns) DO UPDATE SET "
            "fingerprint = excluded.fingerprint, components = excluded.components, "
            "fingerprint_bf16 = excluded.fingerprint_bf16, components_bf16 = excluded.components_bf16, "
            "fingerprinted_at = excluded.fingerprinted_at",
            (*key, fingerprint, json.dumps(components, sort_keys=True), bf16,
             json.dumps(bf16_components, sort_keys=True) if bf16_components is not None else None, time.time()))


#: the record query (``files f LEFT JOIN content c`` on the stat key) and the function that reads one of its rows,
#: for modules that stream records by a WHERE / ORDER BY of their own (``library.hub_queries``: at hub scale a
#: command loads only the rows it needs, never ``files()``'s whole list)
SELECT_RECORDS = _SELECT
record_of = _record
json_column = _loads
