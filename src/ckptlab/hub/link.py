"""``civitai link``: connect library files to their CivitAI model versions.

For every file without a link: bulk ``POST by-hash`` with the SHA256s (batches of 100), then for the
misses that are safetensors LoRAs a ``GET by-hash/{AutoV3}`` (AutoV3 survives header edits). A
match stores the version and model records (as revisions, see ``store``) and a link keyed by the
file's SHA256. A file still unlinked whose tensor fingerprint equals a directly linked file's (the
pruned / fp16 / converted copy) inherits that link, marked ``fingerprint``.

With ``refresh`` already linked files are re-checked by version id: a changed record becomes a new
revision; a 404 or an outage keeps everything and only notes ``upstream_status``. Never regress.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, NetworkError
from ckptlab.hub import store
from ckptlab.hub.civitai import CivitaiClient
from ckptlab.hub.http import NotFoundError
from ckptlab.library.catalog import Catalog
from ckptlab.progress import Progress, null_progress

LORA_KINDS = (None, "lora", "lycoris", "locon", "dora")
MISS_TTL_S = 7 * 24 * 3600  # a SHA256 CivitAI did not know is asked again after a week (or with --refresh)


@dataclass
class LocalFile:
    path: Path
    sha256: str
    autov3: str | None = None
    kind: str | None = None
    fingerprint: str | None = None
    fingerprint_bf16: str | None = None  # library.fingerprint: bf16 copies of an fp32 file match here


@dataclass
class LinkOutcome:
    """What ``civitai link`` did with one file (``status``) and the CivitAI version it is linked to."""

    path: Path
    sha256: str
    status: str  # linked | inherited | already | refreshed | updated | not_found | kept | error
    version_id: int | None = None
    model_id: int | None = None
    model_name: str | None = None
    version_name: str | None = None
    matched_by: str | None = None
    inherited_from: str | None = None
    revision: int | None = None
    message: str | None = None
    sidecars: list[str] = field(default_factory=list)


@dataclass
class LinkReport:
    """What ``civitai link`` did: one ``LinkOutcome`` per file."""

    outcomes: list[LinkOutcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out


def local_files(cat: Catalog, paths: list[Path], progress: Progress | None = None,
                errors: list[LinkOutcome] | None = None) -> list[LocalFile]:
    """Hashes (and tensor fingerprints when the catalog has them) for ``paths``, from the catalog when
    it knows the file unchanged, else computed now (and stored for catalogued files). Files that
    cannot be read are left out and reported in ``errors`` (status ``error``)."""
    from ckptlab.hashes import hash_file

    progress = progress or null_progress
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            continue
        rec = cat.get_by_path(p)
        st = p.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        h, fp, fpb, kind = None, None, None, None
        if rec is not None:
            kind = rec.kind
            if rec.stat_key == key:
                h, fp, fpb = rec.hashes, rec.fingerprint, rec.fingerprint_bf16
        if h is None:
            content = cat.content(key)
            if content:
                h, fp, fpb = content["hashes"], fp or content["fingerprint"], fpb or content["fingerprint_bf16"]
        if h is None:
            try:
                h = hash_file(p, progress=progress)
            except CkptlabError as e:
                if errors is not None:
                    errors.append(LinkOutcome(path=p, sha256="", status="error", message=e.message))
                continue
            if rec is not None:
                cat.put_hashes(key, h)
        out.append(LocalFile(p, h.sha256.upper(), h.autov3, kind, fp, fpb))
    return out


_LORA_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w", "lokr_w", "oft_", "dora_scale")


def _is_lora(lf: LocalFile) -> bool:
    """AutoV3 applies to safetensors LoRAs: the catalog's kind, else the tensor names in the header."""
    if lf.kind is not None:
        return lf.kind.lower() in LORA_KINDS
    try:
        from ckptlab.formats import detect_format, open_model

        if detect_format(lf.path) != "safetensors":
            return False
        src = open_model(lf.path)
        try:
            return any(m in k for k in src.keys() for m in _LORA_MARKERS)
        finally:
            src.close()
    except CkptlabError:
        return False


