"""``ckptlab images``: the models images were made with, found in the library catalog.

Each model an image names (``metadata.ModelRef``: role, name, hashes as written, CivitAI version id) is resolved
against the catalog's stored hashes, CivitAI links and file names, in this order; the first rule that matches
anything decides:

1. each hash as written, by its length (hex, case ignored; ``blake3:``/``sha256:`` prefixes as InvokeAI writes):
   - 10 hex: sha256[:10] (AutoV2: A1111's ``Model hash``/``VAE hash``, dgenerate's and Forge's LoRA hashes), then
     AutoV3[:10] (Civitai Helper's ``Hashes`` for LoRAs);
   - 12 hex: AutoV3[:12] (A1111's ``Lora hashes``), then sha256[:12] (A1111's ``TI hashes``, LoRAs from .pt files);
   - 8 hex: AutoV1 (pre-2023 ``Model hash``), then sha256[:8];
   - 64 hex: the full sha256, then BLAKE3 (InvokeAI), then AutoV3[:12] of a full AutoV3 (``sshs_model_hash``);
   - other lengths of 8 or more: a sha256 prefix.
   Several different contents under one rule: **ambiguous**, never picked (copies of the same bytes are one
   content, listed together).
2. the CivitAI modelVersionId (``Civitai resources``): files the catalog links to that version (``civitai link``)
   or whose sidecars name it.
3. the name (``Model``, ``<lora:name:w>``, ``Lora hashes`` names, ComfyUI file names with their sub-folders):
   catalogued files of a fitting kind whose file stem equals it (case ignored). When the image also wrote a hash
   and the named file has hashes that differ, it is NOT that file: **missing**, with a note naming the file of the
   same name. A named file that was never hashed (``scan`` without ``--hash``) matches by name, and says so.

Only present files count as found; a model the catalog knows only as missing (deleted, moved away) is missing, with
a note naming where it was.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.formats import MODEL_SUFFIXES
from ckptlab.imaging.metadata import IMAGE_SUFFIXES, ImageMetadata, ModelRef, read_metadata

#: the kinds a name may match for each role (a record without a kind matches any role)
ROLE_KINDS = {"checkpoint": ("checkpoint", "unet"), "unet": ("unet", "checkpoint"), "vae": ("vae",),
              "lora": ("lora", "lycoris"), "embedding": ("embedding",), "hypernetwork": ("hypernetwork",)}


@dataclass
class Resolution:
    """Where a model an image names is in the library: ``status`` found | ambiguous | missing | unchecked (no
    catalog); ``matched_by`` the rule (``sha256[:10] (AutoV2)``, ``AutoV3[:12]``, ``name``...); ``sha256`` and
    ``paths`` of the content found; ``candidates`` (``[{"sha256", "paths"}]``) when ambiguous; ``note``."""

    status: str
    matched_by: str | None = None
    sha256: str | None = None
    paths: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    note: str | None = None


@dataclass
class _Content:
    key: str  # the SHA-256 (upper case), or "#<file id>" for a file never hashed
    sha256: str | None
    present: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    kinds: set = field(default_factory=set)


def _stem(name: str) -> str:
    base = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    low = base.lower()
    for suf in MODEL_SUFFIXES:
        if low.endswith(suf):
            return low[: -len(suf)]
    return low


def _hexpart(h: str) -> tuple[str | None, str]:
    s = str(h).strip().lower()
    algo = None
    if ":" in s:
        algo, _, s = s.partition(":")
    s = s.removeprefix("0x")
    return algo, s


class CatalogIndex:
    """The catalog's files by every hash and name an image may use, built once (one query), then looked up in
    memory; each distinct (role, name, hashes, version) is resolved once."""

    def __init__(self) -> None:
        self.contents: dict[str, _Content] = {}
        self.by: dict[str, dict[str, set[str]]] = {k: {} for k in (
            "sha256", "sha10", "sha12", "sha8", "autov1", "autov3", "autov3_10", "blake3", "stem", "version")}
        self._memo: dict[tuple, Resolution] = {}

    def _add(self, table: str, value: str | None, key: str) -> None:
        if value:
            self.by[table].setdefault(value.lower(), set()).add(key)

    def add_file(self, rec) -> None:
        """Index one catalog ``FileRecord``."""
        h = rec.hashes
        key = h.sha256.upper() if h and h.sha256 else f"#{rec.id}"
        c = self.contents.setdefault(key, _Content(key, h.sha256.upper() if h and h.sha256 else None))
        (c.present if rec.status == "present" else c.gone).append(rec.path)
        if rec.kind:
            c.kinds.add(rec.kind.lower())
        if h and h.sha256:
            sha = h.sha256.lower()
            for table, value in (("sha256", sha), ("sha10", sha[:10]), ("sha12", sha[:12]), ("sha8", sha[:8]),
                                 ("autov1", h.autov1), ("autov3", h.autov3),
                                 ("autov3_10", h.autov3[:10] if h.autov3 else None), ("blake3", h.blake3)):
                self._add(table, value, key)
        self._add("stem", _stem(rec.name or os.path.basename(rec.path)), key)
        sc = rec.sidecars if isinstance(rec.sidecars, dict) else {}
        civ = sc.get("civitai") if isinstance(sc.get("civitai"), dict) else {}
        if civ.get("version_id") is not None:
            self._add("version", str(civ["version_id"]), key)

    def add_version_link(self, version_id: int, sha256: str) -> None:
        key = sha256.upper()
        if key in self.contents:
            self._add("version", str(version_id), key)

    @classmethod
    def from_catalog(cls, cat) -> CatalogIndex:
        """The index of every catalogued file (present and missing), with the CivitAI version links that
        ``civitai link`` stored (read with SQL: the hub's module is not imported, so opening adds none of its
        tables)."""
        index = cls()
        for rec in cat.files(status=None, sort="id"):
            index.add_file(rec)
        has_links = cat.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'civitai_links'")
        if has_links.fetchone():
            for vid, sha in cat.conn.execute("SELECT version_id, sha256 FROM civitai_links"):
                if vid is not None and sha:
                    index.add_version_link(vid, sha)
        return index

    # -- lookups ---------------------------------------------------------------------------
    def _hash_rules(self, h: str) -> list[tuple[str, set[str]]]:
        algo, s = _hexpart(h)
        if len(s) < 8 or any(ch not in "0123456789abcdef" for ch in s):
            return []
        get = lambda table, v=s: self.by[table].get(v, set())  # noqa: E731
        if algo == "blake3":
            return [("BLAKE3", get("blake3"))]
        if len(s) == 64:
            return [("sha256", get("sha256")), ("BLAKE3", get("blake3")),
                    ("AutoV3[:12] of a full AutoV3", get("autov3", s[:12]))]
        if len(s) == 10:
            return [("sha256[:10] (AutoV2)", get("sha10")), ("AutoV3[:10]", get("autov3_10"))]
        if len(s) == 12:
            return [("AutoV3[:12]", get("autov3")), ("sha256[:12]", get("sha12"))]
        if len(s) == 8:
            return [("AutoV1", get("autov1")), ("sha256[:8]", get("sha8"))]
        return [(f"sha256[:{len(s)}]", {k for sha, ks in self.by["sha256"].items() if sha.startswith(s) for k in ks})]

    def _decide(self, keys: set[str], matched_by: str, note: str | None = None) -> Resolution:
        present = [self.contents[k] for k in sorted(keys) if self.contents[k].present]
        if len(present) == 1:
            c = present[0]
            return Resolution("found", matched_by, c.sha256, sorted(c.present), note=note)
        if len(present) > 1:
            return Resolution("ambiguous", matched_by, candidates=[{"sha256": c.sha256, "paths": sorted(c.present)}
                                                                   for c in present],
                              note=f"{len(present)} different files match; none picked")
        gone = sorted(p for k in keys for p in self.contents[k].gone)
        return Resolution("missing", matched_by, note=f"catalogued at {gone[0]}, which is gone" if gone else None)

    def resolve(self, ref: ModelRef) -> Resolution:
        memo_key = (ref.role, (ref.name or "").lower(), tuple(x.lower() for x in ref.hashes), ref.version_id)
        if memo_key not in self._memo:
            self._memo[memo_key] = self._resolve(ref)
        return self._memo[memo_key]

    def _resolve(self, ref: ModelRef) -> Resolution:
        for h in ref.hashes:
            for label, keys in self._hash_rules(h):
                if keys:
                    return self._decide(keys, label)
        if ref.version_id is not None:
            keys = self.by["version"].get(str(ref.version_id), set())
            if keys:
                return self._decide(keys, "CivitAI version")
        if ref.name:
            kinds = ROLE_KINDS.get(ref.role)
            keys = {k for k in self.by["stem"].get(_stem(ref.name), set())
                    if not kinds or not self.contents[k].kinds or self.contents[k].kinds & set(kinds)}
            if keys:
                if ref.hashes:
                    hashed = {k for k in keys if self.contents[k].sha256}
                    unhashed = keys - hashed
                    if unhashed:
                        return self._decide(unhashed, "name (file not hashed: run 'ckptlab scan --hash')")
                    paths = sorted(p for k in hashed for p in self.contents[k].present)
                    return Resolution("missing", note=f"the library's {paths[0] if paths else 'file'} has this "
                                                      "name but other bytes (another version?)")
                return self._decide(keys, "name")
        return Resolution("missing")


# ------------------------------------------------------------------------------------------- per image


@dataclass
class UsedModel:
    """One model an image used, with where the library has it."""

    role: str
    name: str | None
    hashes: list[str]
    weight: float | None
    weight_clip: float | None
    version_id: int | None
    title: str | None
    sources: list[str]
    status: str
    matched_by: str | None = None
    sha256: str | None = None
    paths: list[str] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    note: str | None = None


@dataclass
class ImageReport:
    """One image: its metadata (``metadata.ImageMetadata``'s fields) and the models it used, resolved."""

    path: str
    container: str
    size: tuple[int, int] | None
    generator: str | None
    prompt: str
    negative: str
    params: dict
    models: list[UsedModel]
    chunks: list[str]
    warnings: list[str]

    def links(self) -> list[tuple[str, str, str | None]]:
        """``(sha256, role, matched_by)`` of every model found: what the catalog records."""
        return [(m.sha256, m.role, m.matched_by) for m in self.models if m.status == "found" and m.sha256]


def resolve_image(meta: ImageMetadata, index: CatalogIndex | None) -> ImageReport:
    """Resolve every model ``meta`` names. Two names of one image that resolve to the same content in the same
    role (``<lora:x:0.8>`` and a ``Civitai resources`` entry) become one model."""
    used: list[UsedModel] = []
    for ref in meta.models:
        res = index.resolve(ref) if index is not None else Resolution("unchecked")
        same = next((u for u in used if res.status == "found" and u.status == "found" and u.sha256 == res.sha256
                     and u.role == ref.role), None)
        if same is not None:
            same.sources += [s for s in ref.sources if s not in same.sources]
            same.hashes += [h for h in ref.hashes if h not in same.hashes]
            same.name = same.name or ref.name
            same.weight = same.weight if same.weight is not None else ref.weight
            same.version_id = same.version_id if same.version_id is not None else ref.version_id
            same.title = same.title or ref.title
            continue
        used.append(UsedModel(ref.role, ref.name, list(ref.hashes), ref.weight, ref.weight_clip, ref.version_id,
                              ref.title, list(ref.sources), res.status, res.matched_by, res.sha256, list(res.paths),
                              list(res.candidates), res.note))
    return ImageReport(meta.path, meta.container, meta.size, meta.generator, meta.prompt, meta.negative, meta.params,
                       used, meta.chunks, meta.warnings)


# ------------------------------------------------------------------------------------------- files


def iter_image_files(args: list[str | os.PathLike], on_error: Callable[[str, str], None]) -> Iterator[Path]:
    """The image files the PATH arguments name: a file as given (its bytes decide whether it is an image), a
    folder searched recursively for ``.png``/``.jpg``/``.jpeg``/``.webp`` (hidden entries skipped, each folder
    walked once however symlinks loop, each file given once). ``on_error(path, message)`` hears about an argument
    that is not there or a folder with no image in it."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[Path]:
        try:
            st = folder.stat()
        except OSError as e:
            on_error(str(folder), f"cannot read: {e.strerror or e}")
            return
        if (st.st_dev, st.st_ino) in seen_dirs:
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            on_error(str(folder), f"cannot list: {e.strerror or e}")
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            p = Path(e.path)
            try:
                if e.is_dir():
                    yield from walk(p)
                elif e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file():
                    yield p
            except OSError:
                continue

    for arg in args:
        p = Path(os.fspath(arg))
        try:
            st = p.stat()
        except OSError as e:
            on_error(str(p), "no such file or folder" if not os.path.lexists(p) else f"cannot read: {e.strerror or e}")
            continue
        found = False
        for f in (walk(p) if stat.S_ISDIR(st.st_mode) else iter([p])):
            try:
                fst = f.stat()
                ident = (fst.st_dev, fst.st_ino)
            except OSError:
                ident = None
            found = True
            if ident is not None and ident in seen_files:
                continue
            if ident is not None:
                seen_files.add(ident)
            yield f
        if not found:
            on_error(str(p), "no .png, .jpg, .jpeg or .webp image in this folder")


def read_images(args: list[str | os.PathLike], index: CatalogIndex | None,
                on_error: Callable[[str, str], None]) -> Iterator[ImageReport]:
    """One ``ImageReport`` per image the arguments name, in order; a file that cannot be read (not an image,
    truncated, damaged, a decompression bomb) goes to ``on_error(path, message)`` and the rest go on."""
    from ckptlab.errors import CkptlabError

    for f in iter_image_files(args, on_error):
        try:
            meta = read_metadata(f)
        except CkptlabError as e:
            on_error(str(f), e.message)
            continue
        yield resolve_image(meta, index)


def catalog_index(db: Path | None, *, required: bool = False) -> tuple[CatalogIndex | None, Path]:
    """``(index, catalog path)`` of the catalog ``db`` names (None: ``$CKPTLAB_DB`` or the default): None when no
    catalog exists there and none was named; ``required``: a missing catalog is a ``UsageError``."""
    from ckptlab.errors import UsageError
    from ckptlab.library.catalog import Catalog, default_db_path

    db_path = Path(db) if db is not None else default_db_path()
    if db_path.exists() or db is not None:
        with Catalog(db_path, must_exist=True) as cat:
            return CatalogIndex.from_catalog(cat), db_path
    if required:
        raise UsageError(f"--missing needs a catalog, and there is none at {db_path} (make one with "
                         "'ckptlab scan --hash FOLDER', or pass --db)")
    return None, db_path


def record_links(db_path: Path, reports: list[ImageReport]) -> str | None:
    """Keep "images made with this model" in the catalog for ``reports``; returns a warning line when the catalog
    cannot be written (the report itself stands)."""
    from ckptlab.errors import CatalogError, CatalogWriteError
    from ckptlab.library import image_links
    from ckptlab.library.catalog import Catalog

    links = [(r.path, r.links()) for r in reports]
    if not links:
        return None
    try:
        with Catalog(db_path) as cat:
            image_links.record(cat, links)
    except (CatalogWriteError, CatalogError) as e:
        return f"{e}; the links from images to models were not recorded"
    return None


# ------------------------------------------------------------------------------------------- --missing


def missing_models(reports: list[ImageReport]) -> list[dict]:
    """What the images used that the library lacks: one entry per distinct model (role + name, else hash, else
    CivitAI version), with how many images used it and up to three of them, most used first."""
    out: dict[tuple, dict] = {}
    for r in reports:
        for m in r.models:
            if m.status != "missing":
                continue
            ident = (m.role, _stem(m.name) if m.name else None, None if m.name else (m.hashes[0].lower()
                     if m.hashes else None), None if m.name or m.hashes else m.version_id)
            e = out.setdefault(ident, {"role": m.role, "name": m.name, "hashes": [], "version_id": m.version_id,
                                       "title": m.title, "images": 0, "examples": [], "note": m.note})
            e["hashes"] += [h for h in m.hashes if h not in e["hashes"]]
            if r.path not in e["examples"]:
                e["images"] += 1
                if len(e["examples"]) < 3:
                    e["examples"].append(r.path)
    return sorted(out.values(), key=lambda e: (-e["images"], e["role"], (e["name"] or "").lower()))
