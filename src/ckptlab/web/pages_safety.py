"""The Safety page (``/safety``): every catalogued file whose verdict is not ``safe`` - malicious, suspicious,
corrupt, unchecked, or never checked - with what ``ckptlab check`` found (the ``files.safety_detail`` a scan
stores: the findings that decide the verdict, the globals a pickle imports, why a check could not run), counts
per verdict, and links to each file's model page and to a "check again" job.

One SQL query over the catalog's ``files`` table (present files, one page of rows): no record is loaded that
the page does not show.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request

from ckptlab.display import short_text
from ckptlab.errors import BadChoiceError
from ckptlab.library.catalog import Catalog
from ckptlab.web.deps import catalog
from ckptlab.web.query import page_number
from ckptlab.web.templating import page

router = APIRouter()

NEVER = "never checked"
#: the verdicts the page lists, worst first (``never checked``: no verdict recorded at all)
NOT_SAFE = ("malicious", "suspicious", "corrupt", "unchecked", NEVER)
PER_PAGE = 200
_ORDER = "CASE coalesce(safety, '') " + " ".join(
    f"WHEN '{v}' THEN {i}" for i, v in enumerate(NOT_SAFE[:-1])) + f" WHEN '' THEN {len(NOT_SAFE) - 1} ELSE 3 END"


@dataclass
class FindingView:
    severity: str
    kind: str
    detail: str
    location: str = ""
    file: str = ""  # a diffusers folder: the file inside it


@dataclass
class UnsafeRow:
    id: int
    path: str
    name: str
    verdict: str
    format: str | None
    kind: str | None
    size: int | None
    findings: list[FindingView] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why a check could not run, what a reader refused

    @property
    def check_url(self) -> str:
        return "/jobs/new/check?" + urlencode({"path": self.path}, quote_via=quote)


#: a value of a stored safety record as text ("" for none; a finding's detail is cut at 4,000 characters)
_text = functools.partial(short_text, limit=4000, empty="")


def findings_of(detail) -> tuple[list[FindingView], list[str], list[str]]:
    """``(findings, globals, notes)`` from a stored ``safety_detail`` (the shapes ``library.scanner`` writes: one
    check's record; ``{"files": {name: record}}`` for a diffusers folder; ``{"error": ...}`` for a check that
    could not run; ``reader_refused`` when a reader refused a file the check passed)."""
    findings: list[FindingView] = []
    globs: list[str] = []
    notes: list[str] = []
    if not isinstance(detail, dict):
        if detail is not None:
            notes.append(_text(detail))
        return findings, globs, notes

    def one(rec: dict, file: str = "") -> None:
        for f in rec.get("findings") or []:
            if isinstance(f, dict):
                findings.append(FindingView(severity=_text(f.get("severity")), kind=_text(f.get("kind")),
                                            detail=_text(f.get("detail")), location=_text(f.get("location")),
                                            file=file))
        for gname in rec.get("globals") or []:
            if _text(gname) not in globs:
                globs.append(_text(gname))
        if rec.get("error"):
            notes.append((f"{file}: " if file else "") + _text(rec["error"]))
        if rec.get("reader_refused"):
            notes.append((f"{file}: " if file else "") + "a reader refused it: " + _text(rec["reader_refused"]))

    one(detail)
    files = detail.get("files")
    if isinstance(files, dict):
        for name, rec in files.items():
            if isinstance(rec, dict):
                one(rec, _text(name))
    return findings, globs, notes


def verdict_counts(cat: Catalog) -> dict[str, int]:
    """Present files per verdict (``never checked`` for no verdict), ``safe`` included."""
    rows = cat.conn.execute("SELECT coalesce(safety, ?), count(*) FROM files WHERE status = 'present' "
                            "GROUP BY coalesce(safety, ?)", (NEVER, NEVER)).fetchall()
    return dict(rows)


@router.get("/safety")
def safety(request: Request, cat: Catalog = Depends(catalog)):
    verdict = request.query_params.get("verdict") or ""
    if verdict and verdict not in NOT_SAFE:
        raise BadChoiceError(f"verdict {verdict[:40]!r}: use one of {', '.join(NOT_SAFE)}")
    pg = page_number(request.query_params)
    counts = verdict_counts(cat)
    where = "status = 'present' AND (safety IS NULL OR safety != 'safe')"
    args: list = []
    if verdict == NEVER:
        where = "status = 'present' AND safety IS NULL"
    elif verdict:
        where = "status = 'present' AND safety = ?"
        args.append(verdict)
    total = cat.conn.execute(f"SELECT count(*) FROM files WHERE {where}", args).fetchone()[0]
    rows = cat.conn.execute(
        f"SELECT id, display, name, safety, safety_detail, format, kind, size FROM files WHERE {where} "
        f"ORDER BY {_ORDER}, display LIMIT ? OFFSET ?", [*args, PER_PAGE, (pg - 1) * PER_PAGE]).fetchall()
    out = []
    for fid, display, name, verdict_, detail, fmt, kind, size in rows:
        try:
            parsed = json.loads(detail) if detail else None
        except ValueError:
            parsed = detail
        findings, globs, notes = findings_of(parsed)
        out.append(UnsafeRow(id=fid, path=display, name=name, verdict=verdict_ or NEVER, format=fmt, kind=kind,
                             size=size, findings=findings, globals=globs, notes=notes))
    pages = max(1, math.ceil(total / PER_PAGE))

    def url(**changes) -> str:
        q = {"verdict": verdict, "page": pg, **changes}
        q = {k: v for k, v in q.items() if v and not (k == "page" and v == 1)}
        return "/safety" + ("?" + urlencode(q) if q else "")

    return page(request, "safety.html", nav="safety", rows=out, counts=counts, verdicts=NOT_SAFE, verdict=verdict,
                total=total, page_no=pg, pages=pages, url=url,
                not_safe_total=sum(n for v, n in counts.items() if v != "safe"))
