"""``ckptlab apply-plan``: carry out a reviewed ``plan-space`` plan (``ckptlab.library.plan``), step by step.

Before a step touches anything it checks that the file is still what the plan saw (size, and mtime or
sha256) and, for a duplicate, re-verifies the kept copy: it exists, has the size and mtime the plan
saw, and is the same model *now* - its SHA-256 recomputed for ``same sha256`` groups, its tensor
fingerprint recomputed for ``same weights`` groups. A step whose checks fail changes nothing. Then:

- ``delete_duplicate``: the duplicate's sidecars (previews, ``.civitai.info``...) that the kept copy
  lacks are renamed to the kept copy's name, then the duplicate is removed.
- ``link_duplicate``: a hard link or symlink to the kept copy is made under a hidden name in the
  duplicate's folder and renamed over the duplicate (``link_path``), so the UI's name never goes
  missing, not even for an instant.
- ``transform``: the transform writes a hidden file in the same folder from the file (one pass:
  convert, prune, fp16), which is then renamed to ``output``; the original goes when the name changed.

Every step is idempotent: a step found already done (the duplicate gone while the kept copy is there;
the link in place; the output present and made from the planned input, by the input sha256 the
transform records in its metadata) is reported ``done-before``, so a plan can be re-run after a crash.
``dry_run`` runs every check (hashes and fingerprints included) and plans every transform, and reports
what each step would do and free, writing nothing. Bytes freed are measured the way the plan bills
them: a removed file frees its size unless another hard link keeps the data; a rewritten file frees
its size minus the new file's.

A step naming an object in object storage (an ``s3://``... URL: the plan was edited, or made by another tool) is
refused with one line and changes nothing: a disk plan acts on local files only; deduplicating objects is
reported by ``dupes`` and ``report``, not executed here.

The catalog row of a file whose name changes is re-pointed to the new name (its id - and everything
linked to it - is kept); afterwards the touched folders are rescanned so sizes, hashes and facts match.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, MismatchError, OutputError, StaleStep
from ckptlab.hashes import NO_CACHE, HashCache, VerifiedFile
from ckptlab.progress import Progress, null_progress


@dataclass
class StepResult:
    action: str
    path: Path
    new_path: Path | None = None
    status: str = "pending"  # done | done-before | would-do | skipped | failed
    bytes_before: int = 0
    bytes_after: int = 0
    bytes_planned: int = 0
    bytes_freed: int = 0
    message: str = ""
    keep: Path | None = None
    moved_sidecars: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    from ckptlab.hashes import sha256_file

    return sha256_file(path).upper()


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
        if _sha256(path) != sha256.upper():
            raise StaleStep("content changed since the plan (sha256 differs); re-run plan-space", path)
        return
    if mtime_ns is not None:
        raise StaleStep("modified since the plan (mtime differs); re-run plan-space", path)


def verify_keeper(step) -> None:
    """The kept copy is present, has the size and mtime the plan saw, and is the same model now."""
    keep = Path(step.keep)
    try:
        st = keep.stat()
    except OSError:
        raise MismatchError(f"the copy to keep ({keep}) does not exist; duplicate not removed", step.path) from None
    if not keep.is_file():
        raise MismatchError(f"the copy to keep ({keep}) is not a file; duplicate not removed", step.path)
    if st.st_size != step.keep_size or (step.keep_mtime_ns is not None and st.st_mtime_ns != step.keep_mtime_ns):
        raise MismatchError(f"the copy to keep ({keep.name}) changed since the plan (size or mtime); duplicate "
                            "not removed - re-run plan-space", step.path)
    if step.match == "sha256":
        if _sha256(keep) != (step.keep_sha256 or "").upper() or (step.sha256 or "").upper() != step.keep_sha256.upper():
            raise MismatchError(f"not identical to {keep.name} any more (sha256 recomputed); duplicate not removed",
                                step.path)
        return
    from ckptlab.library.fingerprint import fingerprint_file

    fp = fingerprint_file(keep)
    now = fp.fingerprint if step.match == "fingerprint" else fp.bf16
    if now != step.keep_fingerprint:
        raise MismatchError(f"{keep.name} no longer holds the same weights (fingerprint recomputed); duplicate "
                            "not removed", step.path)


def hidden_target(final: Path) -> Path:
    """The hidden name a step writes before renaming to ``final`` (same folder, so the rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.stem}.ckptlab-apply{final.suffix}")


