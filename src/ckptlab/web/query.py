"""The library page's question: which catalogued files match these filters and this search, in what order, one
page at a time (``search``), and what each filter can be set to (``facets``).

Answered from the library index (``web.index``: one derived row per present file, indexed columns for the
filters and sorts, FTS5 for the text), which ``search`` and ``facets`` first bring up to date with what the CLI
or a job changed since (``index.refresh``: only the rows the catalog's triggers marked). Never loads all records.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlencode

from ckptlab.errors import BadChoiceError, CkptlabError, UsageError
from ckptlab.library.catalog import Catalog
from ckptlab.web import index
from ckptlab.web.index import precision_of  # noqa: F401 - part of this module's interface

SORTS = ("name", "size", "added", "family")
SAFETY = ("safe", "suspicious", "malicious", "corrupt", "unchecked")
PER_PAGE = (30, 60, 120, 240)
MAX_QUERY = 200  # characters of search text kept


def page_number(params: Mapping) -> int:
    """The ``page`` query parameter of a paged page (1 when absent); ``UsageError`` unless a whole number >= 1."""
    try:
        n = int(params.get("page") or 1)
    except ValueError:
        raise UsageError("page: use a whole number from 1") from None
    if n < 1:
        raise UsageError("page: use a whole number from 1")
    return n


@dataclass
class Filters:
    """What the library page asks for. Multi-valued filters match any of their values; filters combine with AND.
    ``linked``/``duplicates``/``updates``: None = either, True/False = only those that are / are not."""

    q: str = ""
    kind: tuple[str, ...] = ()
    family: tuple[str, ...] = ()     # family ids (sd1, sdxl, pony...: see facets for the labels UIs use)
    format: tuple[str, ...] = ()     # safetensors, ckpt, diffusers, gguf, ...
    precision: tuple[str, ...] = ()  # fp32, fp16, bf16, fp8, mixed, quantized
    safety: tuple[str, ...] = ()     # SAFETY
    folder: tuple[str, ...] = ()     # the UI folder (a1111 Lora, comfyui loras, ...)
    tag: tuple[str, ...] = ()        # CivitAI / sidecar tags
    linked: bool | None = None       # has a CivitAI link
    duplicates: bool | None = None   # has another present copy of the same bytes
    updates: bool | None = None      # CivitAI has a newer version of its model
    sort: str = "name"
    desc: bool = False
    page: int = 1
    per_page: int = 60

    @classmethod
    def from_query(cls, params: Mapping[str, object]) -> Filters:
        """From query parameters (a Starlette ``QueryParams`` or a dict of str / list of str). Unknown names are
        ignored; a bad value raises ``UsageError`` (the page answers 400 with its message)."""
        def values(name: str) -> list[str]:
            getlist = getattr(params, "getlist", None)
            raw = getlist(name) if getlist else params.get(name, [])
            raw = [raw] if isinstance(raw, str) else list(raw or [])
            out: list[str] = []
            for v in raw:
                out += [p.strip() for p in str(v).split(",") if p.strip()]
            return out

        def one(name: str) -> str | None:
            v = values(name)
            return v[-1] if v else None

        def tri(name: str) -> bool | None:
            v = one(name)
            if v in (None, "", "any"):
                return None
            if v.lower() in ("1", "yes", "true", "on"):
                return True
            if v.lower() in ("0", "no", "false", "off"):
                return False
            raise UsageError(f"{name}={v!r}: use yes, no or any")

        def number(name: str, default: int) -> int:
            v = one(name)
            if v is None:
                return default
            try:
                return int(v)
            except ValueError:
                raise UsageError(f"{name}={v!r}: not a whole number") from None

        f = cls(q=(one("q") or "")[:MAX_QUERY], kind=tuple(values("kind")), family=tuple(values("family")),
                format=tuple(values("format")), precision=tuple(values("precision")),
                safety=tuple(values("safety")), folder=tuple(values("folder")), tag=tuple(values("tag")),
                linked=tri("linked"), duplicates=tri("duplicates"), updates=tri("updates"),
                sort=one("sort") or "name", desc=tri("desc") or False, page=number("page", 1),
                per_page=number("per_page", 60))
        if f.sort not in SORTS:
            raise BadChoiceError(f"sort={f.sort!r}: use one of {', '.join(SORTS)}")
        bad = [s for s in f.safety if s not in SAFETY]
        if bad:
            raise BadChoiceError(f"safety={bad[0]!r}: use one of {', '.join(SAFETY)}")
        if f.page < 1:
            raise UsageError("page must be 1 or more")
        if f.per_page not in PER_PAGE:
            raise UsageError(f"per_page={f.per_page}: use one of {', '.join(map(str, PER_PAGE))}")
        return f

    def to_query(self, **changes) -> str:
        """These filters (with ``changes``) as a query string, default values left out."""
        f = self if not changes else Filters(**{**{x.name: getattr(self, x.name) for x in fields(self)}, **changes})
        default = Filters()
        pairs: list[tuple[str, str]] = []
        for x in fields(f):
            v = getattr(f, x.name)
            if v == getattr(default, x.name):
                continue
            if isinstance(v, tuple):
                pairs += [(x.name, s) for s in v]
            elif isinstance(v, bool):
                pairs.append((x.name, "yes" if v else "no"))
            else:
                pairs.append((x.name, str(v)))
        return urlencode(pairs)


@dataclass
class Card:
    """One catalogued file as the library shows it."""

    id: int
    name: str                      # display name: the CivitAI model name when linked, else the file stem
    file_name: str
    path: str
    kind: str | None
    subtype: str | None            # LoCon / LoHa / LoKr / DoRA for LoRAs; inpaint, refiner... for checkpoints
    family: str | None             # family id
    base_model: str | None         # the name UIs use ("SD 1.5", "SDXL 1.0", "Pony")
    format: str | None
    precision: str | None
    size: int | None
    safety: str | None             # None: never checked
    duplicates: int = 0            # other present files with the same bytes
    update_available: bool = False
    linked: bool = False
    has_preview: bool = False
    added: float = 0.0             # first seen by a scan
    folder: str | None = None      # the UI folder it sits in
    version_name: str | None = None
    sha256: str | None = None
    tags: tuple[str, ...] = ()      # CivitAI / sidecar tags
    family_label: str | None = None  # the family's name in UIs ("SD 1.5"), whatever CivitAI calls the base model
    folder_label: str | None = None  # "Lora (A1111/Forge)"


@dataclass
class Page:
    cards: list[Card]
    total: int
    filters: Filters
    took_ms: float = 0.0
    facets: dict = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.filters.per_page))



_COLS = ("file_id, name, file_name, path, kind, subtype, family, base_model, format, precision, size, safety, dups, "
         "update_available, linked, has_preview, added, folder, version_name, sha256, tags, folder_label")
_ORDER = {"name": ("sort_name",), "size": ("size", "sort_name"), "added": ("added", "sort_name"),
          "family": ("family_key", "sort_name")}
_TRI = {"linked": "linked", "updates": "update_available"}


def _where(cat: Catalog, f: Filters) -> tuple[list[str], list]:
    """SQL conditions (AND) and their arguments for ``f``: any of a filter's values, every filter."""
    from ckptlab.library.ui_folders import KIND_GROUPS

    where: list[str] = []
    args: list = []

    def any_of(col: str, values) -> None:
        values = sorted(set(values))
        where.append(f"w.{col} IN ({', '.join('?' * len(values))})")
        args.extend(values)

    text = index.text_condition(cat, f.q)
    if text is not None:
        where.append(f"w.file_id IN (SELECT rowid FROM web_index_fts WHERE {text[0]})")
        args.extend(text[1])
    if f.kind:
        any_of("kind", [k for v in f.kind for k in KIND_GROUPS.get(v.lower(), (v.lower(),))])
    if f.family:
        any_of("family", [v.lower() for v in f.family])
    for name, col in (("format", "format"), ("precision", "precision"), ("safety", "safety_key"),
                      ("folder", "folder")):
        if getattr(f, name):
            any_of(col, getattr(f, name))
    if f.tag:
        tags = sorted({t.strip().casefold() for t in f.tag})
        where.append(f"w.file_id IN (SELECT file_id FROM web_index_tags WHERE tag IN ({', '.join('?' * len(tags))}))")
        args.extend(tags)
    for name, col in _TRI.items():
        if getattr(f, name) is not None:
            where.append(f"w.{col} = ?")
            args.append(int(getattr(f, name)))
    if f.duplicates is not None:
        where.append("w.dups > 0" if f.duplicates else "w.dups = 0")
    return where, args


