"""The loop shared by the one-input-one-output transforms (prune, precision, extract, replace...).

Phase 1 opens every input (header only), refuses unsafe pickles, plans every output and checks every
output path - so a bad input or a bad target stops the command before any byte is written. Phase 2
streams each plan through the writer, hashing the input in parallel for the provenance metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptlab.errors import CkptlabError, UnsafeFileError, UnsupportedFormatError
from ckptlab.formats.base import TensorSource
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.stream import (
    FileHasher,
    Out,
    TransformResult,
    check_output,
    make_folder,
    open_input,
    output_path,
    placeholder,
    provenance,
    write_plan,
)
from ckptlab.progress import Progress, null_progress

#: plan_fn(path, source, result) -> (items, options, keep input metadata?)
PlanFn = Callable[[Path, TensorSource, TransformResult], tuple[list[Out], dict, bool]]


@dataclass
class _Job:
    path: Path
    src: TensorSource
    out: Path
    items: list[Out]
    options: dict
    keep_meta: bool
    result: TransformResult


def ensure_safe(src: TensorSource, allow_suspicious: bool | None = None) -> list[str]:
    """Refuse a pickle that ``ckptlab check`` calls malicious, or suspicious unless ``allow_suspicious``.

    ``allow_suspicious=None`` means the calling command has no such option (the refusal points to
    ``convert --allow-suspicious``). Returns the suspicious findings that were ignored (nothing written
    on refusal)."""
    if src.format != "pickle":
        return []
    verdict, findings = getattr(src, "verdict", None), getattr(src, "findings", None)
    if verdict is None:
        from ckptlab.security import check

        report = check(src.path)
        verdict, findings = report.verdict, report.findings
    if verdict == "safe":
        return []
    if allow_suspicious is None:  # the command has no --allow-suspicious
        if verdict in ("malicious", "suspicious"):
            hint = "; `ckptlab convert --allow-suspicious` can salvage the tensors" if verdict == "suspicious" else ""
            raise UnsafeFileError(f"refused: `ckptlab check` calls this pickle {verdict}{hint}", src.path)
        return []
    if verdict != "suspicious":  # malicious pickles fail to open; never write them whatever happens
        raise UnsafeFileError(f"refused: pickle is {verdict}", src.path)
    issues = [f"{f.detail} [{f.location}]" for f in findings or [] if f.severity == "suspicious"]
    if not allow_suspicious:
        raise UnsafeFileError(f"refused: suspicious pickle ({issues[0] if issues else 'see ckptlab check'}); "
                              "--allow-suspicious converts the tensors anyway", src.path)
    return issues


def open_checked(path: Path, allow_suspicious: bool | None = None) -> TensorSource:
    """``open_input`` + ``ensure_safe`` (closing the file on refusal)."""
    return _open_checked(path, allow_suspicious)[0]


def _open_checked(path: Path, allow_suspicious: bool | None) -> tuple[TensorSource, list[str]]:
    src = open_input(path)
    try:
        return src, ensure_safe(src, allow_suspicious)
    except BaseException:
        src.close()
        raise


def is_identity(src: TensorSource, items: list[Out]) -> bool:
    """Whether a plan writes exactly the input's tensors: every one, under its own name, as raw copies
    (same dtype and shape). Such an output would be a plain copy of the input's weights."""
    return (len(items) == len(src) and len({it.key for it in items}) == len(items)
            and all(it.produce is None and it.source is src and it.src_key == it.key for it in items))


