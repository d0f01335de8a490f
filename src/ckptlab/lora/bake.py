"""``ckptlab lora bake``: LoRAs added into a model's weights, streaming one weight at a time (docs/lora.md).

Phase 1 reads headers only: the base (single-file checkpoint, or a standalone UNet / text-encoder file) and
every LoRA are opened (hostile pickles refused), the LoRA families checked against the base's, every LoRA
module resolved to the model weight it adapts (``naming.targets_for``), and every output key planned. Phase 2
streams the plan: a weight some LoRA adapts is read, its ΔW computed (``maths.apply``, fp32, scale once) and
added, and the result cast back to the base dtype (or ``dtype``); every other tensor is copied raw. Peak
memory is one weight plus its LoRA factors, never the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.lora import maths
from ckptlab.lora.file import LoraFile, LoraModule
from ckptlab.lora.naming import Target, TargetTable, targets_for
from ckptlab.lora.write import carried_metadata
from ckptlab.ops.stream import Out
from ckptlab.progress import Progress, null_progress

OPERATION = "lora-bake"
#: how many unmatched module names a warning lists
SHOW_UNMATCHED = 3
#: output dtypes of the LoRA commands' ``--precision`` (the names ``ckptlab precision`` takes are accepted too)
DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}


@dataclass
class LoraReport:
    """What one LoRA contributed: its strengths, modules, how many found a weight, the first that did not."""

    path: Path
    strength: float
    te_strength: float
    family: str | None
    modules: int
    matched: int
    unmatched: list[str] = field(default_factory=list)
    sha256: str | None = None


#: workers computing baked weights ahead of the writer (each with one torch thread: the bytes do not depend on it)
WRITE_THREADS = 2


@dataclass
class BakeResult:
    """What ``bake`` did (the ``--json`` record): the base, the output, the family, one ``LoraReport`` per LoRA
    (modules matched, names that matched nothing, strengths), the output dtype and warnings."""

    operation: str
    base: Path
    output: Path
    dry_run: bool
    family: str | None
    loras: list[LoraReport]
    tensors_out: int = 0
    changed: int = 0
    bytes_out: int = 0
    dtype: str | None = None
    warnings: list[str] = field(default_factory=list)
    base_sha256: str | None = None


@dataclass
class Patch:
    """One LoRA module on one target weight, with the multiplier it is applied at."""

    target: Target
    lora: LoraFile
    module: LoraModule
    multiplier: float


def strengths_for(n: int, strengths: Sequence[float] | None, te_strengths: Sequence[float] | None
                  ) -> list[tuple[float, float]]:
    """``(strength, te_strength)`` per LoRA: one value per LoRA in order, or one value for all; default 1.0;
    the text-encoder strength defaults to the LoRA's strength. Any other count is a usage error."""

    def spread(values, default, what):
        if not values:
            return list(default)
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{what}: strengths must be finite numbers, got {', '.join(map(str, values))}")
        if len(values) == 1:
            return values * n
        if len(values) != n:
            raise UsageError(f"{what}: {len(values)} values for {n} LoRAs; give one value (all LoRAs) or one "
                             "per LoRA, in order")
        return values

    s = spread(strengths, [1.0] * n, "--strength")
    t = spread(te_strengths, s, "--te-strength")
    return list(zip(s, t, strict=True))


def patches_of(lora: LoraFile, table: TargetTable, strength: float, te_strength: float
               ) -> tuple[list[Patch], list[str], int, int]:
    """The patches of one LoRA on ``table``, the names of the modules that match no weight, and how many matched
    modules change nothing (strength 0; a stored alpha of 0): those are left out, so their weights stay raw
    copies. A module whose algorithm cannot be baked is refused (one line, the reason)."""
    patches: list[Patch] = []
    unmatched: list[str] = []
    idle = zero_alpha = 0
    for mod in lora.modules.values():
        why = maths.unsupported(mod)
        if why:
            raise MismatchError(f"{mod.name}: {why}", lora.path)
        t = table.lookup(mod.name)
        if t is None:
            unmatched.append(mod.name)
            continue
        m = te_strength if t.component.startswith("te") else strength
        if maths.additive_only(mod) and maths.module_scale(lora, mod) == 0:
            zero_alpha += 1
            continue
        if m == 0:
            idle += 1
            continue
        patches.append(Patch(t, lora, mod, m))
    return patches, unmatched, idle, zero_alpha


def parse_dtype(dtype: str | None) -> str | None:
    """``fp16``/``bf16``/``fp32`` (or the safetensors name) as a safetensors dtype; anything else: usage error."""
    from ckptlab.formats.dtypes import parse_dtype as any_dtype

    if dtype is None:
        return None
    try:
        out = any_dtype(str(dtype))
    except ValueError:
        out = None
    if out in DTYPES.values():
        return out
    raise UsageError(f"--precision {dtype!r}: use one of {', '.join(DTYPES)}")


