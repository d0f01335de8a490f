"""The inventory report: totals, by kind / family / format / precision, size buckets, pickles and
their safety verdicts, errors, missing files -- as a rich table, JSON, CSV (one row per file) or one
self-contained HTML page (inline CSS and a few lines of JS to sort any table by a column).

At hub scale (millions of rows) nothing is loaded whole: every count and sum is a SQL aggregate, the hub figures
(files per verdict, what deduplication would save: ``hub_queries.dedup_figures``) too, and the per-file sections
are queries streamed into the output (``stream_report``)."""

from __future__ import annotations

import csv
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.display import human_size, printable
from ckptlab.errors import OutputError
from ckptlab.library.catalog import Catalog, FileRecord
from ckptlab.library.dupes import precision

SIZE_BUCKETS = ((100 << 20, "< 100 MiB"), (1 << 30, "100 MiB - 1 GiB"), (4 << 30, "1 - 4 GiB"),
                (8 << 30, "4 - 8 GiB"), (None, ">= 8 GiB"))
FILE_COLUMNS = ("path", "name", "kind", "family", "format", "precision", "size", "mtime", "safety", "sha256",
                "autov2", "autov3", "fingerprint", "status", "error")


@dataclass
class Inventory:
    """The report's content. The per-file lists (``unsafe``, ``pickles``, ``error_files``, ``rows``) are lists, or,
    from ``build_inventory(..., lazy=True)``, ``RowSource``s that query the still-open catalog each time they are
    iterated (a hub catalog's million rows are streamed to the output, never held)."""

    catalog: str
    generated: str
    files: int
    bytes: int
    missing: int
    errors: int
    by_kind: list[dict] = field(default_factory=list)
    by_family: list[dict] = field(default_factory=list)
    by_format: list[dict] = field(default_factory=list)
    by_precision: list[dict] = field(default_factory=list)
    by_size: list[dict] = field(default_factory=list)
    pickles: list[dict] = field(default_factory=list)
    unsafe: list[dict] = field(default_factory=list)  # any format whose verdict is not safe (as ls --unsafe)
    error_files: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    #: hub figures: files and bytes per safety verdict (``unchecked`` for none), and what dedup would save
    #: (``hub_queries.dedup_figures``: per sha256 / fingerprint / fingerprint_bf16: groups, copies, bytes_saved)
    by_safety: list[dict] = field(default_factory=list)
    dedup: dict = field(default_factory=dict)


class RowSource:
    """A per-file list of the report as a query: iterating runs it (rows streamed from the cursor), ``len`` counts
    in SQL. Valid while its catalog is open."""

    def __init__(self, catalog: Catalog, select: str, where: str, order: str, make, *, records: bool = False):
        self.catalog, self.select, self.where, self.order, self.make, self.records = (
            catalog, select, where, order, make, records)

    def __iter__(self):
        from ckptlab.library.hub_queries import iter_records, scalar_rows

        if self.records:
            return (self.make(r) for r in iter_records(self.catalog, self.where, order=self.order))
        return (self.make(row) for row in scalar_rows(
            self.catalog, f"SELECT {self.select} FROM files f WHERE {self.where} ORDER BY {self.order}"))

    def __len__(self) -> int:
        return int(self.catalog.conn.execute(f"SELECT count(*) FROM files f WHERE {self.where}").fetchone()[0])

    def __bool__(self) -> bool:
        return self.catalog.conn.execute(f"SELECT 1 FROM files f WHERE {self.where} LIMIT 1").fetchone() is not None


def _merge(rows, label: str, name=lambda v: v) -> list[dict]:
    """``(value, files, bytes)`` aggregate rows -> ``[{label, files, bytes}]``, merged by ``name(value) or
    "unknown"`` (the same slot for NULL, empty and "unknown", as the Python tally always did), by bytes."""
    out: dict[str, dict] = {}
    for value, n, size in rows:
        k = name(value) or "unknown"
        slot = out.setdefault(k, {label: k, "files": 0, "bytes": 0})
        slot["files"] += int(n or 0)
        slot["bytes"] += int(size or 0)
    return sorted(out.values(), key=lambda d: (-d["bytes"], d[label]))


