"""The catalog on PostgreSQL: the SQLite dialect ckptlab writes, translated once per statement.

Every module keeps writing the SQL it always wrote (one schema, one set of migrations, for both databases).
``PgConnection`` presents the part of the ``sqlite3.Connection`` API ckptlab uses (``execute`` -> a cursor with
``fetchone``/``fetchall``/iteration/``lastrowid``/``rowcount``, ``executemany``, ``in_transaction``, ``close``)
over psycopg 3, and ``translate`` rewrites each statement (LRU-cached) into PostgreSQL:

- placeholders ``?`` / ``?N`` -> ``%s`` / ``%(pN)s``; ``INSERT OR IGNORE`` -> ``ON CONFLICT DO NOTHING``; ``INSERT OR
  REPLACE`` -> ``ON CONFLICT (primary key) DO UPDATE`` (the key read from the database once per table);
- DDL types: ``INTEGER PRIMARY KEY`` -> an identity column, ``INTEGER`` -> ``BIGINT`` (inodes, sizes and ns
  times overflow int4), ``REAL`` -> ``DOUBLE PRECISION``, ``BLOB`` -> ``BYTEA``; ``WITHOUT ROWID`` dropped; an
  FTS5 virtual table -> a plain table with a ``rowid`` key (searched by ``web.index``'s PostgreSQL branch);
- ``CREATE TRIGGER ... BEGIN ...; END`` -> a PL/pgSQL function and a ``FOR EACH ROW`` trigger;
- ``x IS NOT y`` -> ``IS DISTINCT FROM``; ``x COLLATE NOCASE`` -> ``lower(x)``; ``SELECT changes()`` -> the last
  row count; PRAGMAs: ``user_version`` -> the ``ckptlab_meta`` table, ``table_info`` -> ``information_schema``,
  ``busy_timeout`` -> ``lock_timeout``, the others (journal mode, synchronous...) nothing;
- SQLite functions PostgreSQL lacks are created once in the database (``COMPAT``): ``instr``, ``total``,
  ``json_valid``, ``json_type``, ``json_extract``, ``json_each``, ``json_group_array`` and a ``sqlite_master`` view.
  ``json_each`` values are text, so ``x IN (SELECT value FROM json_each(?))`` compares ``x::text``.

Concurrency is SQLite's: ``BEGIN IMMEDIATE`` (and every write outside a transaction) takes one transaction-level
advisory lock per database, so writers run one at a time exactly as on SQLite (no deadlock, no serialization
failure, no read-then-write race a SQLite caller did not already handle); readers never wait. Lock waits end
after ``lock_timeout`` (the catalog's busy timeout) with SQLite's "database is locked". psycopg errors are raised
as the ``sqlite3`` exception of the same DB-API class, so every ``except sqlite3.Error`` keeps working.

psycopg is imported lazily: ``import ckptlab`` and SQLite catalogs never need it.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import sqlite3
import weakref
from urllib.parse import quote, unquote, urlsplit, urlunsplit

#: the key of the one advisory lock all writers of a database take (SQLite's write lock)
WRITE_LOCK = 0x636B7074  # "ckpt"
CONNECT_TIMEOUT_S = 10

_URL = re.compile(r"^postgres(?:ql)?:/+", re.IGNORECASE)


def is_postgres(location) -> bool:
    """Whether a ``--db`` value names a PostgreSQL database (``postgresql://`` or ``postgres://``; also the
    ``postgresql:/...`` a ``pathlib.Path`` makes of one)."""
    if location is None:
        return False
    if isinstance(location, DbUrl):
        return True
    try:
        text = os.fspath(location)
    except TypeError:
        return False
    return isinstance(text, str) and bool(_URL.match(text))


def normalize_url(location) -> str:
    """``postgresql://...`` again from whatever a path option made of it (``Path`` collapses ``//``)."""
    if isinstance(location, DbUrl):
        return location.dsn
    return _URL.sub("postgresql://", os.fspath(location), count=1)


def _bad_url(url: str) -> str | None:
    """Why ``url`` is not a URL libpq could use (``[`` without ``]``, a port that is no number in 0-65535), in
    words that never repeat the URL (its password); None when it parses."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "unbalanced [ ] around the host"
    try:
        _ = parts.port
    except ValueError:
        return "the port is not a number in 0-65535"
    return None


def check_url(url: str) -> None:
    """A ``UsageError`` (one line, exit 2, the password never in it) for a ``postgresql://`` URL that does not
    parse."""
    why = _bad_url(url)
    if why is not None:
        from ckptlab.errors import UsageError

        raise UsageError(f"not a valid PostgreSQL URL ({why}); expected "
                         "postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?OPTIONS]")


def _is_password_option(option: str) -> bool:
    return unquote(option.split("=", 1)[0]).strip().lower() == "password"


def _query_password(query: str) -> str | None:
    """The value of the last ``password=`` option of a URL's query (libpq takes the password there too)."""
    found = None
    for option in query.split("&"):
        if _is_password_option(option):
            found = unquote(option.split("=", 1)[1]) if "=" in option else ""
    return found


def url_passwords(url: str) -> list[str]:
    """Every password ``url`` carries (userinfo and ``?password=``), raw and decoded, for scrubbing messages."""
    if _bad_url(url) is not None:
        return []
    parts = urlsplit(url)
    out = []
    if parts.password:
        out += [parts.password, unquote(parts.password)]
    for option in parts.query.split("&"):
        if _is_password_option(option) and "=" in option:
            raw = option.split("=", 1)[1]
            out += [raw, unquote(raw)]
    return sorted({p for p in out if p}, key=len, reverse=True)