def _out_dtype(info: TensorInfo, dtype: str | None) -> str:
    from ckptlab.formats.dtypes import FLOAT_DTYPES

    return dtype if dtype is not None and info.dtype in FLOAT_DTYPES else info.dtype


def baked(get, has, key: str, patches: list[Patch], out_dtype: str, where, *, bias: bool = False):
    """The baked tensor of ``key``, the one per-key step of the command and of the recipe's ``lora`` step: read
    with ``get(key)`` (``has(key)``: whether the model has a key), patched in fp32 (``patch_weight`` /
    ``patch_bias``), cast to ``out_dtype`` with the NaN/overflow checks (fp8 bases: upcast, add, cast back). ComfyUI
    scaled fp8 stores ``w / scale_weight``: the dequantised weight is patched and stored scaled again."""
    if bias:
        return cast_checked(patch_bias(get(key), patches), out_dtype, key, where)
    scale_key = key[: -len("weight")] + "scale_weight"
    if key.endswith(".weight") and has(scale_key):
        import torch

        s = get(scale_key).to(torch.float32)
        return cast_checked(patch_weight(get(key).to(torch.float32) * s, patches) / s, out_dtype, key, where)
    return cast_checked(patch_weight(get(key), patches), out_dtype, key, where)


def weight_out(src: TensorSource, key: str, patches: list[Patch], out_dtype: str, *, bias: bool = False) -> Out:
    """The planned output of one adapted weight (or bias): ``baked`` when it is written."""
    infos = src.infos()
    return Out(key, TensorInfo(out_dtype, tuple(infos[key].shape)),
               produce=lambda: baked(src.get, infos.__contains__, key, patches, out_dtype, src.path, bias=bias))


def _cast(t, tdtype, key: str, where):
    import math

    import torch

    # one pass: NaN propagates through aminmax, and the extremes tell whether a narrow dtype can overflow
    lo, hi = (float(x) for x in torch.aminmax(t)) if t.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MismatchError(f"{key}: the baked weight has NaN or infinite values (a LoRA with huge values?)",
                            where)
    out = t.to(tdtype)
    if tdtype in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2) and max(-lo, hi) > torch.finfo(
            tdtype).max and not bool(torch.isfinite(out.to(torch.float32)).all()):
        raise MismatchError(f"{key}: the baked weight overflows {str(tdtype).replace('torch.', '')}; bake with "
                            "--precision fp32 or bf16", where)
    return out.contiguous()


def match_loras(infos, family: str | None, loras: list[LoraFile], strengths: list[tuple[float, float]],
                result: BakeResult) -> tuple[dict[str, list[Patch]], dict[str, list[Patch]]]:
    """``(weight key -> patches, bias key -> patches)`` of ``loras`` on a model with these ``infos`` (key ->
    ``TensorInfo``) and ``family``; one ``LoraReport`` per LoRA and the partial-match warnings go into
    ``result``. Refuses a LoRA of another family, one that matches nothing, an algorithm that cannot be baked,
    a bias change on a model without that bias."""
    from ckptlab.arch.families import display_name
    from ckptlab.arch.identify import identify

    table = targets_for(infos, family)
    by_key: dict[str, list[Patch]] = {}
    bias: dict[str, list[Patch]] = {}
    for lora, (s, t) in zip(loras, strengths, strict=True):
        lfam = identify(lora.source).family
        if lfam == "unknown":
            lfam = None
        if lfam is not None and family is not None and lfam != family:
            raise MismatchError(f"this LoRA is for {display_name(lfam)}; the model is {display_name(family)}",
                                lora.path)
        patches, unmatched, idle, zero_alpha = patches_of(lora, table, s, t)
        rep = LoraReport(lora.path, s, t, lfam, len(lora.modules), len(patches) + idle + zero_alpha,
                         unmatched[:SHOW_UNMATCHED])
        result.loras.append(rep)
        if zero_alpha:
            result.warnings.append(f"{lora.path.name}: {zero_alpha} module(s) store alpha 0, which A1111 and ComfyUI "
                                   "load as scale 0: they change nothing (docs/lora.md)")
        if not patches and not idle and not zero_alpha:
            raise MismatchError(f"none of this LoRA's {len(lora.modules)} modules adapts a weight of this "
                                f"{display_name(family) + ' ' if family else ''}model (first: {unmatched[0]})",
                                lora.path)
        if unmatched:
            result.warnings.append(f"{lora.path.name}: {len(unmatched)} of {len(lora.modules)} modules match no "
                                   f"weight of the model and are left out (first: "
                                   f"{', '.join(unmatched[:SHOW_UNMATCHED])})")
        for p in patches:
            if _touches_weight(p.module):
                by_key.setdefault(p.target.key, []).append(p)
            if maths.touches_bias(p.module):
                if p.target.rows is not None or p.target.bias_key not in infos:
                    raise MismatchError(f"{p.module.name}: the LoRA changes a bias the model does not have "
                                        f"({p.target.bias_key})", lora.path)
                bias.setdefault(p.target.bias_key, []).append(p)
    return by_key, bias


