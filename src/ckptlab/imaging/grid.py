"""``ckptlab grid``: A1111's X/Y/Z plot from the command line, over models, merge ratios, LoRA strengths, seeds
and settings, offline.

Every value of every axis is checked before any weight loads (models exist, samplers are known, the Prompt S/R
text is in the prompt, merge parameters in their method's range, VAEs of the models' family). The loops are
ordered by cost (A1111's ``AxisOption.cost``): model, then merge, then VAE, then LoRA strength outermost, so
each model loads once; a merge parameter change recomputes the merged weights in memory (``grid_merge``), a
VAE change re-reads only the VAE, a LoRA strength change only the weights the LoRAs touch. Each cell is a
``render.Session.render`` with the cell's ``Settings`` (so it equals ``ckptlab generate`` with the same
options), saved with its own infotext to ``--cells DIR``; the grid carries the first cell's infotext (as A1111)
and is re-saved atomically after every finished row of the loops, so a long run can be watched.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.arch.families import get
from ckptlab.errors import CkptlabError, MismatchError, OutputError, UsageError
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.imaging.grid_axes import Axis
from ckptlab.imaging.render import MAX_SEED, Settings
from ckptlab.progress import Progress, null_progress

NO_VAE = ("none", "automatic", "auto", "-")
#: axes that set one ``Settings`` field to the cell's value
_SETTING_OF = {"seed": "seed", "steps": "steps", "cfg": "cfg", "sampler": "sampler", "schedule": "schedule",
               "clip-skip": "clip_skip"}
NAMES = ("x", "y", "z")


@dataclass
class GridResult:
    """What ``grid`` did (the ``--json`` record)."""

    output: Path
    size: tuple[int, int]
    shape: tuple[int, int, int]
    cells: list[Path] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotext: str = ""
    loads: int = 0
    saves: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One cell: its place and what differs from the base settings."""

    index: tuple[int, int, int]
    values: dict[str, object]


def cell_name(index: tuple[int, int, int], present: tuple[bool, bool, bool], suffix: str) -> str:
    """``cell-x00-y01[-z00].png``: the cell's place (0-based) on each axis given."""
    parts = [f"{n}{i:02d}" for n, i, p in zip(NAMES, index, present, strict=True) if p]
    return f"cell-{'-'.join(parts) or 'x00'}{suffix}"


def loop_order(axes: list[Axis | None]) -> list[int]:
    """Axis positions (0=x, 1=y, 2=z) from outermost to innermost loop: A1111's z, y, x, except that a costlier
    axis goes further out (stable for equal costs); an absent axis (one value) counts as outermost."""
    costs = [a.cost if a is not None else float("inf") for a in axes]
    return sorted([2, 1, 0], key=lambda i: -costs[i])


def _key(a: Axis) -> str:
    return f"{a.kind}:{a.param}" if a.param else a.kind


