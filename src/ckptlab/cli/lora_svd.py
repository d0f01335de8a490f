"""``ckptlab lora extract | resize | merge``: the SVD commands (docs/lora.md).

No logic here: each command calls one function of ``ckptlab.lora`` (``extract``, ``resize``, ``combine``) and
prints a summary line (or one JSON object with ``--json``, per-module numbers included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option, numbers

_OUT = typer.Option(..., "-o", "--output", help="Output LoRA (.safetensors).")
_DTYPE = typer.Option(None, "--precision", help="fp32, fp16 or bf16 for the factors (default: the input's).")
_DRY = typer.Option(False, "--dry-run", help="Plan and check only; write nothing.")
_JSON = typer.Option(False, "--json", help="Print the result (per-module numbers included) as one JSON object.")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace the output if it exists.")


def _cache(db: Path | None):
    from ckptlab.library.catalog import hash_cache

    return hash_cache(db)


def _err(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _summary(text: str, warnings: list[str]) -> None:
    from ckptlab.cli.common import console, warning_line

    console.print(text, highlight=False, markup=False, soft_wrap=True)
    for w in warnings:
        warning_line(w)


def extract_cmd(
    tuned: Path = typer.Argument(..., help="The fine-tuned model."),
    base: Path = typer.Argument(..., help="The model it was tuned from (same family)."),
    rank: int = typer.Option(..., "--rank", "-r", help="Rank of Linear / 1×1 modules (max rank with --sv-*)."),
    conv_rank: Optional[int] = typer.Option(None, "--conv-rank", help="Also extract resnet / sampler convs; rank of 3×3 convs."),
    sv_fro: Optional[float] = typer.Option(None, "--sv-fro", help="Dynamic rank: keep this share of the Frobenius norm, in (0, 1]."),
    sv_ratio: Optional[float] = typer.Option(None, "--sv-ratio", help="Dynamic rank: keep singular values above max(S)/F."),
    clamp_quantile: Optional[float] = typer.Option(None, "--clamp-quantile", help="kohya's clamp of the factors to ±quantile Q (off by default)."),
    min_diff: float = typer.Option(0.01, "--min-diff", help="Skip the text encoders when no TE weight changed by more than this."),
    output: Path = _OUT, dtype: Optional[str] = _DTYPE, dry_run: bool = _DRY, json_out: bool = _JSON,
    overwrite: bool = _OVERWRITE, db: Optional[Path] = db_option(),
) -> None:
    """Extract a LoRA (kohya naming, α = rank) from a fine-tune and its base, one module at a time.

      ckptlab lora extract tuned.safetensors base.safetensors --rank 32 -o tuned-lora32.safetensors
    """
    from ckptlab.cli.common import emit_json, progress_bar
    from ckptlab.lora.combine import count
    from ckptlab.lora.extract import extract

    with progress_bar("extract", enabled=not json_out) as cb:
        r = extract(tuned, base, output, rank=rank, conv_rank=conv_rank, sv_fro=sv_fro, sv_ratio=sv_ratio,
                    clamp_quantile=clamp_quantile, min_diff=min_diff, dtype=dtype, overwrite=overwrite,
                    dry_run=dry_run, progress=cb, cache=_cache(db))
    if json_out:
        emit_json(r)
        return
    verb = "would write" if r.dry_run else "wrote"
    ranks = sorted({m["rank"] for m in r.modules}) if r.modules else []
    rank_txt = f"rank {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0] if ranks else rank}"
    _summary(f"{tuned} - {base} -> {verb} {output}: {count(r.planned, 'module')}, {rank_txt}, "
             f"relative error {_err(r.total_rel_error)}", r.warnings)


def resize_cmd(
    lora: Path = typer.Argument(..., help="The LoRA to resize."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="New rank (the cap with a dynamic method)."),
    sv_ratio: Optional[float] = typer.Option(None, "--sv-ratio", help="Dynamic: keep singular values above max(S)/F (kohya)."),
    sv_cumulative: Optional[float] = typer.Option(None, "--sv-cumulative", help="Dynamic: keep this share of ΣS, in (0, 1] (kohya)."),
    sv_fro: Optional[float] = typer.Option(None, "--sv-fro", help="Dynamic: keep this share of the Frobenius norm, in (0, 1] (kohya)."),
    output: Path = _OUT, dtype: Optional[str] = _DTYPE, dry_run: bool = _DRY, json_out: bool = _JSON,
    overwrite: bool = _OVERWRITE, db: Optional[Path] = db_option(),
) -> None:
    """Change a LoRA's rank (kohya resize_lora semantics: α/r preserved, no clamp).

      ckptlab lora resize big.safetensors --rank 16 -o small.safetensors
      ckptlab lora resize big.safetensors --sv-fro 0.9 --rank 64 -o dynamic.safetensors
    """
    from ckptlab.cli.common import emit_json, progress_bar
    from ckptlab.lora.combine import count
    from ckptlab.lora.resize import resize

    with progress_bar("resize", enabled=not json_out) as cb:
        r = resize(lora, output, rank=rank, sv_ratio=sv_ratio, sv_cumulative=sv_cumulative, sv_fro=sv_fro,
                   dtype=dtype, overwrite=overwrite, dry_run=dry_run, progress=cb, cache=_cache(db))
    if json_out:
        emit_json(r)
        return
    verb = "would write" if r.dry_run else "wrote"
    ranks = sorted({m["new_rank"] for m in r.modules})
    rank_txt = f"rank {ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else f"rank {ranks[0]}"
    _summary(f"{lora} -> {verb} {output}: {count(len(r.modules), 'module')}, rank {r.old_rank} -> {rank_txt[5:]}, "
             f"mean Frobenius norm retained {_err(r.mean_fro_retained)}", r.warnings)


def merge_cmd(
    loras: list[Path] = typer.Argument(..., help="LoRAs of one model family."),
    strength: Optional[list[str]] = typer.Option(None, "--strength", "-s", help="One per LoRA, or one for all (repeat, or comma-separated; negative allowed; default 1)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Re-factor the exact sum by SVD at this rank (default: exact concatenation)."),
    output: Path = _OUT, dtype: Optional[str] = _DTYPE, dry_run: bool = _DRY, json_out: bool = _JSON,
    overwrite: bool = _OVERWRITE, db: Optional[Path] = db_option(),
) -> None:
    """Merge LoRAs into one that loads as the weighted sum of their ΔW (exact unless --rank).

      ckptlab lora merge style.safetensors detail.safetensors --strength 0.8 --strength -0.3 -o mix.safetensors
    """
    from ckptlab.cli.common import emit_json, progress_bar
    from ckptlab.lora.combine import count, merge

    with progress_bar("merge", enabled=not json_out) as cb:
        r = merge(loras, output, strengths=numbers(strength, "--strength"), rank=rank, dtype=dtype,
                  overwrite=overwrite,
                  dry_run=dry_run, progress=cb, cache=_cache(db))
    if json_out:
        emit_json(r)
        return
    verb = "would write" if r.dry_run else "wrote"
    how = "exact" if rank is None else f"rank {rank}"
    _summary(f"{count(len(loras), 'LoRA')} -> {verb} {output}: {count(r.planned, 'module')} ({how}), relative "
             f"error {_err(r.total_rel_error)}", r.warnings)


def register(group) -> None:
    group.command("extract")(extract_cmd)
    group.command("resize")(resize_cmd)
    group.command("merge")(merge_cmd)