def _card(row) -> Card:
    (fid, name, file_name, path, kind, subtype, family, base_model, fmt, precision, size, safety, dups, update,
     linked, has_preview, added, folder, version_name, sha256, tags, folder_label) = row
    return Card(id=fid, name=name, file_name=file_name, path=path, kind=kind, subtype=subtype, family=family,
                base_model=base_model, format=fmt, precision=precision, size=size, safety=safety, duplicates=dups,
                update_available=bool(update), linked=bool(linked), has_preview=bool(has_preview), added=added,
                folder=folder, version_name=version_name, sha256=sha256,
                tags=tuple(json.loads(tags)) if tags else (), family_label=index.family_label(family),
                folder_label=folder_label)


def search(cat: Catalog, f: Filters) -> Page:
    """The page of cards ``f`` asks for (sorted by ``f.sort``, ties by name then id, all in ``f.desc``'s
    direction), how many match in all, and the library's facets. The index is refreshed first, so a change
    the CLI or a job made is seen by the next answer."""
    t0 = time.perf_counter()
    index.refresh(cat)
    where, args = _where(cat, f)
    sql_where = f" WHERE {' AND '.join(where)}" if where else ""
    if len(where) == 1 and where[0].startswith("w.file_id IN (SELECT rowid FROM web_index_fts"):
        # text alone: the FTS table has one row per index row, count there (no lookups into the index)
        total = cat.conn.execute(f"SELECT count(*) FROM web_index_fts WHERE {index.text_condition(cat, f.q)[0]}",
                                 args).fetchone()[0]
    else:
        total = cat.conn.execute(f"SELECT count(*) FROM web_index w{sql_where}", args).fetchone()[0]
    direction = " DESC" if f.desc else ""
    # few matches (a rare verdict, a search word): take them by the filter's index or the FTS rowids and sort
    # them (``+`` keeps SQLite off the sort index); many: walk the sort index and stop after one page
    fac = facets(cat, refreshed=True)  # cached per index generation: it also knows the index's row count
    few = bool(where) and total * 4 < sum(n for _, _, n in fac.get("linked", ()))
    order = ", ".join(f"{'+' if few else ''}w.{c}{direction}" for c in (*_ORDER[f.sort], "file_id"))
    rows = cat.conn.execute(f"SELECT {_COLS} FROM web_index w{sql_where} ORDER BY {order} LIMIT ? OFFSET ?",
                            (*args, f.per_page, (f.page - 1) * f.per_page)).fetchall()
    return Page([_card(r) for r in rows], total, f, (time.perf_counter() - t0) * 1000, fac)


