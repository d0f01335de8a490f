"""``ckptlab lora bake``: LoRAs baked into a model (``ckptlab.lora.bake``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option, numbers


def bake_cmd(
    base: Path = typer.Argument(..., help="The model: a single-file checkpoint, or a standalone UNet / text "
                                          "encoder file."),
    loras: list[Path] = typer.Argument(..., help="LoRA / LyCORIS files, baked in this order."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (.safetensors)."),
    strength: Optional[list[str]] = typer.Option(None, "--strength", "-s", help="Strength per LoRA, in order "
                                                 "(repeat, or comma-separate); one value applies to all. "
                                                 "Default 1.0."),
    te_strength: Optional[list[str]] = typer.Option(None, "--te-strength", help="Text-encoder strength per "
                                                    "LoRA, likewise (default: the strength)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp16, bf16 or fp32 for the output's "
                                                                      "weights (default: the base's dtype)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and check only; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    db: Optional[Path] = db_option(),
) -> None:
    """Bake LoRAs into a model, streaming weight by weight.

      ckptlab lora bake model.safetensors style.safetensors detail.safetensors -s 0.8 -s 0.5 -o baked.safetensors
    """
    from ckptlab.cli.common import console, emit_json, progress_bar, warning_line
    from ckptlab.display import human_size
    from ckptlab.library.catalog import hash_cache
    from ckptlab.lora.bake import bake

    with progress_bar("bake", enabled=not json_out) as cb:
        r = bake(base, list(loras), output, strengths=numbers(strength, "--strength"),
                 te_strengths=numbers(te_strength, "--te-strength"), dtype=precision, overwrite=overwrite,
                 dry_run=dry_run, progress=cb, cache=hash_cache(db))
    if json_out:
        emit_json(r)
        return
    for w in r.warnings:
        warning_line(w)
    verb = "would write" if r.dry_run else "wrote"
    parts = ", ".join(f"{lr.path.name} ×{lr.strength:g}" + (f" (te ×{lr.te_strength:g})"
                                                            if lr.te_strength != lr.strength else "")
                      + f": {lr.matched}/{lr.modules} modules" for lr in r.loras)
    console.print(f"{verb} {r.output} ({human_size(r.bytes_out)}, {r.changed} weights changed; {parts})",
                  highlight=False, markup=False, soft_wrap=True)


def register(group) -> None:
    group.command("bake")(bake_cmd)
