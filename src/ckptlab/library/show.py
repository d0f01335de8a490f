"""``show`` and ``ls``: what the catalog knows about one file (found by path or by any hash), and the
catalogued files filtered as ``ckptlab ls`` filters them.

The library is below the hub: it does not know where a CivitAI link is stored. A caller that has one
passes a lookup (``civitai=``, a function from a ``FileRecord`` to the link's summary dict, or None);
``ckptlab.hub.link.link_lookup(catalog)`` is the hub's. Without it the CivitAI part comes from sidecars
only (``ls``) or is None (``show``).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

from ckptlab.errors import NotInCatalogError, UsageError
from ckptlab.library import previews, sidecars
from ckptlab.library.catalog import Catalog, FileRecord

#: ``FileRecord -> CivitAI link summary or None`` (``hub.store.link_summary``'s dict)
LinkLookup = Callable[[FileRecord], "dict | None"]


def lookup(catalog: Catalog, target: str) -> list[FileRecord]:
    """Records for a path (exact) or a hash (SHA256 / AutoV1-3 / CRC32 / BLAKE3 / SHA-256 prefix)."""
    if os.path.lexists(target) or os.sep in target:
        rec = catalog.get_by_path(Path(target))
        if rec is not None:
            return [rec]
    hexish = target.strip().lower().removeprefix("0x")
    if hexish and all(ch in "0123456789abcdef" for ch in hexish) and len(hexish) >= 8:
        return catalog.find_by_hash(hexish)
    return []


def show_file(catalog: Catalog, target: str, *, civitai: LinkLookup | None = None) -> list[dict]:
    """Everything known about the file(s) ``target`` names (a catalogued path, or a hash / hash prefix of
    at least 8 hex digits): the catalog record, its hashes, live sidecars, files with the same bytes or a
    same component, and (with a ``civitai`` lookup) the CivitAI link. One dict per matching file, as
    ``ckptlab show --json`` prints them. Raises ``NotInCatalogError`` (exit 1) when nothing matches."""
    from ckptlab.jsonable import to_jsonable

    recs = lookup(catalog, target)
    if not recs:
        hexish = target.strip().lower().removeprefix("0x")
        if hexish and len(hexish) < 8 and all(ch in "0123456789abcdef" for ch in hexish):
            raise UsageError(f"{target!r}: a hash prefix needs at least 8 hex digits")
        raise NotInCatalogError(f"{target!r} is not in the catalog (scan its folder first, or give a known hash)")
    out = []
    for rec in recs:
        d = to_jsonable(rec)
        d["hashes"] = rec.hashes.names() if rec.hashes else None
        if rec.status == "present" and os.path.exists(rec.path):
            live = sidecars.read(rec.path)
            d["sidecars"] = live if live.get("files") else None
        elif isinstance(d.get("sidecars"), dict):
            d["sidecars"].pop("_signature", None)
        same: dict[str, list[str]] = {}
        if rec.components:
            for other in catalog.files(status="present", sort="path"):
                if other.id == rec.id or not other.components:
                    continue
                for comp, fp in rec.components.items():  # fp16 rounding, else bf16 rounding (fingerprint.py)
                    if other.components.get(comp) == fp or (
                            rec.components_bf16 and other.components_bf16
                            and other.components_bf16.get(comp) == rec.components_bf16.get(comp)):
                        same.setdefault(comp, []).append(other.path)
        d["same_component_as"] = same or None
        d["civitai"] = civitai(rec) if civitai is not None else None
        d["same_bytes_as"] = [o.path for o in (catalog.find_by_sha256(rec.sha256) if rec.sha256 else [])
                              if o.id != rec.id and o.status == "present"] or None
        d["trigger_words"] = trigger_sources(rec, d["civitai"], d["sidecars"]) or None
        d["preview"] = previews.preview_of(catalog, rec.id)  # the one `ckptlab preview` rendered
        d["images"] = _images_made_with(catalog, rec)
        out.append(d)
    return out


def _images_made_with(catalog: Catalog, rec: FileRecord) -> dict | None:
    """``{"count", "paths", "roles"}`` of the images ``ckptlab images`` found made with this file's content."""
    from ckptlab.library import image_links  # imported here: only a catalog that has the table is read

    return image_links.images_for(catalog, rec.sha256)


