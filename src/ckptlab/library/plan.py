"""The ``plan-space`` plan: a reviewed list of disk-saving steps, saved as JSON for ``apply-plan``.

``ckptlab plan-space -o plan.json`` writes it (``library.dupes.plan_space``); ``ckptlab apply-plan
plan.json`` carries it out (``library.apply_plan``). Schema (version 2)::

    {
      "format": "ckptlab-space-plan",
      "version": 2,
      "created": "2026-11-23T16:00:00Z",
      "catalog": "/home/me/.local/share/ckptlab/catalog.db",
      "link": "auto",
      "total_bytes_freed": 12345,
      "steps": [
        {"action": "link_duplicate", "path": "/ui/comfyui/models/loras/a.safetensors", "size": 2132,
         "mtime_ns": 1, "sha256": "ABC...", "bytes_freed": 2132, "keep": "/ui/a1111/models/Lora/a.safetensors",
         "keep_size": 2132, "keep_mtime_ns": 2, "keep_sha256": "ABC...", "match": "sha256",
         "keep_fingerprint": null, "link": "hard", "link_path": "/ui/comfyui/models/loras/a.safetensors",
         "reason": "same sha256", "group": 1},
        {"action": "delete_duplicate", "path": "/home/me/Downloads/a.safetensors", ...},
        {"action": "transform", "path": "/ui/a1111/models/Stable-diffusion/b.ckpt", "ops": ["convert_pickle",
         "prune"], "output": "/ui/a1111/models/Stable-diffusion/b.safetensors", "bytes_freed": 1234, ...}
      ]
    }

Actions:

- ``delete_duplicate``: remove ``path``, a copy of ``keep`` outside every UI model folder.
- ``link_duplicate``: a copy inside a UI model folder: replace it by a hard link (``link: hard``, same
  filesystem) or a symlink (``sym``) to ``keep``, named ``link_path`` (the copy's own name; for a
  same-weights copy in another container, its stem with the keeper's suffix), so the UI still loads it.
- ``transform``: rewrite ``path`` into ``output`` with ``ops`` applied in one pass (``convert_pickle``,
  ``prune``, ``to_fp16``), then remove ``path`` when the name changed. ``bytes_freed`` is ``size`` minus
  the exact size of the file the transform plans (``ops.run.planned_file_size``).

``size``/``mtime_ns``/``sha256`` are what the file must still be when the step runs; ``keep_size``/
``keep_mtime_ns`` what the kept copy must still be, and ``match`` what makes it the same model
(``sha256``: ``keep_sha256`` equals ``sha256``; ``fingerprint``/``fingerprint_bf16``: the kept copy's
recomputed fingerprint of that kind equals ``keep_fingerprint``). Steps are ordered: every duplicate
step before any transform, so a keeper is verified in the state the plan saw. A plan of an older
version is refused (it lacks the keeper checks): make a new one. Unknown fields are ignored on load.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePath

from ckptlab.display import human_size
from ckptlab.errors import CkptlabError, FormatError, OutputError

PLAN_FORMAT = "ckptlab-space-plan"
PLAN_VERSION = 2
ACTIONS = ("delete_duplicate", "link_duplicate", "transform")
OPS = ("convert_pickle", "prune", "to_fp16")
MATCHES = ("sha256", "fingerprint", "fingerprint_bf16")
LINKS = ("hard", "sym")


#: a plan for a million files is ~300 MiB of JSON; anything larger is not one of ours
MAX_PLAN_BYTES = 1 << 30


@dataclass
class PlanStep:
    action: str
    path: str
    size: int
    bytes_freed: int
    sha256: str | None = None
    mtime_ns: int | None = None
    keep: str | None = None
    reason: str = ""
    file_id: int | None = None
    # duplicate steps: the kept copy as the plan saw it, and what makes it the same model
    keep_size: int | None = None
    keep_mtime_ns: int | None = None
    keep_sha256: str | None = None
    match: str | None = None
    keep_fingerprint: str | None = None
    group: int | None = None
    # link_duplicate
    link: str | None = None
    link_path: str | None = None
    # transform
    ops: list[str] | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise FormatError(f"unknown plan action {self.action!r} (known: {', '.join(ACTIONS)})")
        if not isinstance(self.path, str) or not self.path:
            raise FormatError("a plan step has no path")
        for name in ("sha256", "keep", "keep_sha256", "match", "keep_fingerprint", "link", "link_path", "output"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise FormatError(f"plan step for {self.path}: {name} must be a string")
        for name in ("mtime_ns", "keep_size", "keep_mtime_ns", "file_id", "group"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise FormatError(f"plan step for {self.path}: {name} must be an integer")
        if not isinstance(self.reason, str):
            raise FormatError(f"plan step for {self.path}: reason must be a string")
        if not isinstance(self.size, int) or not isinstance(self.bytes_freed, int):
            raise FormatError(f"plan step for {self.path}: size and bytes_freed must be integers")
        if self.action in ("delete_duplicate", "link_duplicate"):
            if not self.keep:
                raise FormatError(f"{self.action} step for {self.path} does not name the copy to keep")
            if self.match not in MATCHES or not isinstance(self.keep_size, int):
                raise FormatError(f"{self.action} step for {self.path} lacks the kept copy's identity "
                                  "(keep_size, match); make a new plan with plan-space")
            if self.match == "sha256" and not (self.keep_sha256 and self.sha256):
                raise FormatError(f"{self.action} step for {self.path}: match sha256 without both hashes")
            if self.match != "sha256" and not self.keep_fingerprint:
                raise FormatError(f"{self.action} step for {self.path}: match {self.match} without keep_fingerprint")
        if self.action == "link_duplicate" and (self.link not in LINKS or not self.link_path):
            raise FormatError(f"link_duplicate step for {self.path} needs link (hard|sym) and link_path")
        # a step writes only next to its own file (plan-space never plans otherwise; a forged plan cannot
        # make apply-plan put a link or a model anywhere else)
        for name in ("link_path", "output"):
            v = getattr(self, name)
            if v is not None and (PurePath(v).parent != PurePath(self.path).parent or ".." in PurePath(v).parts
                                  or ".." in PurePath(self.path).parts):
                raise FormatError(f"plan step for {self.path}: {name} {v} is not in the same folder")
        if self.action == "transform":
            if not self.ops or not isinstance(self.ops, list) or any(o not in OPS for o in self.ops):
                raise FormatError(f"transform step for {self.path}: ops must be a list of {', '.join(OPS)}")
            if not self.output or not self.output.endswith(".safetensors"):
                raise FormatError(f"transform step for {self.path} does not name its .safetensors output")

    @property
    def label(self) -> str:
        """``delete_duplicate``, ``link_duplicate``, or the transform's ops (``convert_pickle+prune``)."""
        return "+".join(self.ops or []) if self.action == "transform" else self.action