class _Plan:
    """Everything checked and resolved before anything loads."""

    def __init__(self, model, settings: Settings, axes: list[Axis | None], *, merge, vae, loras, refiner, db,
                 cache: HashCache):
        from ckptlab.imaging.models import resolve_model
        from ckptlab.imaging.render import parse_size
        from ckptlab.imaging.samplers import find_schedule, resolve

        self.axes = axes
        self.settings = settings
        self.loras = [(Path(p), float(s)) for p, s in loras]
        self.refiner = Path(refiner) if refiner else None
        self.vae = Path(vae) if vae else None
        present = [a for a in axes if a is not None]
        seen: set[str] = set()
        for a in present:
            if _key(a) in seen:
                raise UsageError(f"the {_key(a)} axis is given twice")
            seen.add(_key(a))
        kinds = {a.kind for a in present}
        self.merge_recipe = None
        if "merge" in kinds and merge is None:
            raise UsageError("a merge axis needs --merge RECIPE.toml (or a model made by ckptlab merge)")
        if merge is not None and ("model" in kinds or model is not None):
            raise UsageError("--merge makes the model: give no MODEL and no model axis with it")
        if merge is None and model is None and "model" not in kinds:
            raise UsageError("give a MODEL, a model axis (--x model=A,B) or --merge RECIPE")
        if model is not None and "model" in kinds:
            raise UsageError("give either MODEL or a model axis, not both")
        # models
        if merge is not None:
            from ckptlab.imaging.grid_merge import check_values, find_param, load_recipe, verify_inputs

            self.merge_recipe = load_recipe(Path(merge))
            self.merge_recipe.validate()
            self.merge_paths = verify_inputs(self.merge_recipe, cache)
            for a in present:
                if a.kind == "merge":
                    a.step, a.name = find_param(self.merge_recipe, a.param)
                    check_values(self.merge_recipe, a.step, a.name, a.values)
            self.models = [None]
        else:
            model_axis = next((a for a in present if a.kind == "model"), None)
            texts = model_axis.values if model_axis else [model]
            self.models = []
            for t in texts:
                p = Path(resolve_model(str(t), db=db))
                if not p.exists():
                    raise CkptlabError("no such model file or folder (nor a catalog hash)", p)
                self.models.append(p)
            if model_axis:
                model_axis.values = self.models
        # values that need no model
        for a in present:
            if a.kind == "sampler":
                for v in a.values:  # an old name's schedule (DPM++ 2M Karras) is kept: Session resolves it
                    resolve(v, settings.schedule)
                a.texts = list(a.values)
            elif a.kind == "schedule":
                for v in a.values:
                    find_schedule(v)
            elif a.kind == "size":
                a.values = [parse_size(v) for v in a.values]
                a.texts = [f"{w}x{h}" for w, h in a.values]
            elif a.kind == "vae":
                vals = []
                for v in a.values:
                    if str(v).lower() in NO_VAE:
                        vals.append(None)
                        continue
                    p = Path(v)
                    if not p.is_file():
                        raise CkptlabError("no such VAE file", p)
                    vals.append(p)
                a.values = vals
                a.texts = ["model's own" if v is None else v.stem for v in vals]
            elif a.kind == "model":
                a.texts = [p.stem for p in a.values]
            elif a.kind == "lora":
                if not self.loras:
                    raise UsageError("a lora axis needs --lora FILE (the LoRA whose strength it sweeps)")
                if a.param and not any(p.stem == a.param or p.name == a.param for p, _ in self.loras):
                    raise UsageError(f"lora:{a.param}: no --lora has that name (given: "
                                     f"{', '.join(p.stem for p, _ in self.loras)})")
            elif a.kind == "prompt":
                search = a.values[0]
                if search not in settings.prompt and search not in settings.negative:
                    raise UsageError(f"Prompt S/R: {search!r} is not in the prompt or the negative prompt")
        resolve(settings.sampler, settings.schedule)
        find_schedule(settings.schedule)
        for p in [*(p for p, _ in self.loras), *([self.vae] if self.vae else []),
                  *([self.refiner] if self.refiner else [])]:
            if not p.exists():
                raise CkptlabError("no such file", p)
        # seeds: one random seed for the whole grid unless seed is an axis (A1111)
        if settings.seed < 0:
            settings.seed = random.randrange(MAX_SEED + 1)
        for a in present:
            if a.kind == "seed":
                a.values = [v if v >= 0 else random.randrange(MAX_SEED + 1) for v in a.values]
        self.cells = [Cell(idx, self._values(idx)) for idx in self._order()]
        for c in self.cells:
            self.settings_for(c).check()

    def _order(self) -> list[tuple[int, int, int]]:
        lens = [len(a.values) if a is not None else 1 for a in self.axes]
        order = loop_order(self.axes)
        out = []
        for combo in itertools.product(*(range(lens[i]) for i in order)):
            idx = [0, 0, 0]
            for pos, i in zip(order, combo, strict=True):
                idx[pos] = i
            out.append(tuple(idx))
        return out

    def _values(self, idx) -> dict[str, object]:
        vals: dict[str, object] = {}
        for a, i in zip(self.axes, idx, strict=True):
            if a is not None:
                vals[_key(a)] = a.values[i]
        return vals

    def axis(self, kind: str) -> Axis | None:
        return next((a for a in self.axes if a is not None and a.kind == kind), None)

    def settings_for(self, c: Cell) -> Settings:
        s = Settings(**self.settings.__dict__)
        for a in self.axes:
            if a is None:
                continue
            v = c.values[_key(a)]
            if a.kind in _SETTING_OF:
                setattr(s, _SETTING_OF[a.kind], v)
            elif a.kind == "size":
                s.width, s.height = v
            elif a.kind == "prompt":
                search = a.values[0]
                s.prompt = s.prompt.replace(search, v)
                s.negative = s.negative.replace(search, v)
        return s

    def model_of(self, c: Cell) -> Path | None:
        return c.values.get("model", self.models[0])

    def vae_of(self, c: Cell) -> Path | None:
        return c.values["vae"] if "vae" in c.values else self.vae

    def loras_of(self, c: Cell) -> list[tuple[Path, float]]:
        out = []
        for p, s in self.loras:
            for k in (f"lora:{p.stem}", f"lora:{p.name}", "lora"):
                if k in c.values:
                    s = float(c.values[k])
                    break
            out.append((p, s))
        return out

    def merge_of(self, c: Cell) -> dict[tuple[int, str], float]:
        return {(a.step, a.name): c.values[_key(a)] for a in self.axes if a is not None and a.kind == "merge"}