def _touches_weight(mod: LoraModule) -> bool:
    if mod.algo == "norm":
        return "w_norm" in mod.params
    if mod.algo == "full":
        return "diff" in mod.params
    return True


def patch_weight(w, patches: list[Patch]):
    """``w`` (the whole stored weight, any float dtype) with ``patches`` applied, as a new fp32 tensor: patches
    of a row slice of a fused weight (OpenCLIP ``in_proj_weight``, Flux ``qkv``) go to their rows."""
    import torch

    out = w.to(torch.float32, copy=True).contiguous()
    groups: dict[tuple[int, int] | None, list[Patch]] = {}
    for p in patches:
        groups.setdefault(p.target.rows, []).append(p)
    for rows, ps in groups.items():
        triples = [(p.lora, p.module, p.multiplier) for p in ps]
        a, b = rows if rows is not None else (0, out.shape[0])
        maths.apply(out[a:b], triples, ps[0].target.shape, inplace=True)  # rows of a contiguous tensor: a view
    return out


def patch_bias(b, patches: list[Patch]):
    """``b`` with the ``diff_b`` / ``b_norm`` of ``patches`` added, fp32."""
    return maths.apply_bias(b, [(p.lora, p.module, p.multiplier) for p in patches])


def cast_checked(t, dtype: str, key: str, where):
    """``t`` (fp32) cast to the safetensors ``dtype``; refuses NaN/Inf and an overflow of a narrow dtype."""
    from ckptlab.formats.dtypes import to_torch

    return _cast(t, to_torch(dtype), key, where)


#: a standalone CLIP-L text encoder (transformers names) inside the checkpoint of each family that uses it
_TE_PREFIX = {"sd1": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}


def standalone_text_encoder(components, loras: list[LoraFile], src: TensorSource) -> tuple[str, str]:
    """``(family, checkpoint prefix)`` for a standalone text-encoder file (no family of its own): a CLIP-L in
    transformers layout is read as the first text encoder of the family of the first LoRA identified (SD1's
    ``lora_te_``, SDXL's ``lora_te1_``). Other text encoders are refused."""
    from ckptlab.arch.families import display_name
    from ckptlab.arch.identify import identify

    if "clip_l" not in components:
        raise MismatchError(f"lora bake reads a standalone text encoder only as CLIP-L in transformers layout; "
                            f"this one is {', '.join(components) or 'not recognised'} (bake into the checkpoint)",
                            src.path)
    fams = [f for f in (identify(lf.source).family for lf in loras) if f and f != "unknown"]
    if not fams or fams[0] not in _TE_PREFIX:
        what = display_name(fams[0]) if fams else "an unrecognised model"
        raise MismatchError(f"a standalone CLIP-L text encoder takes SD1 or SDXL LoRAs; the LoRA is for {what}",
                            src.path)
    return fams[0], _TE_PREFIX[fams[0]]


def base_identity(src: TensorSource):
    """``identify`` of the model to bake into; a LoRA given there is refused (the arguments swapped)."""
    from ckptlab.arch.identify import identify

    ident = identify(src)
    if ident.kind in ("lora", "lycoris"):
        raise MismatchError("this is a LoRA, not a model to bake into: give the model first, then the LoRAs",
                            src.path)
    return ident


@dataclass
class BakePlan:
    """Every output tensor of a bake (nothing read yet) and the report."""

    items: list[Out]
    result: BakeResult
    options: dict


