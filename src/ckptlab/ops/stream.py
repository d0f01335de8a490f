"""The one write path every transform uses: a plan of output tensors, each produced on demand from the
inputs, streamed through ``SafetensorsWriter``. Also the shared bookkeeping of transforms: provenance
metadata (operation, tool version, input sha256), output naming, and the result record.

A transform builds a list of ``Out`` items (key, dtype/shape, and how to get the bytes), then calls
``write_plan``. Unchanged tensors of a safetensors input are copied as raw bytes (zero copy from the
mmap); anything computed goes through ``produce()`` one tensor at a time, so peak memory stays near the
largest tensor, never the model.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, OutputError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.hashes import NO_CACHE, HashCache, sha256_file
from ckptlab.progress import Progress, null_progress

META_OPERATION = "ckptlab.operation"
META_VERSION = "ckptlab.version"
META_INPUTS = "ckptlab.inputs"
META_OPTIONS = "ckptlab.options"


@dataclass
class Out:
    """One planned output tensor: either a raw copy of ``source[src_key]`` or ``produce()`` (which may name the
    one source tensor it is derived from in ``source``/``src_key``: a slice, a reshape, a transpose)."""

    key: str
    info: TensorInfo
    source: TensorSource | None = None
    src_key: str | None = None
    produce: Callable[[], object] | None = None

    @classmethod
    def copy(cls, key: str, source: TensorSource, src_key: str | None = None) -> Out:
        src_key = src_key or key
        return cls(key, source.info(src_key), source=source, src_key=src_key)


@dataclass
class TransformResult:
    """What one transform did to one input (the ``--json`` record)."""

    operation: str
    input: Path
    output: Path | None
    dry_run: bool = False
    tensors_in: int = 0
    tensors_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    #: the size of the output file (header included) as planned; the written file has exactly this size
    file_bytes_out: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    converted: int = 0
    warnings: list[str] = field(default_factory=list)
    input_sha256: str | None = None
    #: why nothing was written (the output would have been a plain copy of the input); None when written
    unchanged: str | None = None


def write_plan(path: Path, items: list[Out], metadata: dict[str, str], *, progress: Progress = null_progress,
               overwrite: bool = False, pending: dict[str, FileHasher] | None = None, set_total: bool = True,
               data_hash: str | None = None, threads: int = 1) -> int:
    """Stream ``items`` into a new safetensors file at ``path``; return the bytes of tensor data written.

    ``pending`` maps placeholder strings inside ``metadata`` to input hashers still running: the
    digests are patched into the header (same length) just before the file is committed, so hashing
    the inputs overlaps with writing instead of adding a full read in front of it. ``data_hash`` is a
    placeholder (64 characters, like ``placeholder``) inside ``metadata`` that becomes the SHA-256 of the tensor
    data actually written (kohya's ``sshs_model_hash``). ``threads`` > 1: computed items are produced by that
    many worker threads ahead of the writer (``produce`` must be thread-safe; torch's own intra-op threads are
    set to 1 meanwhile, as in the merge engine), written in plan order, so the bytes do not change.
    """
    plan: dict[str, TensorInfo] = {}
    for it in items:
        if it.key in plan:
            raise CkptlabError(f"two output tensors are both named {it.key!r}")
        plan[it.key] = it.info
    if set_total:
        progress(0, total=sum(i.info.nbytes for i in items))
    written = 0
    from ckptlab.formats.writer import SafetensorsWriter

    with SafetensorsWriter(path, plan, metadata, overwrite=overwrite, hash_data=data_hash is not None) as w, \
            _Producer(items, threads) as produced:
        for i, it in enumerate(items):
            if it.produce is None and hasattr(it.source, "raw_bytes"):
                w.write_raw(it.key, it.source.raw_bytes(it.src_key))
            else:
                t = produced(i) if it.produce is not None else it.source.array(it.src_key)
                w.write(it.key, t)
                del t
            written += it.info.nbytes
            progress(it.info.nbytes)
        if pending or data_hash:
            # digests and placeholders have the same length, so the header keeps its size
            final = dict(metadata)
            digests = {ph: hasher.result() for ph, hasher in (pending or {}).items()}
            if data_hash:
                digests[data_hash] = w.data_sha256()
            for ph, digest in digests.items():
                final = {k: v.replace(ph, digest) for k, v in final.items()}
            w.rewrite_metadata(final)
    return written


class _Producer:
    """``produced(i)``: the tensor of computed item ``i``, made by ``threads`` workers that run ahead of the writer
    (at most ``4 × threads`` items and ``budget`` bytes of output in flight); with one thread, made on demand."""

    def __init__(self, items: list[Out], threads: int, budget: int = 256 << 20):
        self.items = items
        self.threads = threads
        self.budget = budget
        self.futures: dict[int, object] = {}
        self.inflight = 0
        self.next = 0

    def __enter__(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            try:  # imported here, not first in a worker; a core install without torch produces with numpy
                import torch
            except ImportError:
                torch = None
            self.torch = torch
            self.prev = torch.get_num_threads() if torch else None
            if self.torch:
                self.torch.set_num_threads(1)
            self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="ckptlab-write")
        return self

    def __call__(self, i: int):
        if self.threads <= 1:
            return self.items[i].produce()
        while self.next < len(self.items) and (self.next <= i or (
                len(self.futures) < 4 * self.threads and self.inflight < self.budget)):
            it = self.items[self.next]
            if it.produce is not None:
                self.futures[self.next] = self.pool.submit(it.produce)
                self.inflight += it.info.nbytes
            self.next += 1
        fut = self.futures.pop(i)
        self.inflight -= self.items[i].info.nbytes
        return fut.result()

    def __exit__(self, *exc) -> None:
        if self.threads > 1:
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.torch and self.prev is not None:
                self.torch.set_num_threads(self.prev)


def placeholder(i: int) -> str:
    """A 64-character stand-in for the sha256 of input ``i`` (patched in by ``write_plan``)."""
    return f"pending-sha256-of-input-{i:04d}".ljust(64, "~")


def tool_version() -> str:
    from ckptlab.version import __version__

    return f"ckptlab {__version__}"


def provenance(operation: str, inputs: Iterable[tuple[Path, str | None]], options: dict | None = None,
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The one provenance writer of transforms and merges: ``base`` (kept input metadata) plus what produced
    the output - ``ckptlab.operation``, ``ckptlab.version`` (``ckptlab X.Y.Z``), ``ckptlab.inputs`` (JSON list of
    ``{"name", "sha256"}``, in input order) and ``ckptlab.options`` (JSON, sorted keys; left out when empty);
    ``format: pt`` unless ``base`` says otherwise. No timestamps: same inputs and options, same bytes."""
    meta = dict(base or {})
    meta.setdefault("format", "pt")
    meta[META_OPERATION] = operation
    meta[META_VERSION] = tool_version()
    meta[META_INPUTS] = json.dumps([{"name": Path(p).name, "sha256": h} for p, h in inputs],
                                   separators=(",", ":"))
    if options:
        meta[META_OPTIONS] = json.dumps(options, separators=(",", ":"), sort_keys=True)
    return meta


class FileHasher:
    """SHA-256 of a file computed in a background thread (hashlib releases the GIL), so hashing an
    input overlaps with writing the output instead of adding a full extra pass in front of it."""

    def __init__(self, path: Path, *, cache: HashCache = NO_CACHE):
        """``cache``: where a digest already known for this exact file is taken from (the file is then not
        read); the default knows nothing."""
        self.path = Path(path)
        self._digest: str | None = cache.known_sha256(self.path)
        self._error: BaseException | None = None
        self.from_cache = self._digest is not None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if not self.from_cache:
            self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = sha256_file(self.path, self._cancel)
        except BaseException as e:  # noqa: BLE001 - reported by result()
            self._error = e

    def cancel(self) -> None:
        """Stop reading (the work the digest was for failed or ended): the thread ends at its next chunk."""
        self._cancel.set()

    def result(self) -> str:
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise OutputError(f"cannot hash input: {self._error}", self.path)
        assert self._digest is not None
        return self._digest


def output_path(inp: Path, out_dir: Path | None, suffix: str, ext: str = ".safetensors") -> Path:
    """``<out_dir or input folder>/<input stem><suffix><ext>``."""
    inp = Path(inp)
    stem = inp.name if inp.is_dir() else inp.stem
    folder = Path(out_dir) if out_dir is not None else inp.parent
    return folder / f"{stem}{suffix}{ext}"


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file: same resolved path, or the same (device, inode) -
    which also catches hard links and symlinks."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


#: the one suffix a safetensors output may have (compared case-insensitively)
OUTPUT_SUFFIX = ".safetensors"


def check_suffix(out: Path) -> None:
    """Refuse an output name that does not end in ``.safetensors``: every transform writes safetensors, and
    UIs choose the loader by suffix (A1111 would unpickle a ``.ckpt``), so ``-o x.ckpt`` is an error, not a
    silently mislabelled file."""
    out = Path(out)
    if out.suffix.lower() != OUTPUT_SUFFIX:
        hint = out.with_suffix(OUTPUT_SUFFIX).name if out.suffix else out.name + OUTPUT_SUFFIX
        raise OutputError(f"the output is a safetensors file; name it .safetensors (e.g. {hint})", out)


def check_output(out: Path, inputs: Iterable[Path], overwrite: bool, *, create_folder: bool = False) -> None:
    """The one output check of transforms and merges, before any work: refuse an output that is an input
    (any of them: the main input, every file baked in, every model merged; by resolved path and by
    device+inode), exists (unless ``overwrite``), is not named ``.safetensors``, or whose folder is missing /
    not writable. With
    ``create_folder`` (``--out-dir``) a missing folder is fine when it can be created (see ``check_folder``);
    the caller creates it with ``make_folder`` once every check has passed."""
    out = Path(out)
    check_suffix(out)
    for p in inputs:
        if same_file(out, p):
            raise OutputError(f"output would replace the input {Path(p).name}, one of the inputs; choose another "
                              "name (inputs are never modified)", out)
    if out.exists() and not overwrite:
        raise OutputError("output already exists (use --overwrite to replace it)", out)
    check_folder(out.parent, out, create=create_folder)


def check_folder(folder: Path, out: Path | None = None, *, create: bool = False) -> None:
    """The folder an output goes into is a writable folder - or, with ``create``, can be made: its nearest
    existing ancestor is a writable folder. Nothing is created here (a later refusal must leave nothing)."""
    folder = Path(folder)
    if folder.is_dir():
        probe_writable(folder, out)
        return
    if folder.exists() or not create:
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"output folder {folder} {what}", out or folder)
    anc = folder
    while not anc.exists() and anc.parent != anc:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create the output folder {folder}: {anc} is not a folder", out or folder)
    probe_writable(anc, out or folder)


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) for ``--out-dir``; one-line error on failure."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder: {e.strerror or e}", folder) from None


def probe_writable(folder: Path, out: Path | None = None) -> None:
    """Create and remove a probe file: ``os.access`` lies for root and for read-only mounts. The name is
    chosen before the file exists and removed in ``finally``, so a Ctrl-C at any moment leaves nothing."""
    import secrets

    name = Path(folder) / f".ckptlab-probe-{secrets.token_hex(8)}"
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"cannot write in {folder}: {e.strerror or e}", out or folder) from None
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass


def open_input(path: Path) -> TensorSource:
    """``open_model`` for a transform input (files or diffusers folders), with a clear missing-file error."""
    from ckptlab.errors import FormatError
    from ckptlab.formats import open_model

    path = Path(path)
    if not path.exists():
        raise FormatError("no such file", path)
    return open_model(path)
