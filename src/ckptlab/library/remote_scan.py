"""``scan_remote(prefix_urls, catalog)``: object-store prefixes into the catalog, streamed, in parallel tasks
(a local thread pool, or Ray tasks on a cluster with ``ray_address``).

The listing (``ckptlab.remote.listing.list_objects``) streams page by page; objects are grouped as they arrive
into *units* (a model file with its sidecars, or a diffusers folder = every object under a prefix holding
``model_index.json``), compared with the catalog a batch at a time, and the ones to read are packed into tasks:
``TASK_FILES`` files per task for header-only scans, ``TASK_BYTES`` bytes per task with ``--hash`` /
``--fingerprint``. At most ``inflight`` tasks are out at once (2 per worker/CPU), so memory stays flat however
many objects the prefix holds. Each task returns per-unit results; the driver (this process) alone writes the
catalog, upserting by path, so a task that Ray re-runs after losing a worker still leaves one row per object.

A row is the one a local scan writes for the same bytes: ``path`` = the URL's UTF-8 bytes, ``display`` = the
URL, ``name`` = the basename, ``root`` = the prefix URL, ``folder``/kind hint from the UI folder names below the
prefix, the stat key = ``remote_stat_key(entry)``, facts from ``scanner.read_file_facts``, content rows for
hashes and fingerprints. Re-runs are incremental on that key (URL + version id or ETag, size, Last-Modified):
an unchanged object (and unchanged sidecars) is not read again; objects gone from a complete listing become
``missing`` (never deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ckptlab.display import cap
from ckptlab.errors import CkptlabError, HTTPStatusError, NetworkError
from ckptlab.library import sidecars, ui_folders
from ckptlab.library.catalog import Catalog, StatKey
from ckptlab.library.scanner import ScanSummary, fact_values, facts_or_error, recorded_scan, upsert_file_row
from ckptlab.progress import Progress, null_progress
from ckptlab.remote import RemoteEntry, remote_stat_key

TASK_FILES = 64  # files per task, header-only scans
TASK_BYTES = 4 * 1024**3  # bytes per task with --hash / --fingerprint (one object larger than this: its own task)
LOOKUP_BATCH = 500  # units compared with the catalog per query
TASK_RETRIES = 3  # re-runs of a task after worker loss (Ray) or persistent throttling
THROTTLE_TRIES = 5  # in-task retries of one object that is throttled, with backoff
#: what a Ray worker gets from this process's environment (``runtime_env`` is visible cluster-wide): the storage
#: clients' families and the few ckptlab settings a worker reads; never ``CKPTLAB_TOKEN``, ``CKPTLAB_DB``...
ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "AZURE_", "CKPTLAB_REMOTE_")
ENV_NAMES = ("CKPTLAB_REMOTE_STAGE", "CKPTLAB_DIRECT_IO")
#: S3-style error codes / HTTP statuses that mean "slow down" (read from an exception's fields, never its text)
THROTTLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                            "RequestLimitExceeded", "ServiceUnavailable"})
THROTTLE_STATUSES = frozenset({429, 503})
_JSON_ROLES = ("json", "civitai_info", "cm_info", "metadata_json", "description")


@dataclass
class Unit:
    """One thing to catalogue: an object (with its sidecars) or a diffusers folder (``members``)."""

    url: str
    root: str
    entry: RemoteEntry  # a folder: a synthetic entry (size = sum, etag from the members', newest Last-Modified)
    sidecar_entries: dict[str, RemoteEntry] = field(default_factory=dict)  # role -> object
    members: list[RemoteEntry] | None = None
    read_facts: bool = True
    sidecars_only: bool = False  # the object is unchanged, its sidecars are not: read those alone
    known_format: str | None = None  # an unchanged object's stored format and verdict (hash-only tasks)
    known_safety: str | None = None
    need_hash: bool = False
    need_fp: bool = False
    why: str = "new"
    fid: int | None = None
    probe_error: str | None = None  # a folder whose diffusers probe failed: its members are not catalogued

    @property
    def key(self) -> StatKey:
        return remote_stat_key(self.entry)

    @property
    def size(self) -> int:
        return self.entry.size

    def sidecar_signature(self) -> dict[str, int]:
        return {e.name: (0 if role in ("preview", "thumb", "yaml") else int(round((e.last_modified or 0) * 1e9)))
                for role, e in self.sidecar_entries.items()}


def url_key(url: str) -> bytes:
    """The catalog's ``files.path`` of an object: its URL's UTF-8 bytes."""
    return url.encode("utf-8", "surrogateescape")


def location(u: Unit) -> dict:
    folder, _ui, hint = ui_folders.folder_hint(u.url, u.root)
    return {"path": url_key(u.url), "display": u.url, "name": u.url.rstrip("/").rsplit("/", 1)[-1],
            "root": u.root, "folder": folder, "hint": hint}


# -- grouping the listing into units ------------------------------------------------------------
def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _folder_entry(url: str, members: list[RemoteEntry]) -> RemoteEntry:
    h = hashlib.blake2b(digest_size=16)
    for m in members:
        h.update(f"{m.url}\0{m.version_id or m.etag or ''}\0{m.size}\n".encode("utf-8", "surrogatepass"))
    newest = max((m.last_modified or 0.0) for m in members) if members else 0.0
    return RemoteEntry(url=url, size=sum(m.size for m in members), etag=h.hexdigest(), last_modified=newest)


def group_units(entries: Iterable[RemoteEntry], root: str, is_diffusers) -> Iterator[Unit]:
    """Units from a listing in key order, streamed. ``is_diffusers(folder_url)`` says whether a folder (no
    trailing slash) holds ``model_index.json``; it is asked once per folder, the answers kept only for the
    folders that enclose the current key. A probe that raises ``CkptlabError`` (access, network): the folder is
    one unit with ``probe_error`` set (its members held like a pipeline's), never guessed "not diffusers". Sidecars of ``<dir>/<stem>.<ext>`` are ``<dir>/<stem>.*``: all in the
    block of keys starting ``<dir>/<first segment of the name>.``, which key order makes contiguous, so a block
    is held only until the listing leaves it."""
    root = root.rstrip("/")
    groups: dict[str, list[RemoteEntry]] = {}  # open blocks: prefix -> entries
    known: dict[str, bool | str] = {}  # folder url -> is diffusers, or the probe's error (enclosing folders)
    diff: tuple[str, list[RemoteEntry]] | None = None

    def folder_unit(url: str, members: list[RemoteEntry]) -> Unit:
        err = known.get(url)
        return Unit(url=url, root=root, entry=_folder_entry(url, members), members=members,
                    probe_error=err if isinstance(err, str) else None)

    def flush(prefix: str) -> Iterator[Unit]:
        block = groups.pop(prefix)
        names = {e.name for e in block}
        by_name = {e.name: e for e in block}
        for e in block:
            if ui_folders.is_model_name(e.name):
                found = sidecars.find(e.name, names)
                yield Unit(url=e.url, root=root, entry=e,
                           sidecar_entries={role: by_name[n] for role, n in found.items()})

    for e in entries:
        rel = e.url[len(root):].lstrip("/") if e.url.startswith(root) else e.name
        if _hidden(rel):
            continue
        if diff is not None and not e.url.startswith(diff[0] + "/"):
            yield folder_unit(*diff)
            diff = None
        for prefix in [p for p in groups if not e.url.startswith(p)]:
            yield from flush(prefix)
        if diff is not None:
            diff[1].append(e)
            continue
        folder = e.url.rsplit("/", 1)[0]
        for k in [k for k in known if not (e.url.startswith(k + "/"))]:
            del known[k]
        # the root itself, then each folder below it down to this object's
        chain = [root] if e.url.startswith(root + "/") else []
        if chain:
            parts = e.url[len(root) + 1:].split("/")[:-1]
            for p in parts:
                chain.append(chain[-1] + "/" + p)
        hit = None
        for f in chain:
            if f not in known:
                try:
                    known[f] = bool(is_diffusers(f))
                except CkptlabError as err:
                    known[f] = f"cannot tell whether this folder is a diffusers pipeline: {err.message}"
            if known[f]:
                hit = f
                break
        if hit is not None:
            diff = (hit, [e])
            continue
        prefix = folder + "/" + e.name.split(".", 1)[0] + "."
        groups.setdefault(prefix, []).append(e)
    for prefix in list(groups):
        yield from flush(prefix)
    if diff is not None:
        yield folder_unit(*diff)


# -- reading one task (runs in a worker thread, process or Ray worker) ---------------------------------
_CANCEL = threading.Event()  # the local pool's Ctrl-C: tasks stop between objects


def _filesystem(url: str):
    import fsspec

    return fsspec.filesystem(url.partition("://")[0].lower())


def _stage_forced() -> bool:
    """``CKPTLAB_REMOTE_STAGE=1``: every unit is staged (streamed to a private temporary folder on the worker's
    disk and read there; cost: the whole object's bytes) instead of read with ranged GETs. Otherwise only a
    diffusers folder scanned with ``--fingerprint`` is staged (``fingerprint_diffusers`` reads the folder's files
    on disk). Nothing else falls back to staging: a reader that fails on an object (a bug included) gives that
    object's error row, which the next scan reads again, never a silent download of the whole object."""
    return os.environ.get("CKPTLAB_REMOTE_STAGE") == "1"


@contextlib.contextmanager
def _staged(u: Unit, tmp: str, direct: bool) -> Iterator[str]:
    """A path ``read_file_facts`` can read for ``u``: its URL (``direct``), or a local copy of the object /
    the folder."""
    if direct:
        yield u.url if u.members is None else u.url + "/"  # a prefix, as remote-io's readers take it
        return
    fs = _filesystem(u.url)
    name = u.url.rstrip("/").rsplit("/", 1)[-1]
    local = os.path.join(tmp, "o", name)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        if u.members is None:
            fs.get_file(u.url, local)
        else:
            for m in u.members:
                dst = os.path.join(local, *m.url[len(u.url) + 1:].split("/"))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fs.get_file(m.url, dst)
        yield local
    finally:
        shutil.rmtree(os.path.join(tmp, "o"), ignore_errors=True)


def _read_sidecars(u: Unit, tmp: str) -> str | None:
    if not u.sidecar_entries:
        return None
    folder = os.path.join(tmp, "s")
    os.makedirs(folder, exist_ok=True)
    found = {role: e.name for role, e in u.sidecar_entries.items()}
    try:
        fs = _filesystem(u.url)
        for role, e in u.sidecar_entries.items():
            if role in _JSON_ROLES and e.size <= 8 * 1024 * 1024:
                fs.get_file(e.url, os.path.join(folder, e.name))
        data = sidecars.read(os.path.join(folder, u.url.rsplit("/", 1)[-1]), found)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    data["_signature"] = u.sidecar_signature()
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "replace").decode("utf-8")


def _renamed(obj, local: str, url: str):
    if isinstance(obj, str):
        return obj.replace(local, url) if local in obj else obj
    if isinstance(obj, dict):
        return {k: _renamed(v, local, url) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_renamed(v, local, url) for v in obj]
    return obj


def _content(src, need_hash: bool, need_fp: bool, streamable: bool):
    """``(Hashes | None, Fingerprint | None)`` of an object (its ``RemoteEntry``: size known, no HEAD) or a local
    path. A safetensors object the check called safe (``streamable``): remote-io's ``stream_content``, one
    streamed GET for the hashes and the fingerprint. Anything else: the hashes from one stream
    (``hash_remote``/``hash_file``) and ``fingerprint_file``, whose reader applies the same refusals as a local
    scan's (a polyglot or a malicious pickle is refused, not parsed as a stream)."""
    if not (need_hash or need_fp):
        return None, None
    from ckptlab.library import fingerprint as fpmod

    if streamable and hasattr(fpmod, "stream_content"):
        return fpmod.stream_content(src, hash=need_hash, fingerprint=need_fp)
    from ckptlab import hashes

    url = src.url if isinstance(src, RemoteEntry) else src
    hasher = hashes.hash_file
    if isinstance(src, RemoteEntry) and hasattr(hashes, "hash_remote"):
        hasher = hashes.hash_remote
    h = hasher(src if hasher is not hashes.hash_file else url) if need_hash else None
    return h, (fpmod.fingerprint_file(url) if need_fp else None)


def _one(u: Unit, tmp: str, direct: bool) -> dict:
    hint = location(u)["hint"]
    out: dict = {"url": u.url, "pid": os.getpid(), "direct": direct}
    if u.sidecars_only and not (u.need_hash or u.need_fp):
        out["sidecars"] = _read_sidecars(u, tmp)
        return out
    try:
        with _staged(u, tmp, direct) as path:
            _read_unit(u, tmp, path, hint, out)
    except (KeyboardInterrupt, SystemExit):
        raise
    except CkptlabError as e:  # the object could not be fetched (staging)
        out["facts"] = {"kind": hint, "error": e.message}
        out["throttled"] = is_throttle(e)
    except Exception as e:  # noqa: BLE001 - a reader's bug on one object: not the whole task's failure
        out["facts"] = {"kind": hint, "error": cap(f"unreadable: {type(e).__name__}: {e}")}
        out["throttled"] = is_throttle(e)
    return out


def _read_unit(u: Unit, tmp: str, path: str, hint, out: dict) -> None:
    if u.read_facts:
        out["facts"] = facts_or_error(path, hint)
        if path != u.url:  # a staged copy (or the prefix): the facts name the object / the folder URL
            out["facts"] = _renamed(out["facts"], path, u.url)
        try:
            out["facts"]["sidecars"] = _read_sidecars(u, tmp)
        except Exception as e:  # noqa: BLE001 - a sidecar problem is never fatal
            out["facts"]["sidecars"] = json.dumps({"error": str(e)})
    if not (u.need_hash or u.need_fp):  # (as a local scan: also for a file whose facts had an error)
        return
    try:
        facts = out.get("facts") or {"format": u.known_format, "safety": u.known_safety}
        streamable = facts.get("format") == "safetensors" and facts.get("safety") == "safe"
        h, fp = _content(u.entry if path == u.url else path, u.need_hash and u.members is None, u.need_fp,
                         streamable)
    except (CkptlabError, OSError) as e:
        msg = e.message if isinstance(e, CkptlabError) else f"cannot read: {e.strerror or e}"
        out["throttled"] = is_throttle(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a hasher's bug on one object: that object's error
        msg = cap(f"cannot hash: {type(e).__name__}: {e}")
        out["throttled"] = is_throttle(e)
    else:
        if h is not None:
            out["hashes"] = h
        if fp is not None:
            out["fingerprint"] = (fp.fingerprint, fp.components, fp.bf16, fp.bf16_components)
        return
    # as a local scan: both or neither (the next scan retries)
    out["content_error"] = _renamed(msg, path, u.url).encode("utf-8", "replace").decode("utf-8")


def is_throttle(exc: BaseException) -> bool:
    """Whether an exception says "slow down", from its type and fields only, never its message (a crafted
    object's error text can hold any digits: "header length 150300000000" is no 503): the reader's retry
    exception (``retryable``), an ``HTTPStatusError`` with status 429/503, a botocore ``ClientError`` whose
    ``Error.Code`` is a throttling code or whose HTTP status is 429/503; and the same for its cause."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 4:
        if getattr(e, "retryable", False) is True:
            return True
        if isinstance(e, HTTPStatusError) and e.status in THROTTLE_STATUSES:
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err, meta = resp.get("Error") or {}, resp.get("ResponseMetadata") or {}
            if (isinstance(err, dict) and err.get("Code") in THROTTLE_CODES) or (
                    isinstance(meta, dict) and meta.get("HTTPStatusCode") in THROTTLE_STATUSES):
                return True
        e, seen = e.__cause__, seen + 1
    return False


def read_task(units: list[Unit]) -> list[dict]:
    """Read every unit of one task: ``[{"url", "pid", "facts"?, "hashes"?, "fingerprint"?, "content_error"?}]``.
    An object whose read failed with a throttling *exception* (``is_throttle``: its type and status, never
    its message) is read again alone, with backoff, up to ``THROTTLE_TRIES`` times; after that its error is its
    result (the next scan reads it again). No object's error fails the task: its neighbours' results stand."""
    from ckptlab.remote.listing import backoff

    out = []
    with tempfile.TemporaryDirectory(prefix="ckptlab-scan-") as tmp:
        for u in units:
            if _CANCEL.is_set():
                break
            for attempt in range(1, THROTTLE_TRIES + 1):
                # a diffusers prefix is read in place too (remote-io reads a prefix like a folder), except for
                # its fingerprint: fingerprint_diffusers needs the folder's files on disk
                direct = (not _stage_forced() and (u.members is None or not u.need_fp)) or u.sidecars_only
                r = _one(u, tmp, direct)  # an error, expected or not, is this object's row (no fallback)
                if not r.pop("throttled", False) or attempt == THROTTLE_TRIES:
                    break
                time.sleep(backoff(attempt, base=0.2))
            out.append(r)
    return out


# -- executors ---------------------------------------------------------------------------------------
class _LocalPool:
    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.workers = workers
        self.ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckptlab-scan")
        _CANCEL.clear()

    def submit(self, units):
        return self.ex.submit(read_task, units)

    def wait(self, handles, timeout=None):
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as fwait

        done, _ = fwait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, h):
        return h.result()

    def cancel(self, handles):
        _CANCEL.set()
        for h in handles:
            h.cancel()
        self.ex.shutdown(wait=False, cancel_futures=True)

    def close(self):
        self.ex.shutdown(wait=True)


def worker_env() -> dict[str, str]:
    """The variables a Ray worker needs to reach the store as this process does (endpoint, credentials,
    region, fsspec settings): ``AWS_*``, ``FSSPEC_*``, ``GOOGLE_*``, ``AZURE_*``, and of ckptlab's own only an
    allow-list (``CKPTLAB_REMOTE_*``, ``CKPTLAB_DIRECT_IO``): ``runtime_env`` is visible to the whole cluster, so
    the web app's ``CKPTLAB_TOKEN``, the catalog's ``CKPTLAB_DB`` and the rest stay in this process."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def _check_address(address: str) -> None:
    """A TCP connect to ``host:port`` first: ``ray.init`` to an address where nothing listens retries for
    a long time."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise CkptlabError(f"--ray: expected 'auto' or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5):
            pass
    except OSError as e:
        raise CkptlabError(f"--ray: no Ray cluster at {address} ({e.strerror or e})") from None


class _RayPool:
    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise CkptlabError("--ray needs the ray package: pip install 'ckptlab[ray]'") from None
        self.ray = ray
        if address in (None, "", "auto"):
            address = os.environ.get("RAY_ADDRESS") or "auto"
        if address != "auto":
            _check_address(address)
        import logging

        try:
            ray.init(address=address, runtime_env={"env_vars": worker_env()}, logging_level=logging.ERROR,
                     log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CkptlabError(f"--ray: cannot connect to the Ray cluster at {address}: {msg}") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.fn = ray.remote(max_retries=TASK_RETRIES, retry_exceptions=[NetworkError])(read_task)

    def submit(self, units):
        return self.fn.remote(units)

    def wait(self, handles, timeout=None):
        done, _ = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def result(self, h):
        return self.ray.get(h)

    def cancel(self, handles):
        for h in handles:
            with contextlib.suppress(Exception):
                self.ray.cancel(h, force=True)

    def close(self):
        with contextlib.suppress(Exception):
            self.ray.shutdown()


# -- the driver ---------------------------------------------------------------------------------------


def _prefix_range(root: str) -> tuple[bytes, bytes]:
    k = url_key(root.rstrip("/") + "/")
    return k, k + b"\xff"  # UTF-8 never holds 0xff: every key below the prefix sorts in between


def scan_remote(roots: list[str], catalog: Catalog, *, hash: bool = False, fingerprint: bool = False,
                progress: Progress | None = None, workers: int | None = None, ray_address: str | None = None,
                on_wait=None, page_size: int = 1000) -> ScanSummary:
    """Scan object-store prefixes into ``catalog`` (see the module docstring). ``ray_address``: run the reads
    as Ray tasks on that cluster (``"auto"``: ``$RAY_ADDRESS`` or the local one); else a local pool of
    ``workers`` threads (default 8). Ctrl-C cancels outstanding tasks and records the scan ``interrupted``."""
    progress = progress or null_progress
    roots = [r.rstrip("/") if r.count("/") > 2 else r for r in roots]
    pool = _RayPool(ray_address) if ray_address is not None else _LocalPool(workers or 8)
    try:
        with recorded_scan(catalog, roots, on_wait) as summary:
            try:
                for root in roots:
                    _Driver(catalog, summary, pool, root, hash=hash, fingerprint=fingerprint, progress=progress,
                            page_size=page_size).run()
            finally:
                summary.errors = len(summary.error_list)  # before the record keeps the first 1,000
    finally:
        pool.close()
    return summary


class _Driver:
    def __init__(self, catalog, summary, pool, root, *, hash, fingerprint, progress, page_size):
        self.cat, self.s, self.pool, self.root = catalog, summary, pool, root
        self.hash, self.fp, self.progress, self.page_size = hash, fingerprint, progress, page_size
        self.inflight: dict = {}
        self.max_inflight = 2 * pool.workers
        self.task_limit = TASK_BYTES if (hash or fingerprint) else None
        self.files_done = 0
        self.files_todo = 0
        self.scan_bytes = 0  # bytes of every object listed (the bar's total grows as the listing streams)

    # the listing and the diffusers probe
    def _fs(self):
        if not hasattr(self, "_fs_obj"):
            self._fs_obj = _filesystem(self.root)
        return self._fs_obj

    def _is_diffusers(self, folder: str) -> bool:
        """Raises ``CkptlabError`` when the store cannot say (after retries): ``group_units`` makes that
        folder one error unit instead of splitting a pipeline into single-file rows."""
        from ckptlab.remote.listing import call_with_retries

        return bool(call_with_retries(folder, self._fs().exists, 8, path=folder + "/model_index.json"))

    def run(self) -> None:
        from ckptlab.remote.listing import list_objects

        s = self.s
        self.progress(0, total=0, description=f"listing {self.root}")
        listed = 0
        batch: list[Unit] = []
        task: list[Unit] = []
        self.started = time.time()
        with self.cat.transaction() as c:  # this run's listed paths (see _finish), on disk, not in memory
            c.execute("CREATE TEMP TABLE IF NOT EXISTS _remote_listed (path BLOB PRIMARY KEY)")
            c.execute("DELETE FROM _remote_listed")
        entries = list_objects(self.root, page_size=self.page_size)
        try:
            for u in group_units(entries, self.root, self._is_diffusers):
                listed += 1
                batch.append(u)
                if len(batch) >= LOOKUP_BATCH:
                    task = self._plan(batch, task)
                    batch = []
            task = self._plan(batch, task)
            if task:
                self._submit(task)
            while self.inflight:
                self._collect(block=True)
        except BaseException:
            self.pool.cancel(list(self.inflight))
            self.inflight.clear()
            raise
        if listed == 0:
            s.bad_roots.append(self.root)
            s.error_list.append({"path": self.root, "error": "no objects under this prefix (not scanned)"})
            return
        self._finish()

    def _plan(self, units: list[Unit], task: list[Unit]) -> list[Unit]:
        """Compare ``units`` with their rows; submit what needs reading; returns the task being filled."""
        if not units:
            return task
        s = self.s
        keys = [url_key(u.url) for u in units]
        # a folder whose probe failed: its members count as listed (their rows, if any, are not marked missing)
        blind = [url_key(m.url) for u in units if u.probe_error for m in u.members or ()]
        with self.cat.transaction() as c:
            c.executemany("INSERT OR IGNORE INTO _remote_listed(path) VALUES (?)", [(k,) for k in keys + blind])
        rows = {}
        q = ",".join("?" * len(keys))
        for row in self.cat.conn.execute(
                f"SELECT id, path, dev, ino, size, mtime_ns, status, error, sidecars, safety, format FROM files "
                f"WHERE path IN ({q})", keys):
            rows[bytes(row[1])] = row
        unchanged = []
        for u, k in zip(units, keys, strict=True):
            s.files += 1
            s.bytes += u.size
            row = rows.get(k)
            u.fid = row[0] if row else None
            if u.probe_error:  # not read: an error row (a known folder keeps its facts, gets the error)
                u.read_facts, u.why = row is None, ("new" if row is None else "changed")
                self.files_todo += 1
                self._write([u], [{"url": u.url, "task_error": u.probe_error}])
                continue
            same = row is not None and (row[2], row[3], row[4], row[5]) == u.key
            if same and row[6] == "present" and row[7] is None and row[9] is not None:
                unchanged.append(row[0])
                u.read_facts = False
                u.why = "unchanged"
                u.sidecars_only = not self._sidecars_same(u, row[8])  # as a local scan: no re-read of the model
                u.known_format, u.known_safety = row[10], row[9]
            else:
                u.why = "changed" if row is not None else "new"
            if self.hash or self.fp:
                cached = self.cat.content(u.key) or {}
                u.need_hash = self.hash and cached.get("hashes") is None and u.members is None
                u.need_fp = self.fp and cached.get("fingerprint") is None
            if u.read_facts or u.sidecars_only or u.need_hash or u.need_fp:
                self.files_todo += 1
                task.append(u)
                if self._full(task):
                    self._submit(task)
                    task = []
        s.unchanged += len(unchanged)
        if unchanged:
            now = time.time()
            with self.cat.transaction() as c:
                c.executemany("UPDATE files SET last_seen = ?, last_scan = ? WHERE id = ?",
                              [(now, s.scan_id, i) for i in unchanged])
        self.progress(sum(u.size for u in units if u.why == "unchanged" and not (u.need_hash or u.need_fp)),
                      total=s.bytes, description=self._desc())
        return task

    def _desc(self) -> str:
        return f"reading {self.files_done}/{self.files_todo} objects ({self.s.unchanged} unchanged)"

    @staticmethod
    def _sidecars_same(u: Unit, stored) -> bool:
        old = {}
        if stored:
            try:
                old = json.loads(stored).get("_signature", {}) or {}
            except (ValueError, AttributeError):
                old = {}
        return old == u.sidecar_signature()

    def _full(self, task: list[Unit]) -> bool:
        if self.task_limit is None:
            return len(task) >= TASK_FILES
        return sum(u.size for u in task if u.need_hash or u.need_fp) >= self.task_limit or len(task) >= 4 * TASK_FILES

    def _submit(self, task: list[Unit]) -> None:
        while len(self.inflight) >= self.max_inflight:
            self._collect(block=True)
        self.inflight[self.pool.submit(task)] = (task, 0)
        self._collect(block=False)

    def _collect(self, block: bool) -> None:
        if not self.inflight:
            return
        for h in self.pool.wait(list(self.inflight), timeout=None if block else 0):
            task, tries = self.inflight.pop(h)
            try:
                results = self.pool.result(h)
            except NetworkError as e:
                if tries < TASK_RETRIES and isinstance(self.pool, _LocalPool):
                    self.inflight[self.pool.submit(task)] = (task, tries + 1)
                    continue
                results = [{"url": u.url, "task_error": str(e)} for u in task]
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - a task that failed for good: its objects get the error
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                results = [{"url": u.url, "task_error": cap(f"task failed: {msg}")} for u in task]
            self._write(task, results)

    def _write(self, task: list[Unit], results: list[dict]) -> None:
        s = self.s
        by_url = {r["url"]: r for r in results}
        now = time.time()
        with self.cat.transaction() as c:
            for u in task:
                r = by_url.get(u.url) or {"task_error": "not read (scan cancelled)"}
                loc = location(u)
                if "task_error" in r and not u.read_facts:
                    # the object's facts were not to be read (unchanged: in the task for its hashes or its
                    # sidecars): its verdict stands; the failed work is its error, as a content error is
                    facts = None
                    r = {"content_error": r["task_error"]}
                elif "task_error" in r:
                    facts = {"kind": loc["hint"], "error": r["task_error"]}
                elif "facts" in r:
                    facts = r["facts"]
                else:
                    facts = None
                if facts is not None:
                    self._upsert(c, u, loc, facts, now)
                    if facts.get("error"):
                        s.error_list.append({"path": u.url, "error": facts["error"]})
                if "sidecars" in r:
                    c.execute("UPDATE files SET sidecars = ? WHERE path = ?", (r["sidecars"], loc["path"]))
                if r.get("content_error"):
                    s.error_list.append({"path": u.url, "error": r["content_error"]})
                    c.execute("UPDATE files SET error = ? WHERE path = ?", (r["content_error"], loc["path"]))
                if r.get("hashes") is not None:
                    self.cat.put_hashes(u.key, r["hashes"])
                    s.hashed += 1
                if r.get("fingerprint") is not None:
                    self.cat.put_fingerprint(u.key, *r["fingerprint"])
                    s.fingerprinted += 1
                self.files_done += 1
        self.progress(sum(u.size for u in task if u.read_facts or u.need_hash or u.need_fp),
                      description=self._desc())

    def _upsert(self, c, u: Unit, loc: dict, facts: dict, now: float) -> None:
        upsert_file_row(c, loc, u.key, 0, fact_values(facts), now, self.s.scan_id)
        if u.why == "new":
            self.s.new += 1
        else:
            self.s.changed += 1

    def _finish(self) -> None:
        """After a complete listing: rows under the prefix that this run did not list become ``missing``;
        the verdict counts of what the prefix holds.

        "Did not list" is the run's own record (``_remote_listed``, a TEMP table filled a lookup batch at a time:
        on disk, per connection, so memory stays flat at millions of objects), not ``last_scan``: another scan of
        a nested or enclosing prefix running at once (PostgreSQL locks per root) restamps ``last_scan`` of the
        rows both list. A row another scan has seen since this run began (``last_seen``) is not marked either:
        it was there after this listing started (created behind the listing's position)."""
        s = self.s
        lo, hi = _prefix_range(self.root)
        exact = url_key(self.root)
        where = ("((path >= ? AND path < ?) OR path = ?) AND status = 'present' AND (last_seen IS NULL OR "
                 "last_seen < ?) AND NOT EXISTS (SELECT 1 FROM _remote_listed l WHERE l.path = files.path)")
        args = (lo, hi, exact, self.started)
        with self.cat.transaction() as c:
            gone = c.execute(f"SELECT COUNT(*) FROM files WHERE {where}", args).fetchone()[0]
            c.execute(f"UPDATE files SET status = 'missing' WHERE {where}", args)
            verdicts = c.execute(
                "SELECT f.safety, COUNT(*) FROM files f JOIN _remote_listed l ON l.path = f.path WHERE "
                "f.status = 'present' AND f.safety IN ('malicious', 'suspicious') GROUP BY f.safety").fetchall()
            c.execute("DELETE FROM _remote_listed")
        s.missing += gone
        for verdict, n in verdicts:
            setattr(s, verdict, getattr(s, verdict) + n)