def run_each(inputs: list[Path], operation: str, suffix: str, plan_fn: PlanFn, *, out_dir: Path | None = None,
             outputs: list[Path] | None = None, overwrite: bool = False, dry_run: bool = False,
             progress: Progress = null_progress, extra_inputs: list[Path] | None = None,
             allow_suspicious: bool | None = None, cache: HashCache = NO_CACHE,
             skip_unchanged: str | None = None) -> list[TransformResult]:
    """Plan every input with ``plan_fn``, then write each output. ``extra_inputs`` (e.g. a VAE baked
    into every input) are recorded with their sha256 in every output's provenance. ``allow_suspicious``
    (see ``ensure_safe``): suspicious pickles are read anyway, each ignored finding reported in the
    result's warnings as ``ignored (suspicious): ...``. ``cache``: where inputs' known sha256 are taken
    from (``ckptlab.hashes.HashCache``; default: none, every input is hashed). ``out_dir`` is created when
    missing (after every check passed; never on dry runs).

    ``skip_unchanged`` (a reason, e.g. "nothing to prune"): when the plan of an input is exactly its own
    tensors under their own names and dtypes, nothing is written for it; its result has ``output=None``
    and ``unchanged`` set to the reason. Without it such a plan is written (a plain copy)."""
    if not inputs:
        raise CkptlabError("no input files")
    jobs: list[_Job] = []
    skipped: list[TransformResult] = []
    order: dict[int, int] = {}  # results in input order, written or not
    seen_outputs: set[Path] = set()
    try:
        for i, path in enumerate(inputs):
            path = Path(path)
            if path.is_dir():
                raise UnsupportedFormatError(f"{operation} works on model files; this is a folder (a diffusers "
                                             "pipeline? use from-diffusers first)", path)
            src, ignored = _open_checked(path, allow_suspicious)
            out = Path(outputs[i]) if outputs else output_path(path, out_dir, suffix)
            result = TransformResult(operation, path, out, dry_run=dry_run, tensors_in=len(src),
                                     bytes_in=sum(inf.nbytes for inf in src.infos().values()))
            result.warnings += [f"ignored (suspicious): {i}" for i in ignored]
            order[id(result)] = i
            jobs.append(_Job(path, src, out, [], {}, False, result))
            items, options, keep_meta = plan_fn(path, src, result)
            jobs[-1].items, jobs[-1].options, jobs[-1].keep_meta = items, options, keep_meta
            if not items:
                raise CkptlabError("no tensors to write; no output made", path)
            result.tensors_out = len(items)
            result.bytes_out = sum(it.info.nbytes for it in items)
            if skip_unchanged and is_identity(src, items):
                result.unchanged, result.output, result.bytes_out = skip_unchanged, None, 0
                jobs.pop()
                src.close()
                skipped.append(result)
                continue
            hashed = [path.is_file(), *(True for _ in extra_inputs or [])]  # as phase 2 hashes them
            result.file_bytes_out = planned_file_size(items, _metadata(operation, jobs[-1], extra_inputs, hashed))
            if out.resolve() in seen_outputs:
                raise CkptlabError(f"two inputs would both be written to {out}", path)
            seen_outputs.add(out.resolve())
            check_output(out, [path, *(extra_inputs or [])], overwrite, create_folder=out_dir is not None)
        results = {id(r): r for r in skipped}
        results.update((id(j.result), j.result) for j in jobs)
        ordered = sorted(results.values(), key=lambda r: order[id(r)])
        if dry_run:
            return ordered
        for folder in {j.out.parent for j in jobs}:
            make_folder(folder)
        extra_hashers: dict[Path, FileHasher] = {}
        progress(0, total=sum(j.result.bytes_out for j in jobs))
        for n, job in enumerate(jobs):
            progress(0, description=f"{operation} {job.path.name} ({n + 1}/{len(jobs)})")
            hasher = FileHasher(job.path, cache=cache) if job.path.is_file() else None
            for p in extra_inputs or []:
                if p not in extra_hashers:
                    extra_hashers[p] = FileHasher(p, cache=cache)  # hashed once, recorded in every output
            hashers = [hasher, *(extra_hashers[p] for p in extra_inputs or [])]
            pending = {placeholder(i): h for i, h in enumerate(hashers) if h is not None}
            meta = _metadata(operation, job, extra_inputs, [h is not None for h in hashers])
            write_plan(job.out, job.items, meta, progress=progress, overwrite=overwrite, pending=pending,
                       set_total=False)
            job.result.input_sha256 = hasher.result() if hasher else None
        return ordered
    finally:
        for j in jobs:
            j.src.close()


def _metadata(operation: str, job: _Job, extra_inputs: list[Path] | None, hashed: list[bool]) -> dict[str, str]:
    """The output's metadata, input digests as same-length placeholders (patched in by ``write_plan``)."""
    paths = [job.path, *(extra_inputs or [])]
    return provenance(operation, [(p, placeholder(i) if h else None)
                                  for i, (p, h) in enumerate(zip(paths, hashed, strict=True))],
                      job.options, base=job.src.metadata if job.keep_meta else None)


def planned_file_size(items: list[Out], metadata: dict[str, str]) -> int:
    """Bytes of the file ``write_plan(items, metadata)`` writes: the header the writer builds plus the
    tensors laid out contiguously (a pure function of the plan; nothing is read)."""
    from ckptlab.formats.writer import build_header

    return len(build_header({it.key: it.info for it in items}, metadata)) + sum(it.info.nbytes for it in items)

