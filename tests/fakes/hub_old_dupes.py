# The duplicate finder as it was before hub scale (library/dupes.py at 6d4c7c2, verbatim below this note): the
# oracle that tests/library/test_hub_*.py and benchmarks/hub_answers.py compare the SQL-driven one against.
# Never imported by ckptlab itself.
# ruff: noqa
"""Duplicates and the disk-space plan, from the catalog (no model file is read here; ``plan_space``
asks each transform to plan its output, which reads headers only).

A duplicate group is every catalogued file of one model: files linked by the same SHA-256 (the same
bytes), or by an equal tensor fingerprint (fp32 vs fp16, ``.ckpt`` vs ``.safetensors``, full vs
pruned, metadata edits, a diffusers folder vs its single file), or by an equal bf16 fingerprint,
joined transitively. Hard links and symlinks to one file (same ``(dev, inode)``) are one physical
file, never a duplicate. A pickle that ``check`` did not call ``safe`` is in no group. Each group has exactly one kept copy, so two groups can never disagree about
a file. ``kind`` is ``exact`` when every copy is the same bytes, else ``same_weights``.
``shared_component`` groups (``components=True``) are informational: different models sharing one
component, e.g. the same UNet with a different VAE baked in. Nothing is freed.

Which copy to keep (best first): a copy inside a UI model folder over one outside (``out/``,
``Downloads/``...); safetensors over pickle; pruned (no EMA/training state) over full; higher
precision over lower unless ``prefer_smaller=True``; a real file over a symlink; the oldest catalog
entry. A diffusers folder is never the kept copy of a group that has a single file (a file name cannot
become a folder), and is never removed: it is listed as the same model in another form.

What happens to each other copy (``DupeCopy.action``):

- ``delete``: a copy outside every UI model folder.
- ``link``: a copy inside a UI model folder is replaced by a link to the kept copy under its own name
  (a hard link on the same filesystem, else a symlink; ``link="hard"|"sym"`` forces one), so every
  UI that listed it still loads it. A same-weights copy in another container (``.ckpt`` vs
  ``.safetensors``) keeps its stem and takes the kept copy's suffix. ``link="none"`` removes copies
  from UI folders instead: only when the user asks for it.
- ``leave``: not touched, with the reason in ``note`` (a diffusers folder; a kind whose UI loads only
  pickles, e.g. hypernetworks ``.pt``; the new name is taken; a hard link across filesystems; a copy
  that matches the kept one only through a third copy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from ckptlab.formats.dtypes import FLOAT_DTYPES, itemsize
from ckptlab.library.catalog import Catalog, FileRecord
from ckptlab.library.plan import PlanStep, SpacePlan

NO_FP16_KINDS = frozenset({"vae"})  # fp16 VAEs overflow (SDXL VAE) - not proposed
#: kinds whose fp16 form every UI loads; others (upscalers, detectors, unknown files) are not proposed
FP16_KINDS = frozenset({"checkpoint", "unet", "lora", "lycoris", "controlnet", "text_encoder"})
#: kinds every UI also loads as .safetensors; a pickle of another kind is never converted unless asked
#: (stock A1111 lists hypernetworks only as *.pt and ESRGAN models only as *.pth)
CONVERT_KINDS = frozenset({"checkpoint", "lora", "lycoris", "vae", "embedding", "controlnet", "unet",
                           "text_encoder"})
LINK_MODES = ("auto", "hard", "sym", "none")
_PRECISION_TAGS = ("fp32", "fp16", "bf16", "f32", "f16", "float32", "float16")


@dataclass
class DupeCopy:
    id: int
    path: str
    size: int
    format: str | None
    precision: str | None
    pruned: bool
    is_link: bool
    keep: bool = False
    in_ui: bool = False
    action: str = "keep"  # keep | delete | link | leave
    match: str | None = None  # what makes it the kept copy's model: sha256 | fingerprint | fingerprint_bf16
    link: str | None = None  # hard | sym (action link)
    link_path: str | None = None
    bytes_freed: int = 0
    note: str = ""


@dataclass
class DupeGroup:
    kind: str  # exact | same_weights | shared_component
    key: str
    copies: list[DupeCopy]
    keep: str
    bytes_freed: int
    reason: str = ""
    component: str | None = None


@dataclass
class DupesResult:
    """The duplicate groups ``dupes`` found, and how many files it could not compare (not hashed / fingerprinted)."""

    groups: list[DupeGroup] = field(default_factory=list)
    unhashed: int = 0
    unfingerprinted: int = 0

    @property
    def bytes_freed(self) -> int:
        return sum(g.bytes_freed for g in self.groups)

    def to_dict(self) -> dict:
        from ckptlab.jsonable import to_jsonable

        return {"groups": [to_jsonable(g) for g in self.groups], "bytes_freed": self.bytes_freed,
                "unhashed": self.unhashed, "unfingerprinted": self.unfingerprinted}


def precision(rec: FileRecord) -> str | None:
    """The float dtype holding most of the weights (``F32``, ``F16``...): what the plan compares to pick a keeper.
    Not the label pages show: that is ``library.precision.precision_of`` (by bytes over every dtype, quantized
    included, ``mixed`` below 90 %)."""
    from ckptlab.library.precision import byte_counts

    floats = {d: b for d, b in byte_counts(rec.dtypes).items() if d in FLOAT_DTYPES}
    return max(floats, key=lambda d: (floats[d], d)) if floats else None


def _is_pruned(rec: FileRecord) -> bool:
    return not rec.ema_bytes


def in_ui_folder(rec: FileRecord) -> bool:
    """Is this file in a folder a UI reads models from? A known UI folder name or an
    ``extra_model_paths.yaml`` category (``rec.folder``), or any folder below a ``models/`` folder
    (ComfyUI custom nodes read ``models/<anything>/``). Erring towards "yes" only makes a plan
    link instead of delete."""
    if rec.folder:
        return True
    parents = PurePath(rec.path).parent.parts
    return any(p.lower() == "models" for p in parents[:-1])


def _width(rec: FileRecord) -> int:
    prec = precision(rec)
    return itemsize(prec) if prec else 4


#: the kept copy's ranking, best first: (why a copy wins on this criterion, its sort key); ``_rank`` and
#: ``keep_reason`` both read this one list, so the reason shown is the rule applied
_RANK_CRITERIA = (
    ("a single file (a diffusers folder is never the kept copy)", lambda r, ps: r.format == "diffusers"),
    ("in a UI model folder", lambda r, ps: not in_ui_folder(r)),
    ("safetensors, not a pickle", lambda r, ps: r.format == "pickle"),
    ("pruned (no EMA weights or training state)", lambda r, ps: not _is_pruned(r)),
    ("", lambda r, ps: _width(r) if ps else -_width(r)),  # precision: worded by keep_reason
    ("a real file, not a symlink", lambda r, ps: r.is_link),
    ("in a folder a UI names", lambda r, ps: r.folder is None),
    ("catalogued first", lambda r, ps: r.id),
)


def _rank(rec: FileRecord, prefer_smaller: bool) -> tuple:
    return tuple(key(rec, prefer_smaller) for _, key in _RANK_CRITERIA)


def keep_reason(keeper: FileRecord, other: FileRecord, prefer_smaller: bool = False) -> str:
    """Why ``keeper`` is kept rather than ``other`` (two copies of one group): the first rule of the ranking
    (module doc) on which they differ, e.g. ``"in a UI model folder"``."""
    for label, key in _RANK_CRITERIA:
        a, b = key(keeper, prefer_smaller), key(other, prefer_smaller)
        if a != b:
            if label:
                return label
            kp, op = (precision(keeper) or "?").lower(), (precision(other) or "?").lower()
            return (f"smaller precision ({kp} over {op}, --prefer-smaller)" if prefer_smaller
                    else f"higher precision ({kp} over {op})")
    return "catalogued first"


def _copy(rec: FileRecord, keep: bool) -> DupeCopy:
    return DupeCopy(id=rec.id, path=rec.path, size=rec.size or 0, format=rec.format, precision=precision(rec),
                    pruned=_is_pruned(rec), is_link=rec.is_link, keep=keep, in_ui=in_ui_folder(rec),
                    action="keep" if keep else "leave")


def _nlink(path: str) -> int:
    try:
        return os.stat(path).st_nlink
    except OSError:
        return 1


def _physical(path: str) -> tuple[int, int] | None:
    """``(dev, inode)`` of the file ``path`` names now (symlinks followed), None when it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def symlinked_files(recs) -> set[tuple[int, int]]:
    """``(dev, inode)`` of every file a catalogued symlink resolves to, as catalogued and as it is now: a
    transform must never rewrite or remove such a file (the link would dangle or change under the UI)."""
    out: set[tuple[int, int]] = set()
    for r in recs:
        if r.is_link or os.path.islink(r.path):
            if r.dev is not None and r.ino is not None:
                out.add((r.dev, r.ino))
            now = _physical(r.path)
            if now is not None:
                out.add(now)
    return out


