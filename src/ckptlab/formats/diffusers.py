"""A diffusers folder as one ``TensorSource``.

Two shapes of folder are accepted:

* a pipeline: ``model_index.json`` plus one folder per component (``unet/``, ``vae/``,
  ``text_encoder/``, ``text_encoder_2/``, ``transformer/``...). Keys are prefixed with the
  component name: ``unet.conv_in.weight``, ``text_encoder.text_model.embeddings...``;
* a single component: ``config.json`` next to the weights (a ``vae/`` folder on its own). Keys are
  the component's own keys, unprefixed.

In each component folder the weights are ``diffusion_pytorch_model[.VARIANT].safetensors``
(diffusers) or ``model[.VARIANT].safetensors`` (transformers), or their ``.bin`` pickles, or a
sharded set described by ``*.safetensors.index[.VARIANT].json``. One variant is chosen for the
whole folder: the plain files when every component has them, else a variant (``fp16``...) that
every component has; ``variant=`` forces one (``""`` forces the plain files). Safetensors are
preferred over ``.bin``; ``.bin`` goes through ckptlab's data-only pickle reader.

``metadata`` maps each config file's relative path (``model_index.json``, ``unet/config.json``,
``scheduler/scheduler_config.json``...) to its JSON text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import FormatError, UnsupportedFormatError
from ckptlab.formats.base import TensorInfo, TensorSource, brief

WEIGHT_BASES = ("diffusion_pytorch_model", "model", "pytorch_model")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
MAX_CONFIG_BYTES = 1 << 20
PLAIN = ""  # the "no variant" variant

_SINGLE = re.compile(r"^(?P<base>[A-Za-z0-9_]+)(?:\.(?P<var>[A-Za-z0-9_]+))?\.(?P<ext>safetensors|bin)$")
# ``name.safetensors.index[.VARIANT].json``; older diffusers wrote ``name.VARIANT.safetensors.index.json``
_INDEX = re.compile(r"^(?P<base>[A-Za-z0-9_]+)(?:\.(?P<var0>[A-Za-z0-9_]+))?\.(?P<ext>safetensors|bin)\.index"
                    r"(?:\.(?P<var>[A-Za-z0-9_]+))?\.json$")


@dataclass
class WeightSet:
    """The files holding one component's weights in one variant."""

    variant: str
    ext: str  # 'safetensors' | 'bin'
    files: list[Path]
    index: Path | None = None  # the shard index, when sharded


@dataclass
class Component:
    name: str  # '' for a single-component folder
    folder: Path
    library: str | None = None  # from model_index.json: 'diffusers' | 'transformers' | ...
    class_name: str | None = None
    weights: WeightSet | None = None
    available: dict[str, list[str]] = field(default_factory=dict)  # variant -> extensions present
    sets: dict[tuple[str, str], WeightSet] = field(default_factory=dict, repr=False)


def _weight_sets(folder: Path) -> dict[tuple[str, str], WeightSet]:
    """Every (variant, ext) weight set found in ``folder``."""
    found: dict[tuple[str, str], WeightSet] = {}
    try:
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
    except OSError as e:
        raise FormatError(f"cannot list component folder: {e.strerror or e}", folder) from None
    for name in names:
        m = _INDEX.match(name)
        if m and not (m["var0"] and m["var"]):
            var = m["var"] or m["var0"] or PLAIN
            found.setdefault((var, m["ext"]), WeightSet(var, m["ext"], [], folder / name))
    for name in names:
        m = _SINGLE.match(name)
        if m and m["base"] in WEIGHT_BASES:
            key = (m["var"] or PLAIN, m["ext"])
            found.setdefault(key, WeightSet(key[0], key[1], [folder / name]))
    if not found:  # an unusual name: accept a lone safetensors file
        lone = [n for n in names if n.endswith(".safetensors")]
        if len(lone) == 1:
            found[(PLAIN, "safetensors")] = WeightSet(PLAIN, "safetensors", [folder / lone[0]])
    return found


