"""``convert``: legacy pickles (.ckpt/.pt/.pth/.bin) to ``.safetensors``, one tensor at a time.

Inputs are read by the data-only pickle reader (``formats.pickle``); ``malicious`` files are
refused by opening them, ``suspicious`` ones unless ``allow_suspicious``. Every input is opened and
checked and every output path validated before the first byte is written (the same two phases as
``ops.run``, whose safety gate has no ``allow_suspicious``). Tensors
are copied bit for bit with their dtype; views of one storage become separate tensors; training
state (optimizer, schedulers, callbacks) is dropped; EMA weights are kept unless ``drop_ema``;
non-tensor values (``global_step``, ``epoch``...) become metadata strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ckptlab.errors import CkptlabError, UnsafeFileError, UnsupportedFormatError
from ckptlab.ops.stream import (
    FileHasher,
    Out,
    TransformResult,
    check_output,
    open_input,
    output_path,
    placeholder,
    provenance,
    write_plan,
)
from ckptlab.progress import Progress, null_progress

#: what ``convert`` returns per input (the shared transform record)
ConvertResult = TransformResult

EMA_PREFIX = "model_ema."


def convert(inputs: str | Path | Iterable[str | Path], out: str | Path | None = None,
            out_dir: str | Path | None = None, *, allow_suspicious: bool = False, drop_ema: bool = False,
            overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None) -> list[ConvertResult]:
    """Convert each pickle in ``inputs`` to ``<stem>.safetensors`` (next to it, in ``out_dir``, or ``out``)."""
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if out is not None and len(paths) != 1:
        raise CkptlabError("-o/--output takes exactly one input; use --out-dir for several")
    if out is not None and out_dir is not None:
        raise CkptlabError("use either -o/--output or --out-dir, not both")

    if not paths:
        raise CkptlabError("no input files")
    progress = progress or null_progress
    jobs: list[tuple[object, TransformResult, list[Out], dict]] = []
    seen: set[Path] = set()
    try:
        # phase 1: open (refusing malicious input), plan and check every output before writing anything
        for i, path in enumerate(paths):
            src = open_input(path)  # a malicious pickle raises UnsafeFileError here
            target = Path(out) if out is not None else output_path(path, Path(out_dir) if out_dir else None, "")
            result = TransformResult("convert", path, target, dry_run=dry_run, tensors_in=len(src),
                                     bytes_in=sum(inf.nbytes for inf in src.infos().values()))
            jobs.append((src, result, [], {}))
            items, options = _plan(path, src, result, allow_suspicious, drop_ema)
            jobs[i] = (src, result, items, options)
            result.tensors_out = len(items)
            result.bytes_out = sum(it.info.nbytes for it in items)
            if target.resolve() in seen:
                raise CkptlabError(f"two inputs would both be written to {target}", path)
            seen.add(target.resolve())
            check_output(target, [path], overwrite)
        if dry_run:
            return [r for _, r, _, _ in jobs]
        # phase 2: stream each input into its output (input sha256 computed alongside for provenance)
        for n, (src, result, items, options) in enumerate(jobs):
            progress(0, description=f"convert {result.input.name} ({n + 1}/{len(jobs)})")
            hasher = FileHasher(result.input)
            meta = provenance("convert", [(result.input, placeholder(0))], options, base=src.metadata)
            write_plan(result.output, items, meta, progress=progress, overwrite=overwrite,
                       pending={placeholder(0): hasher})
            result.input_sha256 = hasher.result()
        return [r for _, r, _, _ in jobs]
    finally:
        for src, *_ in jobs:
            src.close()


def _plan(path: Path, src, result: TransformResult, allow_suspicious: bool,
          drop_ema: bool) -> tuple[list[Out], dict]:
    if src.format != "pickle":
        raise UnsupportedFormatError(f"convert reads pickle files (.ckpt/.pt/.pth/.bin); this is {src.format}", path)
    if src.verdict == "suspicious":
        issues = [f"{f.detail} [{f.location}]" for f in src.findings if f.severity == "suspicious"]
        if not allow_suspicious:
            raise UnsafeFileError(f"refused: suspicious pickle ({issues[0] if issues else 'see ckptlab check'}); "
                                  "--allow-suspicious converts the tensors anyway", path)
        result.warnings += [f"ignored (suspicious): {i}" for i in issues]
    elif src.verdict != "safe":  # PickleSource raises for these; never convert them whatever happens
        raise UnsafeFileError(f"refused: pickle is {src.verdict}", path)
    result.warnings += [w for w in src.warnings if not w.startswith("suspicious: ")]
    keys = list(src.keys())
    kept = [k for k in keys if not (drop_ema and k.startswith(EMA_PREFIX))]
    if len(kept) != len(keys):
        result.dropped["ema"] = len(keys) - len(kept)
    if src.dropped:
        result.dropped["training_state"] = len(src.dropped)
        result.warnings.append(f"training state dropped: {', '.join(src.dropped)}")
    if not kept:
        raise UnsupportedFormatError("no tensors found in this pickle", path)
    return [Out.copy(k, src) for k in kept], {"drop_ema": drop_ema, "source_container": src.container}