def trigger_sources(rec: FileRecord, link: dict | None = None, sidecars: dict | None = None) -> list[dict]:
    """Every trigger word known for a file, each once (case-folded), with where it came from: the file's
    metadata (``files.triggers``: ``dataset folder``, ``output name``, ``tag frequency`` with its count), the
    stored CivitAI link (``civitai link``) and the sidecars (``sidecar <file name>``, CivitAI's trained words).
    ``[{"word", "sources", "count"}]``, metadata words first in their rank order."""
    out: dict[str, dict] = {}

    def add(word, source: str, count: int = 0) -> None:
        if not isinstance(word, str) or not word.strip():
            return
        w = word.strip()
        e = out.setdefault(w.casefold(), {"word": w, "sources": [], "count": 0})
        if source not in e["sources"]:
            e["sources"].append(source)
        e["count"] = max(e["count"], count if isinstance(count, int) else 0)

    for t in rec.triggers or []:
        if isinstance(t, dict):
            for src in t.get("sources") or []:
                add(t.get("word"), str(src), t.get("count") or 0)
    if link and isinstance(link.get("trigger_words"), list):
        for w in link["trigger_words"]:
            add(w, "civitai link")
    sc = sidecars if isinstance(sidecars, dict) else {}  # the sidecars show lists for the file (none: none)
    files = sc.get("files") if isinstance(sc.get("files"), dict) else {}
    for role in ("civitai_info", "cm_info", "metadata_json", "json"):
        s = sc.get(role)
        if isinstance(s, dict):
            words = s.get("trained_words") if isinstance(s.get("trained_words"), list) else []
            if role == "json" and s.get("activation_text"):
                words = [s["activation_text"]]
            for w in words:
                add(w, f"sidecar {files.get(role, role)}")
    return list(out.values())


def civitai_brief(rec: FileRecord, link: dict | None = None) -> dict | None:
    """What ``ls`` shows and searches about a file's CivitAI identity: ``{model_name, version_name,
    base_model, trigger_words, source}`` from the file's stored CivitAI ``link`` summary (``source:
    "link"``), else from a sidecar that names the model (Civitai Helper, Stability Matrix, LoRA Manager,
    SD.Next). None when neither knows it."""
    from ckptlab.display import short_text as text  # sidecars and server records are untrusted

    def words(v) -> list[str]:
        return [w if isinstance(w, str) else str(w) for w in v] if isinstance(v, list) else []

    civ = link
    if civ:
        return {"model_name": text(civ.get("model_name")), "version_name": text(civ.get("version_name")),
                "base_model": text(civ.get("base_model")), "trigger_words": words(civ.get("trigger_words")),
                "source": "link"}
    sc = rec.sidecars if isinstance(rec.sidecars, dict) else {}
    named = sidecar_naming_model(sc)
    if named is None:
        return None
    role, s = named
    files = sc.get("files") if isinstance(sc.get("files"), dict) else {}
    return {"model_name": text(s.get("model_name")), "version_name": text(s.get("version_name")),
            "base_model": text(s.get("base_model")),
            "trigger_words": words(sc.get("trigger_words") or s.get("trained_words")),
            "source": text(files.get(role, role))}


#: the sidecar summaries ``library.sidecars`` stores, in the order their names are trusted
SIDECAR_ROLES = ("civitai_info", "cm_info", "metadata_json", "json")


def sidecar_naming_model(sidecars) -> tuple[str, dict] | None:
    """``(role, summary)`` of the first sidecar summary (``SIDECAR_ROLES`` order) that names the model, or None:
    the rule ``civitai_brief`` and the web library index both use for a file with no CivitAI link."""
    if not isinstance(sidecars, dict):
        return None
    for role in SIDECAR_ROLES:
        s = sidecars.get(role)
        if isinstance(s, dict) and s.get("model_name"):
            return role, s
    return None


