"""The library page (``/``): every catalogued file as a card (or a table row), filtered, searched, sorted and
paged by ``query.search``; the filter controls from ``query.facets``.

One URL, three answers:

- a plain request: the whole page (filters, results, pager), rendered server-side: no script is needed to see
  or page through results;
- an htmx request (``HX-Request``, ``partial``): only the ``#results`` fragment, which the filter form swaps in
  and pushes to the address bar;
- an htmx request with ``chunk=1`` (the infinite-scroll sentinel at the end of a page): only the next page's
  cards and a new sentinel, appended in place, so the DOM grows by one page per scroll and never holds the
  whole library.

Display settings (``view`` grid|list, ``density`` comfortable|compact|dense) are not filters: a value given in
the query string is used and remembered in a cookie, and a request without one uses the cookie.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from ckptlab.errors import BadChoiceError
from ckptlab.library.precision import PRECISIONS
from ckptlab.library.ui_folders import kind_label
from ckptlab.web.deps import catalog_at
from ckptlab.web.query import PER_PAGE, SAFETY, SORTS, Card, Filters, facets, search
from ckptlab.web.templating import page

router = APIRouter()

VIEWS = ("grid", "list")
DENSITIES = ("comfortable", "compact", "dense")
COOKIE_AGE = 365 * 24 * 3600
FACET_SHOWN = 60  # values listed per filter (the most common; selected ones always)
#: kinds whose prompt syntax the card's copy button gives (A1111: LoRA/LyCORIS tag, embedding by its name)
LORA_KINDS = ("lora", "lycoris")
EMBEDDING_KINDS = ("embedding",)


def _display(request: Request, name: str, allowed: tuple[str, ...]) -> tuple[str, bool]:
    """A display setting from the query (remembered: True) or the cookie, else the first allowed value."""
    given = request.query_params.get(name)
    if given:
        if given not in allowed:
            raise BadChoiceError(f"{name}={given!r}: use one of {', '.join(allowed)}")
        return given, True
    kept = request.cookies.get(f"ckptlab_{name}")
    return (kept if kept in allowed else allowed[0]), False


def stem(file_name: str) -> str:
    import os

    return os.path.splitext(file_name)[0]


def prompt_syntax(card: Card) -> str | None:
    """What a user pastes into an A1111 prompt for this file: ``<lora:STEM:1>`` for LoRAs (LyCORIS included),
    the stem for embeddings; None for other kinds."""
    if card.kind in LORA_KINDS:
        return f"<lora:{stem(card.file_name)}:1>"
    if card.kind in EMBEDDING_KINDS:
        return stem(card.file_name)
    return None


def _active(f: Filters) -> bool:
    """Whether any filter or search narrows the list (an empty result then means 'nothing matches', not 'empty
    library')."""
    return bool(f.q or f.kind or f.family or f.format or f.precision or f.safety or f.folder or f.tag
                or f.linked is not None or f.duplicates is not None or f.updates is not None)


def _options(fac: dict, name: str, selected: tuple[str, ...], fallback: tuple[str, ...] = ()) -> list[tuple]:
    """``[(value, label, count or None, checked)]`` for one multi-valued filter: the facet's values (most common
    first, at most FACET_SHOWN), else ``fallback``; selected values are always listed."""
    rows = [(v, lbl, n) for v, lbl, n in fac.get(name, [])[:FACET_SHOWN]] if fac.get(name) else \
        [(v, v, None) for v in fallback]
    seen = {str(v) for v, _, _ in rows}
    rows += [(v, v, None) for v in selected if v not in seen]
    return [(str(v), str(lbl), n, str(v) in selected) for v, lbl, n in rows]


@router.get("/")
def library(request: Request):
    """The library page, its ``#results`` fragment (htmx) or the next page's cards (``chunk=1``)."""
    # opened in this route's own thread (a Depends(catalog) may run in another pool thread than the route)
    cat = catalog_at(request.app.state.db)
    f = Filters.from_query(request.query_params)
    view, set_view = _display(request, "view", VIEWS)
    density, set_density = _display(request, "density", DENSITIES)
    result = search(cat, f)
    if not all(c.has_preview for c in result.cards):
        from ckptlab.web.media import preview_paths

        have = preview_paths(cat, [c.id for c in result.cards if not c.has_preview])
        for c in result.cards:
            c.has_preview = c.has_preview or c.id in have
    htmx = request.headers.get("hx-request") == "true"
    # htmx's history restore (a cache miss on Back) asks with HX-Request too but wants the whole page
    fragment = htmx and request.headers.get("hx-history-restore-request") != "true"
    chunk = fragment and request.query_params.get("chunk") == "1"
    # the form's choices: only a whole page has the form (a fragment needs the family labels, which an indexed
    # search hands back in result.facets; without them a card shows the family id)
    fac = result.facets or ({} if fragment else facets(cat))
    family_labels = {str(v): str(lbl) for v, lbl, _ in fac.get("family", [])}

    def href(view: str | None = None, chunk: bool = False, **changes) -> str:
        """This page's URL with ``changes`` to the filters (and a display setting, or the chunk marker)."""
        query = f.to_query(**changes)
        extra = "&".join(x for x in ((f"view={view}" if view else ""), ("chunk=1" if chunk else "")) if x)
        return "/?" + "&".join(x for x in (query, extra) if x) if (query or extra) else "/"

    ctx = dict(
        nav="library", result=result, f=f, view=view, density=density, views=VIEWS, densities=DENSITIES,
        active=_active(f), sorts=SORTS, per_pages=PER_PAGE, href=href, syntax=prompt_syntax, safety_values=SAFETY,
        lora_kinds=LORA_KINDS, kind_label=kind_label,
        family_labels=family_labels, filter_groups=[
            ("kind", "Kind", _options(fac, "kind", f.kind)),
            ("family", "Base model", _options(fac, "family", f.family)),
            ("format", "Format", _options(fac, "format", f.format)),
            ("precision", "Precision", _options(fac, "precision", f.precision, PRECISIONS)),
            ("safety", "Safety", _options(fac, "safety", f.safety, SAFETY)),
            ("folder", "UI folder", _options(fac, "folder", f.folder)),
            ("tag", "Tags", _options(fac, "tag", f.tag)),
        ],
        tristates=[("linked", "CivitAI link", ("linked", "not linked"), f.linked),
                   ("duplicates", "Duplicates", ("has copies", "no copies"), f.duplicates),
                   ("updates", "Updates", ("update available", "up to date"), f.updates)],
    )
    template = "_library_chunk.html" if chunk else "_library_results.html" if fragment else "library.html"
    headers = {"Vary": "HX-Request"}
    if fragment and not chunk:  # the address bar gets the canonical URL, not every default the form sent
        headers["HX-Push-Url"] = href()
    resp = page(request, template, headers=headers, **ctx)
    for name, value, given in (("view", view, set_view), ("density", density, set_density)):
        if given:
            resp.set_cookie(f"ckptlab_{name}", value, max_age=COOKIE_AGE, samesite="strict", httponly=True)
    return resp