def redact(url: str) -> str:
    """The URL without its password (for messages, reports, logs and anything written down: never the secret):
    neither the userinfo one nor a ``password=`` query option (any case), which libpq takes as well. Left out
    rather than masked, so that the redacted URL still connects where libpq finds the password itself
    (``PGPASSWORD``, ``~/.pgpass``) or where this process saw the full URL before (``DbUrl``)."""
    if _bad_url(url) is not None:
        return "postgresql://(unparsable URL)"
    parts = urlsplit(url)
    query = parts.query
    if query:
        query = "&".join(o for o in query.split("&") if not _is_password_option(o))
    if parts.password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        user = quote(unquote(parts.username or ""), safe="")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class DbUrl(str):
    """A PostgreSQL catalog's location as ``Catalog.path``: the string is the URL without its password (safe to
    print or store in a report); ``dsn`` is the real one. Answers the few ``Path`` questions code asks a catalog
    location (``absolute``, ``exists``, ``is_file``, ``is_dir``)."""

    dsn: str
    #: redacted URL -> the full one, for URLs this process was given with a password: a location that went
    #: through ``str``/``Path`` (a web job's catalog, a plan's) connects again with it; never printed or stored
    _seen: dict[str, str] = {}

    def __new__(cls, location):
        url = normalize_url(location)
        check_url(url)
        shown = redact(url)
        if shown != url:
            cls._seen[shown] = url
        self = super().__new__(cls, shown)
        self.dsn = cls._seen.get(shown, url)
        return self

    @property
    def password(self) -> str | None:
        """The password the URL carries (a ``password=`` option wins over the userinfo one, as in libpq)."""
        parts = urlsplit(self.dsn)
        found = _query_password(parts.query)
        if found is not None:
            return found
        return unquote(parts.password) if parts.password is not None else None

    def absolute(self) -> DbUrl:
        return self

    def expanduser(self) -> DbUrl:
        return self

    def exists(self) -> bool:
        return True

    def is_file(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def __fspath__(self) -> str:  # os.fspath / Path() of it give the URL without its password
        return str(self)


def is_pg_connection(conn) -> bool:
    """Whether ``conn`` (a catalog's ``conn``) is a PostgreSQL one."""
    return isinstance(conn, PgConnection)


# -- the compatibility functions ---------------------------------------------------------------------------
#: created once per database (under the write lock, versioned in ckptlab_meta): SQLite's functions ckptlab uses
COMPAT_VERSION = 1
COMPAT = [
    "CREATE TABLE IF NOT EXISTS ckptlab_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "CREATE OR REPLACE FUNCTION instr(text, text) RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE "
    "AS 'SELECT strpos($1, $2)'",
    "CREATE OR REPLACE FUNCTION ckpt_total_bool(double precision, boolean) RETURNS double precision "
    "LANGUAGE sql IMMUTABLE AS 'SELECT $1 + CASE WHEN $2 THEN 1 ELSE 0 END'",
    "CREATE OR REPLACE AGGREGATE total(double precision) (sfunc = float8pl, stype = double precision, "
    "initcond = '0')",
    "CREATE OR REPLACE AGGREGATE total(boolean) (sfunc = ckpt_total_bool, stype = double precision, "
    "initcond = '0')",
    """CREATE OR REPLACE FUNCTION ckpt_json(doc text) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $f$
    BEGIN
        RETURN doc::jsonb;
    EXCEPTION WHEN others THEN
        RETURN NULL;
    END $f$""",
    "CREATE OR REPLACE FUNCTION ckpt_path(p text) RETURNS text[] LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT CASE WHEN p = '$' THEN '{}'::text[] ELSE string_to_array(substr(p, 3), '.') END$f$",
    "CREATE OR REPLACE FUNCTION json_valid(doc text) RETURNS boolean LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT doc IS NOT NULL AND ckpt_json(doc) IS NOT NULL$f$",
    """CREATE OR REPLACE FUNCTION ckpt_type(v jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS $f$
    SELECT CASE jsonb_typeof(v) WHEN 'string' THEN 'text'
        WHEN 'number' THEN CASE WHEN v::text ~ '^-?[0-9]+$' THEN 'integer' ELSE 'real' END
        WHEN 'boolean' THEN v::text ELSE jsonb_typeof(v) END $f$""",
    "CREATE OR REPLACE FUNCTION json_type(doc text, p text DEFAULT '$') RETURNS text LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT ckpt_type(ckpt_json(doc) #> ckpt_path(p))$f$",
    "CREATE OR REPLACE FUNCTION json_extract(doc text, p text) RETURNS text LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT ckpt_json(doc) #>> ckpt_path(p)$f$",
    """CREATE OR REPLACE FUNCTION json_each(doc text, p text DEFAULT '$')
    RETURNS TABLE(key text, value text, type text) LANGUAGE plpgsql IMMUTABLE AS $f$
    #variable_conflict use_column
    DECLARE v jsonb := ckpt_json(doc) #> ckpt_path(p);
    BEGIN
        IF jsonb_typeof(v) = 'object' THEN
            RETURN QUERY SELECT e.key, e.value #>> '{}', ckpt_type(e.value) FROM jsonb_each(v) e;
        ELSIF jsonb_typeof(v) = 'array' THEN
            RETURN QUERY SELECT (e.n - 1)::text, e.x #>> '{}', ckpt_type(e.x)
                FROM jsonb_array_elements(v) WITH ORDINALITY e(x, n);
        END IF;
    END $f$""",
    "CREATE OR REPLACE FUNCTION ckpt_group_add(a jsonb, x text) RETURNS jsonb LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT a || jsonb_build_array(CASE WHEN x ~ '^-?[0-9]+(\\.[0-9]+)?$' THEN x::jsonb ELSE to_jsonb(x) END)$f$",
    "CREATE OR REPLACE FUNCTION ckpt_group_text(a jsonb) RETURNS text LANGUAGE sql IMMUTABLE AS "
    "$f$SELECT a::text$f$",
    "CREATE OR REPLACE AGGREGATE json_group_array(text) (sfunc = ckpt_group_add, stype = jsonb, initcond = '[]', "
    "finalfunc = ckpt_group_text)",
    """CREATE OR REPLACE VIEW sqlite_master AS
    SELECT 'table'::text AS type, c.relname::text AS name, c.relname::text AS tbl_name, NULL::text AS sql
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v') AND n.nspname = current_schema()
    UNION ALL
    SELECT 'index', c.relname::text, t.relname::text, pg_get_indexdef(c.oid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid)
    UNION ALL
    SELECT 'trigger', g.tgname::text, t.relname::text, NULL FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
        JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = current_schema() AND NOT g.tgisinternal""",
]


# -- translation ------------------------------------------------------------------------------------------
class Translated:
    """A statement in PostgreSQL: ``sql`` (one or more statements to run in order; the last one's rows are the
    answer), ``named`` (``?N`` placeholders: the parameters go as ``{"pN": value}``), ``kind``: ``write`` (runs
    under the write lock), ``begin``, ``other``, ``noop``, ``changes`` (``SELECT changes()``) or ``busy``
    (``PRAGMA busy_timeout``), ``replace_table`` (``INSERT OR REPLACE``: completed with the table's key),
    ``insert_table`` (an INSERT whose ``lastrowid`` may be asked for)."""

    __slots__ = ("sql", "named", "kind", "replace_table", "insert_table", "value")

    def __init__(self, sql: list[str], named: bool = False, kind: str = "other", replace_table: str | None = None,
                 insert_table: str | None = None, value=None):
        self.sql, self.named, self.kind = sql, named, kind
        self.replace_table, self.insert_table, self.value = replace_table, insert_table, value


_WORD_AFTER = re.compile(r"\s*(\w+)")


def _placeholders(sql: str) -> tuple[str, bool, bool]:
    """``?``/``?N`` -> psycopg placeholders and ``%`` -> ``%%`` (only where the statement has placeholders),
    outside quoted strings and identifiers. Returns (sql, named, has_placeholders)."""
    out: list[str] = []
    pieces = [(kind == "code", text) for kind, text in _pieces(sql)]  # (is_code, text)
    has = any(code and "?" in text for code, text in pieces)
    named = any(code and re.search(r"\?\d", text) for code, text in pieces)
    for code, text in pieces:
        if not has:
            out.append(text)
            continue
        text = text.replace("%", "%%")
        if code:
            text = re.sub(r"\?(\d+)", r"%(p\1)s", text)
            text = text.replace("?", "%s")
        out.append(text)
    return "".join(out), named, has


_TYPES = [(re.compile(r"\bINTEGER\s+PRIMARY\s+KEY\b", re.I), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
          (re.compile(r"\bINTEGER\b", re.I), "BIGINT"), (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
          (re.compile(r"\bBLOB\b", re.I), "BYTEA"), (re.compile(r"\)\s*WITHOUT\s+ROWID\b", re.I), ")")]
_TEXT = re.compile(r"\bTEXT\b(?!\s+COLLATE\b)")  # (schema DDL writes its types in capitals)
#: "does table X exist" (asked per row by some lookups): pg_class by its (name, schema) index, not the view
_HAS_TABLE = re.compile(r"^SELECT\s+(1|count\(\*\))\s+FROM\s+sqlite_master\s+WHERE\s+type\s*=\s*'table'\s+AND\s+"
                        r"name\s*=\s*('\w+'|\?)$", re.I)
_IS_NOT = re.compile(r"\bIS\s+NOT\s+(?!NULL\b|DISTINCT\b|TRUE\b|FALSE\b)", re.I)
_NOCASE = re.compile(r"((?:\w+\.)?\w+)\s+COLLATE\s+NOCASE\b", re.I)
_IN_JSON = re.compile(r"((?:\w+\.)?\w+)\s+IN\s+\(\s*SELECT\s+value\s+FROM\s+json_each\(", re.I)
_UNARY_PLUS = re.compile(r"((?:ORDER\s+BY|,)\s*)\+(?=[A-Za-z_])", re.I)
_TRIGGER = re.compile(r"^\s*CREATE\s+TRIGGER\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+(.*?)\s+ON\s+(\w+)\s*(?:WHEN\s+(.*?))?"
                      r"\s*BEGIN\b(.*)\bEND\s*;?\s*$", re.I | re.S)
_FTS = re.compile(r"^\s*CREATE\s+VIRTUAL\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s+USING\s+fts5\s*\((.*)\)\s*;?\s*$",
                  re.I | re.S)
_PRAGMA = re.compile(r"^\s*PRAGMA\s+(\w+)\s*(?:=\s*(.*?)|\((\w+)\))?\s*;?\s*$", re.I | re.S)
_INSERT = re.compile(r"^\s*INSERT\s+(?:OR\s+(IGNORE|REPLACE)\s+)?INTO\s+(\w+)", re.I)


def _pieces(sql: str) -> list[tuple[str, str]]:
    """``sql`` cut into ``("code" | "str" | "ident" | "comment", text)`` pieces: quoted strings (``'...'``),
    quoted identifiers (``"..."``), ``--`` and ``/* */`` comments, and the code between them. Every rewrite of
    ``translate`` looks at code only (a ``'`` in a comment or ``IS NOT`` in a string is not SQL)."""
    out: list[tuple[str, str]] = []
    i, n, start = 0, len(sql), 0
    while i < n:
        ch = sql[i]
        if ch in ("'", '"'):
            j = i + 1
            while j < n:
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            kind, end = ("str" if ch == "'" else "ident"), min(j + 1, n)
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            kind, end = "comment", (n if j < 0 else j)
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            kind, end = "comment", (n if j < 0 else j + 2)
        else:
            i += 1
            continue
        if start < i:
            out.append(("code", sql[start:i]))
        out.append((kind, sql[i:end]))
        i = start = end
    if start < n:
        out.append(("code", sql[start:]))
    return out


def _without_comments(sql: str) -> str:
    """``sql`` with its comments replaced by a space (nothing appended to a statement lands in a ``--`` comment,
    no quote in a comment opens a string)."""
    return "".join(" " if kind == "comment" else text for kind, text in _pieces(sql))


def _on_code(sql: str, fn) -> str:
    """``fn`` applied to the code outside quoted strings and identifiers; the quoted pieces kept as they are,
    each stood in for by a marker ``fn`` cannot match (so that a rewrite sees a whole expression)."""
    pieces = _pieces(sql)
    marks = {}
    code = []
    for kind, text in pieces:
        if kind == "code":
            code.append(text)
        else:
            key = f"\x00{len(marks)}\x00"
            marks[key] = text
            code.append(key)
    out = fn("".join(code))
    return _MARK.sub(lambda m: marks[m.group(0)], out)


_MARK = re.compile("\x00\\d+\x00")  # where _on_code took a quoted piece out


_OPERAND = r"(?:(?:\w+\.)?\w+|\?\d*)"
_CMP = r"(?:==|=|!=|<>|<=|>=|<|>|\bNOT\s+LIKE\b|\bLIKE\b)"
#: ``a OP b COLLATE NOCASE`` and ``a COLLATE NOCASE OP b``: SQLite compares both sides case-insensitively
_NOCASE_RIGHT = re.compile(rf"({_OPERAND})\s*({_CMP})\s*({_OPERAND})\s+COLLATE\s+NOCASE\b", re.I)
_NOCASE_LEFT = re.compile(rf"({_OPERAND})\s+COLLATE\s+NOCASE\s*({_CMP})\s*({_OPERAND})", re.I)
#: a column sorted or grouped case-insensitively (ORDER BY / GROUP BY lists): followed by , ) ASC DESC or the end
_NOCASE_SORT = re.compile(r"(?<![?\w.])((?:\w+\.)?[A-Za-z_]\w*)\s+COLLATE\s+NOCASE\b"
                          r"(?=\s*(?:,|\)|$|\bASC\b|\bDESC\b|\bNULLS\b|\bLIMIT\b|\bOFFSET\b))", re.I)
_NOCASE_ANY = re.compile(r"\bCOLLATE\s+NOCASE\b", re.I)


def _nocase(code: str) -> str:
    code = _NOCASE_RIGHT.sub(r"lower(\1) \2 lower(\3)", code)
    code = _NOCASE_LEFT.sub(r"lower(\1) \2 lower(\3)", code)
    code = _NOCASE_SORT.sub(r"lower(\1)", code)
    if _NOCASE_ANY.search(code):
        shown = " ".join(_MARK.sub("...", code).split())[:200]
        raise sqlite3.OperationalError(
            "COLLATE NOCASE in a form the PostgreSQL translation does not handle (only 'a OP b COLLATE NOCASE', "
            "'a COLLATE NOCASE OP b' on columns and parameters, and a sorted column; not DDL): write lower() "
            f"instead: {shown}")
    return code


def _code_expressions(code: str) -> str:
    code = _IS_NOT.sub("IS DISTINCT FROM ", code)
    code = _nocase(code)
    code = _IN_JSON.sub(r"(\1)::text IN (SELECT value FROM json_each(", code)
    return _UNARY_PLUS.sub(r"\1", code)  # SQLite's "+col" (keeps the planner off an index) is no text operator here


def _expressions(sql: str) -> str:
    """The expression rewrites every statement gets (outside DDL types), on its code only (never inside a
    string literal, a quoted identifier or a comment)."""
    return _on_code(sql, _code_expressions)


#: a statement that writes: INSERT/UPDATE/DELETE/REPLACE, also behind a ``WITH`` (a data-modifying CTE or body)
_WRITE = re.compile(r"^(INSERT|UPDATE|DELETE|REPLACE)\b", re.I)
_WITH_WRITE = re.compile(r"^WITH\b.*\b(INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM)\b", re.I | re.S)


def _is_write(body: str) -> bool:
    code = "".join(text if kind == "code" else " '' " for kind, text in _pieces(body))
    return bool(_WRITE.match(code) or _WITH_WRITE.match(code))


def _before_returning(sql: str, clause: str) -> str:
    """``clause`` (``ON CONFLICT ...``) where PostgreSQL wants it: before a RETURNING (in code), else at the end."""
    code = "".join(text if kind == "code" else " " * len(text) for kind, text in _pieces(sql))
    found = list(re.finditer(r"\bRETURNING\b", code, re.I))
    if not found:
        return sql + clause
    at = found[-1].start()
    return sql[:at].rstrip() + clause + " " + sql[at:]


def _trigger(m: re.Match) -> list[str]:
    name, when_what, table, cond, body = m.groups()
    stmts = [s.strip() for s in body.split(";") if s.strip()]
    lines = []
    for s in stmts:
        t = _translate_one(s)
        lines.append(t.sql[-1].rstrip().rstrip(";") + ";")
    fn = (f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $ckpt$\nBEGIN\n"
          + "\n".join(lines) + "\nRETURN NULL;\nEND $ckpt$")
    when = f" WHEN ({_expressions(cond)})" if cond else ""
    trig = f"CREATE TRIGGER {name} {when_what} ON {table} FOR EACH ROW{when} EXECUTE FUNCTION {name}_fn()"
    return [fn, trig]


def _translate_one(sql: str) -> Translated:
    body = _without_comments(sql).strip().rstrip(";").strip()
    head = body[:40].upper()
    if head.startswith("BEGIN"):
        return Translated(["BEGIN", f"SELECT pg_advisory_xact_lock({WRITE_LOCK})"], kind="begin")
    m = _PRAGMA.match(body)
    if m:
        name, value, arg = m.group(1).lower(), m.group(2), m.group(3)
        if name == "user_version" and value is None:
            return Translated(["SELECT coalesce((SELECT value FROM ckptlab_meta WHERE key = 'user_version'), 0)"])
        if name == "user_version":
            return Translated([f"INSERT INTO ckptlab_meta(key, value) VALUES ('user_version', {int(value)}) "
                               "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"], kind="write")
        if name == "table_info":
            return Translated([
                "SELECT ordinal_position - 1, column_name::text, data_type::text, (is_nullable = 'NO')::int, "
                "column_default::text, 0 FROM information_schema.columns WHERE table_schema = current_schema() "
                f"AND table_name = '{arg}' ORDER BY ordinal_position"])
        if name == "busy_timeout" and value is not None:
            return Translated([f"SET lock_timeout = {int(value)}"], kind="busy", value=int(value))
        return Translated([], kind="noop")
    if re.match(r"^SELECT\s+changes\(\s*\)$", body, re.I):
        return Translated([], kind="changes")
    m = _HAS_TABLE.match(body)
    if m:
        text, named, _has = _placeholders(
            f"SELECT {m.group(1)} FROM pg_class c WHERE c.relname = {m.group(2)} AND c.relkind IN ('r', 'p', 'v') "
            "AND c.relnamespace = current_schema()::regnamespace")
        return Translated([text], named=named)
    m = _TRIGGER.match(body)
    if m:
        return Translated(_trigger(m), kind="other")
    m = _FTS.match(body)
    if m:
        cols = [c.strip() for c in m.group(2).split(",") if c.strip() and "=" not in c]
        return Translated([f"CREATE TABLE {m.group(1)} (rowid BIGINT PRIMARY KEY, "
                           + ", ".join(f"{c} TEXT" for c in cols) + ")"])
    if re.match(r"^(CREATE\s+(TEMP\s+|TEMPORARY\s+)?TABLE|ALTER\s+TABLE)\b", body, re.I):
        if _NOCASE_ANY.search("".join(t for k, t in _pieces(body) if k == "code")):
            raise sqlite3.OperationalError("COLLATE NOCASE in a table definition has no PostgreSQL translation "
                                           "(compare with lower() instead)")

        def types(code: str) -> str:
            for pat, rep in _TYPES:
                code = pat.sub(rep, code)
            # text compares and sorts as in SQLite (BINARY: by code point, lower() on ASCII only) whatever the
            # database's default collation (en_US, ICU...): names, paths and hashes order the same in both
            return _TEXT.sub('TEXT COLLATE "C"', code)

        body = _on_code(body, types)
    body = _expressions(body)
    kind = "write" if _is_write(body) else "other"
    replace_table = insert_table = None
    m = _INSERT.match(body)
    if m:
        mode, table = (m.group(1) or "").upper(), m.group(2)
        body = body[:m.start()] + f"INSERT INTO {table}" + body[m.end():]
        if mode == "IGNORE":
            body = _before_returning(body, " ON CONFLICT DO NOTHING")
        elif mode == "REPLACE":
            replace_table = table
        if "RETURNING" not in body.upper():
            insert_table = table
    text, named, _has = _placeholders(body)
    return Translated([text], named=named, kind=kind, replace_table=replace_table, insert_table=insert_table)


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> Translated:
    """``sql`` (the SQLite dialect ckptlab writes) in PostgreSQL; cached, so each statement is translated once."""
    return _translate_one(sql)


# -- errors -----------------------------------------------------------------------------------------------
_CLASSES = ("IntegrityError", "DataError", "NotSupportedError", "ProgrammingError", "InternalError",
            "OperationalError", "InterfaceError", "DatabaseError", "Error")
#: SQLSTATE classes/codes with the SQLite wording ``catalog.write_failure`` recognises
_WORDS = {"53": "disk is full", "25006": "attempt to write a readonly database", "55P03": "database is locked",
          "57014": "database is locked", "40P01": "database is busy (deadlock)", "40001": "database is busy",
          "08": "unable to open database", "28": "unable to open database (authentication failed)",
          "3D": "unable to open database (no such database)"}


def sqlite_error(e: Exception, dsn: str | None = None) -> sqlite3.Error:
    """The ``sqlite3`` exception of the same DB-API class as psycopg's ``e``, with its message (the password of
    ``dsn`` never in it) prefixed with the SQLite wording ckptlab's callers test for."""
    import psycopg

    cls = sqlite3.DatabaseError
    for name in _CLASSES:
        if isinstance(e, getattr(psycopg, name)):
            # SQLite reports bad SQL (no such column, a syntax error) as OperationalError
            cls = sqlite3.OperationalError if name == "ProgrammingError" else getattr(sqlite3, name)
            break
    code = getattr(getattr(e, "diag", None), "sqlstate", None) or getattr(e, "sqlstate", None) or ""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if dsn:
        for pw in url_passwords(dsn):
            msg = msg.replace(pw, "***")
    word = _WORDS.get(code) or _WORDS.get(code[:2])
    if word and cls is not sqlite3.IntegrityError:
        cls = sqlite3.OperationalError
        msg = f"{word}: {msg}"
    return cls(msg)


# -- the connection ---------------------------------------------------------------------------------------
class PgCursor:
    """What ``PgConnection.execute`` returns: the rows of the statement (already fetched) and its counts."""

    def __init__(self, rows: list | None, rowcount: int = -1, lastrowid: int | None = None, description=None):
        self._rows = rows or []
        self._i = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid
        self.description = description

    def fetchone(self):
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> list:
        out = self._rows[self._i:]
        self._i = len(self._rows)
        return out

    def fetchmany(self, size: int = 1) -> list:
        out = self._rows[self._i:self._i + size]
        self._i += len(out)
        return out

    def __iter__(self):
        while self._i < len(self._rows):
            self._i += 1
            yield self._rows[self._i - 1]

    def close(self) -> None:
        self._rows = []


#: names of the server-side cursors ``PgConnection.stream`` opens (unique per process)
_STREAM_IDS = itertools.count(1)
#: statements ``stream`` hands to a server-side cursor (anything else runs as ``execute``)
_READ = re.compile(r"^\s*(SELECT|WITH)\b", re.I)


class PgStream:
    """What ``PgConnection.stream`` returns: the rows of one SELECT, pulled from a named server-side cursor
    (``DECLARE ... WITH HOLD``) ``size`` rows per round trip, never the whole answer in this process. The
    cursor outlives the statement's transaction (WITH HOLD), so the connection stays free for other statements
    (a lookup per row, a write) while the rows are read; it is closed when the rows run out or by ``close``."""

    def __init__(self, owner: PgConnection, cur, size: int):
        self._owner, self._cur, self._size = owner, cur, size
        self.description = cur.description
        self.rowcount = -1
        self.lastrowid = None
        self.pulled = 0  # rows received from the server so far

    def _pull(self, n: int | None) -> list:
        if self._cur is None:
            return []
        try:
            rows = self._cur.fetchmany(n) if n is not None else self._cur.fetchall()
        except self._owner._psycopg.Error as e:
            self.close()
            raise sqlite_error(e, self._owner.dsn) from None
        self.pulled += len(rows)
        if n is None or len(rows) < n:
            self.close()
        return rows

    def fetchmany(self, size: int | None = None) -> list:
        return self._pull(size or self._size)

    def fetchone(self):
        rows = self._pull(1)
        return rows[0] if rows else None

    def fetchall(self) -> list:
        return self._pull(None)

    def __iter__(self):
        while True:
            rows = self._pull(self._size)
            if not rows:
                return
            yield from rows

    def close(self) -> None:
        cur, self._cur = self._cur, None
        if cur is not None:
            self._owner._close_stream(cur)

    def __del__(self):  # dropped unfinished: closed before the connection's next stream (no I/O from the GC)
        cur, self._cur = getattr(self, "_cur", None), None
        if cur is not None:
            self._owner._pending.append(cur)


_BEGIN_LOCKED = f"BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"

#: where a parameter's type is the column's (so a server-side parameter, sent untyped or as its Python type,
#: means what the client-side literal means): ``col <op> %s``, ``col IN (%s, ...)``, ``VALUES (%s, ...)``, LIMIT/OFFSET
_TYPED_SLOT = re.compile(r"\b\w+\s*(?:=|!=|<>|<=|>=|<|>)\s*%s\b|\b\w+\s+IN\s*\(\s*%s(?:\s*,\s*%s)*\s*\)"
                         r"|\bVALUES\s*\(\s*%s(?:\s*,\s*%s)*\s*\)|\b(?:LIMIT|OFFSET)\s+%s\b", re.I)
_STAR = re.compile(r"(?:SELECT|,)\s*(?:\w+\.)?\*", re.I)
_BINDABLE_TYPES = (int, float, str, bytes, bytearray, memoryview, type(None))


@functools.lru_cache(maxsize=2048)
def server_bindable(sql: str) -> bool:
    """Whether ``sql`` (translated, positional ``%s``) may go with server-side parameters, and so be prepared
    by psycopg after a few runs: every parameter sits where its column gives it a type (``_TYPED_SLOT``), no
    ``%%`` (a literal percent sign) and no ``SELECT *`` (a prepared ``*`` breaks when a migration adds a
    column). Anything else keeps the client-side binding that types values by their context, as SQLite does."""
    n = sql.count("%s")
    if not n or "%%" in sql or "%(" in sql or _STAR.search(sql):
        return False
    return sum(m.group(0).count("%s") for m in _TYPED_SLOT.finditer(sql)) == n


def _param(v):
    return int(v) if isinstance(v, bool) else v


def _params(t: Translated, params):
    if params is None:
        return None
    if isinstance(params, dict):
        return {k: _param(v) for k, v in params.items()}
    values = [_param(v) for v in params]
    if t.named:
        return {f"p{i}": v for i, v in enumerate(values, start=1)}
    return values


class PgConnection:
    """A psycopg 3 connection (autocommit; explicit ``BEGIN`` as ckptlab writes it) behind the ``sqlite3``
    interface ckptlab uses. ``dsn``: a ``postgresql://`` URL; ``busy_timeout_s``: how long a writer waits for
    another (SQLite's busy timeout, here ``lock_timeout``)."""

    def __init__(self, dsn: str, *, busy_timeout_s: float = 30):
        try:
            import psycopg
        except ImportError:
            raise sqlite3.OperationalError("unable to open database: a postgresql:// catalog needs psycopg: "
                                           "pip install 'ckptlab[postgres]'") from None
        self.dsn = dsn
        self._psycopg = psycopg
        try:
            # client-side binding: values go as SQL literals, typed by their context as in SQLite's dynamic
            # typing (a None in "? IS NOT NULL", a str in "length(?)"); server-side parameters need a type each
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                         application_name="ckptlab", cursor_factory=psycopg.ClientCursor)
        except psycopg.Error as e:
            raise sqlite_error(e, dsn) from None
        self._changes = 0
        self._streams: weakref.WeakSet = weakref.WeakSet()  # open PgStreams (closed with the connection)
        self._pending: list = []  # server-side cursors to close before the next stream
        self._keys: dict[str, tuple[list[str], list[str]]] = {}
        self.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")

    # -- the sqlite3 interface ------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self._conn.info.transaction_status != TransactionStatus.IDLE

    def execute(self, sql: str, params=()) -> PgCursor:
        t = translate(sql)
        if t.kind == "noop":
            return PgCursor([])
        if t.kind == "changes":
            return PgCursor([(self._changes,)])
        if t.kind == "busy":
            self._busy_ms = t.value
        try:
            if t.kind == "write" and not self.in_transaction:
                return self._autocommit_write(t, params)
            return self._run(t, params)
        except self._psycopg.Error as e:
            raise sqlite_error(e, self.dsn) from None

    def executemany(self, sql: str, seq) -> PgCursor:
        t = translate(sql)
        rows = [_params(t, p) for p in seq]
        if not rows:
            return PgCursor([], rowcount=0)
        try:
            own = t.kind == "write" and not self.in_transaction
            if own:
                self._begin()
            try:
                sql = self._final_sql(t)
                with self._cursor(sql, rows[0]) as cur:  # server-side binding: psycopg pipelines the rows
                    cur.executemany(sql, rows)
                    self._changes = cur.rowcount
                if own:
                    self._conn.execute("COMMIT")
            except BaseException:
                if own and self.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            return PgCursor([], rowcount=self._changes)
        except self._psycopg.Error as e:
            raise sqlite_error(e, self.dsn) from None

    def stream(self, sql: str, params=(), size: int = 1000):
        """``execute`` for a large read: a SELECT's rows come from a server-side cursor ``size`` at a time
        (``PgStream``: ``fetchmany``/``fetchone``/``fetchall``/iteration, ``close``) instead of all at once.
        Values are bound client-side as for ``execute`` (the SQLite typing), then the statement is declared
        ``WITH HOLD``: outside a transaction the server keeps the finished answer (for an ordered read of a whole
        table it sorts it all anyway) and this process holds one batch. Not a SELECT: the same as ``execute``."""
        t = translate(sql)
        if t.kind != "other" or not t.sql or not _READ.match(t.sql[-1]):
            return self.execute(sql, params)
        self._close_pending()
        try:
            for s in t.sql[:-1]:
                self._conn.execute(s)
            p = _params(t, params)
            query = t.sql[-1]
            if p:
                query = self._psycopg.ClientCursor(self._conn).mogrify(query, p)
            cur = self._conn.cursor(name=f"ckpt_stream_{os.getpid()}_{next(_STREAM_IDS)}", withhold=True)
            cur.itersize = size
            try:
                cur.execute(query)
            except BaseException:
                self._close_stream(cur)
                raise
        except self._psycopg.Error as e:
            raise sqlite_error(e, self.dsn) from None
        out = PgStream(self, cur, size)
        self._streams.add(out)
        return out

    def _close_stream(self, cur) -> None:
        """Close a server-side cursor now, or - when the connection is busy (a stream dropped by the garbage
        collector in the middle of another statement) - before the next stream opens."""
        lock = getattr(self._conn, "lock", None)
        if lock is not None and lock.locked():
            self._pending.append(cur)
            return
        try:
            cur.close()
        except self._psycopg.Error:  # the connection is gone: the server dropped the cursor with it
            pass

    def _close_pending(self) -> None:
        while self._pending:
            try:
                self._pending.pop().close()
            except self._psycopg.Error:
                pass

    def commit(self) -> None:
        if self.in_transaction:
            self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        for st in list(self._streams):
            st._cur = None  # the server drops its cursors with the session
        self._conn.close()

    # -- plumbing ---------------------------------------------------------------------------------------
    def _begin(self) -> None:
        # one round trip: the client cursor sends both statements as one simple query
        self._conn.execute(_BEGIN_LOCKED)

    def _autocommit_write(self, t: Translated, params) -> PgCursor:
        """A write outside a transaction: its own transaction under the write lock (SQLite's implicit one) - sent
        as one simple query (BEGIN, the lock, the statement with its values bound client-side, COMMIT): one round
        trip instead of four. On an error the server skips the rest; the transaction is rolled back here."""
        if len(t.sql) == 1:
            return self._write_in_one(t, params)
        self._begin()
        try:
            cur = self._run(t, params)
            self._conn.execute("COMMIT")
            return cur
        except BaseException:
            if self.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _cursor(self, sql: str, params):
        """A server-side-binding cursor (prepared by psycopg from a statement's 5th run) where ``server_bindable``
        and every value is a plain one; the client-side one otherwise."""
        if self.prepare and isinstance(params, list) and server_bindable(sql) \
                and all(isinstance(v, _BINDABLE_TYPES) for v in params):
            return self._psycopg.Cursor(self._conn)
        return self._conn.cursor()

    #: False: every statement bound client-side (e.g. behind a pooler that cannot keep prepared statements)
    prepare = os.environ.get("CKPTLAB_PG_PREPARE", "1") != "0"

    def _write_in_one(self, t: Translated, params) -> PgCursor:
        sql = self._final_sql(t)
        ident = self._table_keys(t.insert_table)[1] if t.insert_table else []
        returning = "id" in ident
        if returning:
            sql += " RETURNING id"
        p = _params(t, params)
        try:
            with self._conn.cursor() as cur:
                stmt = cur.mogrify(sql, p) if p else sql
                cur.execute(f"{_BEGIN_LOCKED}; {stmt}; COMMIT")
                cur.nextset()
                cur.nextset()  # the statement's own result (after BEGIN and the lock)
                self._changes = cur.rowcount
                if returning:
                    row = cur.fetchone()
                    return PgCursor([], rowcount=cur.rowcount, lastrowid=row[0] if row else None)
                # a statement's own RETURNING: its rows, as SQLite gives them
                rows = cur.fetchall() if cur.description is not None else []
                return PgCursor(rows, rowcount=cur.rowcount, description=cur.description)
        except BaseException:
            if self.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    def _table_keys(self, table: str) -> tuple[list[str], list[str]]:
        """(primary key columns, identity columns) of ``table``, read once per connection."""
        if table not in self._keys:
            pk = [r[0] for r in self._conn.execute(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = to_regclass(%s) AND i.indisprimary "
                "ORDER BY array_position(i.indkey::int2[], a.attnum)", (table,)).fetchall()]
            ident = [r[0] for r in self._conn.execute(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attidentity != ''",
                (table,)).fetchall()]
            self._keys[table] = (pk, ident)
        return self._keys[table]

    def _final_sql(self, t: Translated) -> str:
        sql = t.sql[-1]
        if t.replace_table:
            pk, _ident = self._table_keys(t.replace_table)
            m = re.match(r"^\s*INSERT\s+INTO\s+\w+\s*\(([^)]*)\)", sql, re.I)
            cols = [c.strip() for c in m.group(1).split(",")] if m else []
            rest = [c for c in cols if c not in pk]
            if pk and rest:
                sql = _before_returning(sql, f" ON CONFLICT ({', '.join(pk)}) DO UPDATE SET "
                                        + ", ".join(f"{c} = EXCLUDED.{c}" for c in rest))
            elif pk:
                sql = _before_returning(sql, " ON CONFLICT DO NOTHING")
        return sql

    def _run(self, t: Translated, params) -> PgCursor:
        if t.kind == "begin":
            self._begin()
            return PgCursor([])
        for s in t.sql[:-1]:
            self._conn.execute(s)
        if not t.sql:
            return PgCursor([])
        sql = self._final_sql(t)
        ident = self._table_keys(t.insert_table)[1] if t.insert_table else []
        returning = "id" in ident
        if returning:
            sql += " RETURNING id"
        p = _params(t, params)
        with self._cursor(sql, p) as cur:
            cur.execute(sql, p if p else None)
            if t.kind == "write":  # SQLite's changes(): the last INSERT/UPDATE/DELETE's count, not a SELECT's
                self._changes = cur.rowcount
            if returning:
                row = cur.fetchone()
                return PgCursor([], rowcount=cur.rowcount, lastrowid=row[0] if row else None)
            rows = cur.fetchall() if cur.description is not None else []
            return PgCursor(rows, rowcount=cur.rowcount, description=cur.description)

    def ensure_compat(self) -> None:
        """Create the SQLite functions and the meta table (once per database, under the write lock, so that two
        processes opening a new catalog at once do not collide)."""
        have = self._conn.execute("SELECT to_regclass('ckptlab_meta') IS NOT NULL").fetchone()[0]
        if have and self._compat_version() >= COMPAT_VERSION:
            return
        try:
            self._begin()
            if self._conn.execute("SELECT to_regclass('ckptlab_meta') IS NULL").fetchone()[0] \
                    or self._compat_version() < COMPAT_VERSION:
                for s in COMPAT:
                    self._conn.execute(s)
                self._conn.execute("INSERT INTO ckptlab_meta(key, value) VALUES ('compat', %s) ON CONFLICT (key) "
                                   "DO UPDATE SET value = EXCLUDED.value", (COMPAT_VERSION,))
            self._conn.execute("COMMIT")
        except self._psycopg.Error as e:
            if self.in_transaction:
                self._conn.execute("ROLLBACK")
            raise sqlite_error(e, self.dsn) from None

    def _compat_version(self) -> int:
        row = self._conn.execute("SELECT value FROM ckptlab_meta WHERE key = 'compat'").fetchone()
        return row[0] if row else 0

    def advisory_lock(self, keys: list[int], on_wait=None):
        """Session advisory locks on ``keys`` (taken in sorted order, so two holders of overlapping sets never
        deadlock); returns a function that releases them. ``on_wait`` is called once if any is held by another."""
        keys = sorted(set(keys))
        waited = False
        try:
            for k in keys:
                got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (k,)).fetchone()[0]
                if not got:
                    if on_wait is not None and not waited:
                        on_wait()
                        waited = True
                    self._conn.execute("SET lock_timeout = 0")
                    try:
                        self._conn.execute("SELECT pg_advisory_lock(%s)", (k,))
                    finally:
                        self._conn.execute("RESET lock_timeout")
                        self.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        except self._psycopg.Error as e:
            raise sqlite_error(e, self.dsn) from None

        def release() -> None:
            for k in keys:
                try:
                    self._conn.execute("SELECT pg_advisory_unlock(%s)", (k,))
                except self._psycopg.Error:  # the connection is gone: the server released them
                    return

        return release

    _busy_ms = 30000
