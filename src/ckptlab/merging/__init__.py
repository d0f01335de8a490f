"""Model merging: streaming engine, method registry, block weights, hash-pinned recipes.

``merge(method, models, output, ...)`` runs one step; ``run_recipe(load(path), output)`` runs a chain.
See docs/merge.md.
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.merging.blocks import param_value
from ckptlab.merging.engine import MergeResult, run_recipe, write_node
from ckptlab.merging.methods import METHODS, get_method
from ckptlab.merging.recipe import Recipe, RecipeInput, RecipeStep, dumps, load, loads
from ckptlab.progress import Progress

__all__ = ["METHODS", "MergeResult", "Recipe", "RecipeInput", "RecipeStep", "dumps", "get_method", "load",
           "loads", "merge", "one_step_recipe", "run_recipe", "write_node"]

INPUT_NAMES = "ABCDEFGH"


def one_step_recipe(method: str, models: list[str | Path], *, params: dict | None = None,
                    dtype: str | None = None, merge_dtype: str | None = None, missing: str | None = None,
                    seed: int | None = None, prune: bool = False, vae: str | Path | None = None) -> Recipe:
    """The recipe for one ``ckptlab merge METHOD A B [C]`` invocation."""
    m = get_method(method)
    if len(models) > len(INPUT_NAMES):
        from ckptlab.merging.methods import MethodError

        raise MethodError(f"at most {len(INPUT_NAMES)} models")
    inputs = {INPUT_NAMES[i]: RecipeInput(INPUT_NAMES[i], str(p)) for i, p in enumerate(models)}
    if vae is not None:
        inputs["VAE"] = RecipeInput("VAE", str(vae))
    allowed = {p.name for p in m.params}
    given = {k: v for k, v in (params or {}).items() if v is not None}
    extra = sorted(set(given) - allowed)
    if extra:
        from ckptlab.merging.methods import MethodError

        raise MethodError(f"{m.name} does not take {', '.join('--' + k for k in extra)} "
                          f"(it takes {', '.join('--' + k for k in sorted(allowed))})")
    step_params = {k: param_value(v) for k, v in given.items()}
    options: dict[str, object] = {}
    for k, v in (("dtype", dtype), ("merge_dtype", merge_dtype), ("missing", missing), ("seed", seed)):
        if v is not None:
            options[k] = v
    if prune:
        options["prune"] = True
    if vae is not None:
        options["vae"] = "VAE"
    return Recipe(inputs, [RecipeStep("merge", m.name, list(inputs)[:len(models)], step_params)], options,
                  Path.cwd())


def merge(method: str, models: list[str | Path], output: str | Path, *, params: dict | None = None,
          dtype: str | None = None, merge_dtype: str | None = None, missing: str | None = None,
          seed: int | None = None, prune: bool = False, vae: str | Path | None = None, overwrite: bool = False,
          threads: int = 2, device: str = "cpu", progress: Progress | None = None,
          cache: HashCache = NO_CACHE) -> MergeResult:
    """Merge ``models`` (A first) with ``method`` into ``output``; ``params`` e.g. ``{"alpha": 0.3}``;
    ``cache``: where inputs' sha256s already known are taken from (``ckptlab.hashes.HashCache``; default: none)."""
    recipe = one_step_recipe(method, models, params=params, dtype=dtype, merge_dtype=merge_dtype,
                             missing=missing, seed=seed, prune=prune, vae=vae)
    return run_recipe(recipe, output, overwrite=overwrite, threads=threads, device=device, progress=progress,
                      cache=cache)

