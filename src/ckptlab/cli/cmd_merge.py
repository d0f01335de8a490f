"""``ckptlab merge``: one merge step from the command line, or a chain from a TOML recipe.

No logic here: arguments become a ``Recipe`` and ``ckptlab.merging.run_recipe`` does the work. Heavy
imports (torch) happen inside the command function only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ckptlab.cli.common import db_option

_HELP = """Merge models, streaming one tensor at a time.

Examples:
  ckptlab merge weighted_sum A.safetensors B.safetensors --alpha 0.3 -o out.safetensors
  ckptlab merge add_difference A B C --alpha 1 -o out.safetensors
  ckptlab merge weighted_sum A B --alpha GRAD_V -o out.safetensors        (block-weight preset)
  ckptlab merge weighted_sum A B --alpha "IN=0.2,M00=0.5,OUT=0.8" -o out  (per block)
  ckptlab merge --recipe chain.toml -o out.safetensors
  ckptlab merge --recipe merged.safetensors -o again.safetensors  (re-make a merge from its metadata)

Methods: weighted_sum, add_difference, triple_sum, sum_twice, slerp, train_difference, ties, dare,
add_cosine, subtract, extract (see --list-methods)."""


def merge_cmd(
    method: Optional[str] = typer.Argument(None, help="Merge method (see --list-methods)."),
    models: Optional[list[Path]] = typer.Argument(None, help="Models A B [C ...]; A decides layout and dtype."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .safetensors file."),
    alpha: Optional[str] = typer.Option(None, "--alpha", "-a", help="Number or block weights (preset, 26/20 values, NAME=V)."),
    beta: Optional[str] = typer.Option(None, "--beta", "-b", help="Second weight (triple_sum, sum_twice, extract)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="Similarity sharpness (extract)."),
    density: Optional[str] = typer.Option(None, "--density", help="Fraction kept (ties: top magnitudes; dare: keep probability)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (dare)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype: fp16, bf16, fp32, fp64, fp8_e4m3fn, fp8_e5m2 (default: A's)."),
    merge_dtype: Optional[str] = typer.Option(None, "--merge-dtype", help="Math dtype: fp32 (default), fp64, fp16, bf16."),
    missing: Optional[str] = typer.Option(None, "--missing",
                                          help="Keys not in every input: keep-a (default), union, intersect, error."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Bake this VAE into the output."),
    prune: bool = typer.Option(False, "--prune", help="Drop EMA weights and training state."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Run a TOML recipe (chains of steps), or re-run the recipe embedded in a model ckptlab merged."),
    relink: bool = typer.Option(False, "--relink", help="Accept inputs whose sha256 differs from the recipe's pins and update the recipe."),
    save_recipe: Optional[Path] = typer.Option(None, "--save-recipe", help="Also write the pinned recipe of this merge to a TOML file."),
    threads: int = typer.Option(2, "--threads", min=1, max=16, help="Compute threads (output bytes do not depend on it)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List merge methods and their parameters."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    db: Optional[Path] = db_option(),
) -> None:
    from ckptlab.cli.common import console, emit_json, progress_bar
    from ckptlab.library.catalog import hash_cache
    from ckptlab.merging import METHODS, load, one_step_recipe, run_recipe
    from ckptlab.merging.recipe import RecipeError, apply_overrides

    if list_methods:
        rows = [{"name": m.name, "inputs": [m.min_inputs, m.max_inputs], "output": m.output, "help": m.help,
                 "params": {p.name: p.default for p in m.params}} for m in METHODS.values()]
        if json_out:
            for r in rows:
                emit_json(r)
        else:
            for r in rows:
                params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
                console.print(f"{r['name']} ({r['inputs'][0]}-{r['inputs'][1]} models) "
                              f"{r['help']}  ({params})", highlight=False, markup=False)
        return
    from ckptlab.formats.arrays import import_torch

    import_torch("merge")  # where only the core is installed: one line naming the extra, before any work
    if recipe is not None:
        if method or models:
            raise RecipeError("give either --recipe or METHOD and models, not both")
        rec = apply_overrides(load(recipe), params_given=any(x is not None for x in (alpha, beta, gamma, density)),
                              dtype=dtype, merge_dtype=merge_dtype, missing=missing, seed=seed, prune=prune, vae=vae)
        recipe_path = None if rec.from_model else recipe  # a model's embedded recipe is never rewritten
    else:
        if not method or not models:
            raise RecipeError("usage: ckptlab merge METHOD A B [C] -o OUT (or --recipe FILE); see --help")
        params = {"alpha": alpha, "beta": beta, "gamma": gamma, "density": density}
        rec = one_step_recipe(method, list(models), params=params, dtype=dtype, merge_dtype=merge_dtype,
                              missing=missing, seed=seed, prune=prune, vae=vae)
        recipe_path = None
    with progress_bar("merging", enabled=not json_out) as cb:
        result = run_recipe(rec, output, overwrite=overwrite, relink=relink, recipe_path=recipe_path,
                            threads=threads, device=device, save_recipe=save_recipe, progress=cb,
                            cache=hash_cache(db))
    if json_out:
        emit_json(result)
        return
    from ckptlab.display import human_size

    console.print(f"wrote {result.output}: {result.tensors} tensors, {human_size(result.bytes)}, "
                  f"{result.family or 'unknown family'}, "
                  f"{result.seconds:.1f} s", highlight=False)
    for s in result.steps:
        parts = [f"{s.merged} merged"]
        if s.kept_from_a:
            parts.append(f"{s.kept_from_a} kept from A (not in every input or not float)")
        if s.copied_from_other:
            parts.append(f"{s.copied_from_other} copied from other inputs")
        if s.dropped:
            parts.append(f"{s.dropped} dropped")
        if s.inpaint_sliced:
            parts.append(f"{s.inpaint_sliced} inpaint conv_in merged on shared channels")
        console.print(f"  {s.name} ({s.method}): " + ", ".join(parts), highlight=False)
    if result.vae_replaced or result.vae_added:
        console.print(f"  VAE: {result.vae_replaced} replaced, {result.vae_added} added", highlight=False)
    if result.pruned:
        console.print(f"  pruned {result.pruned} EMA/training tensors", highlight=False)
    for r in result.inputs:
        console.print(f"  {r.name}: {r.path} sha256 {r.sha256[:12].upper()}{' (relinked)' if r.relinked else ''}",
                      highlight=False)
    if result.recipe_updated:
        console.print(f"  recipe pins updated in {recipe_path}", highlight=False)
    for w in result.warnings:
        console.print(f"  warning: {w}", highlight=False)


def register(app) -> None:
    app.command("merge", help=_HELP)(merge_cmd)