def _family_of(path: Path) -> tuple[str | None, int]:
    """``(family, native size)`` of a model: SD2's size follows its prediction (512 eps, 768 v), as the pipeline's
    default size does."""
    from ckptlab.arch.identify import identify
    from ckptlab.imaging.models import open_model_source

    src = open_model_source(path)
    try:
        info = identify(src, heuristics=True)
    finally:
        src.close()
    fam = get(info.family)
    native = (fam.native_resolution(info.prediction) or fam.resolution) if fam is not None else None
    return (fam.id if fam is not None else None), native or 512


def _legend(plan: _Plan, merge_name: str | None) -> list[str]:
    from ckptlab.imaging.samplers import SCHEDULES, find_schedule, resolve

    s = plan.settings
    kinds = {a.kind for a in plan.axes if a is not None}
    parts = []
    if "model" not in kinds:
        parts.append(f"Model: {merge_name or plan.models[0].stem}")
    for kind, text in (("seed", f"Seed: {s.seed}"), ("steps", f"Steps: {s.steps}"),
                       ("sampler", f"Sampler: {resolve(s.sampler, s.schedule)[0].name}"),
                       ("schedule", f"Schedule: {SCHEDULES[find_schedule(s.schedule)][0]}"),
                       ("cfg", f"CFG: {s.cfg:g}"), ("clip-skip", f"Clip skip: {s.clip_skip}" if s.clip_skip > 1 else ""),
                       ("vae", f"VAE: {plan.vae.name}" if plan.vae else "")):
        if kind not in kinds and text:
            parts.append(text)
    if "lora" not in kinds:
        parts.extend(f"LoRA {p.stem}: {w:g}" for p, w in plan.loras)
    lines = [", ".join(parts), f"Prompt: {s.prompt}"]
    if s.negative:
        lines.append(f"Negative: {s.negative}")
    return lines


