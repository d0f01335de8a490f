"""The model page ``/model/{id}``: everything the catalog knows about one file, explained, with links to start
jobs on it. Reads stored data only (the catalog, its CivitAI records, sidecars next to the file and the file's
header when it is present); never loads tensors, never unpickles, never goes to the network.

Sections (ids are the DOM contract the browser tests use): ``#identification`` (what ``ckptlab inspect`` says,
with its evidence), ``#hashes`` (``dl``; a copy button per hash), ``#metadata`` (ModelSpec, kohya training
summary and trigger-word suggestions, merge recipe, ckptlab provenance, every other key), ``#civitai`` (link,
versions, which are local, update available), ``#sidecars``, ``#duplicates`` (same bytes, same weights, same
component), ``#lineage`` (``library.lineage``), ``#images`` (``ckptlab images`` links)."""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request

from ckptlab.display import short_text
from ckptlab.errors import NotInCatalogError
from ckptlab.library import copies  # registers the component index before any catalog opens
from ckptlab.library import lineage as lineage_mod  # registers the lineage indexes likewise
from ckptlab.library.catalog import Catalog, FileRecord
from ckptlab.web.deps import catalog
from ckptlab.web.templating import page

router = APIRouter()

#: kinds the A1111 ``<lora:NAME:1>`` prompt syntax applies to
LORA_KINDS = ("lora", "lycoris", "locon", "dora")
CHECKPOINT_KINDS = ("checkpoint",)
#: metadata values longer than this are cut on the page (a header value may be megabytes)
MAX_VALUE_CHARS = 2000
#: other metadata keys shown at most
MAX_OTHER_KEYS = 200
PROVENANCE_KEYS = ("ckptlab.operation", "ckptlab.version", "ckptlab.inputs", "ckptlab.options")
MERGE_KEYS = ("sd_merge_recipe", "sd_merge_models", "ckptlab.recipe")