def freed_by_removing(path: str, size: int) -> int:
    """Bytes removing ``path`` gives back: its size, or 0 while another hard link keeps the data.
    ``apply-plan`` measures a removal the same way."""
    return size if _nlink(path) <= 1 else 0


def _match(r: FileRecord, keeper: FileRecord) -> str | None:
    if r.sha256 and r.sha256 == keeper.sha256:
        return "sha256"
    if r.components and keeper.components and r.fingerprint and r.fingerprint == keeper.fingerprint:
        return "fingerprint"
    if r.components and keeper.components and r.fingerprint_bf16 and r.fingerprint_bf16 == keeper.fingerprint_bf16:
        return "fingerprint_bf16"
    return None


def _decide(c: DupeCopy, r: FileRecord, keeper: FileRecord, link: str) -> None:
    """Set ``c.action`` (and link details) for a copy ``r`` of ``keeper`` (module doc)."""
    c.match = _match(r, keeper)
    if r.format == "diffusers":
        c.note = "a diffusers folder of the same model (folders are never removed)"
        return
    if keeper.format == "diffusers":
        c.note = "the other copies are diffusers folders; nothing to link to"
        return
    if c.match is None:
        c.note = "the same model only through another copy; not removed"
        return
    if not c.in_ui or link == "none":
        c.action = "delete"
        if c.in_ui:
            c.note = "removed from its UI folder (--link none)"
        c.bytes_freed = freed_by_removing(r.path, c.size)
        return
    path, keep_path = Path(r.path), Path(keeper.path)
    target = path
    if path.suffix.lower() != keep_path.suffix.lower():
        if r.kind not in CONVERT_KINDS:
            c.note = f"its UI loads a {r.kind or 'model'} only as {path.suffix}; the kept copy is {keep_path.suffix}"
            return
        target = path.with_suffix(keep_path.suffix)
        if os.path.lexists(target):
            c.note = f"{target.name} already exists next to it; not linked"
            return
    said = _tagged_dtype(target.stem)
    if said is not None and precision(keeper) not in (None, said):
        c.note = (f"its name says {said.lower()} and the kept copy holds {precision(keeper).lower()}: a link "
                  "would be named for what it does not hold")
        return
    same_fs = r.dev is not None and r.dev == keeper.dev
    if link == "hard" and not same_fs:
        c.note = "the kept copy is on another filesystem: no hard link possible (use --link sym)"
        return
    c.action = "link"
    c.link = "hard" if same_fs and link in ("auto", "hard") else "sym"
    c.link_path = str(target)
    c.bytes_freed = freed_by_removing(r.path, c.size)
    c.note = f"replaced by a {'hard link' if c.link == 'hard' else 'symlink'} to the kept copy" + (
        f", named {target.name}" if target != path else "")