@dataclass
class SpacePlan:
    steps: list[PlanStep] = field(default_factory=list)
    catalog: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    version: int = PLAN_VERSION
    link: str = "auto"
    notes: list[str] = field(default_factory=list)  # what was not proposed, and why

    @property
    def total_bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.steps)

    def by_action(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.steps:
            slot = out.setdefault(s.label, {"files": 0, "bytes_freed": 0})
            slot["files"] += 1
            slot["bytes_freed"] += s.bytes_freed
        return out

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": self.version, "created": self.created, "catalog": self.catalog,
                "link": self.link, "total_bytes_freed": self.total_bytes_freed, "by_action": self.by_action(),
                "steps": [asdict(s) for s in self.steps], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, obj: dict) -> SpacePlan:
        if not isinstance(obj, dict) or obj.get("format") != PLAN_FORMAT:
            raise FormatError(f"not a ckptlab space plan (format is not {PLAN_FORMAT!r})")
        if not isinstance(obj.get("version"), int) or obj["version"] > PLAN_VERSION:
            raise FormatError(f"space plan version {obj.get('version')!r} is not supported (max {PLAN_VERSION})")
        if obj["version"] < PLAN_VERSION:
            raise FormatError(f"space plan version {obj['version']} was made by an older ckptlab without the "
                              "checks of the kept copies; make a new plan with plan-space")
        names = {f.name for f in fields(PlanStep)}
        steps = []
        if not isinstance(obj.get("steps") or [], list):
            raise FormatError("space plan steps must be a list")
        for i, raw in enumerate(obj.get("steps") or []):
            if not isinstance(raw, dict) or not {"action", "path", "size", "bytes_freed"} <= set(raw):
                raise FormatError(f"space plan step {i} lacks action/path/size/bytes_freed")
            steps.append(PlanStep(**{k: v for k, v in raw.items() if k in names}))
        notes = obj.get("notes") or []
        plan = cls(steps=steps, catalog=obj.get("catalog") if isinstance(obj.get("catalog"), str) else None,
                   created=str(obj.get("created") or ""), version=obj["version"],
                   link=str(obj.get("link") or "auto"), notes=[str(n) for n in notes] if isinstance(notes, list) else [])
        plan.check_consistent()
        return plan

    def check_consistent(self) -> None:
        """One consistent plan: a file is the subject of at most one step; no step removes, replaces or
        writes a file another step keeps (a kept copy with no links to it may be rewritten by a transform
        after its duplicates are gone); every duplicate step comes before every transform."""
        removed: set[str] = set()  # files a duplicate step removes or replaces
        written: set[str] = set()  # files a transform rewrites or creates
        kept: set[str] = set()
        linked: set[str] = set()  # kept copies that links will point to
        seen_transform = False
        for s in self.steps:
            if s.path in removed or s.path in written:
                raise FormatError(f"space plan: two steps on {s.path}")
            if s.action == "transform":
                seen_transform = True
                written |= {s.path, s.output}
                continue
            if seen_transform:
                raise FormatError(f"space plan: {s.action} of {s.path} comes after a transform")
            kept.add(s.keep)
            removed |= {s.path, s.link_path or s.path}
            if s.action == "link_duplicate":
                linked.add(s.keep)
        clash = (removed & kept) | (written & linked) | (written & removed)
        if clash:
            raise FormatError(f"space plan: a step removes or rewrites {sorted(clash)[0]}, which another step keeps")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write atomically (temp file in the same folder, then rename); an existing file is replaced only
        with ``overwrite``."""
        path = Path(path)
        if not overwrite and (path.exists() or path.is_symlink()):
            raise OutputError("output already exists (use --overwrite to replace it)", path)
        from ckptlab.atomic import write_atomic

        data = (json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        try:  # missing parent folders are made, as report -o does
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, overwrite=overwrite)
        except FileExistsError:
            raise OutputError("output already exists (use --overwrite to replace it)", path) from None
        except OSError as e:  # e.g. PATH is a folder: one line, not an internal error
            raise OutputError(f"cannot write plan: {e.strerror or e}", path) from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpacePlan:
        from ckptlab.jsonable import loads_limited

        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_PLAN_BYTES + 1)
        except OSError as e:
            raise CkptlabError(f"cannot read plan: {e.strerror or e}", path) from None
        if len(raw) > MAX_PLAN_BYTES:
            raise FormatError(f"not a plan: larger than {human_size(MAX_PLAN_BYTES)}", path)
        try:
            obj = loads_limited(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise FormatError("not a plan: not UTF-8 text (a model file?)", path) from None
        except (ValueError, RecursionError) as e:
            raise FormatError(f"plan is not valid JSON: {e}", path) from None
        return cls.from_dict(obj)

