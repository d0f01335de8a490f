"""``scan(roots, catalog)``: walk model folders into the catalog, incrementally.

Phases: (1) walk every root (``os.scandir``; directory symlinks followed once, loops cut by
``(dev, inode)``; hidden entries skipped) collecting model files and their ``stat``; (2) compare
with the catalog: a path whose ``(dev, inode, size, mtime_ns)`` is unchanged is *not* opened; a
new path whose identity matches a row whose old path is gone is a move (row kept: hashes,
identification and history survive); the rest are read: header, identification, safety verdict,
sidecars, and hashes/fingerprints when asked; (3) rows under the scanned roots not seen any more
are marked ``missing`` (only after a complete walk).

Every problem with one file (permissions, broken links, truncated or garbage bytes, a file that
changes while it is read) becomes that row's ``error``; the scan goes on. Rows are written in
batched transactions, so Ctrl-C leaves the catalog as it was after the last whole batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat as stat_mod
import time
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.display import cap
from ckptlab.errors import CkptlabError
from ckptlab.library import sidecars, ui_folders
from ckptlab.library.catalog import Catalog, StatKey, display_path, path_key
from ckptlab.progress import Progress, null_progress

BATCH = 200
PARALLEL_MIN = 64  # files to read before worker processes pay off


@dataclass
class Found:
    path: str  # absolute, as the OS gives it (may hold surrogate escapes)
    root: str
    st: os.stat_result | None
    is_link: bool
    names: set[str]  # the folder listing, for sidecars
    category: str | None = None  # from extra_model_paths.yaml
    error: str | None = None
    sidecar_files: dict[str, str] | None = None  # precomputed for worker processes (names not shipped)
    folder_key: StatKey | None = None  # a diffusers folder: see ``folder_stat_key``

    @property
    def key(self) -> StatKey | None:
        if self.folder_key is not None:
            return self.folder_key
        if self.st is None:
            return None
        return (self.st.st_dev, self.st.st_ino, self.st.st_size, self.st.st_mtime_ns)


def folder_stat_key(path: str) -> StatKey:
    """The stat identity of a diffusers folder, recorded as one model: ``(dev, inode of the folder,
    sum of the sizes of the files in it, newest mtime_ns of those files and the folders)``. Hidden
    entries (``.cache`` of huggingface_hub) are left out. Any file added, removed, resized or
    rewritten inside changes it, so incremental re-scans and move detection work as for files,
    from ``stat`` calls alone. Raises ``OSError``."""
    st = os.stat(path)
    total, newest = 0, st.st_mtime_ns
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                est = e.stat(follow_symlinks=True)
                newest = max(newest, est.st_mtime_ns)
                if stat_mod.S_ISDIR(est.st_mode):
                    if not e.is_symlink():
                        stack.append(e.path)
                elif stat_mod.S_ISREG(est.st_mode):
                    total += est.st_size
    return (st.st_dev, st.st_ino, total, newest)


def current_key(path: str, is_folder: bool) -> StatKey:
    """The stat identity of ``path`` now (``folder_stat_key`` for a diffusers folder). Raises ``OSError``."""
    if is_folder:
        return folder_stat_key(path)
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _is_diffusers_folder(path: str) -> bool:
    try:
        from ckptlab.formats.diffusers import is_diffusers_folder
    except ImportError:  # pragma: no cover - a build without the diffusers reader
        return False
    return is_diffusers_folder(path)


def _folder_found(path: str, root: str, names: set[str], category: str | None, is_link: bool) -> Found:
    try:
        key = folder_stat_key(path)
    except OSError as e:
        return Found(path, root, None, is_link, names, category, error=f"cannot stat folder: {e.strerror or e}")
    return Found(path, root, os.stat(path), is_link, names, category, folder_key=key)


@dataclass
class ScanSummary:
    """What one ``scan`` did: files seen, new / changed / moved / missing, hashed, errors, unsafe counts."""

    scan_id: int
    roots: list[str]
    status: str = "complete"
    files: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    missing: int = 0
    errors: int = 0
    bad_roots: list[str] = field(default_factory=list)  # roots that could not be accessed at all
    hashed: int = 0
    fingerprinted: int = 0
    malicious: int = 0  # files found by this scan whose stored verdict is malicious / suspicious
    suspicious: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error_list: list[dict] = field(default_factory=list)


# -- walking ----------------------------------------------------------------------------------
def walk(root: str, category: str | None = None, errors: list[dict] | None = None) -> list[Found]:
    """Model files under ``root`` (a folder or a single file)."""
    errors = errors if errors is not None else []
    root = os.path.abspath(root)
    out: list[Found] = []
    try:
        st = os.stat(root)
    except OSError as e:
        errors.append({"path": display_path(root), "error": f"cannot access: {e.strerror or e}", "folder": root,
                       "root": True})
        return out
    if not stat_mod.S_ISDIR(st.st_mode) or _is_diffusers_folder(root):
        folder = os.path.dirname(root)
        if stat_mod.S_ISDIR(st.st_mode):
            out.append(_folder_found(root, folder, _listdir(folder), category, os.path.islink(root)))
        else:
            out.append(Found(root, folder, st, os.path.islink(root), _listdir(folder), category))
        return out
    visited: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            errors.append({"path": display_path(folder), "error": f"cannot list folder: {e.strerror or e}",
                           "folder": folder})
            continue
        names = {e.name for e in entries}
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=True):
                    dst = entry.stat(follow_symlinks=True)
                    ident = (dst.st_dev, dst.st_ino)
                    if ident in visited:
                        if is_link:
                            errors.append({"path": display_path(entry.path),
                                           "error": "symlink loop or folder already scanned; skipped"})
                        continue
                    visited.add(ident)
                    if _is_diffusers_folder(entry.path):  # one model, not a tree of files
                        out.append(_folder_found(entry.path, root, names, category, is_link))
                    else:
                        subdirs.append(entry.path)
                    continue
                if not ui_folders.is_model_name(entry.name):
                    continue
                if is_link and not os.path.exists(entry.path):
                    out.append(Found(entry.path, root, None, True, names, category, error="broken symlink"))
                    continue
                out.append(Found(entry.path, root, entry.stat(follow_symlinks=True), is_link, names, category))
            except OSError as e:
                if ui_folders.is_model_name(entry.name):
                    out.append(Found(entry.path, root, None, False, names, category,
                                     error=f"cannot stat: {e.strerror or e}"))
                else:
                    errors.append({"path": display_path(entry.path), "error": f"cannot stat: {e.strerror or e}"})
        stack.extend(reversed(subdirs))
    return out


def _listdir(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


# -- reading one file -------------------------------------------------------------------------
_TRAINING_ROOTS = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "loss.", "optimizer.")


def _tensor_stats(src) -> dict:
    """Tensor count and bytes: total, EMA + training state (what pruning drops), fp32 weights."""
    import math

    from ckptlab.arch.components import MARKER_KEYS, SCHEDULE_KEYS
    from ckptlab.formats.dtypes import DTYPES

    infos = src.infos()
    dtypes: dict[str, int] = {}
    total = ema = fp32 = 0
    prod = math.prod
    pruned_roots = ("model_ema.", *_TRAINING_ROOTS)
    for k, ti in infos.items():
        # TensorInfo.nbytes, inlined: this loop sees every key (GGUF's quantized types are not in DTYPES: their own)
        nb = prod(ti.shape) * DTYPES[ti.dtype][0] if ti.dtype in DTYPES else ti.nbytes
        total += nb
        if k.startswith(pruned_roots):
            ema += nb
            continue
        dtypes[ti.dtype] = dtypes.get(ti.dtype, 0) + nb
        if ti.dtype == "F32" and k not in SCHEDULE_KEYS and k not in MARKER_KEYS and not k.endswith("position_ids"):
            fp32 += nb
    return {"n_tensors": len(infos), "tensor_bytes": total, "ema_bytes": ema, "fp32_bytes": fp32,
            "dtypes": dtypes}


def _identify(path: str, src) -> dict:
    """kind/family/variant/info from ``ckptlab.arch.identify`` when it is available."""
    try:
        from ckptlab.arch.identify import identify
    except ImportError:
        return {}
    from ckptlab.jsonable import to_jsonable

    info = identify(src if src is not None else path)
    obj = to_jsonable(info)
    return {"kind": getattr(info, "kind", None), "family": getattr(info, "family", None),
            "variant": getattr(info, "variant", None), "info": obj if isinstance(obj, dict) else {"value": obj}}


#: verdicts that ``ls --unsafe``, the scan warning and the report single out
UNSAFE_VERDICTS = ("malicious", "suspicious")


def _safety(path: str, fmt: str | None) -> dict:
    """``ckptlab check``'s verdict for the file (or the worst over a diffusers folder's files), as
    ``{"safety": verdict, "safety_detail": {...}, "check_format": ...}``. Never raises: a check that
    fails is recorded as ``unchecked`` with the reason, so a file is never silently left unrated."""
    try:
        from ckptlab.security import check, check_many, worst_verdict
    except ImportError:  # pragma: no cover - a build without the safety checker
        return {"safety": "unchecked", "safety_detail": {"error": "no safety checker in this build"}}
    from ckptlab.jsonable import to_jsonable

    try:
        if fmt == "diffusers":
            results = list(check_many([path]))
            verdict = worst_verdict(r.verdict for r in results)
            detail = {"files": {_relpath(r.path, path): _check_detail(r, to_jsonable)
                                for r in results if r.verdict != "safe"}}
            return {"safety": verdict, "safety_detail": detail, "check_format": "diffusers"}
        r = check(path)
    except CkptlabError as e:
        return {"safety": "unchecked", "safety_detail": {"error": e.message}}
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, RecursionError, MemoryError,
            OverflowError) as e:  # the checker must not abort the scan; the file stays unrated, visibly
        return {"safety": "unchecked", "safety_detail": {"error": f"check failed: {type(e).__name__}: {e}"}}
    return {"safety": str(r.verdict), "safety_detail": _check_detail(r, to_jsonable), "check_format": r.format}


def _relpath(p, folder: str) -> str:
    """``p`` relative to ``folder`` (a local folder or a remote prefix)."""
    if isinstance(p, str) and "://" in p:
        return p[len(folder.rstrip("/")) + 1:] if p.startswith(folder.rstrip("/") + "/") else p
    return os.path.relpath(os.fspath(p), folder)


def _check_detail(r, to_jsonable) -> dict:
    return {"format": r.format, "container": r.container, "globals": list(r.globals),
            "findings": [to_jsonable(f) for f in r.issues][:50]}


def read_file_facts(path, kind_hint: str | None = None) -> dict:
    """Everything the catalog records about one file from its bytes (no hashing). Raises
    ``CkptlabError`` for unreadable, truncated or unrecognised files.

    The safety verdict (``ckptlab.security.check``) comes first and is always part of the result:
    a file the check calls ``malicious`` is never opened by a reader, and a reader's refusal
    (``UnsafeFileError``) of a ``suspicious`` or ``malicious`` file is the verdict, not an error.
    A file whose format is not recognised from its first bytes but that the checker reads as a
    pickle (a protocol 0/1 stream starting with ``S``, a hostile archive...) is recorded as a pickle
    with its verdict.

    ``path`` may be a remote URL (``s3://``, ``gs://``, ``az://``, ``https://``) or a ``remote.RemoteEntry`` (its
    listed size saves a request): the same facts as for the same bytes on disk, from ranged reads."""
    if not isinstance(path, str) or "://" in path:
        from ckptlab.remote import RemoteEntry, is_remote

        if isinstance(path, RemoteEntry) or is_remote(path):
            from ckptlab.remote.reader import open_remote, session

            with session():
                if isinstance(path, RemoteEntry):
                    open_remote(path)  # its size, for every read of this session
                    path = path.url
                return _read_file_facts(path, kind_hint)
    return _read_file_facts(path, kind_hint)


def _read_file_facts(path: str, kind_hint: str | None) -> dict:
    from ckptlab.errors import UnsafeFileError
    from ckptlab.formats import detect_format, open_model

    try:
        fmt = detect_format(path)
        unknown = None
    except CkptlabError as e:
        fmt, unknown = None, e
    if fmt == "safetensors" and path.lower().endswith(SAFETENSORS_NAMES):
        return _read_named_safetensors(path, kind_hint, open_model)
    safety = _safety(path, fmt)
    check_format = safety.pop("check_format", None)
    facts: dict = {"format": fmt, "kind": kind_hint, **safety}
    if unknown is not None:
        if check_format == "pickle" and safety["safety"] != "corrupt":
            facts["format"] = "pickle"  # the checker parsed it as one: it is what torch.load would run
        if safety["safety"] in UNSAFE_VERDICTS:
            return facts
        unknown.partial_facts = facts  # the verdict survives the error (see _read_one)
        raise unknown
    if safety["safety"] == "malicious":
        return facts  # never handed to a reader
    try:
        _read_tensors(path, fmt, facts, open_model)
    except UnsafeFileError as e:
        if safety["safety"] not in UNSAFE_VERDICTS:  # the reader saw more than the check: never "safe"
            detail = facts.get("safety_detail") if isinstance(facts.get("safety_detail"), dict) else {}
            facts.update(safety="suspicious", safety_detail={**detail, "reader_refused": e.message})
        return facts
    except CkptlabError as e:
        e.partial_facts = facts
        raise
    return facts


#: names UIs load with the safetensors library, never with ``torch.load``
SAFETENSORS_NAMES = (".safetensors", ".sft")


def _read_named_safetensors(path: str, kind_hint: str | None, open_model) -> dict:
    """A ``.safetensors``/``.sft`` file whose bytes are safetensors: the verdict ``check`` gives it,
    from the header this scan parses anyway (``check`` would parse it a second time, which made a
    first scan of a LoRA library about 50 % slower in CPU time): ``corrupt`` when the header does not parse,
    ``malicious`` when torch.load would find a dangerous pickle reading the file from byte 0
    (``security.polyglot_findings``, the rule ``check`` applies), else ``safe``.
    ``tests/library/test_scan_safety.py`` compares this with ``check`` file by file. Files with other names
    (where a UI would call ``torch.load``) and every other format go through ``check`` itself."""
    facts: dict = {"format": "safetensors", "kind": kind_hint}
    try:
        _read_tensors(path, "safetensors", facts, open_model, verdict=True)
    except CkptlabError as e:
        if "safety" not in facts:  # the header did not parse: what check calls a bad header (and a polyglot?)
            verdict = _safetensors_verdict(path)
            facts.update(safety="malicious" if verdict["safety"] == "malicious" else "corrupt", safety_detail={
                **verdict["safety_detail"],
                "findings": [{"kind": "bad_header", "severity": "corrupt", "detail": e.message, "location": ""},
                             *verdict["safety_detail"]["findings"]]})
        e.partial_facts = facts
        raise
    except (ValueError, KeyError, IndexError, TypeError, RecursionError, OverflowError) as e:
        if "safety" not in facts:  # the parser itself failed (a bug): unrated, as when check fails
            facts.update(safety="unchecked", safety_detail={"error": f"check failed: {type(e).__name__}: {e}"})
        err = CkptlabError(f"unreadable: {type(e).__name__}: {e}", path)
        err.partial_facts = facts
        raise err from None
    return facts


def _safetensors_verdict(path: str) -> dict:
    """``check``'s verdict for a safetensors file (its header parsed or not): ``malicious`` when
    torch.load would find a dangerous pickle from byte 0 (``security.polyglot_findings``, the very rule
    ``check`` applies), else ``safe``."""
    from ckptlab.formats.polyglot import polyglot_findings
    from ckptlab.jsonable import to_jsonable
    from ckptlab.remote import as_path

    findings = [to_jsonable(f) for f in polyglot_findings(as_path(path))]
    return {"safety": "malicious" if findings else "safe",
            "safety_detail": {"format": "safetensors", "container": "", "globals": [], "findings": findings}}


def _read_tensors(path: str, fmt: str, facts: dict, open_model, verdict: bool = False) -> None:
    try:
        if fmt == "safetensors":  # what open_model opens, without detecting the format a second time
            from ckptlab.formats.safetensors import SafetensorsSource

            src = SafetensorsSource(path)
            if verdict:
                facts.update(_safetensors_verdict(path))
        else:
            src = open_model(path)
    except ImportError:  # a reader not installed in this build
        src = None
        facts["error"] = f"no reader for {fmt} files in this build"
    try:
        if src is not None:
            facts.update(_tensor_stats(src))
        try:
            ident = _identify(path, src)
        except CkptlabError:
            raise
        except Exception as e:  # noqa: BLE001 - identification must not abort the scan
            ident = {}
            facts["error"] = cap(f"identification failed: {type(e).__name__}: {e}")  # may quote a whole key
        for k, v in ident.items():
            if v is not None:
                facts[k] = v
        if src is not None and facts.get("kind") in TRIGGER_KINDS:
            facts["triggers"] = lora_triggers(src.metadata)
    finally:
        if src is not None:
            src.close()


#: kinds whose trigger words the catalog keeps (``files.triggers``)
TRIGGER_KINDS = ("lora", "lycoris")


def lora_triggers(metadata) -> list[dict]:
    """The trigger words the catalog stores for a LoRA: ``lora.info.trigger_words`` of its header metadata
    (raw strings, or the decoded values ``identify`` keeps in ``info.metadata``), as JSON-ready dicts
    ``{"word", "count", "sources"}``. Never raises: a problem leaves the list empty."""
    from collections.abc import Mapping

    from ckptlab.lora.info import trigger_words

    try:
        return [{"word": t.word, "count": t.count, "sources": list(t.sources)}
                for t in trigger_words(dict(metadata) if isinstance(metadata, Mapping) else {})]
    except Exception:  # noqa: BLE001 - trigger words never fail a scan (trigger_words itself is defensive)
        return []


def _backfill_triggers(catalog: Catalog) -> int:
    """Fill ``files.triggers`` of LoRAs catalogued before the catalog kept them, from the header metadata their
    row already stores (``info.metadata``): no file is re-read. Returns the rows filled."""
    rows = catalog.conn.execute("SELECT id FROM files WHERE triggers IS NULL AND info IS NOT NULL AND "
                                "lower(kind) IN ('lora', 'lycoris')").fetchall()
    done = 0
    for start in range(0, len(rows), BATCH):
        with catalog.transaction() as c:
            for (fid,) in rows[start:start + BATCH]:
                (info,) = c.execute("SELECT info FROM files WHERE id = ?", (fid,)).fetchone()
                try:
                    meta = json.loads(info).get("metadata")
                except (ValueError, AttributeError, RecursionError):
                    meta = None
                c.execute("UPDATE files SET triggers = ? WHERE id = ?",
                          (json.dumps(lora_triggers(meta)), fid))
                done += 1
    return done


# -- the scan ---------------------------------------------------------------------------------
def scan(roots: list[str | os.PathLike], catalog: Catalog, *, hash: bool = False, fingerprint: bool = False,
         extra_model_paths: str | os.PathLike | None = None, progress: Progress | None = None,
         workers: int | None = None, on_wait=None, under: str | os.PathLike | None = None,
         ray_address: str | None = None) -> ScanSummary:
    """Scan ``roots`` into ``catalog``. ``workers``: processes reading new/changed files (default:
    CPUs, at most 8; used only when at least ``PARALLEL_MIN`` files need reading). ``under``: the
    catalogued root folder that ``roots`` (single files, say a job's outputs) lie in, recorded as
    their root as a scan of that whole folder would (default: each file's own folder), without
    walking it.

    Scans of one catalog run one at a time (``scan_lock``): a second scan waits for the first to
    finish (``on_wait()`` is called once when it has to wait), then finds its work done. Roots that
    cannot be accessed are listed in ``summary.bad_roots`` (and ``error_list``); the others are scanned.

    Object-store URLs (``s3://bucket/prefix``...) are scanned by ``ckptlab.library.remote_scan.scan_remote``
    (``ray_address``: on a Ray cluster); they cannot be mixed with local folders in one scan."""
    from ckptlab.remote import is_remote

    urls = [r for r in roots if is_remote(r)]
    if urls:
        if len(urls) != len(roots) or extra_model_paths is not None or under is not None:
            raise CkptlabError("scan object-store URLs and local folders in separate runs")
        from ckptlab.library.remote_scan import scan_remote

        return scan_remote([str(u) for u in urls], catalog, hash=hash, fingerprint=fingerprint, progress=progress,
                           workers=workers, ray_address=ray_address, on_wait=on_wait)
    if ray_address is not None:
        raise CkptlabError("--ray scans object-store prefixes (s3://bucket/prefix); local folders are read by "
                           "local processes (--workers)")
    progress = progress or null_progress
    targets: list[tuple[str, str | None]] = [(os.path.abspath(os.fspath(r)), None) for r in roots]
    if extra_model_paths is not None:
        targets += [(str(p), cat) for cat, p in ui_folders.read_extra_model_paths(extra_model_paths)]
    if not targets:
        raise CkptlabError("nothing to scan: give at least one folder or --extra-model-paths")
    root_names = [display_path(t) for t, _ in targets]
    with recorded_scan(catalog, root_names, on_wait, lock_roots=[t for t, _ in targets]) as summary:
        _run(targets, catalog, summary, hash=hash, fingerprint=fingerprint, progress=progress, workers=workers,
             under=under)
    return summary


@contextlib.contextmanager
def recorded_scan(catalog: Catalog, roots: list[str], on_wait=None, *, lock_roots: list[str] | None = None):
    """One scan as the catalog records it, for local and remote scans alike: ``scan_lock`` on ``lock_roots``
    (default ``roots``), a ``scans`` row marked running, and on the way out its status (complete, interrupted by
    Ctrl-C, failed), its time and its summary. Yields the ``ScanSummary`` the scan fills in."""
    t0 = time.perf_counter()
    with scan_lock(catalog, on_wait, roots=lock_roots if lock_roots is not None else list(roots)):
        with catalog.transaction() as c:
            scan_id = c.execute("INSERT INTO scans(started, roots, status) VALUES (?, ?, 'running')",
                                (time.time(), json.dumps(list(roots)))).lastrowid
        summary = ScanSummary(scan_id=scan_id, roots=list(roots))
        done = False
        try:
            yield summary
            done = True
        except KeyboardInterrupt:
            summary.status = "interrupted"
            raise
        except BaseException:
            summary.status = "failed"
            raise
        finally:
            summary.seconds = round(time.perf_counter() - t0, 3)
            summary.error_list = summary.error_list[:1000]
            try:
                with catalog.transaction() as c:
                    c.execute("UPDATE scans SET finished = ?, status = ?, summary = ? WHERE id = ?",
                              (time.time(), summary.status, json.dumps(_summary_dict(summary)), scan_id))
            except CkptlabError:
                if done:  # else the error already on its way says more
                    raise


@contextlib.contextmanager
def scan_lock(catalog: Catalog, on_wait=None, roots: list[str] | None = None):
    """One scan of a catalog at a time, across processes: an advisory lock (``flock``) on
    ``<catalog>.scan-lock`` next to the catalog. Two scans walking the same folders at once would
    both find a new file new and both insert it; the second waits instead. Where no lock file can
    be made (a read-only folder; the catalog writes then fail with their own clear error) or the
    platform has no ``flock``, scans go ahead unlocked and rely on the upserts in ``_write_batch``.

    On PostgreSQL (``catalog.postgres``), one session advisory lock per root in ``roots`` (folders, URL
    prefixes; None: one lock for the whole catalog), taken in sorted key order: scans of different roots run
    at once (their writes are upserts, serialised by the catalog's write lock), a scan of the same root waits.
    On SQLite ``roots`` is ignored: the file lock covers the whole catalog, as before."""
    if getattr(catalog, "postgres", False):
        import hashlib

        names = sorted({os.fspath(r) for r in roots}) if roots else ["*"]
        keys = [int.from_bytes(hashlib.sha256(b"ckptlab-scan\0" + n.encode("utf-8", "surrogateescape")).digest()[:8],
                               "big", signed=True) for n in names]
        release = catalog.conn.advisory_lock(keys, on_wait)
        try:
            yield
        finally:
            release()
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(os.fspath(catalog.path) + ".scan-lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _summary_dict(s: ScanSummary) -> dict:
    from ckptlab.jsonable import to_jsonable

    d = to_jsonable(s)
    d.pop("error_list", None)
    return d


def _run(targets, catalog: Catalog, summary: ScanSummary, *, hash: bool, fingerprint: bool,
         progress: Progress, workers: int | None, under=None) -> None:
    progress(0, description="walking folders")
    walk_errors: list[dict] = []
    found: list[Found] = []
    seen_paths: set[str] = set()
    for root, category in targets:
        n_errors = len(walk_errors)
        for f in walk(root, category, walk_errors):
            if f.path not in seen_paths:
                seen_paths.add(f.path)
                found.append(f)
        # a root given by the user that is not there (a typo, an unmounted drive); folders that an
        # extra_model_paths.yaml lists but that do not exist are common and stay summary lines
        if category is None and any(e.get("root") for e in walk_errors[n_errors:]):
            summary.bad_roots.append(display_path(root))
    summary.error_list += [{"path": e["path"], "error": e["error"]} for e in walk_errors]
    summary.files = len(found)
    if under is not None:
        top = os.path.abspath(os.fspath(under))
        for f in found:
            if os.path.commonpath([top, os.path.abspath(f.path)]) == top:
                f.root = top
    # an extra_model_paths.yaml folder that lies inside a plain root: its category wins for the files
    # below it, whichever target walked them first (the deepest folder wins)
    categories = sorted(((os.path.join(os.path.abspath(r), ""), c) for r, c in targets if c is not None),
                        key=lambda rc: len(rc[0]), reverse=True)
    if categories:
        for f in found:
            if f.category is None:
                f.category = next((c for prefix, c in categories if f.path.startswith(prefix)), None)

    rows = catalog.conn.execute("SELECT id, path, dev, ino, size, mtime_ns, status, error, sidecars, safety, "
                                "folder FROM files")
    by_path: dict[bytes, tuple] = {}
    by_key: dict[StatKey, list[tuple]] = {}
    for row in rows:
        by_path[row[1]] = row
        if row[2] is not None:
            by_key.setdefault((row[2], row[3], row[4], row[5]), []).append(row)
    found_keys = {path_key(f.path) for f in found}

    todo: list[tuple[Found, int | None, str]] = []  # (found, existing row id, why)
    unchanged_ids: list[int] = []
    moves: list[tuple[Found, int]] = []
    sidecar_updates: list[tuple[Found, int]] = []
    folder_updates: list[tuple[str, int]] = []
    for f in found:
        pk = path_key(f.path)
        row = by_path.get(pk)
        if f.error is None and f.key is not None:
            summary.bytes += f.key[2]
        if row is not None:
            same = f.key is not None and (row[2], row[3], row[4], row[5]) == f.key
            # a row without a verdict (catalogued before every file was checked) is read once more
            if same and row[6] == "present" and row[7] is None and row[9] is not None:
                unchanged_ids.append(row[0])
                # a folder known now (e.g. a category of an extra_model_paths.yaml given this time) is
                # recorded without re-reading the file; a plain re-scan never forgets a category
                folder = _location(f)["folder"]
                if folder is not None and folder != row[10]:
                    folder_updates.append((folder, row[0]))
                if _sidecars_changed(f, row[8]):
                    sidecar_updates.append((f, row[0]))
                continue
            todo.append((f, row[0], "changed"))
            continue
        moved_from = None
        if f.key is not None:
            for cand in by_key.get(f.key, []):
                if cand[1] not in found_keys and not os.path.lexists(os.fsdecode(cand[1])):
                    moved_from = cand
                    break
        if moved_from is not None:
            by_key[f.key].remove(moved_from)
            moves.append((f, moved_from[0]))
            continue
        todo.append((f, None, "new"))

    now = time.time()
    with catalog.transaction() as c:
        c.execute("CREATE TEMP TABLE IF NOT EXISTS _seen (id INTEGER PRIMARY KEY)")
        c.execute("DELETE FROM _seen")
        c.executemany("INSERT OR IGNORE INTO _seen(id) VALUES (?)", [(i,) for i in unchanged_ids])
        c.execute("UPDATE files SET last_seen = ?, last_scan = ? WHERE id IN (SELECT id FROM _seen)",
                  (now, summary.scan_id))
        c.executemany("UPDATE files SET folder = ? WHERE id = ?", folder_updates)
        moves = [(f, fid) for f, fid in moves if _apply_move(c, f, fid, now, summary.scan_id)]
        for f, fid in sidecar_updates:
            sc = sidecars.find(f.path, f.names)
            c.execute("UPDATE files SET sidecars = ? WHERE id = ?", (_sidecar_json(f, sc), fid))
    summary.unchanged = len(unchanged_ids)
    summary.moved = len(moves)

    # the bar counts bytes of all files found; files that need no reading count as done at once
    n_files, done = len(found), len(found) - len(todo)
    progress(summary.bytes - sum(_size(t[0]) for t in todo), total=summary.bytes,
             description=f"reading {done}/{n_files} files")
    batch: list[tuple] = []
    for (f, fid, why), facts in zip(todo, _read_all([t[0] for t in todo], workers), strict=True):
        batch.append((f, fid, why, facts))
        done += 1
        progress(_size(f), description=f"reading {done}/{n_files} files")
        if len(batch) >= BATCH:
            _write_batch(catalog, batch, summary)
            batch = []
    if batch:
        _write_batch(catalog, batch, summary)

    _backfill_triggers(catalog)

    if hash or fingerprint:
        _content_pass(catalog, found, summary, hash=hash, fingerprint=fingerprint, progress=progress)

    # missing: rows under a scanned root that were not found. Not under a folder (or root) that could
    # not be listed: an unmounted drive or a permission problem is not a deletion.
    sep = os.sep.encode()
    root_keys = [path_key(r).rstrip(sep) + sep for r, _ in targets]
    blind = tuple(path_key(e["folder"]).rstrip(sep) + sep for e in walk_errors if e.get("folder"))
    moved_ids = {fid for _, fid in moves}
    gone = [row[0] for pk, row in by_path.items()
            if row[6] == "present" and pk not in found_keys and row[0] not in moved_ids
            and any(pk.startswith(rk) for rk in root_keys) and not (blind and pk.startswith(blind))]
    if gone:
        with catalog.transaction() as c:
            c.executemany("UPDATE files SET status = 'missing' WHERE id = ?", [(g,) for g in gone])
    summary.missing = len(gone)
    summary.errors = len(summary.error_list)
    for pk, verdict in catalog.conn.execute(
            "SELECT path, safety FROM files WHERE status = 'present' AND safety IN ('malicious', 'suspicious')"):
        if pk in found_keys:
            setattr(summary, verdict, getattr(summary, verdict) + 1)


def _size(f: Found) -> int:
    """The bytes a found file counts for in ``summary.bytes`` (0 for one that could not be stat'ed)."""
    return f.key[2] if f.error is None and f.key is not None else 0


def _sidecars_changed(f: Found, stored: str | None) -> bool:
    sc = sidecars.find(f.path, f.names)
    old = json.loads(stored).get("_signature", {}) if stored else {}
    return sidecars.signature(f.path, sc) != old if (sc or old) else False


def _sidecar_json(f: Found, found: dict[str, str]) -> str | None:
    if not found:
        return None
    data = sidecars.read(f.path, found)
    data["_signature"] = sidecars.signature(f.path, found)
    # UTF-8 text (searchable with ls --search); lone surrogates from odd names become U+FFFD
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "replace").decode("utf-8")


def _location(f: Found) -> dict:
    folder, _ui, hint = ui_folders.folder_hint(f.path, f.root)
    if f.category:
        folder, hint = f.category, ui_folders.COMFY_CATEGORY_KINDS.get(f.category, f.category)
    return {"path": path_key(f.path), "display": display_path(f.path), "name": display_path(os.path.basename(f.path)),
            "root": display_path(f.root), "folder": folder, "hint": hint}


def _apply_move(c, f: Found, fid: int, now: float, scan_id: int) -> bool:
    loc = _location(f)
    sc = sidecars.find(f.path, f.names)
    # (no-op when another scan has meanwhile catalogued the new path: the old row then becomes missing)
    c.execute("UPDATE files SET path = ?, display = ?, name = ?, root = ?, folder = ?, is_link = ?, sidecars = ?, "
              "status = 'present', last_seen = ?, last_scan = ? WHERE id = ? AND NOT EXISTS "
              "(SELECT 1 FROM files WHERE path = ?)",
              (loc["path"], loc["display"], loc["name"], loc["root"], loc["folder"], int(f.is_link),
               _sidecar_json(f, sc), now, scan_id, fid, loc["path"]))
    return c.execute("SELECT changes()").fetchone()[0] > 0


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_all(found: list[Found], workers: int | None):
    """``_read_one`` over ``found`` in order; in worker processes when there are enough files."""
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers <= 1 or len(found) < PARALLEL_MIN:
        for f in found:
            yield _read_one(f)
        return
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    for mod in ("ckptlab.arch.identify", "ckptlab.formats.safetensors", "ckptlab.formats.pickle", "ckptlab.security"):
        try:  # imported once here, inherited by forked workers instead of imported by each
            __import__(mod)
        except ImportError:
            pass
    # a folder listing can hold 10,000s of names: ship each file's own sidecar list instead
    light = (replace(f, names=set(), sidecar_files=sidecars.find(f.path, f.names)) for f in found)
    ex = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
    try:
        yield from ex.map(_read_one, light, chunksize=8)
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def facts_or_error(path, hint: str | None) -> dict:
    """``read_file_facts`` as a scan records it (local files and remote objects alike): a file ckptlab cannot read
    is a row with an ``error`` (and whatever facts were found before it, the verdict included), never an
    exception that stops the scan."""
    facts: dict = {"kind": hint}
    try:
        facts.update(read_file_facts(path, hint))
    except CkptlabError as e:
        facts.update(getattr(e, "partial_facts", None) or {})
        facts["error"] = e.message
    except OSError as e:
        facts["error"] = f"cannot read: {e.strerror or e}"
    except MemoryError:
        facts["error"] = "file too large to parse"
    except (ValueError, KeyError, IndexError, TypeError, EOFError) as e:
        facts["error"] = cap(f"unreadable: {type(e).__name__}: {e}")  # stored: never megabytes
    if "error" in facts and facts.get("format") is None:
        from ckptlab.formats import detect_format

        try:
            facts["format"] = detect_format(path)
        except (CkptlabError, OSError):
            pass
    return facts


def _read_one(f: Found) -> dict:
    loc = _location(f)
    facts: dict = {"kind": loc["hint"]}
    if f.error:
        facts["error"] = f.error
        return facts
    facts = facts_or_error(f.path, loc["hint"])
    if "error" not in facts:
        try:
            if current_key(f.path, f.folder_key is not None) != f.key:
                facts = {"kind": loc["hint"], "error": "file changed during the scan; scan again"}
        except OSError as e:
            facts = {"kind": loc["hint"], "error": f"vanished during the scan: {e.strerror or e}"}
    try:
        sc = f.sidecar_files if f.sidecar_files is not None else sidecars.find(f.path, f.names)
        facts["sidecars"] = _sidecar_json(f, sc)
    except Exception as e:  # noqa: BLE001 - a sidecar problem is never fatal
        facts["sidecars"] = json.dumps({"error": str(e)})
    return facts


_FACT_COLS = ("format", "kind", "family", "variant", "n_tensors", "tensor_bytes", "ema_bytes", "fp32_bytes",
              "dtypes", "info", "safety", "safety_detail", "sidecars", "error", "triggers")


def fact_values(facts: dict) -> list:
    """The ``_FACT_COLS`` values of one scanned file as the catalog stores them (JSON columns as text)."""
    vals = []
    for col in _FACT_COLS:
        v = facts.get(col)
        if col in ("dtypes", "info", "safety_detail", "triggers") and v is not None:
            v = json.dumps(v)  # ASCII: lone surrogates from odd file names stay escaped
        elif isinstance(v, str):
            v = v.encode("utf-8", "replace").decode("utf-8")
        vals.append(v)
    return vals


@functools.lru_cache(maxsize=4)
def _upsert_file_sql(cols: tuple[str, ...]) -> str:
    return (f"INSERT INTO files(path, display, name, root, folder, dev, ino, size, mtime_ns, is_link, "
            f"{', '.join(cols)}, status, first_seen, last_seen, last_scan) VALUES "
            f"(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {', '.join('?' * len(cols))}, 'present', ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET " + ", ".join(f"{c_} = excluded.{c_}" for c_ in (
                "display", "name", "root", "folder", "dev", "ino", "size", "mtime_ns", "is_link", *cols,
                "status", "last_seen", "last_scan")))


def upsert_file_row(c, loc: dict, stat_key, is_link: int, vals: list, now: float, scan_id: int) -> None:
    """Insert or update (by path) the row of one scanned file or object: ``loc`` its location (``_location``),
    ``vals`` its ``fact_values``. An upsert: a row another scan added meanwhile is updated, never a UNIQUE
    failure (and a Ray task that ran twice leaves one row)."""
    c.execute(_upsert_file_sql(_FACT_COLS), (loc["path"], loc["display"], loc["name"], loc["root"], loc["folder"], *stat_key,
                             is_link, *vals, now, now, scan_id))


def _write_batch(catalog: Catalog, batch: list[tuple], summary: ScanSummary) -> None:
    now = time.time()
    with catalog.transaction() as c:
        for f, fid, _why, facts in batch:
            loc = _location(f)
            key = f.key if f.error is None else None
            vals = fact_values(facts)
            st = key or (None, None, None, None)
            if fid is None:
                # an upsert: where scans cannot be serialised (no flock), another scan may have added the
                # path since this one read the table; its row is then updated, never a UNIQUE failure
                upsert_file_row(c, loc, st, int(f.is_link), vals, now, summary.scan_id)
                summary.new += 1
            else:
                c.execute(
                    f"UPDATE files SET display = ?, name = ?, root = ?, folder = ?, dev = ?, ino = ?, size = ?, "
                    f"mtime_ns = ?, is_link = ?, {', '.join(c_ + ' = ?' for c_ in _FACT_COLS)}, status = 'present', "
                    f"last_seen = ?, last_scan = ? WHERE id = ?",
                    (loc["display"], loc["name"], loc["root"], loc["folder"], *st, int(f.is_link), *vals, now,
                     summary.scan_id, fid))
                summary.changed += 1
            if facts.get("error"):
                summary.error_list.append({"path": loc["display"], "error": vals[_FACT_COLS.index("error")]})


def _content_pass(catalog: Catalog, found: list[Found], summary: ScanSummary, *, hash: bool, fingerprint: bool,
                  progress: Progress) -> None:
    """Hash / fingerprint files whose stat identity has no cached content yet (one file = one commit)."""
    from ckptlab.hashes import hash_file

    todo = []
    seen_keys: set[StatKey] = set()
    for f in found:
        if f.error or f.key is None or f.key in seen_keys:
            continue
        seen_keys.add(f.key)
        cached = catalog.content(f.key) or {}
        need_h = hash and cached.get("hashes") is None and f.folder_key is None  # CivitAI hashes are per file
        need_f = fingerprint and cached.get("fingerprint") is None
        if need_h or need_f:
            todo.append((f, need_h, need_f))
    # one bar for the whole scan: the bytes to hash or fingerprint are added to the bytes read before,
    # and hash_file / fingerprint_file advance it as they read
    progress(0, total=summary.bytes + sum(f.key[2] * (int(h) + int(fp)) for f, h, fp in todo),
             description=f"hashing 0/{len(todo)} files")
    for i, (f, need_h, need_f) in enumerate(todo, start=1):
        progress(0, description=f"hashing {i}/{len(todo)} files")
        try:
            h = hash_file(f.path, progress=progress) if need_h else None
            fp = None
            if need_f:
                from ckptlab.library.fingerprint import fingerprint_file

                fp = fingerprint_file(f.path, progress=progress)
            if current_key(f.path, f.folder_key is not None) != f.key:
                raise CkptlabError("file changed during the scan; scan again", f.path)
        except (CkptlabError, OSError) as e:
            msg = e.message if isinstance(e, CkptlabError) else f"cannot read: {e.strerror or e}"
            msg = msg.encode("utf-8", "replace").decode("utf-8")
            summary.error_list.append({"path": display_path(f.path), "error": msg})
            with catalog.transaction() as c:  # recorded on the file's row; the next scan retries it
                c.execute("UPDATE files SET error = ? WHERE path = ?", (msg, path_key(f.path)))
            continue
        with catalog.transaction():
            if h is not None:
                catalog.put_hashes(f.key, h)
                summary.hashed += 1
            if fp is not None:
                catalog.put_fingerprint(f.key, fp.fingerprint, fp.components, fp.bf16, fp.bf16_components)
                summary.fingerprinted += 1


def hash_paths(paths: list[str | os.PathLike], catalog: Catalog | None = None,
               progress: Progress | None = None, on_cache_error=None, on_error=None) -> list[dict]:
    """``ckptlab hash``: hashes of each path, from the catalog's cache when the file's stat identity
    is known there, else computed (and cached when a catalog is given). A catalog that cannot be
    written (read-only, disk full) is only a cache: ``on_cache_error(message)`` is told once and the
    hashes are still returned. A path that cannot be hashed raises ``CkptlabError``, or, with
    ``on_error``, is passed to it and skipped (the other files are still hashed)."""
    out = []
    for p in paths:
        try:
            r = _hash_remote(p, progress or null_progress) if isinstance(p, str) and "://" in p and \
                _remote(p) else _hash_one(Path(p), catalog, progress or null_progress, on_cache_error)
        except CkptlabError as e:
            if on_error is None:
                raise
            on_error(e)
            continue
        if r.pop("_uncached", False):
            catalog, on_cache_error = None, None
        out.append(r)
    return out


def _remote(p: str) -> bool:
    from ckptlab.remote import is_remote

    return is_remote(p)


def _hash_remote(url: str, progress: Progress) -> dict:
    """``hash`` of a remote object: one streamed GET, never cached (the catalog caches by stat identity; a URL's
    is its ETag, which ``scan --hash`` records)."""
    from ckptlab.errors import NotFoundError
    from ckptlab.hashes import hash_remote
    from ckptlab.remote.reader import session

    if url.endswith("/"):
        raise CkptlabError("is a prefix (hash objects, or scan the prefix with --hash)", url)
    with session():
        try:
            h = hash_remote(url, progress=progress)
        except NotFoundError:
            from ckptlab.formats import detect_format

            try:
                folder = detect_format(url) == "diffusers"
            except CkptlabError:
                folder = False
            if folder:
                raise CkptlabError("is a diffusers prefix (hash its objects, or scan it with --hash)", url) from None
            raise
    return {"path": url, "cached": False, **h.__dict__}


def _hash_one(p: Path, catalog: Catalog | None, progress: Progress, on_cache_error) -> dict:
    from ckptlab.errors import CatalogWriteError
    from ckptlab.hashes import hash_file

    try:
        st = os.stat(p)
    except OSError as e:
        raise CkptlabError(f"cannot access: {e.strerror or e}", p) from None
    if stat_mod.S_ISDIR(st.st_mode):
        raise CkptlabError("is a folder (hash files, or scan the folder with --hash)", p)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = catalog.content(key) if catalog is not None else None
    if cached and cached.get("hashes"):
        progress(st.st_size)
        return {"path": display_path(p), "cached": True, **cached["hashes"].__dict__}
    h = hash_file(p, progress=progress)
    out = {"path": display_path(p), "cached": False, **h.__dict__}
    after = os.stat(p)
    if catalog is not None and (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == key:
        try:
            with catalog.transaction():
                catalog.put_hashes(key, h)
        except CatalogWriteError as e:
            if on_cache_error is not None:
                on_cache_error(f"{e}; hashes not cached")
            out["_uncached"] = True  # no further writes to try
    return out
