# The inventory report as it was before hub scale (library/report.py at 6d4c7c2, verbatim below this note): the
# oracle of tests/library/test_hub_*.py and benchmarks/hub_answers.py. Never imported by ckptlab itself.
# ruff: noqa
"""The inventory report: totals, by kind / family / format / precision, size buckets, pickles and
their safety verdicts, errors, missing files -- as a rich table, JSON, CSV (one row per file) or one
self-contained HTML page (inline CSS and a few lines of JS to sort any table by a column)."""

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


def _tally(recs: list[FileRecord], keyfn, label: str) -> list[dict]:
    out: dict[str, dict] = {}
    for r in recs:
        k = keyfn(r) or "unknown"
        slot = out.setdefault(k, {label: k, "files": 0, "bytes": 0})
        slot["files"] += 1
        slot["bytes"] += r.size or 0
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


def build_inventory(catalog: Catalog) -> Inventory:
    present = catalog.files(status="present", sort="path")
    missing = catalog.files(status="missing", sort="path")
    order = {name: i for i, (_, name) in enumerate(SIZE_BUCKETS)}
    by_size = sorted(_tally(present, lambda r: _bucket(r.size or 0), "size"), key=lambda d: order[d["size"]])
    return Inventory(
        catalog=str(catalog.path), generated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=len(present), bytes=sum(r.size or 0 for r in present), missing=len(missing),
        errors=sum(1 for r in present if r.error),
        by_kind=_tally(present, lambda r: r.kind, "kind"), by_family=_tally(present, lambda r: r.family, "family"),
        by_format=_tally(present, lambda r: r.format, "format"),
        by_precision=_tally(present, precision, "precision"), by_size=by_size,
        pickles=[{"path": r.path, "size": r.size, "safety": r.safety or "unchecked"}
                 for r in present if r.format == "pickle"],
        unsafe=[{"path": r.path, "format": r.format, "safety": r.safety or "unchecked"} for r in present
                if r.safety != "safe"],
        error_files=[{"path": r.path, "error": r.error} for r in present if r.error],
        rows=[file_row(r) for r in present + missing],
    )




def _sections(inv: Inventory) -> list[tuple[str, list[str], list[list]]]:
    def tab(rows, label):
        return [[d[label], d["files"], d["bytes"]] for d in rows]

    return [
        ("By kind", ["kind", "files", "bytes"], tab(inv.by_kind, "kind")),
        ("By family", ["family", "files", "bytes"], tab(inv.by_family, "family")),
        ("By format", ["format", "files", "bytes"], tab(inv.by_format, "format")),
        ("By precision", ["precision", "files", "bytes"], tab(inv.by_precision, "precision")),
        ("By size", ["size", "files", "bytes"], tab(inv.by_size, "size")),
        ("Not safe", ["path", "format", "safety"], [[u["path"], u["format"], u["safety"]] for u in inv.unsafe]),
        ("Pickles", ["path", "size", "safety"], [[p["path"], p["size"], p["safety"]] for p in inv.pickles]),
        ("Errors", ["path", "error"], [[e["path"], e["error"]] for e in inv.error_files]),
    ]


def render_json(inv: Inventory) -> str:
    from ckptlab.jsonable import to_jsonable

    return json.dumps(to_jsonable(inv), indent=2, ensure_ascii=False) + "\n"


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


