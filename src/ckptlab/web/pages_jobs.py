"""The jobs pages: the list (``/jobs``), a new job's form (``/jobs/new/{kind}``, prefilled from ``?path=``), the
job page (``/jobs/{id}``) with its live progress (server-sent events at ``/jobs/{id}/events``, read by
``static/jobs.js``), and cancel. The work itself runs in worker processes (``ckptlab.web.jobs``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ckptlab.errors import CkptlabError, NotInCatalogError, UsageError
from ckptlab.web import jobs
from ckptlab.web.job_kinds import KINDS, form_kinds, form_values, merge_preview
from ckptlab.web.templating import page

router = APIRouter()

#: how often the events stream reads the job's row
POLL_S = 0.25
#: a comment line this often keeps proxies from closing a quiet stream
KEEPALIVE_S = 15.0
PER_PAGE = 50


def _db(request: Request) -> Path:
    return request.app.state.db


def _form_dict(form) -> dict:
    """A submitted form as params: repeated names become lists; the CSRF field and the kind left out."""
    out: dict = {}
    for key in form.keys():
        if key in ("csrf", "kind"):
            continue
        values = [v for v in form.getlist(key) if isinstance(v, str)]
        out[key] = values if len(values) > 1 else (values[0] if values else None)
    return out


def _job_or_404(db: Path, job_id: int) -> jobs.Job:
    job = jobs.get(db, job_id)
    if job is None:
        raise NotInCatalogError(f"no job {job_id}")
    return job


def _log_tail(db: Path, job_id: int, lines: int = 20) -> str:
    path = jobs.log_path(db, job_id)
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@router.get("/jobs")
def jobs_page(request: Request, page_no: int = 1):
    db = _db(request)
    page_no = max(1, page_no)
    items = jobs.list_jobs(db, limit=PER_PAGE, offset=(page_no - 1) * PER_PAGE)
    total = jobs.count_jobs(db)
    ctx = {"jobs": items, "kinds": form_kinds(), "page_no": page_no, "more": total > page_no * PER_PAGE,
           "active": any(j.active for j in items), "total": total}
    if request.headers.get("hx-request") == "true" and request.query_params.get("rows"):
        return page(request, "jobs_rows.html", **ctx)
    return page(request, "jobs.html", nav="jobs", **ctx)


def _form_page(request: Request, kind: str, values: dict, error: str | None = None, status: int = 200):
    spec = form_kinds().get(kind)
    if spec is None:
        raise NotInCatalogError(f"no job kind {kind!r} (kinds: {', '.join(KINDS)})")
    recipe, recipe_error = None, None
    if kind == "merge":
        recipe, recipe_error = _recipe(request, values)
    return page(request, "job_new.html", status=status, nav="jobs", spec=spec, kind=kind, values=values,
                error=error, recipe=recipe, recipe_error=recipe_error)


@router.get("/jobs/new/{kind}")
def new_job(request: Request, kind: str):
    if kind not in form_kinds():
        raise NotInCatalogError(f"no job kind {kind!r} (kinds: {', '.join(form_kinds())})")
    return _form_page(request, kind, form_values(kind, dict(request.query_params)))


def _recipe(request: Request, values: dict) -> tuple[str | None, str | None]:
    """The merge recipe the form would run, or the one-line reason it cannot show yet."""
    if not values.get("model_a") or not values.get("model_b"):
        return None, "give models A and B to see the recipe"
    try:
        return merge_preview(values), None
    except CkptlabError as e:
        return None, str(e).splitlines()[0]


@router.get("/jobs/recipe")
def merge_recipe(request: Request):
    """The htmx preview of the merge form's recipe (``#recipe-preview``)."""
    values = {k: v for k, v in request.query_params.items() if k != "csrf"}
    recipe, recipe_error = _recipe(request, values)
    return page(request, "job_recipe.html", recipe=recipe, recipe_error=recipe_error)


