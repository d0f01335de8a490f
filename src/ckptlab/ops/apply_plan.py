"""``ckptlab apply-plan``: carry out a reviewed ``plan-space`` plan (``ckptlab.library.plan``), file by file.

Each step first checks the file is still what the plan saw (size, and mtime or sha256), so a stale plan
never touches a changed file. Then, atomically per file:

- ``delete_duplicate``: the kept copy must exist (and, for ``same sha256`` duplicates, hash the same
  now); the duplicate's sidecars (previews, ``.civitai.info``, ``.json``...) that the kept copy lacks are
  renamed to the kept copy's name, then the duplicate is removed.
- ``convert_pickle``: ``ops.convert`` writes ``<stem>.safetensors`` next to it (refusing unsafe pickles),
  then the pickle is removed. Sidecars are keyed by the stem, so they stay linked.
- ``prune`` / ``to_fp16``: the transform writes a hidden new file in the same folder, which then
  replaces the original by rename (a pickle input becomes ``<stem>.safetensors``).

The catalog row of a file whose name changes is re-pointed to the new name (its id - and everything
linked to it - is kept); afterwards the touched folders are rescanned so sizes, hashes and facts match.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, MismatchError, OutputError
from ckptlab.ops.stream import FileHasher
from ckptlab.progress import Progress, null_progress


@dataclass
class StepResult:
    action: str
    path: Path
    new_path: Path | None = None
    status: str = "pending"  # done | would-do | skipped | failed
    bytes_before: int = 0
    bytes_after: int = 0
    message: str = ""
    moved_sidecars: list[str] = field(default_factory=list)


class StaleStep(MismatchError):
    """The file changed since the plan was made."""


def _verify(path: Path, size: int, mtime_ns: int | None, sha256: str | None) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StaleStep("file no longer exists; step skipped", path) from None
    if st.st_size != size:
        raise StaleStep(f"size is {st.st_size}, the plan saw {size}; re-run plan-space", path)
    if mtime_ns is not None and st.st_mtime_ns == mtime_ns:
        return
    if sha256:
        if FileHasher(path).result().lower() != sha256.lower():
            raise StaleStep("content changed since the plan (sha256 differs); re-run plan-space", path)
        return
    if mtime_ns is not None:
        raise StaleStep("modified since the plan (mtime differs); re-run plan-space", path)


def _hidden_target(final: Path) -> Path:
    return final.with_name(f".{final.stem}.ckptlab-apply{final.suffix}")


def _move_sidecars(dup: Path, keep: Path) -> list[str]:
    from ckptlab.library import sidecars

    mine = sidecars.find(dup)
    theirs = sidecars.find(keep)
    moved = []
    dup_stem, keep_stem = os.path.splitext(dup.name)[0], os.path.splitext(keep.name)[0]
    for role, name in mine.items():
        if role in theirs or not name.startswith(dup_stem):
            continue
        target = keep.parent / (keep_stem + name[len(dup_stem):])
        if target.exists():
            continue
        os.replace(dup.parent / name, target)
        moved.append(target.name)
    return moved


def _replace_in_place(path: Path, write) -> Path:
    """Run ``write(tmp_out)`` then put the result where ``path`` was (as ``.safetensors``)."""
    final = path.with_suffix(".safetensors")
    if final != path and final.exists():
        raise OutputError(f"{final.name} already exists next to the pickle; not replaced", final)
    tmp = _hidden_target(final)
    if tmp.exists():
        tmp.unlink()
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    if final != path:
        path.unlink()
    return final


def apply_plan(plan_path: Path, *, catalog_path: Path | None = None, dry_run: bool = False, rescan: bool = True,
               progress: Progress = null_progress) -> list[StepResult]:
    from ckptlab.library.plan import SpacePlan

    plan = SpacePlan.load(plan_path)
    results: list[StepResult] = []
    current: dict[Path, Path] = {}  # where a planned path lives now (convert changes the suffix)
    failed_files: set[Path] = set()
    processed: set[Path] = set()  # files an earlier step already changed (the plan's size no longer holds)
    touched: set[Path] = set()
    renames: list[tuple[Path, Path]] = []
    for n, step in enumerate(plan.steps):
        planned = Path(step.path)
        res = StepResult(step.action, planned)
        results.append(res)
        progress(0, description=f"apply-plan {n + 1}/{len(plan.steps)}: {step.action} {planned.name}")
        if planned in failed_files:
            res.status, res.message = "skipped", "an earlier step on this file failed"
            continue
        path = current.get(planned, planned)
        try:
            if planned not in processed:
                _verify(path, step.size, step.mtime_ns, step.sha256)
            elif not path.exists():
                raise StaleStep("the file of an earlier step is gone", path)
            res.bytes_before = path.stat().st_size
            if dry_run:
                if step.action == "delete_duplicate" and not Path(step.keep or "").exists():
                    raise MismatchError(f"the copy to keep ({step.keep}) does not exist", path)
                res.status = "would-do"
                processed.add(planned)
                continue
            new = _run_step(step, path, res)
            res.new_path = new
            res.bytes_after = new.stat().st_size if new is not None and new.exists() else 0
            processed.add(planned)
            if new is not None and new != path:
                current[planned] = new
                renames.append((path, new))
            touched.add(path.parent)
            res.status = "done"
        except CkptlabError as e:
            res.status, res.message = "failed", str(e)
            failed_files.add(planned)
        progress(1)
    if not dry_run and touched:
        db = catalog_path or (Path(plan.catalog) if plan.catalog else None)  # the catalog the plan came from
        _update_catalog(db, renames, sorted(touched), rescan)
    return results


def _run_step(step, path: Path, res: StepResult) -> Path | None:
    if step.action == "delete_duplicate":
        keep = Path(step.keep)
        if not keep.is_file():
            raise MismatchError(f"the copy to keep ({keep}) does not exist; duplicate not removed", path)
        if keep.resolve() == path.resolve():
            raise MismatchError("the copy to keep is this file", path)
        if "sha256" in (step.reason or "") or not step.reason:
            a, b = FileHasher(path), FileHasher(keep)
            if a.result() != b.result():
                raise MismatchError(f"not identical to {keep.name} any more; duplicate not removed", path)
        res.moved_sidecars = _move_sidecars(path, keep)
        path.unlink()
        return None
    if step.action == "convert_pickle":
        from ckptlab.ops.convert import convert

        final = path.with_suffix(".safetensors")
        convert([path], out=final)
        path.unlink()
        return final
    if step.action == "prune":
        from ckptlab.ops.prune import prune

        return _replace_in_place(path, lambda tmp: prune([path], ema="drop", outputs=[tmp]))
    if step.action == "to_fp16":
        from ckptlab.ops.precision import convert_precision

        return _replace_in_place(path, lambda tmp: convert_precision([path], "fp16", outputs=[tmp]))
    raise CkptlabError(f"unknown plan action {step.action!r}")


def _update_catalog(catalog_path: Path | None, renames: list[tuple[Path, Path]], folders: list[Path],
                    rescan: bool) -> None:
    from ckptlab.library.catalog import Catalog

    with Catalog(catalog_path) as cat:
        with cat.transaction():
            for old, new in renames:
                row = cat.get_by_path(old)
                if row is not None:  # content changed: stat identity left for the rescan to refresh
                    cat.move_file(row.id, new)  # False when the new name already has its own row (rescanned)
        if rescan:
            from ckptlab.library.scanner import scan

            scan([str(f) for f in folders], cat)