def is_diffusers_folder(path: str | Path) -> bool:
    """A pipeline folder (``model_index.json``) or a component folder (``config.json`` next to
    weights named the diffusers/transformers way) - one model, not a tree of files."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return True
    if not (p / "config.json").is_file():
        return False
    try:
        names = [e.name for e in p.iterdir()]
    except OSError:
        return False
    return any((m := _SINGLE.match(n)) and m["base"] in WEIGHT_BASES or _INDEX.match(n) for n in names)


def _read_json(path: Path, what: str):
    """A config or index file, parsed with the nesting limit of every untrusted JSON (``jsonable.loads_limited``)."""
    from ckptlab.jsonable import loads_limited

    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise FormatError(f"{what} is larger than {MAX_CONFIG_BYTES} bytes", path)
        return loads_limited(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{what} is not readable JSON: {e}", path) from None


class DiffusersSource(TensorSource):
    format = "diffusers"

    def __init__(self, path: str | Path, variant: str | None = None):
        super().__init__(path)
        if not self.path.is_dir():
            raise FormatError("not a folder", self.path)
        self.requested_variant = variant
        self.model_index: dict | None = None
        self.components: dict[str, Component] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._route: dict[str, tuple[TensorSource, str]] = {}  # our key -> (source, its key)
        self._sources: dict[Path, TensorSource] = {}
        try:
            self._discover()
            self.variant = self._choose_variant()
            for comp in self.components.values():
                self._load_component(comp)
        except BaseException:
            self.close()
            raise
        if not self._infos:
            raise FormatError("diffusers folder holds no weights", self.path)

    # -- discovery ----------------------------------------------------------------------------
    def _discover(self) -> None:
        index = self.path / "model_index.json"
        if index.is_file():
            self.model_index = _read_json(index, "model_index.json")
            if not isinstance(self.model_index, dict):
                raise FormatError("model_index.json is not a JSON object", index)
            self.metadata["model_index.json"] = json.dumps(self.model_index, ensure_ascii=False)
            for name, spec in self.model_index.items():
                if name.startswith("_"):
                    continue
                folder = self.path / name
                if not folder.is_dir() or "/" in name or name in (".", ".."):
                    continue  # e.g. "safety_checker": [null, null]
                lib, cls = (spec + [None, None])[:2] if isinstance(spec, list) else (None, None)
                self._add_component(name, folder, lib, cls)
        elif (self.path / "config.json").is_file():
            self._add_component("", self.path, None, None)
        else:
            raise UnsupportedFormatError("folder is not a diffusers model (no model_index.json or config.json)",
                                         self.path)

    def _add_component(self, name: str, folder: Path, lib, cls) -> None:
        prefix = f"{name}/" if name else ""
        for cfg in CONFIG_NAMES:
            p = folder / cfg
            if p.is_file():
                obj = _read_json(p, f"{prefix}{cfg}")
                self.metadata[f"{prefix}{cfg}"] = json.dumps(obj, ensure_ascii=False)
                if cls is None and isinstance(obj, dict) and isinstance(obj.get("_class_name"), str):
                    cls = obj["_class_name"]
                if cls is None and isinstance(obj, dict) and isinstance(obj.get("architectures"), list):
                    cls = next(iter(obj["architectures"]), None)
        sets = _weight_sets(folder)
        comp = Component(name, folder, lib if isinstance(lib, str) else None,
                         cls if isinstance(cls, str) else None, sets=sets)
        for var, ext in sets:
            comp.available.setdefault(var, []).append(ext)
        self.components[name] = comp

    def _choose_variant(self) -> str:
        weighted = [c for c in self.components.values() if c.available]
        if self.requested_variant is not None:
            want = self.requested_variant
            lacking = [c.name or "." for c in weighted if want not in c.available]
            if lacking:
                what = f"variant {want!r}" if want else "plain (non-variant) weights"
                raise FormatError(f"no {what} for component(s) {', '.join(lacking)}; available: "
                                  f"{self._available_text(weighted)}", self.path)
            return want
        if all(PLAIN in c.available for c in weighted):
            return PLAIN
        common = set.intersection(*(set(c.available) for c in weighted)) if weighted else set()
        common.discard(PLAIN)
        if common:
            return "fp16" if "fp16" in common else sorted(common)[0]
        self.warnings.append(f"no single weight variant covers every component ({self._available_text(weighted)}); "
                             "using each component's plain files where present, else its first variant")
        return PLAIN

    @staticmethod
    def _available_text(comps) -> str:
        return "; ".join(f"{c.name or '.'}: {', '.join(sorted(v or 'plain' for v in c.available))}" for c in comps)

    # -- loading ------------------------------------------------------------------------------
    def _load_component(self, comp: Component) -> None:
        sets = comp.sets
        if not sets:
            return
        var = self.variant if self.variant in comp.available else sorted(comp.available)[0]
        ws = sets.get((var, "safetensors")) or sets.get((var, "bin"))
        comp.weights = ws
        prefix = f"{comp.name}." if comp.name else ""
        if ws.index is not None:
            self._load_sharded(comp, ws, prefix)
        else:
            src = self._open(ws.files[0])
            for k, info in src.infos().items():
                self._put(prefix + k, info, src, k)

    def _load_sharded(self, comp: Component, ws: WeightSet, prefix: str) -> None:
        idx = _read_json(ws.index, ws.index.name)
        wmap = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError("shard index has no weight_map of key -> file", ws.index)
        by_shard: dict[str, list[str]] = {}  # one pass: a key list per shard (a scan per shard is quadratic)
        for k, fname in wmap.items():
            by_shard.setdefault(fname, []).append(k)
        for fname, mine in by_shard.items():
            p = comp.folder / fname
            if Path(fname).name != fname or fname in (".", ".."):
                raise FormatError(f"shard index names a file outside its folder: {brief(fname)}", ws.index)
            if not p.is_file():
                raise FormatError(f"shard {brief(fname)} listed in the index is missing", ws.index)
            ws.files.append(p)
            src = self._open(p)
            for k in mine:
                if k not in src:
                    raise FormatError(f"key {brief(k)} is mapped to shard {brief(fname)} but not in it", ws.index)
            extra = len(src) - len(mine)
            if extra:
                self.warnings.append(f"{comp.name or '.'}: shard {fname} holds {extra} tensors its index does not list")
            wanted = set(mine)
            for k, info in src.infos().items():  # shard header order: sequential reads
                if k in wanted:
                    self._put(prefix + k, info, src, k)

    def _open(self, p: Path) -> TensorSource:
        if p not in self._sources:
            from ckptlab.formats import detect_format

            fmt = detect_format(p)
            if fmt == "safetensors":
                from ckptlab.formats.safetensors import SafetensorsSource

                self._sources[p] = SafetensorsSource(p)
            elif fmt == "pickle":
                try:
                    from ckptlab.formats.pickle import PickleSource
                except ImportError:
                    raise UnsupportedFormatError("pickle (.bin) weights need ckptlab's pickle reader, "
                                                 "which is not available in this build", p) from None
                self._sources[p] = PickleSource(p)
            else:
                raise UnsupportedFormatError(f"unexpected {fmt} file inside a diffusers folder", p)
        return self._sources[p]

    def _put(self, key: str, info: TensorInfo, src: TensorSource, inner: str) -> None:
        if key in self._infos:
            raise FormatError(f"key {brief(key)} appears in two weight files", self.path)
        self._infos[key] = info
        self._route[key] = (src, inner)

    # -- TensorSource -------------------------------------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    @property
    def files(self) -> list[Path]:
        """The weight files in use, in key order."""
        return list(self._sources)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self._sources)

    def source_of(self, key: str) -> tuple[TensorSource, str]:
        """The underlying file's source and the key inside it (for zero-copy paths)."""
        return self._route[key]

    def array(self, key: str):
        src, inner = self._route[key]
        return src.array(inner)

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