def render_csv(inv: Inventory, *, terminal: bool = False) -> str:
    """One row per file. ``terminal``: the CSV is shown on a terminal, so control and bidi characters in
    names are rendered visibly (``printable``) instead of reaching the terminal as escape sequences; a file
    (``-o``) or a pipe keeps the exact values, as a data format must."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FILE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in inv.rows:
        cells = {k: csv_cell(row.get(k)) for k in FILE_COLUMNS}
        if cells["fingerprint"]:  # hashes a person reads are upper case, as in `hash`, `ls` and `show`
            cells["fingerprint"] = str(cells["fingerprint"]).upper()
        if terminal:
            cells = {k: printable(v) if isinstance(v, str) else v for k, v in cells.items()}
        w.writerow(cells)
    return buf.getvalue()


def render_table(inv: Inventory, width: int | None = None) -> str:
    """The inventory as rich tables. ``width``: the terminal's, to fit a screen; None (files, pipes)
    never wraps a line or a cell, so each path stays on one line for ``grep``."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    con = Console(file=buf, width=width or 100_000, force_terminal=False, color_system=None)
    con.print(f"ckptlab inventory: {inv.files} files, {human_size(inv.bytes)}; {inv.missing} missing, "
              f"{inv.errors} with errors, {len(inv.unsafe)} not safe", markup=False, highlight=False)
    for title, cols, rows in _sections(inv):
        if not rows:
            continue
        t = Table(title=title, title_justify="left")
        for c in cols:
            numeric = c in ("files", "bytes") or (c == "size" and title == "Pickles")
            t.add_column(c, justify="right" if numeric else "left")
        for row in rows:  # Text: names are never read as rich markup; control characters shown
            t.add_row(*[Text(human_size(v) if c in ("bytes",) or (c == "size" and isinstance(v, int)) else
                             printable("" if v is None else v)) for c, v in zip(cols, row, strict=True)])
        con.print(t)
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


def _html_table(cols: list[str], rows: list[list]) -> str:
    e = html.escape
    out = ["<table class=\"sortable\"><thead><tr>", *[f"<th>{e(c)}</th>" for c in cols], "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        for c, v in zip(cols, row, strict=True):
            if isinstance(v, int) and c in ("files", "bytes", "size"):
                text = str(v) if c == "files" else human_size(v)
                out.append(f"<td class=\"n\" data-v=\"{v}\">{e(text)}</td>")
            else:
                out.append(f"<td>{e(printable('' if v is None else v))}</td>")  # no bidi tricks either
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(inv: Inventory) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ckptlab inventory</title>",
             f"<style>{_CSS}</style></head><body><h1>Model library inventory</h1>",
             f"<p>{inv.files} files, {e(human_size(inv.bytes))}; {inv.missing} missing; {inv.errors} with errors. "
             f"Catalog {e(inv.catalog)}, generated {e(inv.generated)}.</p>"]
    for title, cols, rows in _sections(inv):
        if rows:
            parts.append(f"<h2>{e(title)}</h2>{_html_table(cols, rows)}")
    cols = ["name", "kind", "family", "format", "precision", "size", "safety", "autov2", "status", "path"]
    parts.append(f"<h2>Files</h2>{_html_table(cols, [[r.get(c) for c in cols] for r in inv.rows])}")
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "".join(parts)


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


def render_report(inv: Inventory, fmt: str = "table", *, width: int | None = None, terminal: bool = False) -> str:
    """The inventory as ``fmt`` (``table``, ``json``, ``csv`` or ``html``). ``terminal``: the text goes to a
    terminal, so a CSV shows control characters visibly and a table fits ``width`` columns (None: never
    wrapped, one line per path for ``grep``). Raises ``BadChoiceError`` for an unknown format."""
    check_format(fmt)
    if fmt == "table":
        return render_table(inv, width=width if terminal else None)
    if fmt == "csv":  # a terminal shows control characters visibly; a file or a pipe gets exact values
        return render_csv(inv, terminal=terminal)
    return RENDERERS[fmt](inv)


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
        The rendered text.

    Raises:
        BadChoiceError: an unknown format. OutputError: ``output`` exists (without ``overwrite``), is a
        folder or cannot be written (checked before the catalog is read). CatalogError: no catalog there.
    """
    check_format(fmt)
    if output is not None:  # before the work, not after it
        check_output(Path(output), overwrite=overwrite)
    if isinstance(catalog, Catalog):
        inv = build_inventory(catalog)
    else:
        with Catalog(catalog, must_exist=True) as cat:
            inv = build_inventory(cat)
    text = render_report(inv, fmt, width=width, terminal=terminal)
    if output is not None:
        write_report(text, output, overwrite=overwrite)
    return text