def transform(path: Path, ops: list[str], out: Path, *, dry_run: bool = False, progress: Progress = null_progress,
              cache: HashCache = NO_CACHE):
    """The one rewrite a ``transform`` step does, planned (``dry_run``) or written: ``path`` -> ``out`` with
    ``ops`` in one pass. ``plan-space`` bills ``size - result.file_bytes_out`` from the planned run, the
    very plan ``apply-plan`` then writes. ``cache``: where the input's sha256 is already known (its provenance
    then costs no second read)."""
    path, out = Path(path), Path(out)
    fp16 = "to_fp16" in ops
    if "prune" in ops:
        from ckptlab.ops.prune import prune

        results = prune([path], ema="drop", precision="fp16" if fp16 else None, outputs=[out], dry_run=dry_run,
                        progress=progress, cache=cache)
    elif fp16:
        from ckptlab.ops.precision import convert_precision

        results = convert_precision([path], "fp16", outputs=[out], dry_run=dry_run, progress=progress,
                                     cache=cache)
    elif ops == ["convert_pickle"]:
        from ckptlab.ops.convert import convert

        results = convert([path], out=out, dry_run=dry_run, progress=progress, cache=cache)
    else:
        raise CkptlabError(f"unknown transform {'+'.join(ops)!r}", path)
    return results[0]


def _made_from(path: Path, sha256: str | None) -> bool:
    """Was ``path`` written by a ckptlab transform from an input of this sha256 (its provenance says so)?"""
    if not sha256 or not path.is_file():
        return False
    try:
        from ckptlab.formats.safetensors import SafetensorsSource

        with SafetensorsSource(path) as src:
            inputs = json.loads((src.metadata or {}).get("ckptlab.inputs") or "[]")
    except (CkptlabError, OSError, ValueError):
        return False
    return bool(inputs) and isinstance(inputs[0], dict) and str(inputs[0].get("sha256") or "").upper() == sha256.upper()


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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


def _freed_by_removing(path: Path) -> int:
    st = path.stat()
    return st.st_size if st.st_nlink <= 1 else 0


def apply_plan(plan_path: Path, *, catalog_path: Path | None = None, dry_run: bool = False, rescan: bool = True,
               progress: Progress = null_progress) -> list[StepResult]:
    from ckptlab.library.catalog import catalog_location
    from ckptlab.library.plan import SpacePlan

    plan = SpacePlan.load(plan_path)
    # the catalog the plan came from: a file, or a PostgreSQL URL (a ``DbUrl``; ``Path`` of one is no file)
    source = catalog_path or plan.catalog
    db = catalog_location(source) if source else None
    records, link_targets = _catalog_records(db, {s.path for s in plan.steps})
    results: list[StepResult] = []
    touched: set[Path] = set()
    renames: list[tuple[Path, Path]] = []
    for n, step in enumerate(plan.steps):
        path = Path(step.path)
        res = StepResult(step.label, path, bytes_planned=step.bytes_freed,
                         keep=Path(step.keep) if step.keep else None)
        results.append(res)
        progress(0, description=f"apply-plan {n + 1}/{len(plan.steps)}: {step.label} {path.name}")
        remote = remote_in_step(step)
        if remote is not None:
            res.status, res.message = "failed", (f"{remote} is an object in object storage: apply-plan acts on "
                                                 "local files only; nothing changed")
            progress(1)
            continue
        try:
            if step.action == "transform":
                _transform_step(step, path, res, dry_run, link_targets)
            else:
                _duplicate_step(step, path, res, dry_run, records.get(step.path), plan.link)
            if res.status == "done":
                touched.add(path.parent)
                if res.new_path is not None and res.new_path != path and step.action == "transform":
                    renames.append((path, res.new_path))
        except CkptlabError as e:  # the line names the step's path already: the message says the rest
            res.status, res.message = "failed", e.message if e.path in (None, str(path)) else str(e)
        except OSError as e:
            res.status, res.message = "failed", f"{e.strerror or e}"
        progress(1)
    if not dry_run and touched:
        _update_catalog(db, renames, sorted(touched), rescan)
    return results


def remote_in_step(step) -> str | None:
    """The URL a plan step names (its file, kept copy, link or output), or None when it names local files only."""
    from ckptlab.remote import is_remote

    for value in (step.path, step.keep, step.link_path, step.output):
        if is_remote(value):
            return value
    return None


