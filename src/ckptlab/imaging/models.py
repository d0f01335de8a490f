"""What a MODEL argument of ``generate``/``grid``/``preview`` names: a file, a diffusers folder, or a catalog entry.

``resolve_model(text, db=)`` turns the argument into a path:

- an existing file: itself (opened later with ``ops.run.open_checked``: hostile pickles refused);
- an existing folder: a diffusers pipeline folder (``model_index.json``), itself;
- otherwise the catalog (``--db``) is asked, the way ``ckptlab show`` asks it (``library.show.lookup``): a
  SHA-256 (full, or a prefix of at least 8 hex digits), AutoV1, AutoV2 (10 hex), AutoV3 (12 hex), CRC32 or
  BLAKE3; and, where no hash matches, a catalogued file's name (``model.safetensors``) or stem (``model``),
  case-insensitive. Copies with the same bytes count as one model; two different models are "ambiguous" (one
  line naming the candidates); nothing is "not found" (one line).

``open_model_source(path)`` opens it as a ``TensorSource`` with single-file key names. A diffusers folder is
mapped IN MEMORY with ``ops.diffusers_io.plan_from_diffusers`` (the mapping ``from-diffusers`` writes, checked
there against diffusers' own converter): no file is written, each tensor is read from the folder's files when
asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptlab.errors import CkptlabError, FormatError, NotInCatalogError, UsageError
from ckptlab.formats.base import TensorInfo, TensorSource

#: how many candidates an "ambiguous" error names
MAX_CANDIDATES = 5


def is_diffusers_folder(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


def resolve_model(text: str | Path, *, db: Path | None = None) -> Path:
    """The path ``text`` names: an existing file or diffusers folder as is; else the catalogued model with that
    hash (any hash ``show`` accepts) or file name / stem, looked up in the catalog ``db`` (None: ``$CKPTLAB_DB``
    or the platform default). Raises ``NotInCatalogError`` (not found), ``UsageError`` (ambiguous, short hash),
    ``FormatError`` (a folder that is no diffusers pipeline)."""
    p = Path(text)
    raw = os.fspath(text)
    if p.is_dir():
        if not is_diffusers_folder(p):
            raise FormatError("a folder, but not a diffusers pipeline folder (no model_index.json)", p)
        return p
    if p.exists() or os.path.lexists(p):
        return p
    if not raw.strip():
        raise UsageError("MODEL is empty: give a model file, a diffusers folder, a catalog hash or name")
    if os.sep in raw or (os.altsep and os.altsep in raw):
        raise NotInCatalogError("no such file or folder", p)
    return _from_catalog(raw.strip(), db)


def _from_catalog(text: str, db: Path | None) -> Path:
    from ckptlab.library.catalog import Catalog, default_db_path
    from ckptlab.library.show import lookup

    where = Path(db) if db is not None else default_db_path()
    hexish = text.lower().removeprefix("0x")
    is_hex = bool(hexish) and all(c in "0123456789abcdef" for c in hexish)
    if not where.is_file():
        raise NotInCatalogError(f"{text!r}: no such file, and no catalog at {where} to look it up in (scan your "
                                "model folders with 'ckptlab scan', or give --db)")
    with Catalog(where, must_exist=True) as cat:
        recs = lookup(cat, text)
        if not recs:
            folded = text.casefold()
            recs = [r for r in cat.files(status="present", sort="path")
                    if r.name.casefold() == folded or os.path.splitext(r.name)[0].casefold() == folded]
    recs = [r for r in recs if r.status == "present"]
    if not recs:
        if is_hex and len(hexish) < 8:
            raise UsageError(f"{text!r}: no such file; a hash prefix needs at least 8 hex digits")
        raise NotInCatalogError(f"{text!r}: no such file, and no model in the catalog has this hash or name")
    # copies with the same bytes are one model: the first that is still there, unchanged in size, serves
    groups: dict[str, list] = {}
    for r in recs:
        groups.setdefault(r.sha256 or f"path:{r.path}", []).append(r)
    if len(groups) > 1:
        names = [f"{g[0].path}" + (f" [{g[0].sha256[:10].lower()}]" if g[0].sha256 else "") for g in groups.values()]
        more = f" and {len(names) - MAX_CANDIDATES} more" if len(names) > MAX_CANDIDATES else ""
        raise UsageError(f"{text!r} is ambiguous: {len(names)} models match: {'; '.join(names[:MAX_CANDIDATES])}"
                         f"{more}; give a longer hash or a path")
    for r in next(iter(groups.values())):
        if os.path.exists(r.path):
            return Path(r.path)
    raise NotInCatalogError(f"{text!r}: the catalog's file is gone (rescan its folder)", recs[0].path)


class DiffusersAsSingleFile(TensorSource):
    """A diffusers pipeline folder seen with single-file key names (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*`` / ``conditioner.embedders.*``), built from
    ``plan_from_diffusers``' items: ``infos`` from the items, ``array(key)`` from the item's ``produce`` or its
    source tensor. Nothing is written or read ahead; ``close`` closes the component files."""

    format = "diffusers"

    def __init__(self, folder: Path):
        from ckptlab.ops import diffusers_config as cfgs
        from ckptlab.ops.diffusers_io import plan_from_diffusers

        super().__init__(folder)
        self.opened: list[TensorSource] = []
        try:
            self.family, items, self.warnings, self.files = plan_from_diffusers(Path(folder), self.opened)
            self.items = {it.key: it for it in items}
            self._infos = {it.key: it.info for it in items}
            sched = Path(folder) / "scheduler" / "scheduler_config.json"
            sched_cfg = cfgs.read_json(sched) if sched.is_file() else {}
            pred = sched_cfg.get("prediction_type") if isinstance(sched_cfg, dict) else None
        except BaseException:
            self.close()
            raise
        # what plan_to_diffusers reads to pick the scheduler's prediction type (an SD2 768-v folder says so in
        # its scheduler config; its tensors do not)
        if pred in ("v_prediction", "epsilon"):
            self.metadata["modelspec.prediction_type"] = "v" if pred == "v_prediction" else "epsilon"

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def array(self, key: str):
        it = self.items[key]
        return it.produce() if it.produce is not None else it.source.array(it.src_key)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def close(self) -> None:
        for s in self.opened:
            s.close()
        self.opened = []


def open_model_source(path: Path) -> TensorSource:
    """The model at ``path`` as a ``TensorSource`` with single-file key names (a diffusers folder is mapped the
    way ``from-diffusers`` maps it, in memory); hostile pickles refused."""
    from ckptlab.ops.run import open_checked

    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise FormatError("a folder, but not a diffusers pipeline folder (no model_index.json)", path)
        try:
            return DiffusersAsSingleFile(path)
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:  # a config that lacks what its pipeline must have
            raise FormatError(f"not a usable diffusers folder: {type(e).__name__}: {e}", path) from None
    if not path.exists():
        raise CkptlabError("no such file", path)
    return open_checked(path)