class _Runner:
    """The loaded state, changed as little as each cell needs."""

    def __init__(self, plan: _Plan, *, device, dtype, cache, warnings: list[str]):
        self.plan = plan
        self.device, self.dtype, self.cache = device, dtype, cache
        self.ses = None
        self.model = object()
        self.vae = None
        self.loras: list[tuple[Path, float]] = []
        self.merge: dict = {}
        self.merged = None
        self.loads = 0
        self.warnings = warnings

    def close(self) -> None:
        if self.ses is not None:
            self.warnings.extend(w for w in self.ses.warnings if w not in self.warnings)
            self.ses.close()
            self.ses = None
        self.merged = None

    def _open(self, model, vae, loras, merge) -> None:
        from ckptlab.imaging import render

        self.close()
        source = None
        name = model
        if self.plan.merge_recipe is not None:
            from ckptlab.imaging.grid_merge import MergedSource

            source = MergedSource(self.plan.merge_recipe, self.plan.merge_paths)
            try:
                for (i, n), v in merge.items():
                    source.set_param(i, n, v)
            except BaseException:
                source.close()
                raise
            name = Path("merge.safetensors")
        self.ses = render.Session(name, vae=vae, loras=loras, refiner=self.plan.refiner, device=self.device,
                                  dtype=self.dtype, cache=self.cache, source=source)
        self.merged = source
        self.loads += 1
        self.model, self.vae, self.loras, self.merge = model, vae, list(loras), dict(merge)

    def ready(self, c: Cell):
        plan = self.plan
        model, vae, loras, merge = plan.model_of(c), plan.vae_of(c), plan.loras_of(c), plan.merge_of(c)
        if self.ses is None or model != self.model:
            self._open(model, vae, loras, merge)
        if merge != self.merge:
            keys: set[str] = set()
            for (i, n), v in merge.items():
                keys |= self.merged.set_param(i, n, v)
            self.ses.loaded.reload(keys)
            self.merge = dict(merge)
        if vae != self.vae:
            if not self._swap_vae(vae):
                self._open(model, vae, loras, merge)
        if loras != self.loras:
            self._set_loras(loras)
        if self.merged is not None:
            self.ses.identity.model = Path(f"{_merge_name(plan, merge)}.merge")
        return self.ses

    def _set_loras(self, loras) -> None:
        # the same LoRA files as the session's, in order: only their strengths change
        self.ses.set_lora_strengths([s for _, s in loras])
        self.loras = list(loras)

    def _swap_vae(self, vae: Path | None) -> bool:
        """Re-read only the VAE (the model's own when None); False when the new VAE's config differs (the
        caller reloads the model with it)."""
        from ckptlab.imaging.pipeline import vae_plan
        from ckptlab.imaging.weights import put
        from ckptlab.merging.provenance import sha256_path
        from ckptlab.ops import diffusers_config as cfgs
        from ckptlab.ops.diffusers_io import plan_to_diffusers

        ses = self.ses
        loaded = ses.loaded
        src = None
        if vae is None:
            _, files, configs, _, _ = plan_to_diffusers(loaded.source)
            items, cfg = files["vae/diffusion_pytorch_model.safetensors"], configs["vae/config.json"]
        else:
            from ckptlab.arch.vae_fit import check_vae_fits
            from ckptlab.ops.run import open_checked

            src = open_checked(vae)
            w = check_vae_fits(src, ses.family, path=ses.identity.model)
            if w and w not in self.warnings:
                self.warnings.append(w)
            items, lay, shapes = vae_plan(src)
            cfg = cfgs.vae_config(lay, shapes, ses.family)
        have = loaded.pipe.vae.config
        if any(k in have and have[k] != v for k, v in cfg.items() if not k.startswith("_")):
            if src is not None:
                src.close()
            return False
        for it in items:
            put(loaded.pipe.vae, it, loaded.device, loaded.dtype)
        loaded.items["vae"] = items
        if loaded.vae_source is not None:
            loaded.vae_source.close()
        loaded.vae_source = src
        ses.identity.vae = vae
        ses.identity.vae_sha256 = sha256_path(vae, cache=self.cache) if vae is not None else None
        ses.forget_hash("vae")  # the session's own background hash was of the VAE it started with
        self.vae = vae
        return True


def _merge_name(plan: _Plan, merge: dict) -> str:
    rec = plan.merge_recipe
    stems = [plan.merge_paths[n].stem for n in rec.inputs if n in plan.merge_paths and n != rec.options.get("vae")]
    last = rec.steps[-1]
    params = " ".join(f"{n} {v:g}" for (_, n), v in merge.items())
    return f"{' + '.join(stems)} ({last.method}{' ' + params if params else ''})"