def plan_bake(src: TensorSource, loras: list[LoraFile], strengths: list[tuple[float, float]], *,
              dtype: str | None = None, family: str | None = None, output: Path | None = None,
              dry_run: bool = False, ident=None) -> BakePlan:
    """Plan the bake of ``loras`` into the opened base ``src`` (header reads only). ``family``: the base's
    family when the caller knows it (else ``identify`` tells; ``ident``: ``base_identity(src)`` when the caller
    has it already). Refuses a LoRA of another family, a LoRA whose
    modules match no weight, an algorithm that cannot be baked; a partial match is a warning."""
    from ckptlab.arch.layout import file_layout
    from ckptlab.ops.precision import precision_items
    from ckptlab.ops.stream import TransformResult

    dtype = parse_dtype(dtype)
    infos = src.infos()
    prefix = ""
    if family is None:
        ident = ident or base_identity(src)
        family = ident.family if ident.family != "unknown" else None
        if family is None and ident.kind == "text_encoder":
            family, prefix = standalone_text_encoder(ident.components, loras, src)
    result = BakeResult(OPERATION, Path(src.path), Path(output) if output else Path(), dry_run, family, [],
                        dtype=dtype)
    if prefix:  # the checkpoint's names for the tables, the file's own names for the plan
        by_key, bias = match_loras({prefix + k: i for k, i in infos.items()}, family, loras, strengths, result)
        by_key = {k[len(prefix):]: v for k, v in by_key.items()}
        bias = {k[len(prefix):]: v for k, v in bias.items()}
    else:
        by_key, bias = match_loras(infos, family, loras, strengths, result)
    tr = TransformResult(OPERATION, Path(src.path), None)
    base_items = precision_items(src, file_layout(src), [(k, k) for k in src.keys()], dtype, None, False, tr) \
        if dtype else [Out.copy(k, src) for k in src.keys()]
    items: list[Out] = []
    for it in base_items:
        k = it.key
        if k in by_key:
            items.append(weight_out(src, k, by_key[k], _out_dtype(src.info(k), dtype)))
        elif k in bias:
            items.append(weight_out(src, k, bias[k], _out_dtype(src.info(k), dtype), bias=True))
        else:
            items.append(it)
    result.warnings += tr.warnings
    result.tensors_out = len(items)
    result.changed = len(by_key) + len(bias)
    result.bytes_out = sum(it.info.nbytes for it in items)
    options = {"strengths": [s for s, _ in strengths], "te_strengths": [t for _, t in strengths],
               "dtype": dtype}
    return BakePlan(items, result, {k: v for k, v in options.items() if v is not None})


def bake(base: Path, loras: list[Path], output: Path, *, strengths: Sequence[float] | None = None,
         te_strengths: Sequence[float] | None = None, dtype: str | None = None, overwrite: bool = False,
         dry_run: bool = False, progress: Progress = null_progress, cache: HashCache = NO_CACHE) -> BakeResult:
    """Bake ``loras`` into ``base`` and write ``output`` (safetensors, atomic). ``strengths``: one per LoRA in
    order, or one for all (default 1.0); ``te_strengths`` likewise for text-encoder weights (default: the
    strength). ``dtype``: ``fp16``/``bf16``/``fp32`` for the output's float weights (default: the base's
    dtypes, per tensor). The output's metadata: the base's (minus stale hashes) + provenance (every input's
    sha256, the strengths)."""
    from ckptlab.ops.run import open_checked
    from ckptlab.ops.stream import FileHasher, check_output, placeholder, provenance, write_plan

    base, output = Path(base), Path(output)
    loras = [Path(p) for p in loras]
    if not loras:
        raise UsageError("no LoRA to bake; give at least one LoRA file")
    pairs = strengths_for(len(loras), strengths, te_strengths)
    dtype = parse_dtype(dtype)
    opened: list = []
    try:
        src = open_checked(base)
        opened.append(src)
        ident = base_identity(src)  # before the LoRAs: swapped arguments get the clear message
        files = []
        for p in loras:
            lf = LoraFile.open(p)
            opened.append(lf)
            files.append(lf)
        plan = plan_bake(src, files, pairs, dtype=dtype, output=output, dry_run=dry_run, ident=ident)
        check_output(output, [base, *loras], overwrite)
        if dry_run:
            return plan.result
        paths = [base, *loras]
        hashers = [FileHasher(p, cache=cache) if p.is_file() else None for p in paths]
        pending = {placeholder(i): h for i, h in enumerate(hashers) if h is not None}
        meta = provenance(OPERATION, [(p, placeholder(i) if h else None) for i, (p, h) in
                                      enumerate(zip(paths, hashers, strict=True))],
                          plan.options, base=carried_metadata(dict(src.metadata)))
        progress(0, description=f"bake {base.name}")
        write_plan(output, plan.items, meta, progress=progress, overwrite=overwrite, pending=pending,
                   threads=WRITE_THREADS)
        digests = [h.result() if h else None for h in hashers]
        plan.result.base_sha256 = digests[0]
        for rep, d in zip(plan.result.loras, digests[1:], strict=True):
            rep.sha256 = d
        return plan.result
    finally:
        for o in reversed(opened):
            o.close()
