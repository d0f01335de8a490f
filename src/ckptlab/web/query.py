"""The library page's question: which catalogued files match these filters and this search, in what order, one
page at a time (``search``), and what each filter can be set to (``facets``).

SKELETON: the implementation below is the plain one (every record through ``library.show.list_files``); the
index-backed one (FTS5 for text, indexed columns for filters) replaces it with the same signatures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from urllib.parse import urlencode

from ckptlab.errors import BadChoiceError, UsageError
from ckptlab.library.catalog import Catalog

SORTS = ("name", "size", "added", "family")
SAFETY = ("safe", "suspicious", "malicious", "corrupt", "unchecked")
PER_PAGE = (30, 60, 120, 240)
MAX_QUERY = 200  # characters of search text kept


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


def precision_of(dtypes: dict[str, int] | None) -> str | None:
    """One word for a file's tensor dtypes (by bytes): the dtype holding >= 90 % of the bytes, else ``mixed``."""
    if not dtypes:
        return None
    total = sum(dtypes.values()) or 1
    name, n = max(dtypes.items(), key=lambda kv: kv[1])
    if n / total < 0.9:
        return "mixed"
    name = name.lower()
    return {"f32": "fp32", "f16": "fp16", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, name)


def search(cat: Catalog, f: Filters) -> Page:
    """The page of cards ``f`` asks for, and how many match in all. SKELETON (plain, not indexed)."""
    import time

    from ckptlab.hub.link import link_lookup
    from ckptlab.library.show import list_files

    t0 = time.perf_counter()
    rows = list_files(cat, search=f.q or None, sort={"added": "mtime"}.get(f.sort, "name" if f.sort == "family"
                                                                               else f.sort),
                      civitai=link_lookup(cat))
    cards = []
    for rec, civ in rows:
        stem = os.path.splitext(rec.name)[0]
        cards.append(Card(id=rec.id, name=(civ or {}).get("model_name") or stem, file_name=rec.name, path=rec.path,
                          kind=rec.kind, subtype=rec.variant, family=rec.family,
                          base_model=(civ or {}).get("base_model"), format=rec.format,
                          precision=precision_of(rec.dtypes), size=rec.size, safety=rec.safety,
                          linked=bool(civ and civ.get("source") == "link"), added=rec.first_seen,
                          folder=rec.folder, version_name=(civ or {}).get("version_name")))
    for name in ("kind", "family", "format", "precision", "safety"):
        want = getattr(f, name)
        if want:
            cards = [c for c in cards if (getattr(c, name) or "") in want]
    if f.linked is not None:
        cards = [c for c in cards if c.linked == f.linked]
    total = len(cards)
    start = (f.page - 1) * f.per_page
    return Page(cards[start:start + f.per_page], total, f, (time.perf_counter() - t0) * 1000)


def facets(cat: Catalog) -> dict[str, list[tuple[str, str, int]]]:
    """Per filter, the values present: ``{name: [(value, label, count), ...]}``. SKELETON."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for col in ("kind", "family", "format", "safety"):
        rows = cat.conn.execute(f"SELECT {col}, count(*) FROM files WHERE status = 'present' AND {col} IS NOT NULL "
                                f"GROUP BY {col} ORDER BY 2 DESC").fetchall()
        out[col] = [(v, v, n) for v, n in rows]
    return out