def grid(model: Path | None, output: Path, settings: Settings, axes: list[Axis | None], *,
         merge: Path | None = None, vae: Path | None = None, loras: list[tuple[Path, float]] = (),
         refiner: Path | None = None, device: str = "auto", dtype: str | None = None,
         cells_dir: Path | None = None, overwrite: bool = False, legend: bool = True, db: Path | None = None,
         cache: HashCache = NO_CACHE, progress: Progress = null_progress) -> GridResult:
    """Render the X/Y/Z grid of ``axes`` (``[x, y, z]``, None where absent; see ``grid_axes.parse_axis``) to
    ``output``, each cell also to ``cells_dir`` when given. ``model``: the model of every cell unless an axis
    is ``model``; ``merge``: a recipe (TOML, or a model made by ckptlab merge) computed in memory instead."""
    from ckptlab.imaging import imagefile
    from ckptlab.imaging.grid_draw import draw, layout

    axes = list(axes) + [None] * (3 - len(axes))
    if axes[0] is None:
        raise UsageError("give at least --x AXIS=V1,V2,...")
    output = Path(output)
    suffix = output.suffix.lower()
    imagefile.image_format(output)
    if output.exists() and not overwrite:
        raise OutputError("exists; pass --overwrite to replace it", output)
    if not output.parent.is_dir():
        raise OutputError("the output folder does not exist", output.parent)
    if not os.access(output.parent, os.W_OK):
        raise OutputError("cannot write in this folder", output.parent)
    settings = Settings(**settings.__dict__)
    settings.check()
    plan = _Plan(model, settings, axes, merge=merge, vae=vae, loras=loras, refiner=refiner, db=db, cache=cache)
    present = tuple(a is not None for a in axes)
    cell_paths: dict[tuple[int, int, int], Path] = {}
    if cells_dir is not None:
        cells_dir = Path(cells_dir)
        if cells_dir.exists() and not cells_dir.is_dir():
            raise OutputError("--cells must be a folder", cells_dir)
        if not cells_dir.parent.is_dir():
            raise OutputError("the folder of --cells does not exist", cells_dir.parent)
        if not os.access(cells_dir if cells_dir.is_dir() else cells_dir.parent, os.W_OK):
            raise OutputError("cannot write in this folder", cells_dir if cells_dir.is_dir() else cells_dir.parent)
        for c in plan.cells:
            p = cells_dir / cell_name(c.index, present, suffix)
            if p.exists() and not overwrite:
                raise OutputError("exists; pass --overwrite to replace it", p)
            cell_paths[c.index] = p
    # families: VAEs must fit, and the slot size of cells without --size is the family's native size

    found = [_family_of(plan.merge_paths[next(iter(plan.merge_recipe.inputs))])] if plan.merge_recipe else \
        [_family_of(m) for m in plan.models]
    fams = [f for f, _ in found]
    from ckptlab.arch.families import display_name
    from ckptlab.imaging.pipeline import TXT2IMG

    for f, m in zip(fams, plan.models if plan.merge_recipe is None else [Path(merge)], strict=True):
        if f not in TXT2IMG:
            raise MismatchError(f"grid renders SD1, SD2 and SDXL checkpoints; this is "
                                f"{display_name(f) if f else 'an unrecognised model'}", m)
    vaes = {v for v in ([plan.vae] + (plan.axis("vae").values if plan.axis("vae") else [])) if v is not None}
    for v in vaes:
        from ckptlab.arch.vae_fit import check_vae_fits
        from ckptlab.ops.run import open_checked

        with open_checked(v) as vs:
            for f in set(fams):
                check_vae_fits(vs, f, path=v)
    sizes = []
    for c in plan.cells:
        s = plan.settings_for(c)
        for _, native in found:
            sizes.append((s.width or native, s.height or native))
    slot = (max(w for w, _ in sizes), max(h for _, h in sizes))
    labels = []
    for a in axes:
        labels.append([a.label(i) for i in range(len(a.values))] if a is not None else [""])
    merge_label = _merge_name(plan, {}) if plan.merge_recipe else None
    lay = layout(slot, labels[0], labels[1], labels[2] if axes[2] is not None else [""],
                 _legend(plan, merge_label) if legend else [])
    if cells_dir is not None:
        try:
            cells_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the folder: {e.strerror or e}", cells_dir) from None
    shape = tuple(len(a.values) if a is not None else 1 for a in axes)
    res = GridResult(output, lay.size, shape)
    images: dict[tuple[int, int, int], object] = {}
    texts: dict[tuple[int, int, int], str] = {}
    inner = loop_order(axes)[-1]
    inner_len = shape[inner]
    runner = _Runner(plan, device=device, dtype=dtype, cache=cache, warnings=res.warnings)
    progress(0, total=len(plan.cells), description="grid")
    try:
        for n, c in enumerate(plan.cells, start=1):
            ses = runner.ready(c)
            s = plan.settings_for(c)
            image, seed, size = ses.render(s)
            text = ses.infotext(s, seed, size)
            images[c.index], texts[c.index] = image, text
            if c.index in cell_paths:
                imagefile.save_image(cell_paths[c.index], image, text, overwrite=True)
                res.cells.append(cell_paths[c.index])
            res.seeds.append(seed)
            progress(1)
            if n % inner_len == 0 or n == len(plan.cells):
                first = texts.get((0, 0, 0)) or next(iter(texts.values()))
                imagefile.save_image(output, draw(lay, images), first, overwrite=True)
                res.saves += 1
        res.infotext = texts[(0, 0, 0)]
    finally:
        runner.close()
    res.loads = runner.loads
    return res


__all__ = ["GridResult", "cell_name", "grid", "loop_order"]
