"""``ckptlab grid``: A1111's X/Y/Z plot over models, merge ratios, LoRA strengths, seeds and settings
(``ckptlab.imaging.grid``). Takes every option of ``generate`` (``cli.gen_options``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.gen_options import compute_dtype, settings_from, with_generate_options

AXIS_HELP = ("AXIS=V1,V2,... (CSV, quotes allowed; ranges 1-5, 1-5 (+2), 10-5 (-3), 1-10 [5]). Axes: model, "
             "merge:PARAM (or the bare PARAM of --merge's recipe, e.g. alpha), lora, lora:NAME, seed, steps, cfg, "
             "sampler, schedule, vae, clip-skip, size, prompt (search/replace).")


def _own(
    model: Optional[str] = typer.Argument(None, help="The model of every cell (a file or a catalog hash), "
                                                     "unless an axis is model or --merge is given."),
    x: str = typer.Option(..., "--x", help="The columns: " + AXIS_HELP),
    y: Optional[str] = typer.Option(None, "--y", help="The rows (same syntax as --x)."),
    z: Optional[str] = typer.Option(None, "--z", help="One sub-grid per value (same syntax as --x)."),
    merge: Optional[Path] = typer.Option(None, "--merge", help="A merge recipe (.toml) or a model made by ckptlab "
                                                               "merge (its embedded recipe), computed in memory for "
                                                               "every cell, never written; sweep a parameter with "
                                                               "--x alpha=0,0.5,1."),
    cells: Optional[Path] = typer.Option(None, "--cells", help="Also save each cell to this folder, with its own "
                                                               "infotext (cell-x00-y00.png...)."),
    seed: int = typer.Option(-1, "--seed", help="The seed of every cell unless seed is an axis (-1: one random seed "
                                                "for the whole grid)."),
    no_legend: bool = typer.Option(False, "--no-legend", help="No line of shared settings under the grid."),
    output: Path = typer.Option(..., "-o", "--output", help="The grid image (.png, .jpg, .webp); re-saved after "
                                                            "every row."),
) -> None:
    """(the parameters of grid that generate does not have)"""


def grid_cmd(**kw) -> None:
    """Render an X/Y/Z comparison grid, offline: the same prompt and seed across models, merge ratios, LoRA
    strengths, seeds and settings; every cell keeps A1111's infotext.

      ckptlab grid model.safetensors -p "a lighthouse" --seed 42 --x cfg=4,7,10 --y 'steps=10-30 [3]' -o g.png

      ckptlab grid --merge recipe.toml -p "a lighthouse" --x alpha=0,0.25,0.5,0.75,1 -o merge-grid.png
    """
    from ckptlab.cli.cmd_generate import read_prompt
    from ckptlab.cli.common import console, emit_json, progress_bar, warning_line
    from ckptlab.errors import UsageError
    from ckptlab.imaging.grid import grid
    from ckptlab.imaging.grid_axes import parse_axis
    from ckptlab.library.catalog import hash_cache

    settings, loras = settings_from(kw, read_prompt(kw["prompt"], kw["prompt_file"]))
    params: tuple[str, ...] = ()
    if kw["merge"] is not None:
        from ckptlab.imaging.grid_merge import load_recipe, swept_params

        params = tuple(swept_params(load_recipe(kw["merge"])))
    axes = []
    for flag in ("x", "y", "z"):
        axes.append(parse_axis(kw[flag], f"--{flag}", merge_params=params) if kw[flag] is not None else None)
    if axes[2] is not None and axes[1] is None:
        raise UsageError("--z needs --y (and --x)")
    db = kw["db"]
    with progress_bar("grid", unit_bytes=False, enabled=not kw["json_out"]) as cb:
        r = grid(kw["model"], kw["output"], settings, axes, merge=kw["merge"], vae=kw["vae"], loras=loras,
                 refiner=kw["refiner"], device=kw["device"], dtype=compute_dtype(kw), cells_dir=kw["cells"],
                 overwrite=kw["overwrite"], legend=not kw["no_legend"], db=db, cache=hash_cache(db), progress=cb)
    if kw["json_out"]:
        emit_json(r)
        return
    for w in r.warnings:
        warning_line(w)
    nx, ny, nz = r.shape
    console.print(f"wrote {r.output} ({nx}x{ny}{f'x{nz}' if nz > 1 else ''} cells, {r.size[0]}x{r.size[1]} px, "
                  f"{r.loads} model load{'s' if r.loads != 1 else ''})", highlight=False, markup=False, soft_wrap=True)
    if r.cells:
        console.print(f"cells in {r.cells[0].parent} ({len(r.cells)} images)", highlight=False, markup=False,
                      soft_wrap=True)


with_generate_options(grid_cmd, _own, after=("output", "overwrite", "json_out", "db"))


def register(app) -> None:
    app.command("grid")(grid_cmd)
