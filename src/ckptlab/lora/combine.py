"""``lora merge``: several LoRAs into one, exactly (docs/lora.md).

Default (exact): per module, the inputs' ranks are concatenated with each input's ``strength · α/r`` folded into
its ``up`` rows (adapters.md §1.3 last bullet)::

    up   = [up_1 · (m_1·α_1/r_1) | up_2 · (m_2·α_2/r_2) | …]     [out, Σr]
    down = [down_1; down_2; …]                                  [Σr, in(, kh, kw)]
    α    = Σr  (scale 1)

so every loader computes ``up @ down = Σ m_i·(α_i/r_i)·up_i@down_i``: the sum of the inputs' ΔW, negative
strengths included (kohya's ``merge_lora.py`` gives ``m·|m|`` and, with ``--concat``, half the sum; we copy
neither). Modules present in only some inputs get only those inputs' terms. Modules that are not plain LoRA
(CP ``lora_mid``, LyCORIS algorithms ``lora.maths.delta`` computes) are summed as ΔW and re-factored by a full SVD
at their numerical rank (exact to fp32), and reported as such. ``rank``: the exact sum is re-factored by SVD
and truncated (kohya split, α = rank); the error is the discarded singular values (Eckart–Young). DoRA and
base-dependent algorithms (OFT, IA3, norm) are refused. LoRAs of different families are refused.

Output names: kohya naming through the family's reference alias table (``naming.reference_targets``), so
inputs in kohya, PEFT or diffusers naming meet; a module the table does not know keeps its own name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.arrays import import_torch
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.lora import svd
from ckptlab.lora.file import LoraFile, LoraModule
from ckptlab.ops.stream import Out
from ckptlab.progress import Progress, null_progress

OPERATION = "lora-merge"
_LORA_KINDS = ("lora", "lycoris")


def open_lora(path: Path) -> tuple[LoraFile, str | None]:
    """A LoRA file (hostile pickles refused) and its family; a full model is refused."""
    from ckptlab.arch.identify import identify
    from ckptlab.ops.run import open_checked

    src = open_checked(Path(path))
    try:
        info = identify(src)
        if info.kind not in _LORA_KINDS:
            raise MismatchError(f"not a LoRA (this file is a {info.kind})", path)
        return LoraFile(src), info.family
    except BaseException:
        src.close()
        raise


def output_names(lora: LoraFile, family: str | None) -> dict[str, str]:
    """module name in the file -> kohya module name, through the family's reference table where it knows the
    module (the file's own name otherwise). With no family (a PEFT / diffusers LoRA says nothing about SD1 vs SD2)
    the reference table that resolves the most module names is used: kohya's module names do not depend on
    which of those families it is."""
    from ckptlab.lora.naming import REFERENCE_SPECS, reference_targets

    fams = [family] if family in REFERENCE_SPECS else [] if family is not None else list(REFERENCE_SPECS)
    best: dict[str, str] = {name: name for name in lora.modules}
    best_hits = 0
    for fam in fams:
        table = reference_targets(fam)
        out, hits = {}, 0
        for name in lora.modules:
            t = table.lookup(name)
            kn = t.name("kohya") if t is not None else None
            hits += kn is not None
            out[name] = kn or name
        if hits > best_hits:
            best, best_hits = out, hits
    return best


def count(n: int, what: str) -> str:
    """``1 module`` / ``2 modules``."""
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def float_dtype(lora: LoraFile, mod: LoraModule) -> str:
    role = "up" if "up" in mod.params else next(iter(r for r in mod.params if r != "alpha"))
    dt = lora.info(mod, role).dtype
    return dt if dt in ("F32", "F16", "BF16") else "F32"


@dataclass
class LoraMergeResult:
    """What ``merge`` did (the ``--json`` record). ``modules``: ``name``, ``inputs`` (how many inputs have it),
    ``rank``, ``how`` (``concat`` exact, ``svd-exact`` re-factored at numerical rank, ``svd`` truncated to
    ``--rank``) and ``rel_error`` (‖ΣΔW − ΔŴ‖_F / ‖ΣΔW‖_F with the factors as stored)."""

    operation: str
    inputs: list[Path]
    strengths: list[float]
    output: Path
    family: str | None
    dry_run: bool = False
    rank: int | None = None
    modules: list[dict] = field(default_factory=list)
    total_rel_error: float | None = None
    planned: int = 0
    bytes_out: int = 0
    warnings: list[str] = field(default_factory=list)


def merge(loras: list[Path], output: Path, *, strengths: list[float] | None = None, rank: int | None = None,
          dtype: str | None = None, overwrite: bool = False, dry_run: bool = False,
          progress: Progress = null_progress, cache: HashCache = NO_CACHE) -> LoraMergeResult:
    """Merge ``loras`` (weighted by ``strengths``: one per LoRA, or one for all; default 1) into one LoRA at
    ``output``."""
    from ckptlab.lora.write import factor_items, lora_metadata, write_lora
    from ckptlab.ops.stream import check_output

    loras = [Path(p) for p in loras]
    if not loras:
        raise UsageError("give at least one LoRA to merge")
    strengths = [1.0] * len(loras) if not strengths else [float(s) for s in strengths]
    if not all(math.isfinite(s) for s in strengths):
        raise UsageError("strengths must be finite numbers")
    if len(strengths) == 1:
        strengths = strengths * len(loras)
    if len(strengths) != len(loras):
        raise UsageError(f"{count(len(strengths), 'strength')} for {count(len(loras), 'LoRA')}: give one "
                         "strength per LoRA, or one for all")
    svd.check_rank(rank)
    from ckptlab.lora.bake import parse_dtype

    out_dtype = parse_dtype(dtype)
    output = Path(output)
    check_output(output, loras, overwrite)
    torch = import_torch("lora merge")

    opened: list[tuple[LoraFile, str | None]] = []
    try:
        for p in loras:
            opened.append(open_lora(p))
        fams = {f for _, f in opened if f is not None}
        if len(fams) > 1:
            from ckptlab.arch.families import display_name

            raise MismatchError("the LoRAs are for different model families: " + ", ".join(
                f"{p.name} {display_name(f) if f else 'not recognised'}"
                for p, (_, f) in zip(loras, opened, strict=True)))
        family = next(iter(fams)) if fams else None
        unknown = [p.name for p, (_, f) in zip(loras, opened, strict=True) if f is None]
        # module (output name) -> [(lora, module, factor m_i)]
        groups: dict[str, list[tuple[LoraFile, LoraModule, float]]] = {}
        for (lf, _), m in zip(opened, strengths, strict=True):
            names = output_names(lf, family)
            seen: set[str] = set()
            for mod in lf.modules.values():
                name = names[mod.name]
                if name in seen:
                    raise MismatchError(f"two modules of the file name the same layer ({name})", lf.path)
                seen.add(name)
                groups.setdefault(name, []).append((lf, mod, m))
        result = LoraMergeResult(OPERATION, loras, strengths, output, family, dry_run=dry_run,
                             rank=rank)
        if unknown:
            result.warnings.append(f"model family of {', '.join(unknown)} not recognised (not checked against "
                                   "the others)")
        for lf, _ in opened:
            if lf.extras:
                result.warnings.append(f"{lf.path.name}: {count(len(lf.extras), 'key')} that are no LoRA module not "
                                       "carried over")

        def weight_shape(name, contribs) -> tuple[int, ...]:
            shapes = set()
            for lf, mod, _ in contribs:
                if svd.is_plain(mod):  # from the header: (out, in[, kh, kw])
                    shapes.add((lf.info(mod, "up").shape[0], *lf.info(mod, "down").shape[1:]))
                else:
                    shapes.add(tuple(svd.module_delta(lf, mod).shape))
            flat = {(s[0], math.prod(s[1:])) for s in shapes}
            if len(flat) > 1:
                raise MismatchError(f"{name}: the inputs adapt it with different shapes "
                                    f"({', '.join(str(list(s)) for s in sorted(shapes))})")
            return max(shapes, key=len)  # a 4-D layout (conv) wins over the same weight's 2-D one

        def total_delta(contribs, shape, dt=None):
            """Σ m_i·ΔW_i as ``[out, in·kh·kw]`` (fp32; ``dt`` float64 for the error report)."""
            acc = None
            for lf, mod, m in contribs:
                if svd.is_plain(mod):
                    up, down, _ = svd.plain_factors(lf, mod)
                    if dt is not None:
                        up, down = up.to(dt), down.to(dt)
                    d = (up @ down) * (m * lf.scale(mod))
                else:
                    d = svd.module_delta(lf, mod).reshape(shape[0], -1) * m
                    d = d.to(dt) if dt is not None else d
                acc = d if acc is None else acc + d
            return acc

        plan: list[tuple[str, list, tuple[int, ...], str, int, str]] = []
        for name, contribs in groups.items():
            shape = weight_shape(name, contribs)
            plain = all(svd.is_plain(mod) for _, mod, _ in contribs)
            m_, n_ = shape[0], math.prod(shape[1:])
            if plain:
                r_sum = sum(lf.rank(mod) or 0 for lf, mod, _ in contribs)
                if rank is None:
                    how, k = "concat", r_sum
                else:
                    how, k = "svd", min(rank, r_sum, m_, n_)
            elif rank is not None:
                how, k = "svd", min(rank, m_, n_)
            else:
                s = svd.svdvals(total_delta(contribs, shape))
                how, k = "svd-exact", svd.numerical_rank(s, (m_, n_))
            odt = out_dtype or float_dtype(contribs[0][0], contribs[0][1])
            plan.append((name, contribs, shape, how, k, odt))
        n = sum(1 for p in plan if p[3] == "svd-exact")
        if n:
            result.warnings.append(f"{count(n, 'module')} not plain LoRA (CP / LyCORIS): summed as ΔW and re-factored "
                                   "to plain LoRA by SVD at their numerical rank")

        errors = svd.Errors()
        state: dict[str, object] = {}

        def factors(name, contribs, shape, how, k, odt):
            if state.get("name") == name:
                return state
            tdt = torch.float32 if odt == "F32" else {"F16": torch.float16, "BF16": torch.bfloat16}[odt]
            if how == "concat":
                ups, downs = [], []
                for lf, mod, m in contribs:
                    up, down, _ = svd.plain_factors(lf, mod)
                    ups.append(up * (m * lf.scale(mod)))
                    downs.append(down)
                up, down = torch.cat(ups, 1), torch.cat(downs, 0)
            elif how == "svd" and all(svd.is_plain(mod) for _, mod, _ in contribs):
                ups, downs = [], []
                for lf, mod, m in contribs:
                    u_, d_, _ = svd.plain_factors(lf, mod)
                    ups.append(u_ * (m * lf.scale(mod)))
                    downs.append(d_)
                u, s, vh = svd.product_svd(torch.cat(ups, 1), torch.cat(downs, 0))
                up, down = svd.split(u[:, :k], s[:k], vh[:k])
            else:
                u, s, vh, _ = svd.top_svd(total_delta(contribs, shape), k, method="full")
                up, down = svd.split(u, s, vh)
            up_c, down_c = up.to(tdt).contiguous(), down.to(tdt).contiguous()
            err = errors.add(total_delta(contribs, shape, torch.float64),
                             up_c.to(torch.float64) @ down_c.to(torch.float64))
            up_c, down_c = svd.to_layout(up_c, down_c, shape)
            result.modules.append({"name": name, "inputs": len(contribs), "rank": k, "how": how,
                                   "rel_error": err})
            state.clear()
            state.update(name=name, up=up_c.contiguous(), down=down_c.contiguous())
            return state

        items: list[Out] = []
        pairs = []
        for name, contribs, shape, how, k, odt in plan:
            args = (name, contribs, shape, how, k, odt)
            items += factor_items(name, shape, k, odt, float(k), lambda a=args: factors(*a))
            pairs.append((k, float(k)))
        meta = lora_metadata(family, pairs, title=output.stem)
        meta["modelspec.merged_from"] = ", ".join(p.stem for p in loras)
        options = {"strengths": strengths, "rank": rank, "dtype": out_dtype}
        options = {k: v for k, v in options.items() if v is not None}
        result.bytes_out = sum(i.info.nbytes for i in items)
        result.planned = len(items) // 3
        if dry_run:
            return result
        write_lora(output, items, meta, operation=OPERATION, inputs=loras, options=options, overwrite=overwrite,
                   progress=progress, cache=cache)
        result.total_rel_error = errors.total
        return result
    finally:
        for lf, _ in opened:
            lf.close()
