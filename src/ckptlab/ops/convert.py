"""``convert``: legacy pickles (.ckpt/.pt/.pth/.bin) to ``.safetensors``, one tensor at a time.

Inputs are read by the data-only pickle reader (``formats.pickle``); ``malicious`` files are
refused by opening them, ``suspicious`` ones unless ``allow_suspicious``. The loop is ``ops.run.run_each``:
every input is opened and checked and every output path validated before the first byte is written. Tensors
are copied bit for bit with their dtype; views of one storage become separate tensors; training
state (optimizer, schedulers, callbacks) is dropped; EMA weights are kept unless ``drop_ema``;
non-tensor values (``global_step``, ``epoch``...) become metadata strings.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from pathlib import Path

from ckptlab.errors import CkptlabError, UnsupportedFormatError
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.run import run_each
from ckptlab.ops.stream import Out, TransformResult
from ckptlab.progress import Progress, null_progress

#: what ``convert`` returns per input (the shared transform record)
ConvertResult = TransformResult

EMA_PREFIX = "model_ema."


def convert(inputs: str | Path | Iterable[str | Path], out: str | Path | None = None,
            out_dir: str | Path | None = None, *, allow_suspicious: bool = False, drop_ema: bool = False,
            overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, cache: HashCache = NO_CACHE) -> list[ConvertResult]:
    """Convert each pickle in ``inputs`` to ``<stem>.safetensors`` (next to it, in ``out_dir``, or ``out``)."""
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    if out is not None and len(paths) != 1:
        raise CkptlabError("-o/--output takes exactly one input; use --out-dir for several")
    if out is not None and out_dir is not None:
        raise CkptlabError("use either -o/--output or --out-dir, not both")

    return run_each(paths, "convert", "", partial(_plan, drop_ema=drop_ema), out_dir=Path(out_dir) if out_dir else None,
                    outputs=[Path(out)] if out is not None else None, overwrite=overwrite, dry_run=dry_run,
                    progress=progress or null_progress, allow_suspicious=allow_suspicious,
                    cache=cache)


def _plan(path: Path, src, result: TransformResult, *, drop_ema: bool) -> tuple[list[Out], dict, bool]:
    """Suspicious findings were already refused or reported by ``run_each``'s gate."""
    if src.format != "pickle":
        raise UnsupportedFormatError(f"convert reads pickle files (.ckpt/.pt/.pth/.bin); this is {src.format}", path)
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
    return [Out.copy(k, src) for k in kept], {"drop_ema": drop_ema, "source_container": src.container}, True
