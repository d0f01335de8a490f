"""The Duplicates & disk page (``/disk``): the plan ``ckptlab plan-space`` makes, as a review page, and the
route that applies exactly the plan reviewed (``POST /disk/apply``). The Safety page lives in
``pages_safety`` (its router is included here, so the app includes one router for both).

The page is the CLI's plan, not a second planner: ``library.dupes.plan_space`` with the options the form
sets (``--prefer-smaller``, ``--no-fp16``, ``--link``, ``--convert-kind``), and ``find_dupes`` for what
the plan does not say about a group (the kept copy's facts, the copies left as they are). A GET computes
and shows; it never writes. Applying recomputes the plan from the same options and compares its
fingerprint with the one the reviewed page carried: a catalog that changed in between changes the plan,
and the request is refused rather than applying a plan nobody saw.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse

from ckptlab.errors import BadChoiceError, CkptlabError, OutputError, UsageError
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import CONVERT_KINDS, LINK_MODES, DupeCopy, find_dupes, keep_reason, plan_space
from ckptlab.library.plan import PlanStep, SpacePlan
from ckptlab.web import jobs
from ckptlab.web.deps import catalog
from ckptlab.web.pages_safety import router as safety_router
from ckptlab.web.query import page_number
from ckptlab.web.templating import page

router = APIRouter()
router.include_router(safety_router)

STALE = "the library changed since you reviewed this plan; review it again"
#: kinds a user may ask to convert besides CONVERT_KINDS (plan-space --convert-kind), offered as checkboxes
EXTRA_CONVERT_KINDS = ("hypernetwork", "upscaler")
MAX_KIND_CHARS = 40
#: groups (and rewrites) shown per page; the plan applied is always the whole plan
PER_PAGE = 200


@dataclass(frozen=True)
class PlanOptions:
    """The ``plan-space`` options the page's form sets (query parameters, or the apply form's fields)."""

    prefer_smaller: bool = False
    no_fp16: bool = False
    link: str = "auto"
    convert_kind: tuple[str, ...] = ()
    components: bool = False  # also show shared-component groups (informational, as ``dupes --components``)

    @classmethod
    def from_params(cls, params: Mapping) -> PlanOptions:
        """From query parameters or form fields (Starlette's multi-dicts, or a plain dict). A bad value is a
        ``UsageError`` (400 with its message)."""
        def many(name: str) -> list[str]:
            getlist = getattr(params, "getlist", None)
            raw = getlist(name) if getlist else params.get(name, [])
            raw = [raw] if isinstance(raw, str) else list(raw or [])
            return [str(v).strip() for v in raw if str(v).strip()]

        def flag(name: str) -> bool:
            v = many(name)
            if not v:
                return False
            if v[-1].lower() in ("1", "true", "on", "yes"):
                return True
            if v[-1].lower() in ("0", "false", "off", "no"):
                return False
            raise UsageError(f"{name}={v[-1]!r}: use 1 or 0")

        link = (many("link") or ["auto"])[-1]
        if link not in LINK_MODES:
            raise BadChoiceError(f"link {link!r}: use one of {', '.join(LINK_MODES)}")
        kinds = []
        for k in many("convert_kind"):
            if len(k) > MAX_KIND_CHARS or not k.replace("_", "").replace("-", "").isalnum():
                raise UsageError(f"convert_kind {k[:MAX_KIND_CHARS]!r}: not a model kind")
            if k not in kinds:
                kinds.append(k)
        return cls(prefer_smaller=flag("prefer_smaller"), no_fp16=flag("no_fp16"), link=link,
                   convert_kind=tuple(sorted(kinds)), components=flag("components"))

    def query(self) -> list[tuple[str, str]]:
        """The options as query pairs (only those that differ from the defaults)."""
        out: list[tuple[str, str]] = []
        if self.prefer_smaller:
            out.append(("prefer_smaller", "1"))
        if self.no_fp16:
            out.append(("no_fp16", "1"))
        if self.link != "auto":
            out.append(("link", self.link))
        out += [("convert_kind", k) for k in self.convert_kind]
        if self.components:
            out.append(("components", "1"))
        return out

    @property
    def url(self) -> str:
        q = urlencode(self.query())
        return "/disk" + ("?" + q if q else "")

    def cli(self, db: Path | None = None) -> str:
        """The same plan from the command line (for catalog ``db``)."""
        import shlex

        parts = ["ckptlab plan-space"] + ([f"--db {shlex.quote(str(db))}"] if db is not None else [])
        if self.prefer_smaller:
            parts.append("--prefer-smaller")
        if self.no_fp16:
            parts.append("--no-fp16")
        if self.link != "auto":
            parts.append(f"--link {self.link}")
        parts += [f"--convert-kind {k}" for k in self.convert_kind]
        return " ".join(parts)


def make_plan(cat: Catalog, opts: PlanOptions, dupes=None) -> SpacePlan:
    """What ``ckptlab plan-space`` with these options plans for ``cat`` (the very function it calls);
    ``dupes``: the groups ``find_dupes`` just found with the same options (so they are not found twice)."""
    return plan_space(cat, prefer_smaller=opts.prefer_smaller, fp16=not opts.no_fp16, link=opts.link,
                      convert_kinds=set(opts.convert_kind), dupes=dupes)


def plan_fingerprint(plan: SpacePlan) -> str:
    """A digest of everything the plan would do (every step with the file states it checks, the notes, the
    options), leaving out only when it was made: two plans with one fingerprint are the same plan."""
    body = {k: v for k, v in plan.to_dict().items() if k != "created"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


@dataclass
class CopyView(DupeCopy):
    """One copy of a duplicate group as the page shows it: ``find_dupes``'s copy, with what the plan does to it
    (``action``: keep | link | delete | leave; ``bytes_freed``, ``link``, ``link_path`` from the plan's step)."""

    what: str = ""           # the action in words ("replaced by a hard link to the kept copy", "removed"...)
    why_not_kept: str = ""   # why the kept copy wins over this one
    then: str = ""           # the kept copy: what a later transform step does to it


def _view(c: DupeCopy, **view) -> CopyView:
    """``c`` as the page shows it; the plan's step (``view``) decides the action, link and bytes freed."""
    base = {f.name: getattr(c, f.name) for f in fields(DupeCopy)}
    base.update(note="", link=None, link_path=None, bytes_freed=0)
    return CopyView(**{**base, **view})


@dataclass
class GroupView:
    index: int          # the plan's ``group`` number (1-based, as in plan.json)
    kind: str           # exact | same_weights | shared_component
    reason: str
    copies: list[CopyView]
    bytes_freed: int
    keep: str
    keep_why: list[str] = field(default_factory=list)
    component: str | None = None


@dataclass
class PlanView:
    options: PlanOptions
    plan: SpacePlan
    fingerprint: str
    groups: list[GroupView]
    shared: list[GroupView]
    transforms: list[PlanStep]
    unhashed: int
    unfingerprinted: int

    @property
    def total_bytes_freed(self) -> int:
        return self.plan.total_bytes_freed

    @property
    def duplicate_bytes_freed(self) -> int:
        return sum(g.bytes_freed for g in self.groups)

    @property
    def transform_bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.transforms)


def _what(step: PlanStep | None, copy) -> tuple[str, str]:
    """``(action, words)`` for a non-kept copy: from its plan step when it has one, else left as it is."""
    if step is None:
        return "leave", f"left as it is: {copy.note}" if copy.note else "left as it is"
    if step.action == "link_duplicate":
        kind = "hard link" if step.link == "hard" else "symlink"
        named = "" if step.link_path == step.path else f", named {Path(step.link_path).name}"
        return "link", f"replaced by a {kind} to the kept copy{named} (the UI still loads it)"
    outside = " (outside every UI model folder)" if not copy.in_ui else " from its UI folder (--link none)"
    return "delete", "removed" + outside


def build_view(cat: Catalog, opts: PlanOptions) -> PlanView:
    """The plan and its duplicate groups, joined by the plan's group numbers: the groups are found once
    (``find_dupes``), handed to ``plan_space`` for its duplicate steps and kept for what the steps do not carry
    (the kept copy's facts, the copies left alone). A catalog that changes under the page (a record gone
    between the reads) is read again."""
    for _attempt in range(3):
        dupes = find_dupes(cat, prefer_smaller=opts.prefer_smaller, components=opts.components, link=opts.link)
        try:
            plan = make_plan(cat, opts, dupes)
        except KeyError:  # a grouped file left the catalog before the plan read the records
            continue
        view = _join(cat, opts, plan, dupes)
        if view is not None:
            return view
    raise CkptlabError("the catalog keeps changing (a scan is running?); reload the page in a moment")


def _join(cat: Catalog, opts: PlanOptions, plan: SpacePlan, dupes) -> PlanView | None:
    by_path = {s.path: s for s in plan.steps if s.action != "transform"}
    transformed = {s.path: s for s in plan.steps if s.action == "transform"}
    groups: list[GroupView] = []
    shared: list[GroupView] = []
    for gi, g in enumerate(dupes.groups, 1):
        if g.kind == "shared_component":
            copies = [_view(c, keep=False, action="leave", what="not a duplicate: nothing to do") for c in g.copies]
            shared.append(GroupView(index=gi, kind=g.kind, reason=g.reason, copies=copies, bytes_freed=0, keep="",
                                    component=g.component))
            continue
        records = {c.id: cat.get(c.id) for c in g.copies}
        if any(r is None for r in records.values()):
            return None
        keeper = next(c for c in g.copies if c.keep)
        copies: list[CopyView] = []
        why: list[str] = []
        for c in g.copies:
            step = by_path.get(c.path)
            if step is not None and (step.group != gi or step.keep != keeper.path):
                return None  # the plan was made from another state of the catalog
            if c.keep:
                t = transformed.get(c.path)
                copies.append(_view(c, keep=True, action="keep", what="kept",
                                    then=(f"then rewritten ({t.label}) as {Path(t.output).name}" if t else "")))
                continue
            action, what = _what(step, c)
            reason = keep_reason(records[keeper.id], records[c.id], opts.prefer_smaller)
            if reason not in why:
                why.append(reason)
            copies.append(_view(c, keep=False, action=action, what=what, bytes_freed=step.bytes_freed if step else 0,
                                link=step.link if step else None, link_path=step.link_path if step else None,
                                why_not_kept=reason, note=c.note))
        groups.append(GroupView(index=gi, kind=g.kind, reason=g.reason, copies=copies,
                                bytes_freed=sum(c.bytes_freed for c in copies), keep=keeper.path, keep_why=why))
    planned_groups = {s.group for s in by_path.values()}
    if not planned_groups <= {g.index for g in groups}:
        return None
    groups.sort(key=lambda g: (-g.bytes_freed, g.index))
    return PlanView(options=opts, plan=plan, fingerprint=plan_fingerprint(plan), groups=groups, shared=shared,
                    transforms=sorted(transformed.values(), key=lambda s: (-s.bytes_freed, s.path)), unhashed=dupes.unhashed,
                    unfingerprinted=dupes.unfingerprinted)


#: plans the page showed recently: ``(db, options) -> (catalog change marker, when, view)``. Making the plan reads
#: every record and stats every grouped file (seconds at 50,000 files); a pager click or a second look at the same
#: options reuses it while the catalog is unchanged and the view is younger than ``VIEW_TTL_S`` (files can change
#: on disk without the catalog knowing). Apply never uses it: it makes the plan again and compares fingerprints.
_VIEWS: dict[tuple, tuple[tuple, float, PlanView]] = {}
_VIEWS_LOCK = threading.Lock()
VIEW_TTL_S = 60.0
MAX_VIEWS = 8


def cached_view(cat: Catalog, opts: PlanOptions) -> PlanView:
    """``build_view(cat, opts)``, reused while the catalog's change marker is the same and for ``VIEW_TTL_S``."""
    key = (str(cat.path), tuple(opts.query()))
    marker = cat.change_marker()
    now = time.monotonic()
    with _VIEWS_LOCK:
        hit = _VIEWS.get(key)
    if hit is not None and hit[0] == marker and now - hit[1] < VIEW_TTL_S:
        return hit[2]
    view = build_view(cat, opts)
    with _VIEWS_LOCK:
        _VIEWS[key] = (marker, now, view)
        while len(_VIEWS) > MAX_VIEWS:
            _VIEWS.pop(min(_VIEWS, key=lambda k: _VIEWS[k][1]))
    return view


def plans_dir(db: Path) -> Path:
    """Where applied plans are kept: ``<catalog>.plans/`` beside the catalog (a PostgreSQL catalog's: in the
    user data folder, ``catalog.side_path``)."""
    from ckptlab.library.catalog import side_path

    return side_path(db, ".plans")


def save_plan(plan: SpacePlan, db: Path) -> Path:
    """Write ``plan`` as ``<catalog>.plans/plan-<UTC time>.json`` (never over another plan)."""
    folder = plans_dir(db)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1000):
        path = folder / (f"plan-{stamp}.json" if n == 0 else f"plan-{stamp}-{n}.json")
        try:
            return plan.save(path)
        except OutputError:
            if not (path.exists() or path.is_symlink()):
                raise
    raise OutputError("too many plans saved this second", folder)