def search_text(rec: FileRecord, civ: dict | None) -> str:
    """What ``ls --search`` looks in, case-folded: the path, the sidecar summaries, the CivitAI
    model / version names, base model and trigger words (``civitai_brief``), and the trigger words of a
    LoRA's own metadata (``files.triggers``)."""
    parts = [rec.path]
    if rec.sidecars:
        parts.append(json.dumps(rec.sidecars, ensure_ascii=False))
    if civ:
        parts += [str(civ.get(k) or "") for k in ("model_name", "version_name", "base_model")]
        parts += [str(w) for w in civ.get("trigger_words") or []]
    parts += [str(t.get("word")) for t in rec.triggers or [] if isinstance(t, dict)]  # a LoRA's own metadata
    return "\n".join(parts).casefold()


def list_files(catalog: Catalog, *, kind: str | None = None, family: str | None = None, search: str | None = None,
               sort: str = "name", missing: bool = False, errors: bool = False, unsafe: bool = False,
               civitai: LinkLookup | None = None) -> list[tuple[FileRecord, dict | None]]:
    """The catalogued files ``ckptlab ls`` lists, each with its CivitAI brief (``civitai_brief``).

    Args:
        kind: a kind (``checkpoint``, ``lora`` (LyCORIS included) ...), a UI folder name (``loras``,
            ``Stable-diffusion``) or a CivitAI type (``LORA``).
        family: a family (``sd1``, ``sdxl`` ...), a CivitAI base model (``"SD 1.5"``, ``Pony``) or a short
            name (``sd15``); a file without an identified family matches through its CivitAI base model.
        search: text looked for (case-folded) in the path, the sidecars, the CivitAI names, base model
            and trigger words, and a LoRA's own trigger words (from its metadata, stored by ``scan``).
        sort: ``size``, ``name``, ``mtime`` or ``path``.
        missing: list the files marked missing instead of the present ones.
        errors: only files with errors.
        unsafe: only files whose safety verdict is not ``safe``.
        civitai: the CivitAI link lookup (``hub.link.link_lookup``); None: sidecars only.

    Returns:
        ``[(record, brief or None), ...]`` in ``sort`` order.

    Raises:
        BadChoiceError: an unknown kind or family (exit 2).
    """
    from ckptlab.library.ui_folders import resolve_family, resolve_kind

    kinds = resolve_kind(kind, catalog.kinds()) if kind else None
    families = resolve_family(family, catalog.families()) if family else None
    recs = catalog.files(status="missing" if missing else "present", kind=kinds, sort=sort, unsafe=unsafe)
    civ = {r.id: civitai_brief(r, civitai(r) if civitai is not None and r.sha256 else None) for r in recs}
    if families:  # the identified family; where identification found none, CivitAI's base model
        recs = [r for r in recs if (r.family or "").lower() in families
                or (not r.family and base_model_family(civ[r.id]) in families)]
    if errors:
        recs = [r for r in recs if r.error]
    if search:
        needle = search.casefold()
        recs = [r for r in recs if needle in search_text(r, civ[r.id])]
    return [(r, civ[r.id]) for r in recs]