def _bucket(size: int) -> str:
    for limit, name in SIZE_BUCKETS:
        if limit is None or size < limit:
            return name
    return SIZE_BUCKETS[-1][1]  # pragma: no cover


def file_row(r: FileRecord) -> dict:
    return {"path": r.path, "name": r.name, "kind": r.kind, "family": r.family, "format": r.format,
            "precision": precision(r), "size": r.size,
            "mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.mtime_ns / 1e9)) if r.mtime_ns else None,
            "safety": r.safety, "sha256": r.sha256, "autov2": r.hashes.autov2 if r.hashes else None,
            "autov3": r.hashes.autov3 if r.hashes else None, "fingerprint": r.fingerprint, "status": r.status,
            "error": r.error}


_PRESENT = "f.status = 'present'"
_BY_PATH = "f.display, f.id"


def build_inventory(catalog: Catalog, *, lazy: bool = False) -> Inventory:
    """The inventory of ``catalog``: every count and sum computed by the database (``GROUP BY``), never by loading
    the files. ``lazy``: the per-file lists are ``RowSource``s, read when rendered (the catalog must stay open
    until then); else lists."""
    from ckptlab.library.dupes import float_precision
    from ckptlab.library.hub_queries import VERDICT_ORDER, dedup_figures, loads, scalar_rows

    conn = catalog.conn
    files, total, errors = conn.execute(
        "SELECT count(*), coalesce(sum(coalesce(f.size, 0)), 0), coalesce(sum(CASE WHEN f.error IS NOT NULL AND "
        f"f.error != '' THEN 1 ELSE 0 END), 0) FROM files f WHERE {_PRESENT}").fetchone()
    missing = conn.execute("SELECT count(*) FROM files f WHERE f.status = 'missing'").fetchone()[0]

    def tally(col: str, label: str, name=lambda v: v) -> list[dict]:
        return _merge(scalar_rows(catalog, f"SELECT {col}, count(*), sum(coalesce(f.size, 0)) FROM files f "
                                           f"WHERE {_PRESENT} GROUP BY {col}"), label, name)

    cases = " ".join(f"WHEN coalesce(f.size, 0) < {limit} THEN {i}" for i, (limit, _) in enumerate(SIZE_BUCKETS)
                     if limit is not None)
    sizes = {int(i): (n, b) for i, n, b in scalar_rows(
        catalog, f"SELECT CASE {cases} ELSE {len(SIZE_BUCKETS) - 1} END AS bucket, count(*), "
                 f"sum(coalesce(f.size, 0)) FROM files f WHERE {_PRESENT} GROUP BY bucket")}
    by_size = [{"size": name, "files": int(sizes[i][0]), "bytes": int(sizes[i][1] or 0)}
               for i, (_, name) in enumerate(SIZE_BUCKETS) if i in sizes]
    verdicts = {v: i for i, v in enumerate((*VERDICT_ORDER, "safe"))}
    by_safety = sorted(tally("f.safety", "safety", lambda v: v or "unchecked"),
                       key=lambda d: (verdicts.get(d["safety"], len(verdicts)), d["safety"]))

    def source(select, where, order, make, records=False):
        src = RowSource(catalog, select, where, order, make, records=records)
        return src if lazy else list(src)

    return Inventory(
        catalog=str(catalog.path), generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=int(files), bytes=int(total), missing=int(missing), errors=int(errors),
        by_kind=tally("f.kind", "kind"), by_family=tally("f.family", "family"), by_format=tally("f.format", "format"),
        by_precision=tally("f.dtypes", "precision", lambda text: float_precision(loads(text))), by_size=by_size,
        pickles=source("f.display, f.size, f.safety", f"{_PRESENT} AND f.format = 'pickle'", _BY_PATH,
                       lambda row: {"path": row[0], "size": row[1], "safety": row[2] or "unchecked"}),
        unsafe=source("f.display, f.format, f.safety", f"{_PRESENT} AND (f.safety IS NULL OR f.safety != 'safe')",
                      _BY_PATH, lambda row: {"path": row[0], "format": row[1], "safety": row[2] or "unchecked"}),
        error_files=source("f.display, f.error", f"{_PRESENT} AND f.error IS NOT NULL AND f.error != ''", _BY_PATH,
                           lambda row: {"path": row[0], "error": row[1]}),
        rows=source("", "f.status IN ('present', 'missing')",
                    f"CASE WHEN f.status = 'present' THEN 0 ELSE 1 END, {_BY_PATH}", file_row, records=True),
        by_safety=by_safety, dedup=dedup_figures(catalog),
    )