@router.post("/jobs")
async def create_job(request: Request):
    form = await request.form()
    kind = str(form.get("kind") or "")
    params = _form_dict(form)
    if kind in KINDS and KINDS[kind].internal:  # apply-plan: only the disk page's reviewed plan (POST /disk/apply)
        raise UsageError(f"{kind} jobs start from their own page (the Duplicates & disk review), not this form")
    if kind not in KINDS:
        raise NotInCatalogError(f"no job kind {kind!r} (kinds: {', '.join(form_kinds())})")
    try:
        if kind == "download" and not request.app.state.guard.loopback:
            await run_in_threadpool(refuse_internal_url, params.get("source"))
        job_id = await run_in_threadpool(jobs.submit, _db(request), kind, params)
    except CkptlabError as e:
        values = form_values(kind, {})
        values.update({k: v for k, v in params.items() if v is not None})
        return _form_page(request, kind, values, error=str(e).splitlines()[0], status=400)
    if request.headers.get("hx-request") == "true":
        from fastapi.responses import Response

        return Response(status_code=204, headers={"HX-Redirect": f"/jobs/{job_id}"})
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def refuse_internal_url(source) -> None:
    """Off loopback (a token bind), a download URL must not reach this machine or its private network (the
    server as a proxy into it): ``UsageError`` when the URL's host resolves to a loopback, private, link-local,
    reserved or multicast address. ``civitai:``/``hf:`` sources and other non-URL sources pass."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    if not isinstance(source, str) or "://" not in source:
        return
    try:
        host = urlsplit(source.strip()).hostname
    except ValueError:
        host = None
    if not host:
        raise UsageError("SOURCE: a URL without a host")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise UsageError(f"SOURCE: cannot resolve the host name {host!r}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if (addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved or addr.is_multicast
                or addr.is_unspecified):
            raise UsageError(f"SOURCE: {host} is an address on this machine or its local network ({addr}); "
                             "a server reachable from the network does not download from there")


def _job_ctx(db: Path, job: jobs.Job) -> dict:
    links = jobs.file_ids(db, job.made) if job.made else {}
    return {"job": job, "spec": KINDS.get(job.kind), "links": links,
            "log": _log_tail(db, job.id) if job.status in ("failed", "lost") else "",
            "result_json": json.dumps(job.result, indent=2, ensure_ascii=False)[:20000] if job.result else ""}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int):
    db = _db(request)
    job = _job_or_404(db, job_id)
    if request.headers.get("hx-request") == "true":  # jobs.js refreshing the panel after the final event
        return page(request, "job_panel.html", **_job_ctx(db, job))
    return page(request, "job.html", nav="jobs", **_job_ctx(db, job))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: int):
    db = _db(request)
    _job_or_404(db, job_id)
    jobs.cancel(db, job_id)
    if request.headers.get("hx-request") == "true":
        job = _job_or_404(db, job_id)
        return page(request, "job_panel.html", **_job_ctx(db, job))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _event(data: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + json.dumps(data, ensure_ascii=False) + "\n\n").encode()


@router.get("/jobs/{job_id}/events")
async def job_events(request: Request, job_id: int):
    """Server-sent events: the job's state (``{"status", "done", "total", "description", "error"}``) each time it
    changes; the stream ends after a final state (done, failed, cancelled, lost) or when the client leaves."""
    db = _db(request)
    first = await run_in_threadpool(_job_or_404, db, job_id)
    loop = asyncio.get_running_loop()

    async def stream():
        job, last, quiet_since = first, None, loop.time()
        while True:
            state = job.state()
            if state != last:
                yield _event(state)
                last, quiet_since = state, loop.time()
            elif loop.time() - quiet_since > KEEPALIVE_S:
                yield b": keep-alive\n\n"
                quiet_since = loop.time()
            if job.final:
                return
            await asyncio.sleep(POLL_S)
            if await request.is_disconnected():
                return
            job = await run_in_threadpool(jobs.get, db, job_id) or job

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