def find_dupes(catalog: Catalog, *, prefer_smaller: bool = False, components: bool = False,
               link: str = "auto") -> DupesResult:
    if link not in LINK_MODES:
        from ckptlab.errors import BadChoiceError

        raise BadChoiceError(f"--link {link!r}: use one of {', '.join(LINK_MODES)}")
    # a pickle that `check` did not call safe is never kept, linked to or removed in favour of another copy
    recs = [r for r in catalog.files(status="present", sort="id") if r.error is None and r.dev is not None
            and not (r.format == "pickle" and r.safety != "safe")]
    # one record per physical file (hard links / symlinks to the same inode)
    physical: dict[tuple[int, int], FileRecord] = {}
    for r in sorted(recs, key=lambda r: (r.is_link, r.id)):
        physical.setdefault((r.dev, r.ino), r)
    files = list(physical.values())
    result = DupesResult(unhashed=sum(1 for r in files if r.hashes is None and r.format != "diffusers"),
                         unfingerprinted=sum(1 for r in files if not r.components))

    for group, via_bf16 in _groups(files):
        keeper = min(group, key=lambda r: _rank(r, prefer_smaller))
        members = sorted(group, key=lambda r: _rank(r, prefer_smaller))
        copies = [_copy(r, r is keeper) for r in members]
        for c, r in zip(copies, members, strict=True):
            if r is not keeper:
                _decide(c, r, keeper, link)
        exact = keeper.sha256 is not None and all(r.sha256 == keeper.sha256 for r in group)
        if exact:
            kind, key, reason = "exact", keeper.sha256, "same sha256"
        else:
            forms = sorted({_form(r) for r in group})
            kind, key = "same_weights", keeper.fingerprint or ""
            reason = (("same tensor fingerprint (bf16 rounding): " if via_bf16 else "same tensor fingerprint: ")
                      + ", ".join(forms))
        result.groups.append(DupeGroup(kind=kind, key=key, copies=copies, keep=keeper.path,
                                       bytes_freed=sum(c.bytes_freed for c in copies), reason=reason))

    if components:
        survivors = [r for r in files if r.format != "diffusers"]
        by_comp: dict[tuple[str, str], list[FileRecord]] = {}
        for r in survivors:
            if r.components:
                for comp, cfp in r.components.items():
                    by_comp.setdefault((comp, cfp), []).append(r)
        for (comp, cfp), group in by_comp.items():
            if len({r.fingerprint for r in group}) > 1:
                recs_sorted = sorted(group, key=lambda r: _rank(r, prefer_smaller))
                copies = [_copy(r, False) for r in recs_sorted]
                for c in copies:
                    c.action = "leave"
                result.groups.append(DupeGroup(kind="shared_component", key=cfp, copies=copies,
                                               keep="", bytes_freed=0, component=comp,
                                               reason=f"same {comp}, different other components"))
    return result


