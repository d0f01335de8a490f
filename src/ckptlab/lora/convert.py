"""Convert a LoRA between the naming styles kohya, PEFT, diffusers and ComfyUI (docs/lora.md "naming").

Names come from the family's forward alias table (``naming.reference_targets``): every module of the input is
looked up, the output name is the target's name in the wanted style. Tensor values are copied raw wherever the
layouts allow (renames, ``[out, 1]`` ↔ ``[out]`` DoRA magnitudes, row slices of ``lora_up``); the only computed
tensors are the fused ones below.

Output styles (parameter keys per module ``M``):

- ``kohya``: ``M.lora_down.weight``, ``M.lora_up.weight``, ``M.alpha`` (0-d, the dtype of ``lora_down``),
  ``M.dora_scale`` ``[out, 1]``; LyCORIS parameters keep their own suffixes;
- ``comfy``: kohya's suffixes on ComfyUI's names (``diffusion_model.`` + single-file path);
- ``peft``: ``M.lora_A.weight``, ``M.lora_B.weight``, ``M.lora_magnitude_vector`` ``[out]``; no alpha tensors:
  the alphas go into the header's ``lora_adapter_metadata`` as diffusers writes it (``<component>.r``,
  ``.lora_alpha`` = the most common value, ``.rank_pattern`` / ``.alpha_pattern`` for the others, prefixed by the
  component ``unet`` / ``transformer`` / ``text_encoder`` …);
- ``diffusers``: ``M.lora.down.weight``, ``M.lora.up.weight``, ``M.alpha``, ``M.lora_magnitude_vector``, and the
  same ``lora_adapter_metadata`` as peft: diffusers' own loader reads ``.alpha`` keys only from kohya files (its
  ``network_alphas``), so the alphas also go where it looks (ComfyUI and ckptlab read the ``.alpha`` tensors).

Fused ↔ split (Flux ``qkv`` / ``linear1``, SD3 ``qkv``), exact in both directions:

- fused → split: ``lora_down`` copied to each part, ``lora_up`` split by the part's rows; alpha and rank unchanged,
  so every part's ΔW is the fused ΔW's rows;
- split → fused: ``lora_down`` = the parts' downs concatenated, ``lora_up`` = block-diagonal (each part's up in its
  rows and its rank's columns, zeros where a part is missing); rank = the sum of the parts' ranks. When every part
  has the same α/r the ups are copied raw and α = (α/r)·R; otherwise each up is multiplied by its α/r and α = R.

LyCORIS modules (LoHa, LoKr, …) only rename between kohya and comfy; peft/diffusers have no such keys.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.base import TensorInfo
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.lora.file import PEFT_METADATA_KEY, LoraFile, LoraModule
from ckptlab.lora.naming import STYLES, Target, TargetTable, reference_targets
from ckptlab.ops.stream import Out, check_output
from ckptlab.progress import Progress, null_progress

#: parameter suffix per role and style (LyCORIS roles keep the input's suffix)
_SUFFIX = {
    "kohya": {"down": ".lora_down.weight", "up": ".lora_up.weight", "mid": ".lora_mid.weight", "alpha": ".alpha",
              "dora": ".dora_scale"},
    "peft": {"down": ".lora_A.weight", "up": ".lora_B.weight", "dora": ".lora_magnitude_vector",
             "up_bias": ".lora_B.bias"},
    "diffusers": {"down": ".lora.down.weight", "up": ".lora.up.weight", "alpha": ".alpha",
                  "dora": ".lora_magnitude_vector"},
}
_SUFFIX["comfy"] = _SUFFIX["kohya"]
OPERATION = "lora-convert"
_KOHYA_LIKE = ("kohya", "comfy")
#: input metadata that describes the input's own key layout and is rewritten, not carried over


@dataclass
class LoraConvertResult:
    """What ``convert`` did (the ``--json`` record)."""

    input: Path
    output: Path
    family: str
    style: str
    modules_in: int = 0
    modules_out: int = 0
    fused: int = 0       # fused output modules built from split input modules
    rank_grown: int = 0  # of those, the ones whose rank is the parts' sum (parts with their own lora_down)
    split: int = 0       # fused input modules written as parts
    bytes_out: int = 0
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    operation: str = OPERATION

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"operation": d.pop("operation"), **d}
        d["input"], d["output"] = str(self.input), str(self.output)
        return d


@dataclass
class _Mod:
    """One output module being planned: its name, per-role output items, rank and alpha."""

    name: str
    target: Target
    rank: int | None
    alpha: float | None
    items: list[Out] = field(default_factory=list)
    dora: bool = False


def lora_family(lora: LoraFile, family: str | None = None) -> str:
    """The family of a LoRA: ``family`` when given, else ``arch.identify``, else ``ss_base_model_version``, else
    the one family whose reference table names every module."""
    if family:
        return family
    from ckptlab.arch.families import get
    from ckptlab.arch.identify import identify
    from ckptlab.lora.naming import REFERENCE_SPECS

    fam = identify(lora.source).family
    if fam in REFERENCE_SPECS:
        return fam
    base = lora.metadata.get("ss_base_model_version", "")
    for fid in REFERENCE_SPECS:
        f = get(fid)
        if f is not None and base and any(base.startswith(k) for k in f.kohya):
            return fid
    fits = [fid for fid in REFERENCE_SPECS
            if all(reference_targets(fid).lookup(m) is not None for m in lora.modules)]
    if len(fits) > 1:  # SD1 and SD2 share the diffusers UNet names: the input widths tell them apart
        shaped = [fid for fid in fits if _widths_fit(lora, reference_targets(fid))]
        fits = shaped or fits
    if len(fits) == 1:
        return fits[0]
    if fam:
        return fam  # a recognised family without LoRA naming: reference_targets refuses it by name
    if fits:
        raise MismatchError(f"the LoRA's module names fit {', '.join(fits)}; say which with --family", lora.path)
    raise MismatchError("cannot tell which model family this LoRA is for (no header hint and its module names "
                        "fit no supported family); give --family", lora.path)


def _widths_fit(lora: LoraFile, table: TargetTable) -> bool:
    import math

    for name, mod in lora.modules.items():
        t = table.lookup(name)
        if t is None or "down" not in mod.params:
            continue
        shape = lora.info(mod, "down").shape
        if len(shape) < 2 or math.prod(shape[1:]) != math.prod(t.shape[1:]):
            return False
    return True


def _scaled(rows: tuple[int, int], ref: int, actual: int) -> tuple[int, int] | None:
    """A reference row slice of a fused weight of ``ref`` rows, in a LoRA whose fused rows are ``actual``: the
    fused layouts (q, k, v thirds; Flux ``linear1`` = h, h, h, 4h) keep their proportions at every width."""
    a, b = rows[0] * actual, rows[1] * actual
    if a % ref or b % ref:
        return None
    return a // ref, b // ref


def resolve(lora: LoraFile, table: TargetTable) -> dict[str, Target]:
    """The target of every module; refuses (naming a few) when some module names match nothing."""
    found: dict[str, Target] = {}
    missing: list[str] = []
    for name in lora.modules:
        t = table.lookup(name)
        if t is None:
            missing.append(name)
        else:
            found[name] = t
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise MismatchError(f"{len(missing)} LoRA module name(s) match no {table.family} weight: {shown}", lora.path)
    return found


def _info_like(info: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(info.dtype, tuple(shape))


def convert(lora: Path, output: Path, *, to: str, overwrite: bool = False, dry_run: bool = False,
            family: str | None = None, progress: Progress = null_progress,
            cache: HashCache = NO_CACHE) -> LoraConvertResult:
    """Write ``lora`` renamed to the naming style ``to`` (kohya, peft, diffusers, comfy) at ``output``."""
    if to not in STYLES:
        raise UsageError(f"unknown LoRA naming style {to!r}; choose one of {', '.join(STYLES)}")
    if family is not None:
        from ckptlab.arch.families import get
        from ckptlab.lora.naming import REFERENCE_SPECS

        if get(family) is None:
            raise UsageError(f"unknown model family {family!r}; LoRA naming knows {', '.join(REFERENCE_SPECS)}")
    lora, output = Path(lora), Path(output)
    check_output(output, [lora], overwrite)
    with LoraFile.open(lora) as lf:
        fam = lora_family(lf, family)
        table = reference_targets(fam)
        targets = resolve(lf, table)
        result = LoraConvertResult(lora, output, fam, to, modules_in=len(lf.modules), dry_run=dry_run)
        mods = _plan(lf, table, targets, to, result)
        items = [it for m in mods for it in m.items]
        meta = _metadata(lf, fam, mods, to)
        result.modules_out = len(mods)
        if dry_run:
            result.bytes_out = sum(it.info.nbytes for it in items)
            return result
        from ckptlab.lora.write import write_lora

        result.bytes_out = write_lora(output, items, meta, operation=OPERATION, inputs=[lora],
                                          options={"to": to, "family": fam}, overwrite=overwrite,
                                          progress=progress, cache=cache)
    return result


# -- planning -------------------------------------------------------------------------------------------------

def _plan(lf: LoraFile, table: TargetTable, targets: dict[str, Target], to: str,
          result: LoraConvertResult) -> list[_Mod]:
    by_key: dict[str, list[LoraModule]] = {}
    for name, mod in lf.modules.items():
        by_key.setdefault(targets[name].key, []).append(mod)
    slices_of: dict[str, list[Target]] = {}
    whole_of: dict[str, Target] = {}
    for t in table.targets:
        if t.rows is None:
            whole_of.setdefault(t.key, t)
        else:
            slices_of.setdefault(t.key, []).append(t)
    out: list[_Mod] = []
    for key, mods in by_key.items():
        direct = [m for m in mods if targets[m.name].name(to) is not None]
        rest = [m for m in mods if targets[m.name].name(to) is None]
        for m in direct:
            out.append(_direct(lf, m, targets[m.name], to))
        if not rest:
            continue
        for m in rest:
            if m.algo != "lora":
                raise MismatchError(f"{m.name}: a {m.algo} module has no {to} name (LyCORIS modules convert only "
                                    "between kohya and comfy naming)", lf.path)
        whole = [m for m in rest if targets[m.name].rows is None]
        parts = [m for m in rest if targets[m.name].rows is not None]
        for m in whole:
            pieces = [s for s in slices_of.get(key, []) if s.name(to) is not None]
            if not pieces:
                raise MismatchError(f"{m.name}: no {to} name for {key}", lf.path)
            out.extend(_split(lf, m, pieces, targets[m.name].shape[0], to))
            result.split += 1
        if parts:
            w = whole_of.get(key)
            if w is None or w.name(to) is None:
                raise MismatchError(f"{parts[0].name}: no {to} name for {key}", lf.path)
            fm = _fuse(lf, parts, targets, w, to)
            out.append(fm)
            result.fused += 1
            result.rank_grown += fm.rank is not None and fm.rank > max(lf.info(p, "down").shape[0] for p in parts)
    seen: dict[str, str] = {}
    for m, key in ((m, m.target.key) for m in out):
        if m.name in seen:
            raise MismatchError(f"two modules of the LoRA adapt the same weight {key} and would both be written as "
                                f"{m.name}", lf.path)
        seen[m.name] = key
    return out


def _alpha_item(lf: LoraFile, mod: LoraModule, name: str, to: str, alpha: float | None,
                rank: int | None) -> list[Out]:
    """The ``.alpha`` tensor of a kohya/comfy/diffusers module: the input's raw when it has one, else the value
    (alpha, or rank where the input had none) in the dtype of ``lora_down``."""
    if "alpha" not in _SUFFIX[to]:
        return []
    key = name + _SUFFIX[to]["alpha"]
    if "alpha" in mod.params:
        return [Out.copy(key, lf.source, mod.params["alpha"])]
    value = alpha if alpha is not None else rank
    if value is None:
        return []
    return [_scalar(key, value, lf.info(mod, "down").dtype if "down" in mod.params else "F32")]


def _scalar(key: str, value: float, dtype: str) -> Out:
    import numpy as np

    from ckptlab.formats.dtypes import to_numpy

    if dtype not in ("F16", "BF16", "F32", "F64"):
        dtype = "F32"
    dt = to_numpy(dtype)
    return Out(key, TensorInfo(dtype, ()), produce=lambda: np.asarray(value, dtype=np.float64).astype(dt))


def _direct(lf: LoraFile, mod: LoraModule, t: Target, to: str) -> _Mod:
    name = t.name(to)
    assert name is not None
    rank, alpha = lf.rank(mod), lf.alpha(mod)
    m = _Mod(name, t, rank, alpha, dora=mod.has_dora)
    if mod.algo != "lora":
        if to not in _KOHYA_LIKE:
            raise MismatchError(f"{mod.name}: a {mod.algo} (LyCORIS) module cannot be written in {to} naming "
                                "(only kohya and comfy carry LyCORIS keys)", lf.path)
        for key in mod.params.values():
            suffix = key[len(mod.name):]
            m.items.append(Out.copy(name + suffix, lf.source, key))
        return m
    suffixes = _SUFFIX[to]
    for role, key in mod.params.items():
        if role == "alpha":
            continue
        if role not in suffixes:
            raise MismatchError(f"{mod.name}: its {role} parameter has no {to} form", lf.path)
        if role == "dora":
            m.items.append(_dora(lf, mod, name + suffixes["dora"], to, None))
        else:
            m.items.append(Out.copy(name + suffixes[role], lf.source, key))
    m.items.extend(_alpha_item(lf, mod, name, to, alpha, rank))
    return m


def _dora(lf: LoraFile, mod: LoraModule, key: str, to: str, rows: tuple[int, int] | None) -> Out:
    """A DoRA magnitude in the style's shape (kohya/comfy ``[out, 1]``, peft/diffusers ``[out]``), raw bytes;
    ``rows`` picks a slice of a fused magnitude."""
    info = lf.info(mod, "dora")
    shape = tuple(info.shape)
    if len(shape) == 2 and shape[1] == 1 or len(shape) == 1:
        out = shape[0]
    else:
        raise MismatchError(f"{mod.name}: dora_scale {list(shape)} is the old per-input-column form; only the "
                            "per-output [out, 1] form converts", lf.path)
    if rows is not None:
        out = rows[1] - rows[0]
    new_shape = (out, 1) if to in _KOHYA_LIKE else (out,)
    src = mod.params["dora"]

    def produce():
        import numpy as np

        a = lf.source.array(src).reshape(-1)
        if rows is not None:
            a = a[rows[0]:rows[1]]
        return np.ascontiguousarray(a).reshape(new_shape)

    if rows is None and new_shape == shape:
        return Out.copy(key, lf.source, src)
    return Out(key, _info_like(info, new_shape), produce=produce)


def _split(lf: LoraFile, mod: LoraModule, pieces: list[Target], p_whole_rows: int, to: str) -> list[_Mod]:
    """A fused module written as its parts: down copied, up (and a DoRA magnitude) split by rows."""
    if "mid" in mod.params or "up_bias" in mod.params:
        raise MismatchError(f"{mod.name}: a CP (lora_mid) or biased module cannot be split", lf.path)
    rank, alpha = lf.rank(mod), lf.alpha(mod)
    up_info = lf.info(mod, "up")
    spans: list[tuple[int, int]] = []
    for p in pieces:
        assert p.rows is not None
        rows = _scaled(p.rows, p_whole_rows, up_info.shape[0])
        if rows is None:
            raise MismatchError(f"{mod.name}: lora_up has {up_info.shape[0]} rows, which do not split like "
                                f"{p.key} ({p_whole_rows})", lf.path)
        spans.append(rows)
    blocks = None if mod.has_dora else _block_columns(lf, mod, spans)
    if blocks is not None:
        return _split_blocks(lf, mod, pieces, spans, blocks, to)
    out: list[_Mod] = []
    for p, rows in zip(pieces, spans, strict=True):
        name = p.name(to)
        assert name is not None
        r0, r1 = rows
        m = _Mod(name, p, rank, alpha, dora=mod.has_dora)
        m.items.append(Out.copy(name + _SUFFIX[to]["down"], lf.source, mod.params["down"]))
        m.items.append(Out(name + _SUFFIX[to]["up"], _info_like(up_info, (r1 - r0, *up_info.shape[1:])),
                           produce=_rows(lf, mod.params["up"], r0, r1)))
        if mod.has_dora:
            m.items.append(_dora(lf, mod, name + _SUFFIX[to]["dora"], to, rows))
        m.items.extend(_alpha_item(lf, mod, name, to, alpha, rank))
        out.append(m)
    return out


def _block_columns(lf: LoraFile, mod: LoraModule, spans: list[tuple[int, int]]):
    """The rank columns each part uses when ``lora_up`` is block-diagonal over the parts (a fused module built from
    independent parts, by this command or a trainer): per part ``(c0, c1)``, or None for a part whose rows are all
    zero; None overall when the ups overlap, leave gaps or are all zero (then the plain split applies)."""
    import numpy as np

    up = lf.source.array(mod.params["up"])
    rank = up.shape[1]
    cols: list[tuple[int, int] | None] = []
    for r0, r1 in spans:
        used = np.flatnonzero(np.any(up[r0:r1].reshape(r1 - r0, rank, -1) != 0, axis=(0, 2)))
        if used.size == 0:
            cols.append(None)
            continue
        c0, c1 = int(used[0]), int(used[-1]) + 1
        cols.append((c0, c1))
    present = [c for c in cols if c is not None]
    if not present:
        return None
    edge = 0
    for c in present:
        if c[0] != edge:
            return None
        edge = c[1]
    return cols if edge == rank else None


def _split_blocks(lf: LoraFile, mod: LoraModule, pieces: list[Target], spans: list[tuple[int, int]],
                  blocks: list, to: str) -> list[_Mod]:
    """The inverse of a block-diagonal fuse: each part gets its own rows of ``lora_down`` and its block of
    ``lora_up`` (raw), alpha = α·r_i/R (the same α/r); parts whose rows are all zero are not written."""
    rank, alpha = lf.rank(mod), lf.alpha(mod)
    assert rank
    up_info, down_info = lf.info(mod, "up"), lf.info(mod, "down")
    out: list[_Mod] = []
    for p, (r0, r1), cols in zip(pieces, spans, blocks, strict=True):
        if cols is None:
            continue
        name = p.name(to)
        assert name is not None
        c0, c1 = cols
        r = c1 - c0
        a = None if alpha is None else alpha * r / rank
        m = _Mod(name, p, r, a)
        m.items.append(Out(name + _SUFFIX[to]["down"], _info_like(down_info, (r, *down_info.shape[1:])),
                           produce=_rows(lf, mod.params["down"], c0, c1)))
        m.items.append(Out(name + _SUFFIX[to]["up"], _info_like(up_info, (r1 - r0, r, *up_info.shape[2:])),
                           produce=_block(lf, mod.params["up"], r0, r1, c0, c1)))
        if "alpha" in _SUFFIX[to] and a is not None:
            m.items.append(_scalar(name + _SUFFIX[to]["alpha"], a, down_info.dtype))
        out.append(m)
    return out


def _block(lf: LoraFile, key: str, r0: int, r1: int, c0: int, c1: int):
    def produce():
        import numpy as np

        return np.ascontiguousarray(lf.source.array(key)[r0:r1, c0:c1])
    return produce


def _rows(lf: LoraFile, key: str, r0: int, r1: int):
    def produce():
        import numpy as np

        return np.ascontiguousarray(lf.source.array(key)[r0:r1])
    return produce


def _fuse(lf: LoraFile, parts: list[LoraModule], targets: dict[str, Target], whole: Target, to: str) -> _Mod:
    """Split modules written as one fused module: downs concatenated, ups block-diagonal (exact ΔW)."""
    import numpy as np

    parts = sorted(parts, key=lambda m: targets[m.name].rows or (0, 0))
    name = whole.name(to)
    assert name is not None
    for m in parts:
        if "mid" in m.params or "up_bias" in m.params:
            raise MismatchError(f"{m.name}: a CP (lora_mid) or biased module cannot be fused", lf.path)
    downs = [lf.info(m, "down") for m in parts]
    ups = [lf.info(m, "up") for m in parts]
    in_shapes = {tuple(d.shape[1:]) for d in downs}
    dtypes = {d.dtype for d in downs} | {u.dtype for u in ups}
    if len(in_shapes) != 1 or len(dtypes) != 1:
        raise MismatchError(f"{parts[0].name}: the parts of {whole.key} differ in input shape or dtype", lf.path)
    ranks = [d.shape[0] for d in downs]
    scales = [lf.scale(m) for m in parts]
    total = sum(ranks)
    same = len(set(scales)) == 1
    alpha = scales[0] * total if same else float(total)
    # the LoRA's own width: each part's rows against its reference slice (the same factor for every part)
    r0, r1 = targets[parts[0].name].rows  # type: ignore[misc]
    out_rows = whole.shape[0] * ups[0].shape[0] // (r1 - r0)
    rows: dict[str, tuple[int, int]] = {}
    for m, u in zip(parts, ups, strict=True):
        sl = _scaled(targets[m.name].rows, whole.shape[0], out_rows)  # type: ignore[arg-type]
        if sl is None or u.shape[0] != sl[1] - sl[0]:
            raise MismatchError(f"{m.name}: lora_up has {u.shape[0]} rows, which do not fit {whole.key} "
                                f"next to {parts[0].name}", lf.path)
        rows[m.name] = sl
    shared = _shared_down(lf, parts, rows, out_rows)
    if shared is not None:
        return shared(name, whole, to)
    if any(m.has_dora for m in parts):
        raise MismatchError(f"{parts[0].name}: DoRA parts with their own lora_down cannot be fused into {whole.key} "
                            "(the fused magnitude would need the base model)", lf.path)

    def down():
        return np.ascontiguousarray(np.concatenate([lf.source.array(m.params["down"]) for m in parts], axis=0))

    def up():
        first = lf.source.array(parts[0].params["up"])
        tail = tuple(first.shape[2:])
        full = np.zeros((out_rows, total, *tail), dtype=first.dtype)
        c = 0
        for m, r, s in zip(parts, ranks, scales, strict=True):
            r0, r1 = rows[m.name]
            a = lf.source.array(m.params["up"])
            if not same:
                a = (a.astype(np.float32) * np.float32(s)).astype(first.dtype)
            full[r0:r1, c:c + r] = a
            c += r
        return full

    dinfo, uinfo = downs[0], ups[0]
    m = _Mod(name, whole, total, alpha)
    m.items.append(Out(name + _SUFFIX[to]["down"], _info_like(dinfo, (total, *dinfo.shape[1:])), produce=down))
    m.items.append(Out(name + _SUFFIX[to]["up"], _info_like(uinfo, (out_rows, total, *uinfo.shape[2:])),
                       produce=up))
    if "alpha" in _SUFFIX[to]:
        m.items.append(_scalar(name + _SUFFIX[to]["alpha"], alpha, dinfo.dtype))
    return m


def _shared_down(lf: LoraFile, parts: list[LoraModule], rows: dict[str, tuple[int, int]], out_rows: int):
    """The exact inverse of a split: when the parts tile the fused rows and share one ``lora_down`` (byte for
    byte), rank and alpha, the fused module is that down, the ups stacked by rows (raw) and the same alpha — no
    rank growth. Returns a builder, or None when the parts are independent."""
    import numpy as np

    spans = sorted(rows[m.name] for m in parts)
    if spans[0][0] != 0 or spans[-1][1] != out_rows or any(a[1] != b[0] for a, b in zip(spans, spans[1:],
                                                                                     strict=False)):
        return None
    if len({lf.rank(m) for m in parts}) != 1 or len({lf.alpha(m) for m in parts}) != 1:
        return None
    if len({m.has_dora for m in parts}) != 1:
        return None
    first = lf.source.array(parts[0].params["down"])
    for m in parts[1:]:
        other = lf.source.array(m.params["down"])
        if other.dtype != first.dtype or other.shape != first.shape or other.tobytes() != first.tobytes():
            return None
    ordered = sorted(parts, key=lambda m: rows[m.name])

    def build(name: str, whole: Target, to: str) -> _Mod:
        p0 = ordered[0]
        m = _Mod(name, whole, lf.rank(p0), lf.alpha(p0), dora=p0.has_dora)
        m.items.append(Out.copy(name + _SUFFIX[to]["down"], lf.source, p0.params["down"]))
        uinfo = lf.info(p0, "up")
        m.items.append(Out(name + _SUFFIX[to]["up"], _info_like(uinfo, (out_rows, *uinfo.shape[1:])),
                           produce=lambda: np.ascontiguousarray(np.concatenate(
                               [lf.source.array(q.params["up"]) for q in ordered], axis=0))))
        if p0.has_dora:
            dinfo = lf.info(p0, "dora")
            shape = (out_rows, 1) if to in _KOHYA_LIKE else (out_rows,)
            m.items.append(Out(name + _SUFFIX[to]["dora"], _info_like(dinfo, shape),
                               produce=lambda: np.ascontiguousarray(np.concatenate(
                                   [lf.source.array(q.params["dora"]).reshape(-1) for q in ordered])).reshape(shape)))
        m.items.extend(_alpha_item(lf, p0, name, to, lf.alpha(p0), lf.rank(p0)))
        return m

    return build


# -- metadata -------------------------------------------------------------------------------------------------

def _metadata(lf: LoraFile, family: str, mods: list[_Mod], to: str) -> dict[str, str]:
    from ckptlab.lora.write import lora_metadata

    base = lf.metadata  # lora_metadata drops what described the input (write.STALE_META)
    title = lf.metadata.get("modelspec.title") or lf.path.stem
    module = lf.metadata.get("ss_network_module") or "networks.lora"
    ra = [(m.rank, m.alpha) for m in mods if m.rank is not None]
    meta = lora_metadata(family, ra, title=title, network_module=module, base=base)
    if to in ("peft", "diffusers"):
        meta[PEFT_METADATA_KEY] = json.dumps(peft_config(mods), indent=2, sort_keys=True)
    return meta


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(mods: list[_Mod]) -> dict:
    """diffusers' ``lora_adapter_metadata`` of these modules: per component ``r`` and ``lora_alpha`` (the most
    common values), ``rank_pattern`` / ``alpha_pattern`` for every module that differs, ``target_modules``,
    ``use_dora``; keys prefixed ``<component>.`` like ``lora_base._pack_dict_with_prefix``."""
    comps: dict[str, list[_Mod]] = {}
    for m in mods:
        comps.setdefault(m.name.split(".", 1)[0], []).append(m)
    cfg: dict = {}
    for comp, ms in comps.items():
        ranks = [m.rank for m in ms if m.rank is not None]
        alphas = [float(m.alpha if m.alpha is not None else m.rank or 0) for m in ms]
        r = Counter(ranks).most_common(1)[0][0] if ranks else 0
        a = Counter(alphas).most_common(1)[0][0] if alphas else float(r)
        inner = [m.name.split(".", 1)[1] for m in ms]
        cfg[f"{comp}.r"] = r
        cfg[f"{comp}.lora_alpha"] = _number(a)
        cfg[f"{comp}.rank_pattern"] = {n: m.rank for n, m in zip(inner, ms, strict=True) if m.rank is not None and m.rank != r}
        cfg[f"{comp}.alpha_pattern"] = {n: _number(al) for n, al in zip(inner, alphas, strict=True) if al != a}
        cfg[f"{comp}.target_modules"] = sorted(set(inner))
        cfg[f"{comp}.use_dora"] = any(m.dora for m in ms)
        cfg[f"{comp}.peft_type"] = "LORA"
    return cfg