def _catalog_records(db, paths: set[str]) -> tuple[dict, set]:
    """``({path: catalog row}`` of the present local files among ``paths``, ``(dev, inode)`` of every file a
    catalogued symlink points to``)``, read in one streamed pass over the plan's catalog's local rows (empty when
    there is no catalog); objects in object storage are never stat'ed."""
    from ckptlab.library.catalog import Catalog, catalog_location

    if db is None:
        return {}, set()
    db = catalog_location(db)  # a DbUrl (a PostgreSQL catalog) always "is a file": the server says if it is not
    if not db.is_file():
        return {}, set()
    from ckptlab.library.dupes import symlinked_files
    from ckptlab.library.hub_queries import LOCAL_SQL, is_remote_record, iter_records

    records: dict = {}
    targets: set = set()
    with Catalog(db) as cat:
        for r in iter_records(cat, f"f.status = 'present' AND {LOCAL_SQL}"):
            if is_remote_record(r):
                continue
            if r.path in paths:
                records[r.path] = r
            if r.is_link or os.path.islink(r.path):
                targets |= symlinked_files([r])
    return records, targets


def verify_duplicate(step, rec, plan_link: str) -> None:
    """The duplicate is the file the plan's catalog recorded (``rec``, its row), with the identity the
    step names, still inside or outside a UI folder as the plan's link mode allows, and - recomputed now,
    whatever its mtime says - still the same model as the kept copy: its SHA-256 for ``same sha256`` steps,
    its tensor fingerprint for ``same weights`` steps. A hand-edited plan cannot point a step elsewhere."""
    path = Path(step.path)
    if rec is None:
        raise MismatchError("not in the plan's catalog as a present file; not removed (re-run plan-space)", path)
    if (step.file_id is not None and rec.id != step.file_id) or rec.size != step.size or (
            step.mtime_ns is not None and rec.mtime_ns != step.mtime_ns) or (
            (rec.sha256 or "").upper() != (step.sha256 or "").upper()):
        raise MismatchError("the catalog records another file here than the plan names; not removed "
                            "(re-run plan-space)", path)
    if step.match == "sha256" and step.size != step.keep_size:
        raise MismatchError("its size differs from the copy to keep, so it cannot have the same sha256; not removed",
                            path)
    if step.match != "sha256":
        have = rec.fingerprint if step.match == "fingerprint" else rec.fingerprint_bf16
        if have != step.keep_fingerprint:
            raise MismatchError("the catalog does not record it with the kept copy's fingerprint; not removed", path)
    if step.action == "delete_duplicate" and plan_link != "none":
        from ckptlab.library.dupes import in_ui_folder

        if in_ui_folder(rec):
            raise MismatchError("is in a UI model folder: removing it would take the model from the UI "
                                "(only a plan made with --link none removes such a copy); not removed", path)
    if step.match == "sha256":
        if _sha256(path) != (step.sha256 or "").upper():
            raise StaleStep("content changed since the plan (sha256 recomputed); not removed - re-run plan-space",
                            path)
        return
    from ckptlab.library.fingerprint import fingerprint_file

    fp = fingerprint_file(path)
    if (fp.fingerprint if step.match == "fingerprint" else fp.bf16) != step.keep_fingerprint:
        raise StaleStep("no longer holds the kept copy's weights (fingerprint recomputed); not removed - re-run "
                        "plan-space", path)