def _extra_kinds(cat: Catalog) -> list[str]:
    present = {k for k in cat.kinds() if k}
    return sorted(set(EXTRA_CONVERT_KINDS) | (present - set(CONVERT_KINDS)))


@router.get("/disk")
def disk(request: Request, cat: Catalog = Depends(catalog)):
    opts = PlanOptions.from_params(request.query_params)
    page_no = page_number(request.query_params)
    view = cached_view(cat, opts)
    pages = max(1, math.ceil(max(len(view.groups), len(view.transforms)) / PER_PAGE))
    page_no = min(page_no, pages)
    shown = slice((page_no - 1) * PER_PAGE, page_no * PER_PAGE)

    def page_url(n: int) -> str:
        q = opts.query() + ([("page", str(n))] if n > 1 else [])
        return "/disk" + ("?" + urlencode(q) if q else "")

    template = "disk_plan.html" if request.headers.get("hx-request") == "true" else "disk.html"
    return page(request, template, nav="disk", view=view, opts=opts, kinds=_extra_kinds(cat),
                link_modes=LINK_MODES, cli=opts.cli(request.app.state.db), groups=view.groups[shown],
                transforms=view.transforms[shown], page_no=page_no, pages=pages, page_url=page_url,
                per_page=PER_PAGE)


@router.post("/disk/apply")
def apply(request: Request, cat: Catalog = Depends(catalog), fingerprint: str = Form(""),
          prefer_smaller: str = Form(""), no_fp16: str = Form(""), link: str = Form("auto"),
          convert_kind: list[str] = Form([])):
    """Save the plan the reviewed page showed and start the ``apply-plan`` job on it; 303 to the job page.
    Refused (409) when the plan made now is not the one reviewed."""
    opts = PlanOptions.from_params({"prefer_smaller": prefer_smaller, "no_fp16": no_fp16, "link": link,
                                    "convert_kind": convert_kind})
    if not fingerprint:
        raise UsageError("this form lacks the plan it applies (open the Duplicates & disk page and review it)")
    plan = make_plan(cat, opts)
    if plan_fingerprint(plan) != fingerprint:
        return page(request, "disk_stale.html", status=409, nav="disk", message=STALE, opts=opts)
    if not plan.steps:
        raise UsageError("the plan has no steps: there is nothing to apply")
    db = request.app.state.db
    path = save_plan(plan, db)
    try:
        job_id = jobs.submit(db, "apply-plan", {"plan": str(path)})
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
