"""Duplicates and the disk-space plan, from the catalog alone (no file is read here).

Groups:

- ``exact``: the same bytes (same SHA-256) at different places. Hard links and symlinks to one
  file (same ``(dev, inode)``) are one physical file, never a duplicate.
- ``same_weights``: different files whose tensor fingerprints are equal (fp32 vs fp16, ``.ckpt`` vs
  ``.safetensors``, full vs pruned, metadata edits). Exact groups are collapsed to their kept copy
  first, so no file is counted twice.
- ``shared_component`` (informational, ``components=True``): different models sharing one
  component, e.g. the same UNet with a different VAE baked in. Nothing is freed.

Which copy to keep (best first): safetensors over pickle; pruned (no EMA/training state) over
full; higher precision over lower unless ``prefer_smaller=True``; a real file over a symlink; a
file in a known UI folder; then the oldest catalog entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptlab.formats.dtypes import FLOAT_DTYPES, itemsize
from ckptlab.library.catalog import Catalog, FileRecord
from ckptlab.library.plan import PlanStep, SpacePlan

NO_FP16_KINDS = frozenset({"vae"})  # fp16 VAEs overflow (SDXL VAE) - not proposed


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
    """The float dtype holding most of the weights (``F32``, ``F16``...)."""
    floats = {d: b for d, b in (rec.dtypes or {}).items() if d in FLOAT_DTYPES}
    return max(floats, key=lambda d: (floats[d], d)) if floats else None


def _is_pruned(rec: FileRecord) -> bool:
    return not rec.ema_bytes


def _rank(rec: FileRecord, prefer_smaller: bool) -> tuple:
    prec = precision(rec)
    width = itemsize(prec) if prec else 4
    return (rec.format == "pickle", not _is_pruned(rec), width if prefer_smaller else -width, rec.is_link,
            rec.folder is None, rec.id)


def _copy(rec: FileRecord, keep: bool) -> DupeCopy:
    return DupeCopy(id=rec.id, path=rec.path, size=rec.size or 0, format=rec.format, precision=precision(rec),
                    pruned=_is_pruned(rec), is_link=rec.is_link, keep=keep)


def _group(kind: str, key: str, recs: list[FileRecord], prefer_smaller: bool, reason: str) -> DupeGroup:
    recs = sorted(recs, key=lambda r: _rank(r, prefer_smaller))
    best = recs[0]
    copies = [_copy(r, r is best) for r in recs]
    return DupeGroup(kind=kind, key=key, copies=copies, keep=best.path,
                     bytes_freed=sum(c.size for c in copies if not c.keep), reason=reason)


def find_dupes(catalog: Catalog, *, prefer_smaller: bool = False, components: bool = False) -> DupesResult:
    recs = [r for r in catalog.files(status="present", sort="id") if r.error is None and r.dev is not None]
    # one record per physical file (hard links / symlinks to the same inode)
    physical: dict[tuple[int, int], FileRecord] = {}
    for r in sorted(recs, key=lambda r: (r.is_link, r.id)):
        physical.setdefault((r.dev, r.ino), r)
    files = list(physical.values())
    result = DupesResult(unhashed=sum(1 for r in files if r.hashes is None),
                         unfingerprinted=sum(1 for r in files if not r.components))

    by_sha: dict[str, list[FileRecord]] = {}
    for r in files:
        if r.hashes is not None:
            by_sha.setdefault(r.sha256, []).append(r)
    removed: set[int] = set()
    for sha, group in by_sha.items():
        if len(group) > 1:
            g = _group("exact", sha, group, prefer_smaller, "same sha256")
            result.groups.append(g)
            removed |= {c.id for c in g.copies if not c.keep}

    survivors = [r for r in files if r.id not in removed]
    for group, via_bf16 in _same_weights(survivors):
        forms = sorted({f"{r.format}/{precision(r) or '?'}/{'pruned' if _is_pruned(r) else 'full'}" for r in group})
        g = _group("same_weights", "", group, prefer_smaller,
                   ("same tensor fingerprint (bf16 rounding): " if via_bf16 else "same tensor fingerprint: ")
                   + ", ".join(forms))
        g.key = next(r.fingerprint for r in group if r.path == g.keep)
        result.groups.append(g)

    if components:
        by_comp: dict[tuple[str, str], list[FileRecord]] = {}
        for r in survivors:
            if r.components:
                for comp, cfp in r.components.items():
                    by_comp.setdefault((comp, cfp), []).append(r)
        for (comp, cfp), group in by_comp.items():
            if len({r.fingerprint for r in group}) > 1:
                g = _group("shared_component", cfp, group, prefer_smaller,
                           f"same {comp}, different other components")
                g.bytes_freed = 0
                g.component = comp
                result.groups.append(g)
    return result


def _same_weights(recs: list[FileRecord]) -> list[tuple[list[FileRecord], bool]]:
    """Files linked by an equal fingerprint (fp16 rounding) or an equal bf16 fingerprint, grouped
    transitively (fp16 copy - fp32 - bf16 copy is one group); ``True`` when a bf16 link was used."""
    parent = {r.id: r.id for r in recs}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bf16_joined: set[int] = set()
    for attr in ("fingerprint", "fingerprint_bf16"):
        first: dict[str, int] = {}
        for r in recs:
            v = getattr(r, attr) if r.components else None
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


def plan_space(catalog: Catalog, *, prefer_smaller: bool = False, fp16: bool = True) -> SpacePlan:
    """Dry-run plan: duplicates to delete, pickles to convert, unpruned files to prune, fp32 to fp16."""
    dupes = find_dupes(catalog, prefer_smaller=prefer_smaller)
    steps: list[PlanStep] = []
    deleted: set[int] = set()
    recs = {r.id: r for r in catalog.files(status="present", sort="path")}
    for g in dupes.groups:
        for c in g.copies:
            if c.keep or c.id in deleted:
                continue
            r = recs[c.id]
            deleted.add(c.id)
            steps.append(PlanStep("delete_duplicate", r.path, size=r.size or 0, bytes_freed=r.size or 0,
                                  sha256=r.sha256, mtime_ns=r.mtime_ns, keep=g.keep, reason=g.reason, file_id=r.id))
    for r in recs.values():
        if r.id in deleted or r.error is not None or r.tensor_bytes is None or r.format == "diffusers":
            continue  # a diffusers folder is not one file a transform step can rewrite in place
        size = r.size or 0
        base = dict(path=r.path, size=size, sha256=r.sha256, mtime_ns=r.mtime_ns, file_id=r.id)
        if r.format == "pickle":
            steps.append(PlanStep("convert_pickle", bytes_freed=max(0, size - r.tensor_bytes),
                                  reason=f"pickle (safety: {r.safety or 'unchecked'}) to safetensors", **base))
        if r.ema_bytes:
            steps.append(PlanStep("prune", bytes_freed=r.ema_bytes, reason="EMA weights / training state", **base))
        if fp16 and r.fp32_bytes and r.kind not in NO_FP16_KINDS and r.fp32_bytes * 100 >= r.tensor_bytes:
            steps.append(PlanStep("to_fp16", bytes_freed=r.fp32_bytes // 2, reason="fp32 weights", **base))
    order = {a: i for i, a in enumerate(("delete_duplicate", "convert_pickle", "prune", "to_fp16"))}
    steps.sort(key=lambda s: (s.action != "delete_duplicate", s.path, order[s.action]))
    return SpacePlan(steps=steps, catalog=str(catalog.path))
