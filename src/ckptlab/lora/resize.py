"""``lora resize``: change a LoRA's rank, kohya ``resize_lora.py`` semantics (lora.md §3.6, docs/lora.md).

Per module: the SVD of the *unscaled* product ``up @ down`` (exact, from the factors: ``lora.svd.product_svd``),
the new rank - fixed (``rank``) or dynamic (``sv_ratio`` / ``sv_cumulative`` / ``sv_fro``, kohya's rules incl. its
``+1``, capped by ``rank`` when both are given; a zero module gets rank 1) - then ``up = U·S``, ``down = Vh``
(no clamp) and ``α_new = (α_old / r_old) · r_new``, so α/r and the loaders' scale are preserved. A rank is never
raised above the module's own (kohya would pad with zero directions).

Modules that are not plain LoRA (CP ``lora_mid``, LyCORIS algorithms ``lora.maths.delta`` computes: LoHa, LoKr,
full) are re-factored as plain LoRA from their ΔW (scale folded in, α_new = r_new) and counted in the warnings;
DoRA and base-dependent algorithms (OFT, IA3, norm) are refused. Output: kohya naming (``combine.output_names``),
α as fp32, factors in the input's dtype unless ``dtype``; the input's metadata with ``ss_training_comment``,
``ss_network_dim`` / ``ss_network_alpha`` (``Dynamic`` only when the modules' ranks / alphas differ) updated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import UsageError
from ckptlab.formats.arrays import import_torch
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.lora import svd
from ckptlab.lora.bake import parse_dtype
from ckptlab.lora.combine import count, float_dtype, open_lora, output_names
from ckptlab.ops.stream import Out
from ckptlab.progress import Progress, null_progress

OPERATION = "lora-resize"


@dataclass
class ResizeResult:
    """What ``resize`` did (the ``--json`` record). ``modules``: ``name``, ``old_rank``, ``new_rank``, ``alpha``,
    kohya's ``sum_retained`` / ``fro_retained`` / ``max_ratio`` and ``refactored`` (the algorithm, when a
    non-plain module became plain LoRA)."""

    operation: str
    input: Path
    output: Path
    family: str | None
    dry_run: bool = False
    method: str | None = None
    value: float | None = None
    rank: int | None = None
    old_rank: int = 0
    modules: list[dict] = field(default_factory=list)
    mean_fro_retained: float | None = None
    bytes_out: int = 0
    warnings: list[str] = field(default_factory=list)


def resize(lora: Path, output: Path, *, rank: int | None = None, sv_ratio: float | None = None,
           sv_cumulative: float | None = None, sv_fro: float | None = None, dtype: str | None = None,
           overwrite: bool = False, dry_run: bool = False, progress: Progress = null_progress,
           cache: HashCache = NO_CACHE) -> ResizeResult:
    """Resize ``lora`` to a fixed (``rank``) or dynamic rank into ``output``."""
    from ckptlab.lora.write import carried_metadata, factor_items, lora_metadata, write_lora
    from ckptlab.ops.stream import check_output

    dyn = {k: v for k, v in (("sv_ratio", sv_ratio), ("sv_cumulative", sv_cumulative), ("sv_fro", sv_fro))
           if v is not None}
    if len(dyn) > 1:
        raise UsageError("give one of --sv-ratio, --sv-cumulative and --sv-fro")
    if rank is None and not dyn:
        raise UsageError("give --rank or one of --sv-ratio, --sv-cumulative, --sv-fro")
    svd.check_rank(rank)
    method, value = next(iter(dyn.items())) if dyn else (None, None)
    svd.check_dynamic(method, value)
    out_dtype = parse_dtype(dtype)
    lora, output = Path(lora), Path(output)
    check_output(output, [lora], overwrite)
    torch = import_torch("lora resize")

    lf, family = open_lora(lora)
    try:
        names = output_names(lf, family)
        result = ResizeResult(OPERATION, lora, output, family, dry_run=dry_run,
                              method=method, value=value, rank=rank)
        if lf.extras:
            result.warnings.append(f"{count(len(lf.extras), 'key')} that are no LoRA module not carried over")
        seen: dict[str, str] = {}

        def spectrum(mod):
            """``(U, S, Vh, weight shape, scale kept in α)`` of one module: the product's SVD (plain) or the ΔW's
            (re-factored, scale folded in)."""
            if svd.is_plain(mod):
                up, down, shape = svd.plain_factors(lf, mod)
                u, s, vh = svd.product_svd(up, down)
                return u, s, vh, shape, lf.scale(mod)
            d = svd.module_delta(lf, mod)
            shape = tuple(d.shape)
            u, s, vh = svd.full_svd(svd.as_matrix(d))
            return u, s, vh, shape, 1.0

        plan = []
        refactored = 0
        for mod in lf.modules.values():
            name = names[mod.name]
            if name in seen:
                from ckptlab.errors import MismatchError

                raise MismatchError(f"modules {seen[name]} and {mod.name} name the same layer", lora)
            seen[name] = mod.name
            u, s, vh, shape, scale = spectrum(mod)
            full_len = min(shape[0], math.prod(shape[1:]))
            old = lf.rank(mod) or s.numel()
            if method is None:
                k = max(1, min(rank, s.numel())) if float(s[0]) > svd.ZERO_SV else 1
            else:
                k = svd.dynamic_rank(s, method, value, rank, full_len=full_len)
            info = {"name": name, "old_rank": old, "new_rank": k, "alpha": scale * k, **svd.retained(s, k)}
            if not svd.is_plain(mod):
                info["refactored"] = mod.algo + ("+cp" if "mid" in mod.params else "")
                refactored += 1
            result.modules.append(info)
            result.old_rank = max(result.old_rank, old)
            plan.append((mod, name, shape, k, scale, out_dtype or float_dtype(lf, mod)))
        if refactored:
            result.warnings.append(f"{count(refactored, 'module')} not plain LoRA (CP / LyCORIS) re-factored "
                                   "to plain LoRA from their ΔW")
        fro = [m["fro_retained"] for m in result.modules]
        result.mean_fro_retained = sum(fro) / len(fro) if fro else None

        state: dict[str, object] = {}

        def factors(mod, shape, k, odt):
            if state.get("name") != mod.name:
                u, s, vh, _, _ = spectrum(mod)
                up, down = svd.split(u[:, :k], s[:k], vh[:k])
                tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[odt]
                up, down = svd.to_layout(up.to(tdt), down.to(tdt), shape)
                state.clear()
                state.update(name=mod.name, up=up.contiguous(), down=down.contiguous())
            return state

        items: list[Out] = []
        pairs = []
        for mod, name, shape, k, scale, odt in plan:
            alpha = scale * k
            items += factor_items(name, shape, k, odt, alpha, lambda a=(mod, shape, k, odt): factors(*a))
            pairs.append((k, alpha))

        base = carried_metadata(lf.metadata)
        comment = base.get("ss_training_comment", "")
        if method is None:
            note = f"dimension is resized from {result.old_rank} to {rank}"
        else:
            note = (f"Dynamically resized linear dims with {method}: {value:g} from {result.old_rank}"
                    f"(Dynamically resized conv dims with {method}: {value:g})")
        base["ss_training_comment"] = f"{note}; {comment}" if comment else note
        # ss_network_dim / ss_network_alpha: the common value, "Dynamic" only when the modules differ (lora_metadata)
        meta = lora_metadata(family, pairs, title=output.stem, base=base)
        options = {"rank": rank, method or "": value, "dtype": out_dtype}
        options = {k: v for k, v in options.items() if k and v is not None}
        result.bytes_out = sum(i.info.nbytes for i in items)
        if dry_run:
            return result
        write_lora(output, items, meta, operation=OPERATION, inputs=[lora], options=options, overwrite=overwrite,
                   progress=progress, cache=cache)
        return result
    finally:
        lf.close()