#: the per-file sections of the table format list at most this many rows, then how many more (the CSV, JSON and
#: HTML formats list every file)
TABLE_ROWS = 1000

#: the dedup figures' rows: key, words
_DEDUP_WORDS = (("sha256", "same bytes (sha256)"), ("fingerprint", "same weights (fingerprint)"),
                ("fingerprint_bf16", "same weights, bf16 rounding (fingerprint_bf16)"))
_NUMERIC = ("files", "bytes", "groups", "copies")


def _sections(inv: Inventory) -> list[tuple[str, list[str], object]]:
    def tab(rows, label):
        return [[d[label], d["files"], d["bytes"]] for d in rows]

    class _Rows:  # a per-file section: its rows made as they are read
        def __init__(self, src, make):
            self.src, self.make = src, make

        def __iter__(self):
            return (self.make(d) for d in self.src)

        def __len__(self):
            return len(self.src)

        def __bool__(self):
            return bool(self.src)

    dedup = [[words, inv.dedup[k]["groups"], inv.dedup[k]["copies"], inv.dedup[k]["bytes_saved"]]
             for k, words in _DEDUP_WORDS if (inv.dedup or {}).get(k, {}).get("groups")]
    return [
        ("By kind", ["kind", "files", "bytes"], tab(inv.by_kind, "kind")),
        ("By family", ["family", "files", "bytes"], tab(inv.by_family, "family")),
        ("By format", ["format", "files", "bytes"], tab(inv.by_format, "format")),
        ("By precision", ["precision", "files", "bytes"], tab(inv.by_precision, "precision")),
        ("By size", ["size", "files", "bytes"], tab(inv.by_size, "size")),
        ("Not safe", ["path", "format", "safety"], _Rows(inv.unsafe, lambda u: [u["path"], u["format"], u["safety"]])),
        ("Pickles", ["path", "size", "safety"], _Rows(inv.pickles, lambda p: [p["path"], p["size"], p["safety"]])),
        ("Errors", ["path", "error"], _Rows(inv.error_files, lambda e: [e["path"], e["error"]])),
        ("By verdict", ["safety", "files", "bytes"], tab(inv.by_safety, "safety")),
        ("Duplicates (dedup would save)", ["same", "groups", "copies", "bytes"], dedup),
    ]


def _write_json_value(out, value, indent: str) -> None:
    """``value`` as ``json.dumps(..., indent=2)`` writes it at nesting ``indent``; a list or ``RowSource`` item by
    item (the same text, streamed)."""
    from ckptlab.jsonable import to_jsonable

    if isinstance(value, (list, RowSource)):
        first = True
        pad = indent + "  "
        for item in value:
            out.write(("[\n" if first else ",\n") + pad)
            flat = _flat(item, pad)  # a row of plain values: json's C encoder, laid out as indent=2 lays it out
            out.write(flat if flat is not None else
                      json.dumps(to_jsonable(item), indent=2, ensure_ascii=False).replace("\n", "\n" + pad))
            first = False
        out.write("[]" if first else "\n" + indent + "]")
        return
    out.write(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False).replace("\n", "\n" + indent))


_PLAIN = (str, int, float, bool, type(None))


_ENCODE_STR = json.encoder.encode_basestring  # the C function where there is one, as json.dumps uses it


def _scalar(v) -> str:
    """One plain value as ``json.dumps(v, ensure_ascii=False)`` writes it."""
    t = type(v)
    if t is str:
        return _ENCODE_STR(v)
    if v is None:
        return "null"
    if t is int:
        return int.__repr__(v)
    if t is bool:
        return "true" if v else "false"
    return json.dumps(v)  # a float (NaN and infinities as json spells them)


def _flat(item, pad: str) -> str | None:
    """A dict of plain values exactly as ``json.dumps(item, indent=2, ensure_ascii=False)`` writes it at nesting
    ``pad``, without the indenting encoder (pure Python: a million rows cost minutes); None for anything else."""
    if type(item) is not dict or not item:
        return None
    enc, lead = _ENCODE_STR, ",\n" + pad + "  "
    parts = []
    for k, v in item.items():
        t = type(v)
        if type(k) is not str or t not in _PLAIN:
            return None
        parts.append(enc(k) + ": " + (enc(v) if t is str else _scalar(v)))
    return "{\n" + pad + "  " + lead.join(parts) + "\n" + pad + "}"


