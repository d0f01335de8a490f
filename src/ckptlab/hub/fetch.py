"""``ckptlab download``: resolve a source spec, pick the folder, transfer with verification, then
catalog the file and record its CivitAI metadata.

Specs:
- ``civitai:VERSION_ID`` (a model id works too: when no version has that id, the model's newest
  version is taken), ``civitai:version/ID``, ``civitai:model/ID``, ``civitai:MODEL@VERSION`` (AIR
  style), and civitai.com page or download URLs (``/models/ID?modelVersionId=V``,
  ``/api/download/models/V``).
- ``hf:ORG/REPO/PATH/IN/REPO[@REVISION]`` through ``hub.huggingface.download``.
- any other ``http(s)://`` URL: the server's file name (Content-Disposition, else the URL path).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ckptlab.errors import CkptlabError, NetworkError, NotFoundError, SpecError
from ckptlab.hub.config import HubConfig, load_hub_config
from ckptlab.hub.destination import detect_ui, folder_for_kind, target_folder
from ckptlab.hub.download import DownloadResult, transfer
from ckptlab.progress import Progress, null_progress


@dataclass
class SourceSpec:
    """A parsed download source (``civitai:…``, ``hf:…`` or a URL); not ``sample.build.Spec``, a sample file."""

    kind: str  # civitai | hf | url
    version_id: int | None = None
    model_id: int | None = None
    ambiguous_id: int | None = None  # civitai:N - a version id, else a model id
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    url: str | None = None


def parse_spec(text: str, civitai_base: str | None = None) -> SourceSpec:
    s = text.strip()
    low = s.lower()
    if low.startswith("civitai:"):
        rest = s[8:].strip()
        if m := re.fullmatch(r"(?:version/)?([0-9]{1,15})", rest):
            return SourceSpec("civitai", ambiguous_id=int(m.group(1))) if "/" not in rest else \
                SourceSpec("civitai", version_id=int(m.group(1)))
        if m := re.fullmatch(r"model/([0-9]{1,15})", rest):
            return SourceSpec("civitai", model_id=int(m.group(1)))
        if m := re.fullmatch(r"([0-9]{1,15})@([0-9]{1,15})", rest):
            return SourceSpec("civitai", model_id=int(m.group(1)), version_id=int(m.group(2)))
        raise SpecError(f"bad CivitAI spec {_shown(text)} (use civitai:VERSION_ID, civitai:model/ID or civitai:MODEL@VERSION)")
    if m := re.fullmatch(r"urn:air:[^:]+:[^:]+:civitai:([0-9]{1,15})@([0-9]{1,15})", s):
        return SourceSpec("civitai", model_id=int(m.group(1)), version_id=int(m.group(2)))
    if low.startswith("hf:"):
        rest = s[3:].strip().strip("/")
        rev = None
        if "@" in rest:
            rest, rev = rest.rsplit("@", 1)
        parts = rest.split("/")
        if len(parts) < 3 or not all(parts) or (rev is not None and not rev):
            raise SpecError(f"bad Hugging Face spec {_shown(text)} (use hf:ORG/REPO/PATH/IN/REPO[@REVISION])")
        return SourceSpec("hf", repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=rev)
    if low.startswith(("http://", "https://")):
        u = _checked_url(s, text)
        host = (u.hostname or "").lower()
        civ_hosts = {"civitai.com", "www.civitai.com", "civitai.red"}
        if civitai_base:
            civ_hosts.add((urlsplit(civitai_base).hostname or "").lower())
        if host in civ_hosts:
            if m := re.fullmatch(r"/api/download/models/([0-9]{1,15})/?", u.path):
                return SourceSpec("civitai", version_id=int(m.group(1)))
            if m := re.match(r"/models/([0-9]{1,15})(?![0-9])", u.path):
                q = parse_qs(u.query).get("modelVersionId")
                return SourceSpec("civitai", model_id=int(m.group(1)), version_id=int(q[0]) if q and re.fullmatch(r"[0-9]{1,15}", q[0]) else None)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)", u.path):
            if host in ("huggingface.co", "www.huggingface.co", "hf.co"):
                return SourceSpec("hf", repo_id=m.group(1), revision=m.group(2), filename=m.group(3))
        return SourceSpec("url", url=s)
    raise SpecError(f"not a download source: {_shown(text)} (civitai:ID, hf:ORG/REPO/PATH[@REV] or an http(s) URL)")


def _shown(text: str, limit: int = 100, quote: bool = True) -> str:
    """User input echoed in an error: at most ``limit`` characters (a 5,000-digit id stays readable)."""
    cut = text if len(text) <= limit else text[:limit] + "…"
    return repr(cut) if quote else cut


def _checked_url(s: str, text: str):
    """``urlsplit(s)`` of an http(s) URL that names a host (and a valid port): anything else can never
    succeed, so it is a bad spec now rather than a network error after retries."""
    try:
        u = urlsplit(s)
        u.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        raise SpecError(f"bad URL {_shown(text)}: {e}") from None
    if not u.hostname or any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise SpecError(f"bad URL {_shown(text)}: it needs a host, e.g. https://example.com/model.safetensors")
    return u


def _check_base(config: HubConfig) -> None:
    """The CivitAI base URL must name a host too (its scheme is checked with the config)."""
    _checked_url(config.civitai_base_url, config.civitai_base_url)


def resolve_version(client, spec: SourceSpec) -> dict:
    from ckptlab.hub.civitai import latest_version

    if spec.version_id is not None:
        return client.model_version(spec.version_id)
    if spec.ambiguous_id is not None:
        try:
            return client.model_version(spec.ambiguous_id)
        except NotFoundError:
            return latest_version(client.model(spec.ambiguous_id))
    return latest_version(client.model(spec.model_id))


def describe(source: str, *, config: HubConfig | None = None, client=None):
    """``RemoteInfo`` for a CivitAI source (version, model id, URL or AIR) - nothing is written."""
    from ckptlab.hub.civitai import CivitaiClient, remote_info

    config = config or load_hub_config()
    spec = parse_spec(source, config.civitai_base_url)
    _check_base(config)
    if spec.kind != "civitai":
        raise SpecError(f"not a CivitAI source: {_shown(source)}")
    own = client is None
    client = client or CivitaiClient(config)
    try:
        version = resolve_version(client, spec)
        model = client.model(int(version["modelId"])) if version.get("modelId") is not None else None
        return remote_info(version, model)
    finally:
        if own:
            client.close()


def mark_local_copies(info, db: str | Path | None = None) -> None:
    """Fill ``info.files[].local_paths`` with the catalogued files that have each file's SHA256.
    The catalog (``db``, else ``$CKPTLAB_DB``/the default) is only read, and only when it exists."""
    from ckptlab.hub import store
    from ckptlab.library.catalog import default_db_path

    path = Path(db) if db is not None else default_db_path()
    wanted = [f for f in info.files if f.sha256]
    if not wanted or not path.is_file():
        return
    with store.open_catalog(path) as cat:
        for f in wanted:
            f.local_paths = [r.path for r in cat.find_by_sha256(f.sha256)]


UNSORTED = "models/.ckptlab-incoming"  # hidden: a URL/hf file waits here until it is identified


def _place_by_kind(res: DownloadResult, root: Path, ui: str) -> None:
    """Move a verified URL/hf download from the incoming folder to the folder for its identified
    kind (never replacing a file); an unidentified file goes to ``models/other``."""
    import contextlib

    from ckptlab.hashes import sha256_file
    from ckptlab.hub.download import publish

    kind = None
    try:
        from ckptlab.arch.identify import identify

        kind = identify(res.path).kind
    except (ImportError, CkptlabError):
        kind = None
    folder = folder_for_kind(root, ui, kind if kind and kind != "unknown" else "other")
    dest, incoming = folder / res.path.name, res.path.parent
    if dest == res.path:
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        publish(res.path, dest)
    except CkptlabError as e:
        if dest.is_file() and sha256_file(dest) == res.sha256:  # the same file was already there
            res.path.unlink()
            res.path, res.skipped = dest, True
        else:
            res.extra["warning"] = f"left in {incoming}: {e}"
            return
    else:
        res.path = dest
    res.extra["identified_kind"] = kind
    with contextlib.suppress(OSError):
        incoming.rmdir()  # only when empty (another download may be using it)


_CAP_LOCK = threading.Lock()
_CAPS: dict[int, threading.BoundedSemaphore] = {}


def _cap(n: int) -> threading.BoundedSemaphore:
    with _CAP_LOCK:
        return _CAPS.setdefault(n, threading.BoundedSemaphore(n))


def download(source: str, *, dest: str | Path | None = None, layout: str | None = None, model_type: str | None = None,
             config: HubConfig | None = None, client=None, catalog: bool = True, write_sidecars: bool = False,
             file_id: int | None = None, progress: Progress | None = None, cancel=None,
             db: str | Path | None = None) -> DownloadResult:
    """Download one source into the library (see module doc). At most ``config.max_concurrent``
    transfers run at once in this process. ``db`` is the catalog file (default ``$CKPTLAB_DB`` or
    the platform data dir)."""
    config = config or load_hub_config(download_dir=dest, layout=layout)
    root = Path(dest).expanduser() if dest else (config.download_dir or Path.cwd())
    ui = layout or config.layout  # the install style: a1111 | comfyui | flat | auto
    spec = parse_spec(source, config.civitai_base_url)
    if spec.kind == "civitai":
        _check_base(config)
    progress = progress or null_progress
    with _cap(config.max_concurrent):
        if spec.kind == "civitai":
            return _download_civitai(spec, root, ui, config, client, catalog, write_sidecars, file_id, progress,
                                     cancel, db)
        ui = detect_ui(root) if ui == "auto" else ui
        folder = folder_for_kind(root, ui, model_type) if model_type or ui == "flat" else root / UNSORTED
        if spec.kind == "hf":
            from ckptlab.hub import huggingface

            res = huggingface.download(spec.repo_id, spec.filename, spec.revision, dest_dir=folder, progress=progress)
        else:
            from ckptlab.hub.http import Requester

            req = Requester(interval=0.0)
            try:
                res = transfer(req, spec.url, folder, progress=progress, source="url", cancel=cancel)
            finally:
                req.close()
        if not model_type and ui != "flat":
            _place_by_kind(res, root, ui)
        if catalog:  # a plain URL may well be a CivitAI file: look it up by hash (HF files are not)
            _after_download_safe(res, config, client, write_sidecars, lookup=spec.kind == "url", db=db)
        return res


# CivitAI publishes sizeKB as a float: the byte count it stands for is known to within rounding.
SIZE_SLACK = 1024


def _download_civitai(spec, root, ui, config, client, catalog, write_sidecars, file_id, progress, cancel=None,
                      db=None):
    from ckptlab.hub.civitai import CivitaiClient, pick_file

    own = client is None
    client = client or CivitaiClient(config)
    try:
        version = resolve_version(client, spec)
        choice = pick_file(version, file_id=file_id)
        mtype = (version.get("model") or {}).get("type")
        folder = target_folder(root, ui, mtype, choice.file.get("type"))
        extra = {"version_id": version.get("id"), "model_id": version.get("modelId"), "file_id": choice.file.get("id"),
                 "model_type": mtype, "model_name": (version.get("model") or {}).get("name"),
                 "version_name": version.get("name")}
        if not choice.sha256:
            extra["warning"] = "CivitAI publishes no SHA256 for this file: only the size was checked"
        # the transfer stops at the size CivitAI lists (an endless or oversized answer is cut off and deleted)
        max_size = choice.size + SIZE_SLACK if choice.size is not None else None
        res = transfer(client.http, client.download_url(choice), folder, filename=choice.name,
                       expected_sha256=choice.sha256, max_size=max_size, progress=progress, source="civitai",
                       extra=extra, cancel=cancel)
        if catalog:
            _after_download_safe(res, config, client, write_sidecars, version=version, file_id=choice.file.get("id"),
                                 db=db)
        return res
    finally:
        if own:
            client.close()


def _after_download_safe(res: DownloadResult, *args, **kw) -> None:
    """The file is verified and in place: a catalog or metadata problem becomes a warning, not an error."""
    try:
        _after_download(res, *args, **kw)
    except (CkptlabError, OSError) as e:
        msg = f"downloaded and verified, but not catalogued: {e}"
        res.extra["warning"] = f"{res.extra['warning']}; {msg}" if res.extra.get("warning") else msg


def _after_download(res: DownloadResult, config: HubConfig, client, write_sidecars: bool, *, version: dict | None = None,
                    file_id: int | None = None, lookup: bool = False, db: str | Path | None = None) -> None:
    """Put the verified file's hashes in the catalog, link it to its CivitAI version (known, or
    looked up by hash) and store the records; metadata failures never undo the download."""
    from ckptlab.hashes import hash_file
    from ckptlab.hub import store
    from ckptlab.hub.civitai import CivitaiClient
    from ckptlab.hub.link import LocalFile, link_files, remember_version
    from ckptlab.library.scanner import scan

    st = res.path.stat()
    # the transfer hashed the stream (all six); only files that did not come through it are read here
    h = res.hashes if res.hashes is not None and res.hashes.size == st.st_size else hash_file(res.path)
    with store.open_catalog(db) as cat:  # own connection; SQLite serialises writers (busy timeout)
        cat.put_hashes((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), h)
        scan([res.path.absolute()], cat, hash=True)  # the hashes above are reused (same stat identity)
        res.extra["catalog"] = str(cat.path)
        own = client is None
        client = client or CivitaiClient(config)
        try:
            if version is not None:
                remember_version(cat, client, version, {})
                store.put_link(cat, h.sha256, int(version["id"]), version.get("modelId"), matched_by="download",
                               file_id=file_id)
                res.extra["linked_version"] = version["id"]
                if write_sidecars:
                    from ckptlab.hub.link import fetch_preview
                    from ckptlab.hub.sidecars import write_sidecars as _write

                    model = store.latest_record(cat, "model", version.get("modelId"))
                    res.extra["sidecars"] = _write(res.path, version, model,
                                                   fetch_image=lambda u: fetch_preview(client, u)).written
            elif lookup:
                try:
                    rep = link_files(cat, client, [LocalFile(res.path, h.sha256, h.autov3)], write_sidecars=write_sidecars)
                    o = rep.outcomes[0]
                    res.extra["civitai"] = o.status
                    if o.version_id:
                        res.extra["linked_version"] = o.version_id
                except NetworkError as e:
                    res.extra["civitai"] = f"lookup failed: {e}"
        finally:
            if own:
                client.close()


def download_many(sources: list[str], *, jobs: int | None = None, progress: Progress | None = None,
                  **kw) -> list[DownloadResult | CkptlabError]:
    """Download several sources, ``jobs`` at a time (capped by config); errors are returned in place."""
    config = kw.pop("config", None) or load_hub_config(download_dir=kw.get("dest"), layout=kw.get("layout"))
    for s in sources:  # every spec is checked before any transfer starts: a typo fails at once
        try:
            if parse_spec(s, config.civitai_base_url).kind == "civitai":
                _check_base(config)
        except SpecError as e:
            raise SpecError(f"{_shown(s, quote=False)}: {e}") from None
    n = max(1, min(jobs or config.max_concurrent, config.max_concurrent))
    progress = progress or null_progress
    lock = threading.Lock()
    totals: dict[int, int] = {}

    cancel = threading.Event()

    def one(i_src):
        i, src = i_src

        def cb(advance=0, *, total=None, description=None):
            with lock:
                if total is not None:
                    totals[i] = total
                    progress(advance, total=sum(totals.values()))
                else:
                    progress(advance)

        try:
            return download(src, config=config, progress=cb, cancel=cancel, client=shared, **kw)
        except CkptlabError as e:
            return e

    # one CivitAI client for all sources: one pacer (politeness holds across threads), one pool
    shared = kw.pop("client", None)
    own = shared is None and any(parse_spec(s, config.civitai_base_url).kind == "civitai" for s in sources
                                 if _parses(s, config))
    if own:
        from ckptlab.hub.civitai import CivitaiClient

        shared = CivitaiClient(config)
    try:
        if n == 1 or len(sources) == 1:  # in this thread: Ctrl-C interrupts the transfer itself
            return [one(item) for item in enumerate(sources)]
        pool = ThreadPoolExecutor(max_workers=n)
        futures = [pool.submit(one, item) for item in enumerate(sources)]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            cancel.set()  # workers stop between chunks; their partial files stay for a resume
            for f in futures:
                f.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
    finally:
        if own:
            shared.close()


def _parses(text: str, config: HubConfig) -> bool:
    try:
        parse_spec(text, config.civitai_base_url)
    except SpecError:
        return False
    return True