def _outcome_from(lf: LocalFile, status: str, link: store.Link | None, version: dict | None, **kw) -> LinkOutcome:
    v = version if isinstance(version, dict) else {}  # stored by an older ckptlab: not checked then
    m = v.get("model") if isinstance(v.get("model"), dict) else {}
    return LinkOutcome(path=lf.path, sha256=lf.sha256, status=status,
                       version_id=link.version_id if link else v.get("id"),
                       model_id=link.model_id if link else v.get("modelId"),
                       model_name=m.get("name"), version_name=v.get("name"),
                       matched_by=link.matched_by if link else None,
                       inherited_from=link.inherited_from if link else None, **kw)


def _file_id(version: dict, lf: LocalFile, by: str) -> int | None:
    for f in version.get("files") or []:
        hs = {k.upper(): str(v).upper() for k, v in (f.get("hashes") or {}).items()}
        if (by == "sha256" and hs.get("SHA256") == lf.sha256) or (by == "autov3" and lf.autov3
                                                                   and hs.get("AUTOV3") == lf.autov3.upper()):
            return f.get("id")
    return None


def remember_version(cat: Catalog, client: CivitaiClient, version: dict, models_seen: dict) -> int:
    """Store a CivitAI version record (as a revision) and, once per model id in ``models_seen``, its model
    record (fetched now; on an outage the stored one is kept). Returns the version's revision number."""
    rev, _ = store.store_record(cat, "version", int(version["id"]), version)
    mid = version.get("modelId")
    if mid is not None and mid not in models_seen:
        try:
            models_seen[mid] = client.model(int(mid))
            store.store_record(cat, "model", int(mid), models_seen[mid])
        except (NetworkError, CkptlabError):
            models_seen[mid] = store.latest_record(cat, "model", int(mid))  # keep what we had
    return rev


def _refresh_version(cat: Catalog, client: CivitaiClient, version_id: int, models_seen: dict):
    """``(status, record, revision, message)`` after asking CivitAI again; nothing stored is ever lost."""
    try:
        v = client.model_version(version_id)
    except NotFoundError:
        return "not_found", None, None, "CivitAI no longer has this version; the stored record is kept"
    except NetworkError as e:
        return "kept", None, None, f"CivitAI unreachable, stored record kept ({e})"
    rev, new = store.store_record(cat, "version", version_id, v)
    if v.get("modelId") is not None and v["modelId"] not in models_seen:
        remember_version(cat, client, v, models_seen)
    return ("updated" if new and rev > 1 else "refreshed"), v, rev, None