def write_json(inv: Inventory, out) -> None:
    """The inventory as one JSON object (two-space indent), streamed to the text stream ``out``."""
    from dataclasses import fields

    names = [f.name for f in fields(inv)]
    out.write("{")
    for i, name in enumerate(names):
        out.write(("\n" if i == 0 else ",\n") + "  " + json.dumps(name) + ": ")
        _write_json_value(out, getattr(inv, name), "  ")
    out.write("\n}\n")


def render_json(inv: Inventory) -> str:
    buf = io.StringIO()
    write_json(inv, buf)
    return buf.getvalue()


#: first characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value) -> str | int | float:
    """A value as a CSV cell that a spreadsheet shows as text: a string starting with ``= + - @``, a
    tab or a carriage return gets a leading ``'`` (OWASP's rule), so a file named ``=HYPERLINK(...)``
    stays a name. Numbers are kept as numbers."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def write_csv(inv: Inventory, out, *, terminal: bool = False) -> None:
    """One row per file, streamed to the text stream ``out``. ``terminal``: the CSV is shown on a terminal, so
    control and bidi characters in names are rendered visibly (``printable``) instead of reaching the terminal
    as escape sequences; a file (``-o``) or a pipe keeps the exact values, as a data format must."""
    w = csv.DictWriter(out, fieldnames=list(FILE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in inv.rows:
        cells = {k: csv_cell(row.get(k)) for k in FILE_COLUMNS}
        if cells["fingerprint"]:  # hashes a person reads are upper case, as in `hash`, `ls` and `show`
            cells["fingerprint"] = str(cells["fingerprint"]).upper()
        if terminal:
            cells = {k: printable(v) if isinstance(v, str) else v for k, v in cells.items()}
        w.writerow(cells)


def render_csv(inv: Inventory, *, terminal: bool = False) -> str:
    """``write_csv`` as one string."""
    buf = io.StringIO()
    write_csv(inv, buf, terminal=terminal)
    return buf.getvalue()


def write_table(inv: Inventory, out, width: int | None = None) -> None:
    """The inventory as rich tables, written to the text stream ``out`` section by section. ``width``: the
    terminal's, to fit a screen; None (files, pipes) never wraps a line or a cell, so each path stays on one line
    for ``grep``. A per-file section lists its first ``TABLE_ROWS`` files, then how many more there are."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = Console(file=out, width=width or 100_000, force_terminal=False, color_system=None)
    con.print(f"ckptlab inventory: {inv.files} files, {human_size(inv.bytes)}; {inv.missing} missing, "
              f"{inv.errors} with errors, {len(inv.unsafe)} not safe", markup=False, highlight=False)
    for title, cols, rows in _sections(inv):
        if not rows:
            continue
        t = Table(title=title, title_justify="left")
        for c in cols:
            numeric = c in _NUMERIC or (c == "size" and title == "Pickles")
            t.add_column(c, justify="right" if numeric else "left")
        shown = 0
        for row in rows:  # Text: names are never read as rich markup; control characters shown
            if shown == TABLE_ROWS:
                break
            shown += 1
            t.add_row(*[Text(human_size(v) if c in ("bytes",) or (c == "size" and isinstance(v, int)) else
                             str(v) if c in ("groups", "copies") else
                             printable("" if v is None else v)) for c, v in zip(cols, row, strict=True)])
        con.print(t)
        if shown == TABLE_ROWS and len(rows) > TABLE_ROWS:
            con.print(f"... {len(rows) - TABLE_ROWS} more (all of them: report --format csv|json|html)",
                      markup=False, highlight=False)


