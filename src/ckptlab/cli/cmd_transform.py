"""Transform commands: prune, precision, extract, replace, to-diffusers, from-diffusers, apply-plan.

No logic here: each command calls one function of ``ckptlab.ops`` and prints its results (a line per
output, or JSON Lines with ``--json``). Heavy imports happen inside the command functions.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import DB_HELP, db_option
from ckptlab.display import human_size

_OUT_DIR = typer.Option(None, "--out-dir", help="Folder for the outputs (default: next to each input).")
_DRY = typer.Option(False, "--dry-run", help="Plan and check only; write nothing.")
_JSON = typer.Option(False, "--json", help="Print one JSON object per output (JSON Lines).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace outputs that already exist.")
_DB = db_option()


class PruneEma(str, Enum):
    """``prune --ema`` (``ops.prune.EMA_CHOICES``): an unknown value is a usage error (exit 2)."""

    keep = "keep"
    drop = "drop"
    use = "use"


class DiffusersEma(str, Enum):
    """``to-diffusers --ema`` (``ops.diffusers_io.TO_DIFFUSERS_EMA``)."""

    drop = "drop"
    use = "use"


def _cache(db: Path | None):
    """The hash cache ``--db`` names (inputs' sha256s the catalog already holds are not computed again)."""
    from ckptlab.library.catalog import hash_cache

    return hash_cache(db)


def _paths(args: list[str]) -> list[Path]:
    from ckptlab.cli.common import expand_inputs

    return expand_inputs(args)


def _diffusers_folders(args: list[str]) -> list[Path]:
    """from-diffusers inputs: each argument (globs expanded) is a diffusers folder, or a folder whose
    sub-folders hold diffusers pipelines; anything else is a one-line error naming the argument."""
    import glob

    from ckptlab.errors import FormatError

    out: list[Path] = []
    for arg in args:
        matches = sorted(glob.glob(arg, recursive=True)) if glob.has_magic(arg) else [arg]
        for m in matches or [arg]:
            p = Path(m)
            if not p.exists():
                raise FormatError("no such folder", p)
            if not p.is_dir():
                raise FormatError("not a diffusers pipeline folder (a file; from-diffusers reads folders with "
                                  "a model_index.json)", p)
            if (p / "model_index.json").is_file():
                out.append(p)
                continue
            found = sorted(x.parent for x in p.glob("*/model_index.json"))
            if not found:
                raise FormatError("not a diffusers pipeline folder (no model_index.json here or in its "
                                  "sub-folders)", p)
            out.extend(found)
    return out


def _report(results, json_out: bool) -> None:
    from ckptlab.cli.common import console, emit_json, err_console

    for r in results:
        if json_out:
            emit_json(r)
            continue
        if getattr(r, "unchanged", None):
            hint = ("; `ckptlab convert` makes a .safetensors copy of a pickle"
                    if Path(r.input).suffix.lower() != ".safetensors" else "")
            console.print(f"{r.input}: {r.unchanged}; nothing written{hint}", highlight=False, markup=False,
                          soft_wrap=True)
            continue
        verb = "would write" if r.dry_run else "wrote"
        size = human_size(getattr(r, "bytes_out", 0))
        if hasattr(r, "tensors_out"):
            extra = []
            if r.dropped:
                extra.append("dropped " + ", ".join(f"{v} {k}" for k, v in r.dropped.items()))
            if r.converted:
                extra.append(f"{r.converted} tensors changed")
            tail = f" ({'; '.join(extra)})" if extra else ""
            console.print(f"{r.input} -> {verb} {r.output}: {r.tensors_out} tensors, {size}{tail}",
                          highlight=False, markup=False, soft_wrap=True)
        else:
            files = ", ".join(f"{k} ({v})" for k, v in r.files.items())
            console.print(f"{r.input} -> {verb} {r.output} [{r.family}]: {files}", highlight=False, markup=False, soft_wrap=True)
        for w in r.warnings:
            err_console.print(f"ckptlab: warning: {Path(r.input).name}: {w}", highlight=False, markup=False, soft_wrap=True)


def prune_cmd(
    inputs: list[str] = typer.Argument(..., help="Model files or folders."),
    ema: PruneEma = typer.Option(PruneEma.drop, "--ema", help="EMA weights: keep, drop, or use (replace the UNet = emaonly)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Also convert: fp16, bf16, fp32 or fp8_e4m3fn."),
    clamp: bool = typer.Option(False, "--clamp", help="Clamp values that overflow fp16 instead of refusing."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Drop training state and EMA (or keep / use EMA), optionally changing precision.

      ckptlab prune model.ckpt --ema use --precision fp16 --out-dir pruned/
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.prune import prune

    with progress_bar("prune", enabled=not json_out) as cb:
        results = prune(_paths(inputs), ema=ema.value, precision=precision, clamp=clamp, out_dir=out_dir,
                        overwrite=overwrite, dry_run=dry_run, progress=cb, cache=_cache(db), skip_unchanged=True)
    _report(results, json_out)


def precision_cmd(
    inputs: list[str] = typer.Argument(..., help="Model files or folders."),
    to: str = typer.Option(..., "--to", help="fp16, bf16, fp32 or fp8_e4m3fn."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Convert only unet, vae or te (repeatable)."),
    clamp: bool = typer.Option(False, "--clamp", help="Clamp values that overflow the target instead of refusing."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Convert weights exactly (tensor.to(dtype)); the VAE stays fp32 unless --only vae.

      ckptlab precision model.safetensors --to fp16
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.precision import convert_precision

    with progress_bar("precision", enabled=not json_out) as cb:
        results = convert_precision(_paths(inputs), to, only=only, clamp=clamp, out_dir=out_dir,
                                    overwrite=overwrite, dry_run=dry_run, progress=cb, cache=_cache(db), skip_unchanged=True)
    _report(results, json_out)


def extract_cmd(
    inputs: list[str] = typer.Argument(..., help="Checkpoint file(s)."),
    component: str = typer.Option(..., "--component", "-c", help="unet, vae, clip_l, clip_g, openclip_h, t5xxl or ema."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file (one input)."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Write one component as a standalone file, named as the field names such files.

      ckptlab extract model.safetensors --component vae -o model-vae.safetensors
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.components import extract

    with progress_bar("extract", enabled=not json_out) as cb:
        results = extract(_paths(inputs), component, out=output, out_dir=out_dir, overwrite=overwrite,
                          dry_run=dry_run, progress=cb, cache=_cache(db))
    _report(results, json_out)


def replace_cmd(
    inputs: list[str] = typer.Argument(..., help="Checkpoint file(s)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE to bake in."),
    clip_l: Optional[Path] = typer.Option(None, "--clip-l", help="CLIP-L text encoder to bake in."),
    clip_g: Optional[Path] = typer.Option(None, "--clip-g", help="CLIP-G text encoder to bake in."),
    unet: Optional[Path] = typer.Option(None, "--unet", help="UNet to bake in."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output file (one input)."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Bake components into a checkpoint, checking family and every shape first.

      ckptlab replace model.safetensors --vae vae-ft-mse-840000.safetensors -o model-baked.safetensors
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.components import replace

    with progress_bar("replace", enabled=not json_out) as cb:
        results = replace(_paths(inputs), vae=vae, clip_l=clip_l, clip_g=clip_g, unet=unet, out=output,
                          out_dir=out_dir, overwrite=overwrite, dry_run=dry_run, progress=cb, cache=_cache(db))
    _report(results, json_out)


def to_diffusers_cmd(
    inputs: list[str] = typer.Argument(..., help="SD1/SD2/SDXL single-file checkpoint(s)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (one input)."),
    ema: DiffusersEma = typer.Option(DiffusersEma.drop, "--ema", help="drop (default) or use the EMA weights for the UNet."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Cast UNet and text encoders: fp16, bf16, fp32."),
    clamp: bool = typer.Option(False, "--clamp", help="Clamp values that overflow fp16 instead of refusing."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Write a diffusers folder that StableDiffusion(XL)Pipeline.from_pretrained loads offline.

      ckptlab to-diffusers model.safetensors -o model-diffusers/
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.diffusers_io import to_diffusers_each

    paths = _paths(inputs)
    with progress_bar("to-diffusers", enabled=not json_out) as cb:
        results = to_diffusers_each(paths, output=output, out_dir=out_dir, ema=ema.value, precision=precision,
                                    clamp=clamp, overwrite=overwrite, dry_run=dry_run, progress=cb, cache=_cache(db))
    _report(results, json_out)


def from_diffusers_cmd(
    inputs: list[str] = typer.Argument(..., help="diffusers pipeline folder(s)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .safetensors (one input)."),
    out_dir: Optional[Path] = _OUT_DIR, dry_run: bool = _DRY, json_out: bool = _JSON, overwrite: bool = _OVERWRITE,
    db: Optional[Path] = _DB,
) -> None:
    """Write a single-file checkpoint (A1111/ComfyUI layout) from a diffusers folder.

      ckptlab from-diffusers model-diffusers/ -o model.safetensors
    """
    from ckptlab.cli.common import progress_bar
    from ckptlab.ops.diffusers_io import from_diffusers_each

    paths = _diffusers_folders(inputs)
    with progress_bar("from-diffusers", enabled=not json_out) as cb:
        results = from_diffusers_each(paths, output=output, out_dir=out_dir, overwrite=overwrite, dry_run=dry_run,
                                      progress=cb, cache=_cache(db))
    _report(results, json_out)


def apply_plan_cmd(
    plan: Path = typer.Argument(..., help="A plan written by `ckptlab plan-space -o PLAN`."),
    db: Optional[Path] = typer.Option(None, "--db", "--catalog", help=DB_HELP),
    no_rescan: bool = typer.Option(False, "--no-rescan", help="Do not rescan the touched folders afterwards."),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Run every check (kept copies re-verified) and print what each step would "
                                      "do and free; change nothing."),
    json_out: bool = _JSON,
) -> None:
    """Carry out a reviewed plan-space plan step by step: each kept copy is re-verified before anything is
    removed or linked; a step that was already done is skipped, so a plan can be re-run after a crash.
    The catalog updated is --db, else the one the plan was made from.

      ckptlab plan-space -o plan.json && ckptlab apply-plan plan.json --dry-run && ckptlab apply-plan plan.json
    """
    from ckptlab.cli.common import console, emit_json, progress_bar
    from ckptlab.display import printable
    from ckptlab.errors import CkptlabError
    from ckptlab.library.apply_plan import apply_plan

    with progress_bar("apply-plan", unit_bytes=False, enabled=not json_out) as cb:
        results = apply_plan(plan, catalog_path=db, dry_run=dry_run, rescan=not no_rescan, progress=cb)
    planned = sum(r.bytes_planned for r in results if r.status in ("done", "would-do"))
    freed = sum(r.bytes_freed for r in results if r.status in ("done", "would-do"))
    for r in results:
        if json_out:
            emit_json(r)
            continue
        sizes = (f" [planned {human_size(r.bytes_planned)}, {'would free' if dry_run else 'freed'} "
                 f"{human_size(r.bytes_freed)}]" if r.status in ("done", "would-do") else "")
        why = f": {printable(r.message)}" if r.message else ""
        console.print(f"{r.status:11} {r.action:22} {printable(str(r.path))}{why}{sizes}", highlight=False,
                      markup=False, soft_wrap=True)
    if not json_out:
        verb = "would free" if dry_run else "freed"
        console.print(f"{verb} {human_size(freed)} of {human_size(planned)} planned "
                      f"({sum(r.status in ('done', 'would-do') for r in results)} step(s); "
                      f"{sum(r.status == 'done-before' for r in results)} already done)",
                      highlight=False, markup=False)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise CkptlabError(f"{len(failed)} of {len(results)} step(s) failed (first: {failed[0].path.name}: "
                           f"{failed[0].message})")


def register(app) -> None:
    app.command("prune")(prune_cmd)
    app.command("precision")(precision_cmd)
    app.command("extract")(extract_cmd)
    app.command("replace")(replace_cmd)
    app.command("to-diffusers")(to_diffusers_cmd)
    app.command("from-diffusers")(from_diffusers_cmd)
    app.command("apply-plan")(apply_plan_cmd)