_facets_cache: dict[str, tuple[int, dict]] = {}
_facets_lock = threading.Lock()
MAX_TAGS = 100  # tag facet values shown (most used first)


def facets(cat: Catalog, *, refreshed: bool = False) -> dict[str, list[tuple[str, str, int]]]:
    """Per filter, the values present in the library with their UI labels and how many files the filter
    alone would give: ``{name: [(value, label, count), ...]}`` (most files first). ``family`` is labelled with
    the names UIs use (``sd1`` -> ``SD 1.5``), ``kind`` counts a group as its filter does (``lora`` includes
    LyCORIS), ``safety`` lists never-checked files as ``unchecked``, ``tag`` the ``MAX_TAGS`` most used;
    ``linked``/``duplicates``/``updates`` give the yes and no counts (yes + no: every indexed file). Cached
    until the index changes. ``refreshed``: the caller has just refreshed the index (``search``)."""
    from ckptlab.library.ui_folders import KIND_GROUPS

    if not refreshed:
        index.refresh(cat)
    gen = index.generation(cat)
    key = str(cat.path.absolute())
    with _facets_lock:
        hit = _facets_cache.get(key)
    if hit is not None and hit[0] == gen:
        return hit[1]
    # another process (the server before a restart) may have counted this generation already
    row = cat.conn.execute("SELECT value FROM web_index_cache WHERE key = 'facets' AND generation = ?",
                           (gen,)).fetchone()
    out = count_facets(cat, KIND_GROUPS) if row is None else {
        k: [tuple(x) for x in v] for k, v in json.loads(row[0]).items()}
    if row is None:
        with contextlib.suppress(CkptlabError, sqlite3.Error):  # a read-only catalog: counted again next time
            with index.short_wait(cat, 100), cat.transaction() as conn:
                conn.execute("INSERT INTO web_index_cache(key, generation, value) VALUES ('facets', ?, ?) ON CONFLICT"
                             "(key) DO UPDATE SET generation = excluded.generation, value = excluded.value",
                             (gen, json.dumps(out, ensure_ascii=False)))
    with _facets_lock:
        _facets_cache[key] = (gen, out)
    return out


def count_facets(cat: Catalog, kind_groups) -> dict[str, list[tuple[str, str, int]]]:
    """The facets counted from the index: one GROUP BY per filter column, each over that column's index."""
    q = cat.conn.execute
    out: dict[str, list[tuple[str, str, int]]] = {}

    def ranked(items) -> list[tuple[str, str, int]]:
        return sorted(items, key=lambda x: (-x[2], x[1].casefold(), x[0]))

    def grouped(col: str) -> dict:
        return dict(q(f"SELECT {col}, count(*) FROM web_index WHERE {col} IS NOT NULL GROUP BY {col}").fetchall())

    kinds = grouped("kind")
    for group, members in kind_groups.items():
        if group in kinds:
            kinds[group] = sum(kinds.get(m, 0) for m in members)
    out["kind"] = ranked((k, index.kind_label(k), n) for k, n in kinds.items())
    out["family"] = ranked((v, index.family_label(v), n) for v, n in grouped("family").items())
    for name, col in (("format", "format"), ("precision", "precision"), ("safety", "safety_key")):
        out[name] = ranked((v, v, n) for v, n in grouped(col).items())
    out["folder"] = ranked((v, index.folder_label(v) or v, n) for v, n in grouped("folder").items())
    out["tag"] = [(t, label, n) for t, label, n in q(
        "SELECT tag, min(label), count(*) AS n FROM web_index_tags GROUP BY tag ORDER BY n DESC, tag LIMIT ?",
        (MAX_TAGS,))]
    total = q("SELECT count(*) FROM web_index").fetchone()[0]
    for name, col, yes, no in (("linked", "linked != 0", "linked to CivitAI", "not linked"),
                               ("duplicates", "dups > 0", "has duplicates", "no duplicates"),
                               ("updates", "update_available != 0", "update available", "up to date")):
        n = q(f"SELECT count(*) FROM web_index WHERE {col}").fetchone()[0]
        out[name] = [("yes", yes, n), ("no", no, total - n)]
    return out