def render_table(inv: Inventory, width: int | None = None) -> str:
    """``write_table`` as one string."""
    buf = io.StringIO()
    write_table(inv, buf, width=width)
    return buf.getvalue()


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#eee;cursor:pointer;user-select:none}
td.n{text-align:right;font-variant-numeric:tabular-nums}th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}
.err{color:#a00}"""
_JS = """document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
var table=th.closest('table'),tb=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
var asc=!th.classList.contains('asc');table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc')});
th.classList.add(asc?'asc':'desc');var rows=Array.prototype.slice.call(tb.rows);rows.sort(function(a,b){
var x=a.cells[i].getAttribute('data-v')||a.cells[i].textContent,y=b.cells[i].getAttribute('data-v')||b.cells[i].textContent;
var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny)&&String(nx)===x&&String(ny)===y)?nx-ny:x.localeCompare(y);
return asc?c:-c});rows.forEach(function(r){tb.appendChild(r)})})});"""


def _html_table(cols: list[str], rows, out) -> None:
    e = html.escape
    out.write("".join(["<table class=\"sortable\"><thead><tr>", *[f"<th>{e(c)}</th>" for c in cols],
                       "</tr></thead><tbody>"]))
    for row in rows:
        cells = ["<tr>"]
        for c, v in zip(cols, row, strict=True):
            if isinstance(v, int) and c in ("size", *_NUMERIC):
                text = human_size(v) if c in ("bytes", "size") else str(v)
                cells.append(f"<td class=\"n\" data-v=\"{v}\">{e(text)}</td>")
            else:
                cells.append(f"<td>{e(printable('' if v is None else v))}</td>")  # no bidi tricks either
        cells.append("</tr>")
        out.write("".join(cells))
    out.write("</tbody></table>")


def write_html(inv: Inventory, out) -> None:
    """One self-contained HTML page, streamed to the text stream ``out`` (every file in its Files table)."""
    e = html.escape
    out.write("".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ckptlab inventory</title>",
        f"<style>{_CSS}</style></head><body><h1>Model library inventory</h1>",
        f"<p>{inv.files} files, {e(human_size(inv.bytes))}; {inv.missing} missing; {inv.errors} with errors. "
        f"Catalog {e(inv.catalog)}, generated {e(inv.generated)}.</p>"]))
    for title, cols, rows in _sections(inv):
        if rows:
            out.write(f"<h2>{e(title)}</h2>")
            _html_table(cols, rows, out)
    cols = ["name", "kind", "family", "format", "precision", "size", "safety", "autov2", "status", "path"]
    out.write("<h2>Files</h2>")
    _html_table(cols, ([r.get(c) for c in cols] for r in inv.rows), out)
    out.write(f"<script>{_JS}</script></body></html>\n")


def render_html(inv: Inventory) -> str:
    buf = io.StringIO()
    write_html(inv, buf)
    return buf.getvalue()