def link_files(cat: Catalog, client: CivitaiClient, files: list[LocalFile], *, refresh: bool = False,
               write_sidecars: bool = False, allow_nsfw: bool = False, fingerprint=None,
               progress: Progress | None = None) -> LinkReport:
    """Link ``files``; see the module doc. ``fingerprint(path) -> str | None`` is used for files the
    catalog has no fingerprint for (inherited links)."""
    progress = progress or null_progress
    report = LinkReport()
    models_seen: dict = {}
    results: dict[str, LinkOutcome] = {}
    pending = [lf for lf in files if store.get_link(cat, lf.sha256) is None]
    pending_shas = {lf.sha256 for lf in pending}
    linked = [lf for lf in files if lf not in pending]
    progress(0, total=len(files), description="linking")

    # 1. already linked: keep, or refresh by version id (never regress)
    refreshed: dict[int, tuple[str, dict | None, int | None, str | None]] = {}  # version id -> outcome
    for lf in linked:
        link = store.get_link(cat, lf.sha256)
        if not refresh:
            results[lf.sha256] = _outcome_from(lf, "already", link, store.latest_record(cat, "version", link.version_id))
            continue
        if link.version_id not in refreshed:
            refreshed[link.version_id] = _refresh_version(cat, client, link.version_id, models_seen)
        status, v, rev, msg = refreshed[link.version_id]
        store.set_upstream_status(cat, lf.sha256, {"not_found": "not_found", "kept": "unreachable"}.get(status, "ok"))
        results[lf.sha256] = _outcome_from(lf, status, link, v or store.latest_record(cat, "version", link.version_id),
                                           revision=rev, message=msg)

    # 2. unlinked: bulk SHA256, then AutoV3 for safetensors LoRAs; recent misses are not asked again
    outage: str | None = None
    found: dict[str, dict] = {}
    recent = {} if refresh else {lf.sha256: t for lf in pending
                                 if (t := store.recent_miss(cat, lf.sha256, MISS_TTL_S)) is not None}
    ask = [lf for lf in pending if lf.sha256 not in recent]
    if ask:
        try:
            found = client.versions_by_sha256([lf.sha256 for lf in ask])
        except NetworkError as e:
            outage = str(e)
    for lf in pending:
        if lf.sha256 in recent:
            when = time.strftime("%Y-%m-%d", time.localtime(recent[lf.sha256]))
            results[lf.sha256] = _outcome_from(lf, "not_found", None, None,
                                               message=f"not on CivitAI (asked {when}; --refresh asks again)")
            continue
        if outage:
            results[lf.sha256] = _outcome_from(lf, "error", None, None, message=outage)
            continue
        by, version = "sha256", found.get(lf.sha256.lower())
        if version is None and lf.autov3 and _is_lora(lf):
            try:
                version = client.version_by_hash(lf.autov3)
            except NetworkError as e:
                results[lf.sha256] = _outcome_from(lf, "error", None, None, message=str(e))
                continue
            by = "autov3"
            if version is not None and _file_id(version, lf, "autov3") is None:
                version = None  # the answer must really list a file with our AutoV3
        if version is None:
            store.note_miss(cat, lf.sha256)
            results[lf.sha256] = _outcome_from(lf, "not_found", None, None, message="not on CivitAI")
            continue
        rev = remember_version(cat, client, version, models_seen)
        link = store.put_link(cat, lf.sha256, int(version["id"]), version.get("modelId"), matched_by=by,
                              file_id=_file_id(version, lf, by))
        results[lf.sha256] = _outcome_from(lf, "linked", link, version, revision=rev)

    # 3. inherited links through tensor fingerprints
    fps: dict[str, str | None] = {}
    for lf in files:
        fps[lf.sha256] = lf.fingerprint
    for lf in files:
        o = results.get(lf.sha256)
        if o is None or o.status != "not_found" or lf.sha256 not in pending_shas:
            continue
        fp = fps.get(lf.sha256) or (fingerprint(lf.path) if fingerprint else None)
        if not fp:
            continue
        fpb = lf.fingerprint_bf16 or _stored_bf16(cat, lf.path)
        donors = store.direct_links_by_fingerprint(cat, fp, fpb)
        if not donors and fingerprint:
            # linked files whose fingerprint is not known yet: this run's files first, then catalogued
            # files of the same kind (each fingerprint is computed once and stored in the catalog)
            cands = [(other.sha256, other.path) for other in files if other.sha256 != lf.sha256]
            cands += [(r.sha256.upper(), Path(r.path)) for r in cat.files()
                      if r.sha256 and r.fingerprint is None and (lf.kind is None or r.kind in (None, lf.kind))]
            seen = set()
            for sha, path in cands:
                if sha == lf.sha256 or sha in seen:
                    continue
                seen.add(sha)
                ol = store.get_link(cat, sha)
                if ol is None or ol.inherited:
                    continue
                if fps.get(sha) is None and path.is_file():
                    fps[sha] = fingerprint(path)
                if fps.get(sha) == fp or (fpb and path.is_file() and _stored_bf16(cat, path) == fpb):
                    donors = [ol]
                    break
        if donors:
            d = donors[0]
            link = store.put_link(cat, lf.sha256, d.version_id, d.model_id, matched_by="fingerprint",
                                  inherited_from=d.sha256)
            results[lf.sha256] = _outcome_from(lf, "inherited", link, store.latest_record(cat, "version", d.version_id),
                                               message=f"same tensors as {d.sha256[:12]}")

    # 4. sidecars from what is stored (works offline for linked files too)
    for lf in files:
        o = results[lf.sha256]
        if o.path != lf.path:  # a second copy with the same bytes: same link, its own row and sidecars
            o = dataclasses.replace(o, path=lf.path, sidecars=[])
        if write_sidecars and o.version_id is not None and o.status != "error":
            version = store.latest_record(cat, "version", o.version_id)
            model = store.latest_record(cat, "model", o.model_id)
            if version is not None:
                from ckptlab.hub.sidecars import write_sidecars as _write

                try:
                    res = _write(lf.path, version, model, fetch_image=lambda url: fetch_preview(client, url),
                                 allow_nsfw=allow_nsfw)
                    o.sidecars = res.written
                except OSError as e:
                    o.message = f"sidecars not written: {e.strerror or e}"
        report.outcomes.append(o)
        progress(1)
    return report


