"""The ``plan-space`` plan: a dry-run list of disk-saving steps, saved as JSON.

``ckptlab plan-space -o plan.json`` writes it; ``ckptlab apply-plan plan.json`` (transform issue)
executes it. Schema (version 1)::

    {
      "format": "ckptlab-space-plan",
      "version": 1,
      "created": "2026-11-23T16:00:00Z",
      "catalog": "/home/me/.local/share/ckptlab/catalog.db",
      "total_bytes_freed": 12345,
      "steps": [
        {"action": "delete_duplicate", "path": "/m/a copy.safetensors", "sha256": "ABC...", "size": 2132,
         "bytes_freed": 2132, "keep": "/m/a.safetensors", "reason": "same sha256", "dtype": null},
        {"action": "convert_pickle", "path": "/m/b.ckpt", ...},
        {"action": "prune", ...},
        {"action": "to_fp16", ...}
      ]
    }

Actions: ``delete_duplicate`` (``keep`` names the copy that stays; ``reason`` says ``same sha256`` or
``same fingerprint``), ``convert_pickle`` (pickle -> safetensors), ``prune`` (drop EMA and training
state), ``to_fp16`` (fp32 float tensors -> fp16). ``sha256`` and ``size`` are what the file must
still be when the step runs (``sha256`` is null when the file was never hashed: check the size
and mtime then); ``mtime_ns`` too. Steps on one file are ordered convert -> prune -> fp16 and their
``bytes_freed`` add up. Unknown fields are ignored on load so later versions can add some.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ckptlab.errors import CkptlabError, FormatError, OutputError

PLAN_FORMAT = "ckptlab-space-plan"
PLAN_VERSION = 1
ACTIONS = ("delete_duplicate", "convert_pickle", "prune", "to_fp16")


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

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise FormatError(f"unknown plan action {self.action!r} (known: {', '.join(ACTIONS)})")
        if self.action == "delete_duplicate" and not self.keep:
            raise FormatError(f"delete_duplicate step for {self.path} does not name the copy to keep")


@dataclass
class SpacePlan:
    steps: list[PlanStep] = field(default_factory=list)
    catalog: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    version: int = PLAN_VERSION

    @property
    def total_bytes_freed(self) -> int:
        return sum(s.bytes_freed for s in self.steps)

    def by_action(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.steps:
            slot = out.setdefault(s.action, {"files": 0, "bytes_freed": 0})
            slot["files"] += 1
            slot["bytes_freed"] += s.bytes_freed
        return out

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": self.version, "created": self.created, "catalog": self.catalog,
                "total_bytes_freed": self.total_bytes_freed, "by_action": self.by_action(),
                "steps": [asdict(s) for s in self.steps]}

    @classmethod
    def from_dict(cls, obj: dict) -> SpacePlan:
        if not isinstance(obj, dict) or obj.get("format") != PLAN_FORMAT:
            raise FormatError(f"not a ckptlab space plan (format is not {PLAN_FORMAT!r})")
        if not isinstance(obj.get("version"), int) or obj["version"] > PLAN_VERSION:
            raise FormatError(f"space plan version {obj.get('version')!r} is not supported (max {PLAN_VERSION})")
        names = {f.name for f in fields(PlanStep)}
        steps = []
        for i, raw in enumerate(obj.get("steps") or []):
            if not isinstance(raw, dict) or not {"action", "path", "size", "bytes_freed"} <= set(raw):
                raise FormatError(f"space plan step {i} lacks action/path/size/bytes_freed")
            steps.append(PlanStep(**{k: v for k, v in raw.items() if k in names}))
        return cls(steps=steps, catalog=obj.get("catalog"), created=obj.get("created") or "",
                   version=obj["version"])

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
        except OSError as e:
            raise OutputError(f"cannot write plan: {e.strerror or e}", path) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, indent=2, ensure_ascii=False)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):  # e.g. PATH is a folder: one line, not an internal error
                raise OutputError(f"cannot write plan: {e.strerror or e}", path) from None
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpacePlan:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise CkptlabError(f"cannot read plan: {e.strerror or e}", path) from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise FormatError(f"plan is not valid JSON: {e}", path) from None
        return cls.from_dict(obj)