def write_report(text: str, output: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write ``text`` to ``output`` atomically: a hidden temporary file in the same folder, fsync'ed,
    then put in place. An existing ``output`` is refused unless ``overwrite`` (without it the final step
    is a hard link, which fails if the name appeared meanwhile). Missing parent folders are created.
    Raises ``OutputError``; nothing is left behind on failure."""
    from ckptlab.atomic import write_atomic

    out = Path(output)
    check_output(out, overwrite=overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text.encode("utf-8"), overwrite=overwrite)
    except FileExistsError:
        raise OutputError("output already exists (use --overwrite to replace it)", out) from None
    except OSError as e:
        raise OutputError(f"cannot write report: {e.strerror or e}", out) from None


def check_output(out: Path, *, overwrite: bool) -> None:
    """Refuse a report output that is a folder, or that exists without ``overwrite`` (``OutputError``)."""
    if out.is_dir():
        raise OutputError("is a folder; give a file name", out)
    if out.exists() and not out.is_file():  # /dev/stdout, a FIFO: a rename would replace the node itself
        raise OutputError("is not a regular file (write the report to stdout and redirect it)", out)
    if not overwrite and os.path.lexists(out):
        raise OutputError("output already exists (use --overwrite to replace it)", out)




RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv, "html": render_html}


def write_inventory(inv: Inventory, fmt: str, out, *, width: int | None = None, terminal: bool = False) -> None:
    """``render_report``, streamed to the text stream ``out`` (a lazy inventory's files are read as written)."""
    check_format(fmt)
    if fmt == "table":
        write_table(inv, out, width=width if terminal else None)
    elif fmt == "csv":  # a terminal shows control characters visibly; a file or a pipe gets exact values
        write_csv(inv, out, terminal=terminal)
    elif fmt == "json":
        write_json(inv, out)
    else:
        write_html(inv, out)


def render_report(inv: Inventory, fmt: str = "table", *, width: int | None = None, terminal: bool = False) -> str:
    """The inventory as ``fmt`` (``table``, ``json``, ``csv`` or ``html``). ``terminal``: the text goes to a
    terminal, so a CSV shows control characters visibly and a table fits ``width`` columns (None: never
    wrapped, one line per path for ``grep``). Raises ``BadChoiceError`` for an unknown format."""
    buf = io.StringIO()
    write_inventory(inv, fmt, buf, width=width, terminal=terminal)
    return buf.getvalue()


def check_format(fmt: str) -> None:
    """Refuse a report format that is not one of ``RENDERERS`` (``BadChoiceError``, exit 2)."""
    from ckptlab.errors import BadChoiceError

    if fmt not in RENDERERS:
        raise BadChoiceError(f"--format {fmt!r}: use one of {', '.join(RENDERERS)}")


def report(catalog: Catalog | str | os.PathLike | None, fmt: str = "table", output: str | os.PathLike | None = None,
           *, overwrite: bool = False, width: int | None = None, terminal: bool = False) -> str:
    """``ckptlab report``: the library inventory rendered as ``fmt``, written to ``output`` when given.

    Args:
        catalog: an open ``Catalog``, or the catalog file to open (None: ``$CKPTLAB_DB`` or the default);
            a file is opened read-only in spirit (it must exist).
        fmt: ``table``, ``json``, ``csv`` or ``html``.
        output: the file to write (atomically); None: nothing is written.
        overwrite: replace ``output`` if it exists.
        width, terminal: as for ``render_report`` (the text is shown on a terminal this wide).

    Returns:
        The rendered text (for a hub catalog, ``stream_report`` writes it without holding it).

    Raises:
        BadChoiceError: an unknown format. OutputError: ``output`` exists (without ``overwrite``), is a
        folder or cannot be written (checked before the catalog is read). CatalogError: no catalog there.
    """
    buf = io.StringIO()
    stream_report(catalog, fmt, output, overwrite=overwrite, width=width, terminal=terminal, out=buf)
    return buf.getvalue()


def stream_report(catalog: Catalog | str | os.PathLike | None, fmt: str = "table",
                  output: str | os.PathLike | None = None, *, overwrite: bool = False, width: int | None = None,
                  terminal: bool = False, out=None) -> None:
    """``report`` without holding the text: the inventory's counts come from SQL aggregates and its per-file
    lists are streamed from the catalog into ``output`` (atomically: a hidden temporary file, renamed when
    complete) and/or the text stream ``out``. Memory stays flat whatever the catalog's size. Raises as
    ``report``."""
    check_format(fmt)
    if output is not None:  # before the work, not after it
        check_output(Path(output), overwrite=overwrite)
    if isinstance(catalog, Catalog):
        _stream(catalog, fmt, output, overwrite, width, terminal, out)
    else:
        with Catalog(catalog, must_exist=True) as cat:
            _stream(cat, fmt, output, overwrite, width, terminal, out)


def _stream(cat: Catalog, fmt, output, overwrite, width, terminal, out) -> None:
    inv = build_inventory(cat, lazy=True)
    if output is None:
        if out is not None:
            write_inventory(inv, fmt, out, width=width, terminal=terminal)
        return
    from ckptlab.atomic import write_atomic

    def writer(fh) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        tee = _Tee(text, out)
        write_inventory(inv, fmt, tee, width=width, terminal=terminal)
        text.flush()
        text.detach()

    dest = Path(output)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, writer, overwrite=overwrite)
    except FileExistsError:
        raise OutputError("output already exists (use --overwrite to replace it)", dest) from None
    except OSError as e:
        raise OutputError(f"cannot write report: {e.strerror or e}", dest) from None


class _Tee:
    """A text stream that writes to two (the report file, and the caller's ``out`` when given)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def write(self, text: str) -> int:
        self.a.write(text)
        if self.b is not None:
            self.b.write(text)
        return len(text)

    encoding = "utf-8"

    def flush(self) -> None:
        self.a.flush()

    def isatty(self) -> bool:
        return False