def fetch_preview(client: CivitaiClient, url: str) -> bytes:
    """The bytes of a preview image (at most ``MAX_PREVIEW_BYTES``); ``b""`` when it cannot be had: no
    preview is better than no link."""
    from ckptlab.hub.sidecars import MAX_PREVIEW_BYTES

    try:
        resp = client.http.request("GET", url, what="preview image", stream=True, headers={"Accept": "image/*"})
    except CkptlabError:
        return b""  # no preview is better than no link
    import httpx

    try:
        data = bytearray()
        for chunk in resp.iter_bytes():
            data += chunk
            if len(data) > MAX_PREVIEW_BYTES:
                return b""
        return bytes(data)
    except httpx.HTTPError:
        return b""
    finally:
        resp.close()


def _stored_bf16(cat: Catalog, path: os.PathLike) -> str | None:
    """The bf16 fingerprint the catalog holds for ``path``'s current stat identity (stored together
    with the fp16 one by ``catalog_fingerprint`` and ``scan --fingerprint``)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    cached = cat.content((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return cached.get("fingerprint_bf16") if cached else None


def catalog_fingerprint(cat: Catalog, path: os.PathLike) -> str | None:
    """The file's tensor fingerprint (``library.fingerprint``), from the catalog when known for its
    stat identity, else computed and stored there; None for files that cannot be read as models."""
    from ckptlab.library.fingerprint import fingerprint_file

    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = cat.content(key)
    if cached and cached.get("fingerprint"):
        return cached["fingerprint"]
    try:
        fp = fingerprint_file(path)
    except CkptlabError:
        return None
    cat.put_fingerprint(key, fp.fingerprint, fp.components, fp.bf16, fp.bf16_components)
    return fp.fingerprint


def catalog_paths(cat: Catalog, paths: list[Path], progress: Progress | None = None) -> None:
    """Scan ``paths`` into the catalog (with hashes) so that links refer to catalogued files."""
    from ckptlab.library.scanner import scan

    if paths:
        scan([Path(p).absolute() for p in paths], cat, hash=True, fingerprint=False, progress=progress)


def link_lookup(cat: Catalog):
    """The CivitAI link lookup the library's ``show_file`` / ``list_files`` take (``civitai=``): a function
    from a catalog record to its stored link summary (``store.link_summary``: ids, names, how it was
    matched, trigger words, base model, revisions, upstream status, URL), or None when the file is not
    linked. Reads stored data only (no network); a catalog the hub never used has no links."""
    if not store.has_tables(cat):
        return lambda rec: None
    return lambda rec: store.link_summary(cat, rec.sha256)


def link_paths(cat: Catalog, client: CivitaiClient, files: list[Path] | None = None, *, named: list[Path] = (),
               refresh: bool = False, write_sidecars: bool = False, allow_nsfw: bool = False,
               progress: Progress | None = None, hash_progress: Progress | None = None) -> LinkReport:
    """``ckptlab civitai link``: catalogue, hash and link files to their CivitAI versions.

    Args:
        cat: the catalog (links, records and hashes are stored there).
        client: the CivitAI client (``hub.civitai.CivitaiClient``).
        files: the model files to link; None: the catalogued files under ``named`` (after scanning it),
            or, with nothing named, every catalogued file.
        named: the files and folders the user named; they are scanned into the catalog first (with
            hashes), so that each link refers to a catalogued file.
        refresh: re-check linked files (changes become new revisions); ask again about recent misses.
        write_sidecars: write ``<name>.civitai.info``, ``<name>.json`` (if absent) and a preview.
        allow_nsfw: allow R/X rated images as previews.
        progress: advanced by one per file linked; hash_progress: by the bytes scanned and hashed.

    Returns:
        A ``LinkReport``: one ``LinkOutcome`` per file (unreadable files with status ``error``).

    Raises:
        CkptlabError: a named path that does not exist, nothing to link, or an empty catalog.
    """
    named = [Path(p) for p in named]
    if files is not None:
        missing = [p for p in map(Path, files) if not p.exists()]
        if missing:
            raise CkptlabError("no such file or folder", missing[0])
        if not files:
            raise CkptlabError("no model files found here", named[0] if len(named) == 1 else None)
    elif named:
        missing = [p for p in named if not p.exists()]
        if missing:
            raise CkptlabError("no such file or folder", missing[0])
    else:
        files = [Path(r.path) for r in cat.files()]
        if not files:
            raise CkptlabError("the catalog holds no files yet (run 'ckptlab scan FOLDER' first, or name files)",
                               cat.path)
    catalog_paths(cat, named, progress=hash_progress)
    if files is None:  # the catalogued files under what was named
        roots = [p.absolute() for p in named]
        files = [Path(r.path) for r in cat.files(sort="path")
                 if any(Path(r.path) == root or root in Path(r.path).parents for root in roots)]
        if not files:
            raise CkptlabError("no model files found here", named[0] if len(named) == 1 else None)
    unreadable: list[LinkOutcome] = []
    local = local_files(cat, [Path(p) for p in files], progress=hash_progress, errors=unreadable)
    report = link_files(cat, client, local, refresh=refresh, write_sidecars=write_sidecars, allow_nsfw=allow_nsfw,
                        fingerprint=lambda p: catalog_fingerprint(cat, p), progress=progress)
    report.outcomes += unreadable
    return report


def link_record(cat: Catalog, target: str | os.PathLike) -> dict:
    """``ckptlab civitai show``: a file's stored CivitAI link and every stored revision of its version record.

    Args:
        cat: the catalog.
        target: a model file (its SHA256 from the catalog when known, else computed), or a SHA256.

    Returns:
        ``{"link": Link, "revisions": [{revision, digest, fetched_at, ...}], "latest": the newest version
        record (dict) or None}``.

    Raises:
        CkptlabError: the file is not linked to CivitAI.
    """
    from ckptlab.hashes import hash_file

    p = Path(target)
    if p.is_file():
        rec = cat.get_by_path(p)
        sha = rec.sha256 if rec is not None and rec.sha256 else hash_file(p).sha256
    else:
        sha = str(target).strip().upper()
    link = store.get_link(cat, sha)
    if link is None:
        raise CkptlabError(f"not linked to CivitAI: {target} (run `ckptlab civitai link`)")
    revs = store.revisions(cat, "version", link.version_id)
    return {"link": link, "revisions": [{k: v for k, v in r.items() if k != "data"} for r in revs],
            "latest": revs[-1]["data"] if revs else None}
