"""``show``: everything the catalog knows about one file, found by path or by any hash."""

from __future__ import annotations

import os
from pathlib import Path

from ckptlab.errors import CkptlabError
from ckptlab.library import sidecars
from ckptlab.library.catalog import Catalog, FileRecord


class NotInCatalogError(CkptlabError):
    exit_code = 3


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


def show_file(catalog: Catalog, target: str) -> list[dict]:
    from ckptlab.jsonable import to_jsonable

    recs = lookup(catalog, target)
    if not recs:
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
        d["civitai"] = _civitai(catalog, rec)
        d["same_bytes_as"] = [o.path for o in (catalog.find_by_sha256(rec.sha256) if rec.sha256 else [])
                              if o.id != rec.id and o.status == "present"] or None
        out.append(d)
    return out


def _civitai(catalog: Catalog, rec: FileRecord) -> dict | None:
    """The CivitAI link the hub stored for this file's bytes (``hub.store.link_summary``), if any."""
    try:
        from ckptlab.hub.store import link_summary
    except ImportError:  # pragma: no cover - a build without the hub
        return None
    return link_summary(catalog, rec.sha256)
