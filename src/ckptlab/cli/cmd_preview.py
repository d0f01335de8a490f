"""``ckptlab preview``: a preview image per model, stored as ``<stem>.preview.png`` where A1111, ComfyUI's
managers and the others look for it, recorded in the catalog (``ckptlab.imaging.preview``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option


def preview_cmd(
    models: list[str] = typer.Argument(..., help="Model files, diffusers folders, or catalog hashes / names."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt (default: the model's trigger "
                                                                     "words the catalog knows, then a neutral "
                                                                     "landscape prompt)."),
    negative: str = typer.Option("", "--negative", "-n", help="The negative prompt."),
    seed: int = typer.Option(42, "--seed", help="Seed (-1: random; default 42, so a preview can be made again)."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the family's native size)."),
    sampler: str = typer.Option("DPM++ 2M", "--sampler", help="Sampler as A1111 names it."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Schedule type (default: automatic)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="A VAE file to decode with instead of the model's."),
    lora: Optional[list[str]] = typer.Option(None, "--lora", help="FILE[:STRENGTH], repeatable (strength 1)."),
    base: Optional[str] = typer.Option(None, "--base", help="The checkpoint a LoRA given as MODEL renders on "
                                                            "(strength 1)."),
    clip_skip: int = typer.Option(1, "--clip-skip", help="A1111's Clip skip (1: the last layer)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Compute dtype: fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on "
                                                              "CUDA/MPS)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing <stem>.preview.png (without it, a "
                                                            "model that has any preview is skipped)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per model."),
    db: Optional[Path] = db_option(),
) -> None:
    """Render a preview for each model and store it as <stem>.preview.png next to it (the name A1111, Forge,
    ComfyUI-Lora-Manager, Civitai Helper and Stability Matrix read), with A1111's infotext, recorded in the
    catalog. A model that cannot render is reported and the others go on; the exit status is then non-zero.

      ckptlab preview models/Stable-diffusion/*.safetensors --steps 20
      ckptlab preview 6ce0161689 --prompt "a corgi on a beach" --overwrite
    """
    from ckptlab.cli.common import console, emit_json, error_line, progress_bar, warning_line
    from ckptlab.imaging.preview import preview
    from ckptlab.imaging.render import Settings, parse_lora, parse_size
    from ckptlab.library.catalog import hash_cache

    width, height = parse_size(size) if size else (None, None)
    settings = Settings(prompt or "", negative, seed, steps, cfg, width, height, sampler, schedule, clip_skip)
    loras = [parse_lora(x) for x in lora or ()]
    codes: list[int] = []

    def each(r) -> None:
        if json_out:
            emit_json(r)
        else:
            for w in r.warnings:
                warning_line(w)
            if r.status == "written":
                on = f" on {r.base.name}" if r.base else ""
                console.print(f"wrote {r.preview} (seed {r.seed}, {r.family}{on}"
                              f"{', recorded' if r.recorded else ''})", highlight=False, markup=False,
                              soft_wrap=True)
            elif r.status == "skipped":
                console.print(f"skipped {r.path}", highlight=False, markup=False, soft_wrap=True)
        if r.status == "failed":
            error_line(r.error)
            codes.append(r.exit_code)

    with progress_bar("preview", unit_bytes=False, enabled=not json_out) as cb:
        preview(models, settings, db=db, base=base, vae=vae, loras=loras, device=device, dtype=dtype,
                overwrite=overwrite, cache=hash_cache(db), progress=cb, each=each)
    if codes:
        raise typer.Exit(codes[0])


def register(app) -> None:
    app.command("preview")(preview_cmd)