def render_text(d: dict) -> list[str]:
    """``show``'s human output for one file (a ``show_file`` dict): sizes in IEC units, hashes upper
    case, lists one item per indented line, every value from a file or a server made printable."""
    from ckptlab.display import human_size, printable

    out = [printable(d["path"])]

    def kv(key: str, value, indent: int = 2) -> None:
        out.append(f"{' ' * indent}{key}: {printable(value)}")

    def items(key: str, values, indent: int = 2) -> None:
        out.append(f"{' ' * indent}{key}:")
        out.extend(f"{' ' * (indent + 2)}- {printable(v)}" for v in values)

    for k in ("status", "kind", "family", "variant", "format"):
        if d.get(k) is not None:
            kv(k, d[k])
    if d.get("size") is not None:
        kv("size", f"{human_size(d['size'])} ({d['size']:,} bytes)")
    if d.get("n_tensors") is not None:
        kv("tensors", f"{d['n_tensors']} ({human_size(d.get('tensor_bytes') or 0)}; EMA and training state "
                      f"{human_size(d.get('ema_bytes') or 0)}; fp32 weights {human_size(d.get('fp32_bytes') or 0)})")
    from ckptlab.library.precision import byte_counts

    if byte_counts(d.get("dtypes")):
        out.append("  dtypes:")
        out.extend(f"    {printable(dt)}: {human_size(n)}" for dt, n in sorted(byte_counts(d["dtypes"]).items(),
                                                                               key=lambda x: -x[1]))
    kv("safety", d.get("safety") or "not checked")
    detail = d.get("safety_detail") if isinstance(d.get("safety_detail"), dict) else {}
    findings = [f"{f.get('severity')}: {f.get('detail')}" + (f" [{f['location']}]" if f.get("location") else "")
                for f in detail.get("findings") or [] if isinstance(f, dict)]
    if detail.get("error"):
        findings.append(detail["error"])
    for name, sub in (detail.get("files") or {}).items():
        findings += [f"{name}: {f.get('severity')}: {f.get('detail')}" for f in sub.get("findings") or []
                     if isinstance(f, dict)]
    if findings:
        items("findings", findings, 4)
    for k in ("error", "folder"):
        if d.get(k) is not None:
            kv(k, d[k])
    if d.get("hashes"):
        out.append("  hashes:")
        out.extend(f"    {name:<7} {str(v).upper()}" for name, v in d["hashes"].items())
    if d.get("fingerprint"):
        kv("fingerprint", str(d["fingerprint"]).upper())
        for comp, fp in (d.get("components") or {}).items():
            out.append(f"    {printable(comp)}: {str(fp)[:16].upper()}")
    if civ := d.get("civitai"):
        how = (f"inherited from {str(civ['inherited_from'])[:12].upper()} (same tensors)" if civ.get("inherited")
               else f"matched by {civ.get('matched_by')}")
        out.append(f"  civitai: {printable(civ.get('model_name'))} / {printable(civ.get('version_name'))}  "
                   f"model {civ.get('model_id')} version {civ.get('version_id')}  [{how}]  "
                   f"{civ.get('revisions')} revision(s)  upstream: {printable(civ.get('upstream_status'))}")
        if civ.get("base_model"):
            kv("base model", civ["base_model"], 4)
        if civ.get("trigger_words"):
            items("trigger words", civ["trigger_words"], 4)
        if civ.get("url"):
            kv("url", civ["url"], 4)
    if d.get("same_bytes_as"):
        items("same bytes as", d["same_bytes_as"])
    if d.get("same_component_as"):
        out.append("  same component as:")
        for comp, paths in d["same_component_as"].items():
            items(comp, paths, 4)
    if d.get("trigger_words"):
        out.append("  trigger words (all sources):")
        for t in d["trigger_words"]:
            srcs = [f"{x} {t['count']}" if x == "tag frequency" and t.get("count") else x for x in t["sources"]]
            out.append(f"    - {printable(t['word'])}  [{printable(', '.join(srcs))}]")
    if pv := d.get("preview"):
        kv("preview", f"{pv['path']} (ckptlab preview, seed {pv.get('seed')}"
                      f"{'' if pv.get('exists') else '; the file is gone'})")
    if imgs := d.get("images"):
        items(f"images made with it: {imgs['count']} (as {', '.join(imgs['roles'])}), latest", imgs["paths"])
    if sc := d.get("sidecars"):
        out.append("  sidecars:")
        for role, name in (sc.get("files") or {}).items():
            out.append(f"    {printable(role)}: {printable(name)}")
        if sc.get("trigger_words"):
            items("trigger words", sc["trigger_words"], 4)
    return out


def base_model_family(civ: dict | None) -> str | None:
    """The family a CivitAI base model names (``"SD 1.5"`` -> ``sd1``), or None (unknown, or no CivitAI data)."""
    if not civ or not civ.get("base_model"):
        return None
    return family_of_base_model(str(civ["base_model"]))


@functools.lru_cache(maxsize=1024)
def family_of_base_model(base_model: str) -> str | None:
    """The family a CivitAI base-model name names (``"SD 1.5"`` -> ``sd1``), or None (cached: a library repeats a
    few dozen names)."""
    from ckptlab.errors import CkptlabError
    from ckptlab.library.ui_folders import resolve_family

    try:
        return resolve_family(base_model)[0]
    except CkptlabError:
        return None