def _text(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A metadata value as display text (``display.short_text``: JSON for structures, "" for none)."""
    return short_text(value, limit, indent=1, empty="")


def _stem(rec: FileRecord) -> str:
    return rec.name if rec.format == "diffusers" else os.path.splitext(rec.name)[0]


def plain_text(html: Any, limit: int = 3000) -> str | None:
    """The text of a CivitAI description (HTML written by strangers): tags dropped, ``script``/``style`` contents
    dropped, entities decoded, blank runs collapsed, cut to ``limit`` characters. The template escapes the result
    like any other string; nothing of the HTML is ever rendered as HTML."""
    if not isinstance(html, str) or not html.strip():
        return None
    from html.parser import HTMLParser

    parts: list[str] = []
    skip = [0]

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style"):
                skip[0] += 1
            elif tag in ("p", "br", "li", "div", "h1", "h2", "h3", "h4", "tr"):
                parts.append("\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style") and skip[0]:
                skip[0] -= 1

        def handle_data(self, data):
            if not skip[0]:
                parts.append(data)

    p = P(convert_charrefs=True)
    p.feed(html[:200_000])
    p.close()
    lines = [" ".join(line.split()) for line in "".join(parts).splitlines()]
    text = "\n".join(line for line in lines if line)
    return (text if len(text) <= limit else text[:limit] + "…") or None


def _job_url(kind: str, **params: str) -> str:
    return f"/jobs/new/{kind}?{urlencode(params)}"


# -- sections ---------------------------------------------------------------------------------------------
def identification(rec: FileRecord) -> dict:
    """What ``ckptlab inspect`` shows, from the ``ModelInfo`` the scan stored in ``files.info``."""
    from ckptlab.arch.families import display_name
    from ckptlab.library.precision import byte_counts, precision_of

    info = rec.info if isinstance(rec.info, dict) else {}
    vram = info.get("vram") if isinstance(info.get("vram"), dict) else None
    detail = rec.safety_detail if isinstance(rec.safety_detail, dict) else {}
    findings = [f for f in detail.get("findings") or [] if isinstance(f, dict)]
    for name, sub in (detail.get("files") or {}).items() if isinstance(detail.get("files"), dict) else ():
        findings += [{**f, "location": f"{name}: {f.get('location') or ''}"} for f in
                     (sub.get("findings") or [] if isinstance(sub, dict) else []) if isinstance(f, dict)]
    params = info.get("params")
    return {
        "kind": rec.kind, "family": rec.family, "family_name": display_name(rec.family) if rec.family else None,
        "variant": rec.variant, "prediction": info.get("prediction"),
        "components": [str(c) for c in _list(info.get("components"))],
        "precision": precision_of(rec.dtypes), "dtypes": byte_counts(rec.dtypes), "format": rec.format,
        "size": rec.size, "tensors": rec.n_tensors, "params": params if isinstance(params, int) else None,
        "params_text": _params(params) if isinstance(params, int) else None,
        "has_ema": info.get("has_ema"), "training_state": info.get("training_state"), "pruned": info.get("pruned"),
        "ema_bytes": rec.ema_bytes, "vram": vram,
        "evidence": [str(e) for e in _list(info.get("evidence"))][:50],
        "warnings": [str(w) for w in _list(info.get("warnings"))][:50],
        "safety": rec.safety, "findings": findings[:50], "safety_error": detail.get("error"),
        "error": rec.error, "identified": bool(info),
    }


def _list(v) -> list:
    """A stored list (the scan writes one; another writer may have put anything there): else []."""
    return v if isinstance(v, list) else []


def _params(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}" if unit == "B" else f"{n / div:.1f} {unit}"
    return str(n)


def header_metadata(rec: FileRecord) -> tuple[dict, str]:
    """The file's metadata and where it came from: read from the safetensors / GGUF header now when the file is
    present (header only: no tensor is read), else what the last scan stored (pickles always: a page view never
    runs the pickle reader). Values that hold JSON are parsed, as ``inspect`` shows them."""
    stored = (rec.info or {}).get("metadata") if isinstance(rec.info, dict) else None
    stored = stored if isinstance(stored, dict) else {}
    if rec.status != "present" or rec.format not in ("safetensors", "gguf") or not os.path.isfile(rec.path):
        return stored, "as the last scan recorded it"
    try:
        from ckptlab.arch.identify import parse_metadata

        if rec.format == "safetensors":
            from ckptlab.formats.safetensors import read_header

            raw = read_header(rec.path).metadata or {}
        else:
            from ckptlab.formats import open_model

            with open_model(rec.path) as src:
                raw = dict(src.metadata or {})
        return parse_metadata(dict(raw)), "read from the file's header"
    except Exception:  # noqa: BLE001 - a file changed or unreadable since the scan: show what was stored
        return stored, "as the last scan recorded it (the header cannot be read now)"


def metadata_view(rec: FileRecord, md: dict, link: dict | None, sidecar: dict | None) -> dict:
    """The metadata section: ModelSpec, kohya training summary + trigger suggestions, merge recipe, ckptlab
    provenance, and the other keys."""
    from ckptlab.library.show import trigger_sources
    from ckptlab.lora.info import TRAINING_KEYS

    modelspec = [(_text(k, 200), _text(v)) for k, v in md.items() if str(k).startswith("modelspec.")][:MAX_OTHER_KEYS]
    training = [(k, _text(md[k], 500)) for k in TRAINING_KEYS if md.get(k) not in (None, "", "None")]
    kohya_other = [k for k in md if str(k).startswith("ss_") and k not in TRAINING_KEYS]
    triggers = trigger_sources(rec, link, sidecar)
    merge = {k: _text(md[k]) for k in MERGE_KEYS if k in md}
    recipe = md.get("sd_merge_recipe") if isinstance(md.get("sd_merge_recipe"), dict) else None
    prov = {k: md[k] for k in PROVENANCE_KEYS if k in md}
    inputs = prov.get("ckptlab.inputs")
    if isinstance(inputs, str):
        try:
            inputs = json.loads(inputs)
        except ValueError:
            inputs = None
    options = prov.get("ckptlab.options")
    shown = {k for k in md if str(k).startswith("modelspec.")} | set(TRAINING_KEYS) | set(MERGE_KEYS) | set(PROVENANCE_KEYS)
    other = [(_text(k, 200), _text(v, 500)) for k, v in md.items() if k not in shown][:MAX_OTHER_KEYS]
    return {
        "count": len(md), "modelspec": modelspec, "training": training, "kohya_other": len(kohya_other),
        "triggers": triggers[:40],
        "merge": merge, "recipe": [(k, _text(v, 200)) for k, v in recipe.items()] if recipe else [],
        "provenance": {"operation": _text(prov.get("ckptlab.operation"), 100) or None,
                       "version": _text(prov.get("ckptlab.version"), 100) or None,
                       "inputs": [i for i in inputs if isinstance(i, dict)][:50] if isinstance(inputs, list) else [],
                       "options": _text(options, 1000) or None} if prov else None,
        "other": other,
    }


def civitai_view(cat: Catalog, rec: FileRecord) -> dict | None:
    """The CivitAI link (stored data only) with the model's versions: which are local (a catalogued file has
    one of the version's SHA256s) and whether a newer version than the linked one exists."""
    from ckptlab.hub import store

    link = store.link_summary(cat, rec.sha256)
    if link is None:
        return None
    model = store.latest_record(cat, "model", link.get("model_id")) or {}
    versions = [v for v in model.get("modelVersions") or [] if isinstance(v, dict)][:100]
    by_version: dict[int, list[str]] = {}
    for v in versions:
        shas = []
        for f in v.get("files") or []:
            h = (f.get("hashes") or {}).get("SHA256") if isinstance(f, dict) and isinstance(f.get("hashes"), dict) \
                else None
            if isinstance(h, str) and h:
                shas.append(h.upper())
        by_version[id(v)] = shas
    wanted = sorted({h for hs in by_version.values() for h in hs})
    local: dict[str, tuple[int, str]] = {}
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        for sha, fid, path in cat.conn.execute(
                "SELECT c.sha256, f.id, f.display FROM content c JOIN files f ON c.dev = f.dev AND c.ino = f.ino "
                "AND c.size = f.size AND c.mtime_ns = f.mtime_ns WHERE f.status = 'present' AND c.sha256 IN "
                f"({', '.join('?' for _ in chunk)}) ORDER BY f.id", chunk):
            local.setdefault(sha, (fid, path))
    rows, linked_index = [], None
    for i, v in enumerate(versions):
        here = [local[h] for h in by_version[id(v)] if h in local]
        if v.get("id") == link.get("version_id"):
            linked_index = i
        rows.append({"id": v.get("id"), "name": _text(v.get("name"), 200), "base_model": _text(v.get("baseModel"), 100),
                     "published": _text(v.get("publishedAt") or v.get("createdAt"), 40),
                     "linked": v.get("id") == link.get("version_id"),
                     "local": [{"id": fid, "path": p} for fid, p in here[:5]]})
    newer = store.newer_version_available(link.get("version_id"), [v.get("id") for v in versions])
    update = rows[0] if rows and newer else None  # modelVersions: newest first
    for n, r in enumerate(rows):
        r["newer"] = linked_index is not None and n < linked_index
    revs = store.revisions(cat, "version", link["version_id"]) if link.get("version_id") is not None else []
    return {**link, "model_name": _text(link.get("model_name"), 300), "version_name": _text(link.get("version_name"), 200),
            "versions": rows, "newer_version": update,
            "revision_dates": [(r["revision"], r["fetched_at"]) for r in revs][-20:],
            "description": plain_text(model.get("description") or _version_description(cat, link))}


def _version_description(cat: Catalog, link: dict):
    """The linked version's own description (when the model record has none)."""
    from ckptlab.hub import store

    return (store.latest_record(cat, "version", link.get("version_id")) or {}).get("description")


def sidecars_view(rec: FileRecord) -> dict | None:
    """The sidecars next to the file (read now when it is present; else what the last scan stored)."""
    from ckptlab.library import sidecars

    if rec.status == "present" and os.path.exists(rec.path):
        sc = sidecars.read(rec.path)
        source = "read now"
    else:
        sc = dict(rec.sidecars) if isinstance(rec.sidecars, dict) else {}
        sc.pop("_signature", None)
        source = "as the last scan recorded them"
    files = sc.get("files") if isinstance(sc.get("files"), dict) else {}
    if not files:
        return None
    summaries = []
    for role in ("json", "civitai_info", "cm_info", "metadata_json"):
        s = sc.get(role)
        if isinstance(s, dict):
            summaries.append({"role": role, "file": files.get(role, role),
                              "fields": [(k, _text(v, 500)) for k, v in s.items()][:30]})
    return {"files": sorted((str(r), str(n)) for r, n in files.items()), "summaries": summaries,
            "description": _text(sc.get("description"), 4096) or None,
            "trigger_words": [str(w) for w in sc.get("trigger_words") or []][:40], "source": source, "raw": sc}


def copies_view(cat: Catalog, rec: FileRecord) -> dict:
    """Same bytes (SHA256), same weights (tensor fingerprint, fp16 or bf16 canonical form) and per component the
    files that share it (``library.copies``: index lookups, no loop over the catalog)."""
    same = copies.same_bytes(cat, rec)
    weights = copies.same_weights(cat, rec)
    comps = copies.same_component(cat, rec, exclude={o["id"] for o in same} | {o["id"] for o in weights})
    return {"same_bytes": same, "same_weights": weights, "components": comps, "fingerprinted": bool(rec.fingerprint)}


def actions(rec: FileRecord) -> list[tuple[str, str]]:
    """``[(label, url)]`` of the jobs that make sense for this file (the jobs pages own the forms)."""
    if rec.status != "present":
        return []  # nothing can run on a file that is not there
    p = rec.path
    out = [("Hash", _job_url("hash", path=p)), ("Safety check", _job_url("check", path=p))]
    kind = (rec.kind or "").lower()
    if rec.format == "pickle":
        out.append(("Convert to safetensors", _job_url("convert", path=p)))
    if kind in CHECKPOINT_KINDS or kind in ("unet", "vae", "text_encoder"):
        out += [("Prune", _job_url("prune", path=p)), ("Change precision", _job_url("precision", path=p))]
    if kind in CHECKPOINT_KINDS:
        out += [("Extract a component", _job_url("extract", path=p)),
                ("Merge (as model A)", _job_url("merge", path=p)),
                ("Bake LoRAs into it", _job_url("lora-bake", path=p)),
                ("Generate", _job_url("generate", path=p))]
    if kind in LORA_KINDS:
        out.append(("Bake into a checkpoint", _job_url("lora-bake", lora=p)))
    return out


def model_view(cat: Catalog, rec: FileRecord) -> dict:
    """Everything the model page shows about ``rec`` (a plain dict: the template's only input)."""
    from ckptlab.library import image_links, previews
    from ckptlab.web.media import preview_paths

    md, md_source = header_metadata(rec)
    civ = civitai_view(cat, rec)
    sc = sidecars_view(rec)
    kind = (rec.kind or "").lower()
    stem = _stem(rec)
    pv = previews.preview_of(cat, rec.id)
    # the library page's rule: an image /media/preview/ID would serve (a sidecar that names one is not enough)
    has_preview = bool(preview_paths(cat, [rec.id]))
    return {
        "rec": rec, "name": (civ or {}).get("model_name") or stem, "stem": stem,
        "missing": rec.status != "present",
        "ident": identification(rec),
        "hashes": rec.hashes.names() if rec.hashes else {},
        "hash_job": _job_url("hash", path=rec.path),
        "metadata": metadata_view(rec, md, civ, sc["raw"] if sc else None), "metadata_source": md_source,
        "civitai": civ, "sidecars": sc,
        "copies": copies_view(cat, rec),
        "lineage": lineage_mod.lineage(cat, rec),
        "images": image_links.images_for(cat, rec.sha256, limit=50),
        "preview": pv, "has_preview": has_preview,
        "lora_syntax": f"<lora:{stem}:1>" if kind in LORA_KINDS else None,
        "embedding_name": stem if kind == "embedding" else None,
        "actions": actions(rec),
    }


def _file_id(raw: str) -> int:
    try:
        fid = int(raw)
    except ValueError:
        fid = -1
    if fid < 0 or fid > 2**62:
        raise NotInCatalogError(f"no file with id {raw!r} in the catalog (ids are the numbers in the library's links)")
    return fid


@router.get("/model/{file_id}")
def model_page(request: Request, file_id: str, cat: Catalog = Depends(catalog)):
    """The model page of catalogued file ``file_id``; unknown ids are a 404 page."""
    rec = cat.get(_file_id(file_id))
    if rec is None:
        raise NotInCatalogError(f"no file with id {file_id} in the catalog (it may have been removed by a rescan "
                                "of another catalog; go back to the library)")
    return page(request, "model.html", nav="library", m=model_view(cat, rec))