def _form(r: FileRecord) -> str:
    if r.format == "diffusers":
        return "diffusers folder"
    return f"{r.format}/{precision(r) or '?'}/{'pruned' if _is_pruned(r) else 'full'}"


def _groups(recs: list[FileRecord]) -> list[tuple[list[FileRecord], bool]]:
    """Files linked by an equal sha256, fingerprint (fp16 rounding) or bf16 fingerprint, grouped
    transitively (fp16 copy - fp32 - bf16 copy is one group); ``True`` when a bf16 link was used."""
    parent = {r.id: r.id for r in recs}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bf16_joined: set[int] = set()
    for attr in ("sha256", "fingerprint", "fingerprint_bf16"):
        first: dict[str, int] = {}
        for r in recs:
            v = getattr(r, attr) if (attr == "sha256" or r.components) else None
            if not v:
                continue
            if v in first:
                a, b = find(first[v]), find(r.id)
                if a != b:
                    parent[b] = a
                    if attr == "fingerprint_bf16":
                        bf16_joined.add(r.id)
            else:
                first[v] = r.id
    groups: dict[int, list[FileRecord]] = {}
    for r in recs:
        groups.setdefault(find(r.id), []).append(r)
    return [(g, any(r.id in bf16_joined for r in g)) for g in groups.values() if len(g) > 1]


_TAG_DTYPES = {"fp32": "F32", "f32": "F32", "float32": "F32", "fp16": "F16", "f16": "F16", "float16": "F16",
               "bf16": "BF16"}


def _tag_match(stem: str):
    import re

    pat = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(_PRECISION_TAGS) + r")(?![A-Za-z0-9])", re.IGNORECASE)
    found = list(pat.finditer(stem))
    return found[-1] if found else None


def _tagged_dtype(stem: str) -> str | None:
    """The dtype a file name claims (``model-fp16`` -> ``F16``), None when it names none."""
    m = _tag_match(stem)
    return _TAG_DTYPES[m.group(1).lower()] if m else None


def _retag(stem: str, tag: str = "fp16") -> str | None:
    """``stem`` with its precision tag (``-fp32``, ``_bf16``...) replaced by ``tag``; None when it has none."""
    m = _tag_match(stem)
    return None if m is None else stem[:m.start()] + tag + stem[m.end():]


