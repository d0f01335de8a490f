"""The merge axis: a merge recipe computed in memory, key by key, as the pipeline loads its weights.

``MergedSource`` is a ``TensorSource`` over the merge graph (``merging.graph``: ``SourceNode``/``StepNode``, the
same nodes ``ckptlab merge`` writes from): ``array(key)`` is the merged tensor, computed when the pipeline asks
for it. ``set_param(step, name, value)`` swaps one parameter of one step (re-checked by the recipe's own
``resolve_step``) and returns the keys whose value changes, for ``Loaded.reload``. Nothing is ever written:
no merged file, no intermediate (a recipe's ``save =`` entries are ignored here).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ckptlab.errors import CkptlabError, MismatchError, RecipeError, UsageError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.hashes import NO_CACHE, HashCache


def load_recipe(path: Path):
    """A recipe TOML file, or the recipe a ckptlab merge embedded in its output (``.safetensors``)."""
    from ckptlab.merging.recipe import load, load_from_model

    p = Path(path)
    if not p.exists():
        raise CkptlabError("no such recipe or merged model", p)
    if p.is_file() and p.suffix.lower() == ".toml":
        return load(p)
    if p.is_file() and p.suffix.lower() == ".safetensors":
        return load_from_model(p)
    raise UsageError(f"--merge {p}: give a recipe .toml file or a .safetensors made by ckptlab merge")


def swept_params(recipe) -> list[str]:
    """The parameters an axis can sweep: ``NAME`` (the last step's) and ``STEP.NAME`` for every step."""
    from ckptlab.merging.lora_step import LORA, step_method

    out: list[str] = []
    for i, st in enumerate(recipe.steps):
        m = step_method(st.method)
        if m is LORA:
            continue
        for p in m.params:
            if i == len(recipe.steps) - 1:
                out.append(p.name)
            out.append(f"{st.name}.{p.name}")
    return out


def find_param(recipe, param: str) -> tuple[int, str]:
    """``(step index, parameter name)`` for ``alpha`` (the last step) or ``STEP.alpha``."""
    from ckptlab.merging.lora_step import LORA, step_method

    step, dot, name = param.rpartition(".")
    idx = len(recipe.steps) - 1 if not dot else next(
        (i for i, st in enumerate(recipe.steps) if st.name == step), None)
    if idx is None:
        raise UsageError(f"merge:{param}: the recipe has no step {step!r} (steps: "
                         f"{', '.join(st.name for st in recipe.steps)})")
    st = recipe.steps[idx]
    m = step_method(st.method)
    names = [] if m is LORA else [p.name for p in m.params]
    if name not in names:
        raise UsageError(f"merge:{param}: step {st.name!r} ({st.method}) takes "
                         f"{', '.join(names) or 'no parameters'}")
    return idx, name


def verify_inputs(recipe, cache: HashCache = NO_CACHE) -> dict[str, Path]:
    """Each input's path, verified against its sha256 pin where the recipe has one (a merged model's embedded
    recipe: always, and the input is looked up in the catalog by that pin first)."""
    from ckptlab.merging.provenance import sha256_path

    paths: dict[str, Path] = {}
    for n, inp in recipe.inputs.items():
        p = recipe.input_path(n)
        if n in recipe.untrusted:
            if not inp.sha256:
                raise MismatchError(f"input {n} of the embedded recipe has no sha256 pin: refused")
            found = cache.path_with_sha256(inp.sha256)
            if found is not None:
                p = Path(found)
        if not p.exists():
            raise RecipeError(f"input {n} of the merge recipe is not there", p)
        if inp.sha256:
            h = sha256_path(p, cache=cache)
            if h != inp.sha256:
                raise MismatchError(f"input {n} has sha256 {h[:12]}..., the recipe pins {inp.sha256[:12]}...: "
                                    "a different file", p)
        paths[n] = p
    return paths


class MergedSource(TensorSource):
    """The recipe's result as a ``TensorSource``: each ``array(key)`` computed from the inputs on demand."""

    format = "merge"

    def __init__(self, recipe, paths: dict[str, Path]):
        from ckptlab.merging.graph import BakeVae, Prune, Settings, SourceNode, StepNode
        from ckptlab.merging.lora_step import LORA, BakeLora
        from ckptlab.merging.recipe import MERGE_DTYPES, parse_dtype_option, resolve_steps
        from ckptlab.ops.run import open_checked

        # the path is the folder of the first input: a real path (readers stat it) that is no file (nothing
        # hashes it as "the model": a merge made in memory has no Model hash)
        first = next(iter(paths.values()))
        super().__init__(first if first.is_dir() else first.parent)
        self.recipe = copy.deepcopy(recipe)
        self.sources: dict[str, TensorSource] = {}
        try:
            for n, p in paths.items():
                self.sources[n] = open_checked(p)
            self.nodes = {n: SourceNode(n, s) for n, s in self.sources.items()}
            opts = self.recipe.options
            merge_dtype = parse_dtype_option(opts.get("merge_dtype", "fp32"), "merge_dtype",
                                             MERGE_DTYPES) or "F32"
            self.settings = Settings(merge_dtype=merge_dtype, device="cpu", missing=str(opts.get("missing", "keep-a")),
                                     seed=int(opts.get("seed", 0)))
            self.families = {n: nd.family for n, nd in self.nodes.items()}
            resolved = resolve_steps(self.recipe, self.families)
            nodes = dict(self.nodes)
            self.steps = []
            for rs in resolved:
                if rs.method is LORA:
                    node = BakeLora(rs.name, nodes[rs.inputs[0]], [nodes[i] for i in rs.inputs[1:]],
                                    rs.params["strengths"], rs.dtype)
                else:
                    node = StepNode(rs.name, rs.method, [nodes[i] for i in rs.inputs], rs.params, self.settings,
                                    rs.dtype)
                nodes[rs.name] = node
                self.steps.append(node)
            top = self.steps[-1]
            if top.kind == "delta":
                raise MismatchError("the merge recipe makes a difference (delta) model: nothing to render")
            if opts.get("vae"):
                top = BakeVae(top, nodes[str(opts["vae"])])
            if opts.get("prune"):
                top = Prune(top)
            self.top = top
        except BaseException:
            self.close()
            raise

    def infos(self) -> dict[str, TensorInfo]:
        return self.top.plan

    def array(self, key: str):
        from ckptlab.formats.arrays import as_array

        return as_array(self.top.tensor(key))

    def set_param(self, index: int, name: str, value: float) -> set[str]:
        """Use ``name = value`` in step ``index`` from now on (checked as the recipe checks it); the keys that
        step merges (whose values change)."""
        from ckptlab.merging.recipe import resolve_steps

        st = self.recipe.steps[index]
        old = st.params.get(name)
        st.params[name] = value
        try:
            rs = resolve_steps(self.recipe, self.families)[index]
        except BaseException:
            if old is None:
                st.params.pop(name, None)
            else:
                st.params[name] = old
            raise
        node = self.steps[index]
        node.params = rs.params
        return set(self.top.plan)

    @property
    def size(self) -> int:
        return 0

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
        self.sources = {}


def check_values(recipe, index: int, name: str, values: list[float]) -> None:
    """Refuse a value the method refuses (range), before anything loads."""
    from ckptlab.merging.recipe import resolve_step

    st = copy.deepcopy(recipe.steps[index])
    for v in values:
        st.params[name] = v
        resolve_step(st, None)
