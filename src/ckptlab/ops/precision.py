"""Exact dtype conversion of a checkpoint's weights (``ckptlab precision``), also used by ``prune``.

Conversions give exactly the bytes of torch's ``tensor.to(dtype)``, computed with numpy and ``ml_dtypes``
(``formats.cast``; no torch). Narrowing to fp16 or fp8 never overflows silently: finite
values beyond the target's largest finite value (65504 for fp16, 448 for fp8_e4m3fn) make the whole
transform refuse, naming the tensor and the count, unless ``clamp`` is set (then they are clamped to
the largest finite value first). bf16 and fp32 have fp32's range; nothing overflows there.

What is converted: floating-point weights. Left alone: integer tensors, ``position_ids`` (integers
by nature), LDM schedule buffers and EMA bookkeeping (tiny, and precision matters there), marker
tensors, and the VAE - SD1/SDXL VAEs overflow to NaN in fp16 (the reason madebyollin's
"sdxl-vae-fp16-fix" exists), so the VAE converts only when asked (``only`` includes ``vae``) or
when going up to fp32.
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.arch.components import is_ema, is_position_ids, is_schedule
from ckptlab.arch.layout import FileLayout as Layout
from ckptlab.arch.layout import file_layout
from ckptlab.errors import BadChoiceError, MismatchError, OverflowRefused
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.formats.dtypes import FLOAT_DTYPES, dtype_of
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.stream import Out, TransformResult
from ckptlab.progress import Progress, null_progress

TARGETS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp8_e4m3fn": "F8_E4M3"}
#: largest finite value of narrow targets
LIMITS = {"F16": 65504.0, "F8_E4M3": 448.0}
ONLY_CHOICES = ("unet", "vae", "te")
TE_COMPONENTS = ("clip_l", "clip_g", "openclip_h", "t5xxl")


def target_dtype(name: str) -> str:
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise BadChoiceError(f"unknown precision {name!r}; use one of {', '.join(TARGETS)}") from None


def component_of(layout: Layout) -> dict[str, str]:
    out: dict[str, str] = {}
    for comp, keys in layout.components.items():
        for k in keys:
            out[k] = comp
    return out


def selected(comp: str, only: set[str] | None, target: str) -> bool:
    """Is a key of component ``comp`` converted?"""
    group = "te" if comp in TE_COMPONENTS else ("unet" if comp in ("unet", "dit", "ema") else comp)
    if only is not None:
        return group in only
    if group == "vae":
        return target == "F32"
    return group in ("unet", "te", "other")


def convertible(key: str, info: TensorInfo) -> bool:
    return (info.dtype in FLOAT_DTYPES and not is_position_ids(key) and not is_schedule(key)
            and not (is_ema(key) and not info.shape) and len(info.shape) > 0)


def cast_out(key: str, src: TensorSource, src_key: str, target: str, clamp: bool) -> Out:
    """An ``Out`` that reads ``src[src_key]`` and casts it to ``target`` (checking range)."""
    return cast_item(Out.copy(key, src, src_key), target, clamp)


def cast_item(item: Out, target: str, clamp: bool) -> Out:
    """``item`` cast to ``target``: the bytes of torch's ``tensor.to(dtype)`` (its ``produce`` may return a numpy
    array or a torch tensor; the result is a numpy array), refusing (or clamping) values that overflow."""
    label = item.src_key or item.key
    where = item.source.path if item.source is not None else None

    def produce():
        from ckptlab.formats.arrays import as_array
        from ckptlab.formats.cast import cast, clamp_finite, count_over

        a = as_array(item.produce() if item.produce is not None else item.source.array(item.src_key))
        limit = LIMITS.get(target)
        if limit is not None and dtype_of(a) in FLOAT_DTYPES and a.size:
            n, peak = count_over(a, limit)
            if n:
                if not clamp:
                    raise OverflowRefused(
                        f"{n} value(s) of {label!r} exceed the {target} range (largest |x| = {peak:g} > "
                        f"{limit:g}); nothing written - use --clamp to clamp them", where)
                a = clamp_finite(a, limit)  # infinities stay infinite
        return cast(a, target)

    return Out(item.key, TensorInfo(target, item.info.shape), produce=produce)


def position_ids_out(key: str, src: TensorSource, src_key: str, warnings: list[str]) -> Out:
    """Float ``position_ids`` (a merge artefact: 76 becomes 75.9975) are rounded back to int64."""
    info = src.info(src_key)
    if info.dtype not in FLOAT_DTYPES:
        return Out.copy(key, src, src_key)
    warnings.append(f"{src_key}: position_ids stored as {info.dtype}; repaired to int64 (rounded)")

    def produce():
        import numpy as np

        from ckptlab.formats.cast import cast

        with np.errstate(all="ignore"):  # NaN/inf become INT64_MIN, as torch's cast makes them
            return np.rint(cast(src.array(src_key), "F64")).astype(np.int64)

    return Out(key, TensorInfo("I64", info.shape), produce=produce)


def precision_items(src: TensorSource, layout: Layout, keys: list[tuple[str, str]], target: str | None,
                    only: set[str] | None, clamp: bool, result: TransformResult) -> list[Out]:
    """Plan ``(out_key, src_key)`` pairs, casting what ``target``/``only`` select and repairing position ids."""
    comp_of = component_of(layout)
    items: list[Out] = []
    for out_key, src_key in keys:
        info = src.info(src_key)
        if is_position_ids(src_key):
            items.append(position_ids_out(out_key, src, src_key, result.warnings))
        elif (target is not None and convertible(src_key, info) and info.dtype != target
              and selected(comp_of.get(src_key, "other"), only, target)):
            items.append(cast_out(out_key, src, src_key, target, clamp))
            result.converted += 1
        else:
            items.append(Out.copy(out_key, src, src_key))
    return items


def convert_precision(inputs: list[Path], to: str, *, only: list[str] | None = None, clamp: bool = False,
                      out_dir: Path | None = None, outputs: list[Path] | None = None, overwrite: bool = False,
                      dry_run: bool = False, progress: Progress = null_progress, cache: HashCache = NO_CACHE,
                      skip_unchanged: bool = False) -> list[TransformResult]:
    """``ckptlab precision``: write ``<stem>-<to>.safetensors`` next to each input (or in ``out_dir``).

    An input where no tensor changes (already ``to``, or only tensors that stay as they are): with
    ``skip_unchanged`` (the CLI) nothing is written and the result says why; without it the output is a
    plain copy, with a warning."""
    from ckptlab.ops.run import is_identity, run_each

    target = target_dtype(to)
    only_set = parse_only(only)
    reason = f"nothing to convert: the weights --to {to.lower()} applies to are {to.lower()} already"

    def one(path: Path, src: TensorSource, result: TransformResult):
        layout = file_layout(src)
        comps = set(layout.components)
        if comps == {"vae"} and (only_set is None or "vae" not in only_set) and target != "F32":
            raise MismatchError(f"this is a VAE; {to} VAEs of SD1/SDXL produce NaNs, so VAEs convert only "
                                "with --only vae", path)
        items = precision_items(src, layout, [(k, k) for k in src.keys()], target, only_set, clamp, result)
        if not skip_unchanged and is_identity(src, items):
            result.warnings.append(f"{reason}; the output is a plain copy")
        options = {"to": to.lower(), "only": sorted(only_set) if only_set else None, "clamp": clamp}
        return items, options, True

    return run_each(inputs, "precision", f"-{to.lower()}", one, out_dir=out_dir, outputs=outputs, overwrite=overwrite,
                    dry_run=dry_run, progress=progress, cache=cache, skip_unchanged=reason if skip_unchanged else None)


def parse_only(only: list[str] | None) -> set[str] | None:
    if not only:
        return None
    out = set()
    for o in only:
        for part in o.split(","):
            part = part.strip().lower()
            if part not in ONLY_CHOICES:
                raise BadChoiceError(f"--only {part!r}: use one of {', '.join(ONLY_CHOICES)}")
            out.add(part)
    return out