def plan_space(catalog: Catalog, *, prefer_smaller: bool = False, fp16: bool = True, link: str = "auto",
               convert_kinds: frozenset[str] | set[str] | None = None, dupes: DupesResult | None = None) -> SpacePlan:
    """The disk plan (``library.plan`` describes the steps and their order): the duplicate steps of
    ``find_dupes``, then one transform per file (pickle -> safetensors, prune, fp32 -> fp16 in one pass),
    each billed with the exact size of the file the transform itself plans. ``dupes``: what ``find_dupes``
    just returned for this catalog with the same ``prefer_smaller`` and ``link`` (a caller that shows the
    groups too finds them once; shared-component groups in it are ignored); None finds them here."""
    from ckptlab.errors import CkptlabError
    from ckptlab.library.apply_plan import hidden_target, transform

    kinds = CONVERT_KINDS | set(convert_kinds or ())
    if dupes is None:
        dupes = find_dupes(catalog, prefer_smaller=prefer_smaller, link=link)
    recs = {r.id: r for r in catalog.files(status="present", sort="path")}
    plan = SpacePlan(catalog=str(catalog.path), link=link)
    removed: set[int] = set()
    linked_keepers: set[int] = set()
    same_weights_keepers: set[int] = set()
    taken: set[str] = set()  # paths some step creates
    for gi, g in enumerate((g for g in dupes.groups if g.kind != "shared_component"), 1):
        keeper = next(c for c in g.copies if c.keep)
        kr = recs[keeper.id]
        if g.kind == "same_weights":
            same_weights_keepers.add(kr.id)
        for c in g.copies:
            if c.keep:
                continue
            if c.action == "leave":
                plan.notes.append(f"{c.path}: left as it is: {c.note}")
                continue
            r = recs[c.id]
            removed.add(r.id)
            fp = {"fingerprint": kr.fingerprint, "fingerprint_bf16": kr.fingerprint_bf16}.get(c.match or "")
            step = PlanStep("link_duplicate" if c.action == "link" else "delete_duplicate", r.path,
                            size=r.size or 0, bytes_freed=c.bytes_freed, sha256=r.sha256, mtime_ns=r.mtime_ns,
                            keep=kr.path, reason=g.reason, file_id=r.id, keep_size=kr.size or 0,
                            keep_mtime_ns=kr.mtime_ns, keep_sha256=kr.sha256, match=c.match, keep_fingerprint=fp,
                            group=gi, link=c.link, link_path=c.link_path)
            if c.action == "link":
                linked_keepers.add(kr.id)
                taken.add(c.link_path or r.path)
            plan.steps.append(step)

    link_targets = symlinked_files(recs.values())
    for r in recs.values():
        if r.id in removed or r.error is not None or r.tensor_bytes is None or r.format == "diffusers":
            continue  # a diffusers folder is not one file a transform step can rewrite in place
        path = Path(r.path)
        ops: list[str] = []
        if r.format == "pickle":
            if r.kind not in kinds:
                plan.notes.append(f"{r.path}: stays a pickle: UIs may load {r.kind or 'unknown'} files only as "
                                  f"{path.suffix} (plan-space --convert-kind {r.kind} converts it anyway)")
                continue
            ops.append("convert_pickle")
        if r.ema_bytes:
            ops.append("prune")
        stem = path.stem
        if (fp16 and r.fp32_bytes and r.kind in FP16_KINDS and r.kind not in NO_FP16_KINDS
                and r.fp32_bytes * 100 >= (r.tensor_bytes or 0)):
            new_stem = _retag(stem)
            if r.id in same_weights_keepers:
                plan.notes.append(f"{r.path}: not made fp16: it is the kept copy of a same-weights group "
                                  "(plan-space --prefer-smaller keeps the smaller copy instead)")
            elif new_stem is not None and new_stem != stem and in_ui_folder(r):
                plan.notes.append(f"{r.path}: not made fp16: its name names another precision, and the "
                                  "fp16 file would have to be renamed, which takes it away from its UI")
            else:
                ops.append("to_fp16")
                if new_stem is not None:
                    stem = new_stem
        if not ops:
            continue
        if r.id in linked_keepers:
            plan.notes.append(f"{r.path}: not rewritten: links to it replace duplicates")
            continue
        if r.is_link or os.path.islink(r.path) or _nlink(r.path) > 1:
            plan.notes.append(f"{r.path}: not rewritten: it is a link or has other hard links")
            continue
        if _physical(r.path) in link_targets or (r.dev, r.ino) in link_targets:
            plan.notes.append(f"{r.path}: not rewritten: a symlink in the catalog points to it")
            continue
        output = path.with_name(stem + ".safetensors")
        if output != path and (os.path.lexists(output) or str(output) in taken):
            plan.notes.append(f"{r.path}: not rewritten: {output.name} already exists")
            continue
        try:
            res = transform(path, ops, hidden_target(output), dry_run=True)
            if "to_fp16" in ops and not res.converted:  # nothing to cast after all: drop the no-op
                ops.remove("to_fp16")
                output = path.with_name(path.stem + ".safetensors")
                if not ops:
                    continue
                res = transform(path, ops, hidden_target(output), dry_run=True)
        except CkptlabError as e:
            plan.notes.append(f"{r.path}: not rewritten: {e}")
            continue
        freed = (r.size or 0) - res.file_bytes_out
        if freed <= 0:
            plan.notes.append(f"{r.path}: not rewritten: {'+'.join(ops)} would not make it smaller")
            continue
        taken.add(str(output))
        reasons = {"convert_pickle": f"pickle (safety: {r.safety or 'unchecked'}) to safetensors",
                   "prune": "EMA weights / training state", "to_fp16": "fp32 weights to fp16 (VAE kept fp32)"}
        plan.steps.append(PlanStep("transform", r.path, size=r.size or 0, bytes_freed=freed, sha256=r.sha256,
                                   mtime_ns=r.mtime_ns, file_id=r.id, ops=ops, output=str(output),
                                   reason="; ".join(reasons[o] for o in ops)))
    plan.check_consistent()
    return plan