def _duplicate_step(step, path: Path, res: StepResult, dry_run: bool, rec=None, plan_link: str = "auto") -> None:
    keep = Path(step.keep)
    target = Path(step.link_path) if step.action == "link_duplicate" else None
    res.new_path = target
    # already done (a re-run after a crash or a second run)?
    if step.action == "delete_duplicate" and not os.path.lexists(path) and keep.is_file():
        res.status, res.message = "done-before", "already removed"
        return
    if target is not None and _is_link_to(target, keep, step.link) and (target == path or not os.path.lexists(path)):
        res.status, res.message = "done-before", f"already a {step.link} link to {keep}"
        return
    if os.path.lexists(path) and _same_file(path, keep):
        raise MismatchError("the copy to keep is this same file; nothing to do", path)
    _verify(path, step.size, step.mtime_ns, step.sha256)
    # a crash between making the renamed link and removing the old name leaves both: finish the step
    linked = target is not None and target != path and _is_link_to(target, keep, step.link)
    if target is not None and target != path and os.path.lexists(target) and not linked:
        raise OutputError(f"{target.name} already exists; not replaced", target)
    verify_duplicate(step, rec, plan_link)
    verify_keeper(step)
    freed = _freed_by_removing(path)
    res.bytes_before = path.stat().st_size
    what = (f"remove it (kept: {keep})" if target is None else
            f"replace it by a {step.link} link to {keep}" + (f" named {target.name}" if target != path else ""))
    if dry_run:
        from ckptlab.ops.stream import probe_writable

        probe_writable(path.parent, path)  # the removal or the rename would fail there otherwise
        res.status, res.bytes_freed, res.message = "would-do", freed, f"kept copy verified; would {what}"
        return
    if target is None:
        res.moved_sidecars = _move_sidecars(path, keep)
        path.unlink()
    elif linked:
        path.unlink()
    else:
        tmp = target.with_name(f".{target.name}.ckptlab-link-{secrets.token_hex(4)}")
        try:
            if step.link == "hard":
                os.link(keep, tmp)
            else:
                os.symlink(os.path.abspath(keep), tmp)
            os.replace(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise OutputError(f"cannot make a {step.link} link to {keep}: {e.strerror or e}; nothing changed",
                              path) from None
        if target != path:
            path.unlink()
    res.status, res.bytes_freed, res.message = "done", freed, what.replace("remove it", "removed").replace(
        "replace it by", "replaced by")


def _is_link_to(target: Path, keep: Path, kind: str | None) -> bool:
    if not os.path.lexists(target):
        return False
    if kind == "sym":
        return target.is_symlink() and _same_file(target, keep)
    return not target.is_symlink() and _same_file(target, keep)


def _transform_step(step, path: Path, res: StepResult, dry_run: bool,
                    link_targets: frozenset | set = frozenset()) -> None:
    out = Path(step.output)
    res.new_path = out
    if (not path.exists() or out == path) and _made_from(out, step.sha256) and (
            out != path or path.stat().st_size != step.size):
        res.status, res.message = "done-before", f"{out.name} was already written from this file"
        return
    if path.is_symlink():
        raise MismatchError("is a symlink now; a transform never rewrites through a link", path)
    _verify(path, step.size, step.mtime_ns, step.sha256)
    st = path.stat()
    if (st.st_dev, st.st_ino) in link_targets:
        raise MismatchError("a symlink in the catalog points to it; rewriting it would break the link", path)
    if st.st_nlink > 1:
        raise MismatchError("has other hard links now; rewriting it would not free space", path)
    if out != path and os.path.lexists(out):
        raise OutputError(f"{out.name} already exists; not replaced", out)
    tmp = hidden_target(out)
    if os.path.lexists(tmp):
        tmp.unlink()  # a leftover of a crashed run (the writer commits by rename, so it is not an output)
    res.bytes_before = st.st_size
    if dry_run:
        planned = transform(path, step.ops, tmp, dry_run=True)
        res.status = "would-do"
        res.bytes_after = planned.file_bytes_out
        res.bytes_freed = st.st_size - planned.file_bytes_out
        res.message = f"would write {out.name}" + (f" and remove {path.name}" if out != path else " in its place")
        return
    try:
        # the file was hashed by _verify a moment ago: its provenance reuses that digest
        transform(path, step.ops, tmp, cache=VerifiedFile(path, step.sha256) if step.sha256 else NO_CACHE)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if out != path:
        res.moved_sidecars = _move_sidecars(path, out)
        path.unlink()
    res.bytes_after = out.stat().st_size
    res.bytes_freed = res.bytes_before - res.bytes_after
    res.status = "done"
    res.message = f"wrote {out.name}" + (f", removed {path.name}" if out != path else " in its place")


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
            _rescan(cat, folders)


def _rescan(cat, folders: list[Path]) -> None:
    """Rescan the touched folders, each as the UI folder it was catalogued as: a folder known only as a
    category of an ``extra_model_paths.yaml`` is rescanned under that category again (through a
    temporary YAML), so its files stay in a UI folder for the next plan."""
    import tempfile

    import yaml

    from ckptlab.library import ui_folders
    from ckptlab.library.hub_queries import LOCAL_SQL, iter_records
    from ckptlab.library.scanner import scan

    category: dict[Path, str] = {}
    wanted = set(folders)
    for r in iter_records(cat, f"f.status = 'present' AND {LOCAL_SQL} AND f.folder IS NOT NULL"):
        parent = Path(r.path).parent
        if parent in wanted and r.folder and ui_folders.folder_hint(r.path)[0] is None and "\n" not in str(parent):
            category.setdefault(parent, r.folder)
    plain = [str(f) for f in folders if f not in category]
    if not category:
        scan(plain, cat)
        return
    by_cat: dict[str, list[str]] = {}
    for f, c in category.items():
        by_cat.setdefault(c, []).append(str(f))
    with tempfile.TemporaryDirectory(prefix="ckptlab-apply-") as d:
        y = Path(d) / "extra_model_paths.yaml"
        y.write_text(yaml.safe_dump({"apply_plan": {c: "\n".join(fs) for c, fs in by_cat.items()}}),
                     encoding="utf-8")
        scan(plain, cat, extra_model_paths=y)
