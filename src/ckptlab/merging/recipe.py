"""Merge recipes: a TOML file naming inputs (pinned by sha256) and a chain of steps.

```toml
version = 1

[inputs.A]
path = "a.safetensors"          # relative paths resolve against the recipe's folder
sha256 = "9f0c..."              # refuses to run on a different file (--relink updates it)

[[steps]]
name = "mix"
method = "weighted_sum"
inputs = ["A", "B"]             # input names or earlier step names
alpha = 0.4                     # a number or block weights ("GRAD_V", "0,0.1,...", "IN=0.2,OUT=0.8")
save = "mix.safetensors"        # optional: also write this intermediate

[options]                       # all optional
dtype = "fp16"                  # final output dtype (default: A's)
merge_dtype = "fp32"
missing = "keep-a"              # keep-a | union | intersect | error
seed = 0                        # for dare
prune = false
vae = "V"                       # an input name: bake that VAE into the output
```

The same text (minus output paths) is written into every output's metadata, so an output can be
re-made with ``ckptlab merge --recipe``. Nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import CkptlabError, RecipeError

RECIPE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_OPTION_KEYS = ("dtype", "merge_dtype", "missing", "seed", "prune", "vae")


@dataclass
class RecipeInput:
    name: str
    path: str
    sha256: str | None = None


@dataclass
class RecipeStep:
    name: str
    method: str
    inputs: list[str]
    params: dict[str, object] = field(default_factory=dict)
    save: str | None = None
    dtype: str | None = None


@dataclass
class Recipe:
    inputs: dict[str, RecipeInput]
    steps: list[RecipeStep]
    options: dict[str, object] = field(default_factory=dict)
    base_dir: Path | None = None  # where relative input paths resolve
    from_model: bool = False  # read from a merged model's metadata (no recipe file to update)
    from_file: bool = False  # read from a TOML file the user gave (``save`` paths stay inside its folder)
    #: inputs named by a model's metadata: found by their pin (catalog first), never read unpinned
    untrusted: set[str] = field(default_factory=set)

    def input_path(self, name: str) -> Path:
        p = Path(self.inputs[name].path).expanduser()
        if not p.is_absolute() and self.base_dir is not None:
            q = self.base_dir / p
            if self.from_file and not q.exists() and p.exists():
                # written before paths were stored relative to the recipe file: relative to the folder it
                # was written from (the sha256 pins still decide whether it is the right file)
                return p.absolute()
            p = q
        return p

    def save_path(self, step: RecipeStep) -> Path | None:
        """Where ``step``'s ``save`` writes, or None. Paths from a model's metadata never choose an output
        location (None; the caller warns). A recipe file's ``save`` is relative to the file's folder and
        must stay inside it (``RecipeError`` otherwise: an output elsewhere is the user's ``-o``)."""
        if not step.save or self.from_model:
            return None
        p = Path(step.save)
        if not self.from_file or self.base_dir is None:
            return p  # a Recipe built in code: the caller chose the path
        if p.is_absolute() or step.save.startswith("~"):
            raise RecipeError(f"step {step.name!r}: save = {step.save!r} must be relative to the recipe's folder "
                              "(write elsewhere with -o OUT for the final step)")
        q = self.base_dir / p
        base = self.base_dir.resolve()
        try:
            q.resolve().relative_to(base)
        except ValueError:
            raise RecipeError(f"step {step.name!r}: save = {step.save!r} leaves the recipe's folder {base}; "
                              "a recipe only writes inside its own folder (use -o OUT for the final step)") from None
        return q

    def validate(self) -> None:
        from ckptlab.merging.blocks import numbers_in
        from ckptlab.merging.lora_step import LORA, step_method, validate_step
        from ckptlab.merging.methods import MethodError

        if not self.steps:
            raise RecipeError("recipe has no [[steps]]")
        known = set()
        for name in self.inputs:
            if not _NAME_RE.match(name):
                raise RecipeError(f"input name {name!r} must be letters, digits, _ or -")
            known.add(name)
        for st in self.steps:
            if not _NAME_RE.match(st.name):
                raise RecipeError(f"step name {st.name!r} must be letters, digits, _ or -")
            if st.name in known:
                raise RecipeError(f"step name {st.name!r} is used twice (inputs and steps share one namespace)")
            try:
                m = step_method(st.method)
            except MethodError as e:
                raise RecipeError(f"step {st.name!r}: {e.message}") from None
            for i in st.inputs:
                if i not in known:
                    raise RecipeError(f"step {st.name!r}: unknown input {i!r} (inputs and earlier steps: "
                                      f"{', '.join(sorted(known))})")
            if m is LORA:  # bake LoRAs (merging.lora_step): its own parameters
                validate_step(st, self.inputs)
                known.add(st.name)
                continue
            allowed = {p.name: p for p in m.params}
            for k, v in st.params.items():
                if k not in allowed:
                    raise RecipeError(f"step {st.name!r}: {m.name} has no parameter {k!r} "
                                      f"(it takes {', '.join(sorted(allowed)) or 'none'})")
                for x in numbers_in(v):  # per-block values are checked again once the family is known
                    allowed[k].check(x, f"step {st.name!r}: " if len(self.steps) > 1 else "")
            known.add(st.name)
        vae = self.options.get("vae")
        if vae is not None and vae not in self.inputs:
            raise RecipeError(f"options.vae {vae!r} is not an input name")
        seed = self.options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise RecipeError(f"options.seed {seed!r}: use a whole number from 0 to 2**63-1")
        miss = self.options.get("missing", "keep-a")
        from ckptlab.merging.graph import MISSING_POLICIES

        if miss not in MISSING_POLICIES:
            raise RecipeError(f"options.missing {miss!r}: use one of {', '.join(MISSING_POLICIES)}")


#: output dtypes (``--dtype``, a step's ``dtype``): the floating-point types a model can be stored in
OUTPUT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
#: math dtypes (``--merge-dtype``): those torch computes in
MERGE_DTYPES = ("F32", "F64", "F16", "BF16")


def parse_dtype_option(name, what: str, allowed: tuple[str, ...] = OUTPUT_DTYPES) -> str | None:
    """``name`` as a safetensors dtype, refused (exit 2) unless it is one of ``allowed``: an integer, bool or
    complex output would be a "model" without weights."""
    from ckptlab.formats.dtypes import FLOAT_DTYPES, friendly, parse_dtype

    if name is None:
        return None
    try:
        dt = parse_dtype(str(name))
    except ValueError:
        raise RecipeError(f"{what} {name!r}: unknown dtype; use one of {', '.join(friendly(d) for d in allowed)}") \
            from None
    if dt not in allowed:
        kind = "a floating-point type" if dt not in FLOAT_DTYPES else "a type merges compute in"
        raise RecipeError(f"{what} {name!r}: {friendly(dt)} is not {kind}; use one of "
                          f"{', '.join(friendly(d) for d in allowed)}")
    return dt


@dataclass(frozen=True)
class ResolvedStep:
    """A recipe step parsed once, for the family of its first input: the method itself, its parameters as
    numbers or per-block values (``BlockValues``), each checked against the method's ranges, and the output
    dtype (a safetensors dtype; None: A's). The graph builds its node from this, and the output's metadata
    reads its numbers from it; nothing parses the step's text again."""

    name: str
    method: object  # merging.methods.Method
    inputs: tuple[str, ...]
    params: dict
    dtype: str | None
    family: str | None


def resolve_step(st: RecipeStep, family: str | None, *, many: bool = False,
                 final_dtype=None) -> ResolvedStep:
    """Parse ``st`` for ``family`` (its first input's): ``blocks.parse_value`` for every parameter (the one
    parser of ``--alpha`` strings, TOML values and lists), range checks per value and per block, and the
    dtype (the step's own, else ``final_dtype`` for the last step). ``RecipeError``/``BlockSpecError`` on a bad
    value (exit 2)."""
    from ckptlab.merging.blocks import BlockValues, parse_value
    from ckptlab.merging.lora_step import LORA, step_method, strengths_of

    method = step_method(st.method)
    if method is LORA:
        dtype = parse_dtype_option(st.dtype or final_dtype, f"step {st.name!r} dtype")
        return ResolvedStep(st.name, method, tuple(st.inputs), {"strengths": strengths_of(st)}, dtype, family)
    params: dict = {}
    where = f"step {st.name!r}: " if many else ""
    for p in method.params:
        val = parse_value(st.params.get(p.name, p.default), family, name=p.name, unnamed=_unnamed_default(p))
        if isinstance(val, BlockValues):
            if not p.per_block:
                raise RecipeError(f"step {st.name!r}: {p.name} takes one number, not block weights")
            for block, v in val.values:
                p.check(v, f"{where}block {block}: ")
        else:
            p.check(val, where)
        params[p.name] = val
    dtype = parse_dtype_option(st.dtype or final_dtype, f"step {st.name!r} dtype")
    return ResolvedStep(st.name, method, tuple(st.inputs), params, dtype, family)


def resolve_steps(recipe: Recipe, families: dict[str, str | None]) -> list[ResolvedStep]:
    """Every step of ``recipe`` resolved, before any file is written (a step's family is its first input's,
    an earlier step's family that of its own first input); the last step takes ``options.dtype``."""
    fam = dict(families)
    many = len(recipe.steps) > 1
    last = len(recipe.steps) - 1
    out = []
    for i, st in enumerate(recipe.steps):
        fam[st.name] = fam.get(st.inputs[0]) if st.inputs else None
        out.append(resolve_step(st, fam[st.name], many=many,
                                final_dtype=recipe.options.get("dtype") if i == last else None))
    return out


def _unnamed_default(param) -> float:
    """Blocks a ``NAME=V`` string leaves out get 0 (A's value for a blend), or the parameter's own default
    where 0 is out of its range (``--density IN=0.5``: the other blocks keep the default density)."""
    try:
        param.check(0.0)
        return 0.0
    except CkptlabError:
        return float(param.default)


def apply_overrides(recipe: Recipe, *, params_given: bool = False, dtype=None, merge_dtype=None, missing=None,
                    seed=None, prune: bool = False, vae: str | Path | None = None) -> Recipe:
    """Command-line options on top of a recipe (``merge --recipe R --dtype fp16 ...``): given options replace
    the recipe's, ``prune`` turns pruning on, ``vae`` adds the file as input ``VAE`` (trusted: the user named
    it) and bakes it. Step parameters belong to the recipe file: ``params_given`` (any of --alpha/--beta/
    --gamma/--density) is a ``RecipeError``."""
    if params_given:
        raise RecipeError("--alpha/--beta/--gamma/--density go in the recipe file with --recipe")
    for k, v in (("dtype", dtype), ("merge_dtype", merge_dtype), ("missing", missing), ("seed", seed)):
        if v is not None:
            recipe.options[k] = v
    if prune:
        recipe.options["prune"] = True
    if vae is not None:
        recipe.inputs["VAE"] = RecipeInput("VAE", str(Path(vae).resolve()))
        recipe.untrusted.discard("VAE")  # the user named it
        recipe.options["vae"] = "VAE"
    return recipe


# -- reading ---------------------------------------------------------------------------------------
def _tomllib():
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def loads(text: str, base_dir: Path | None = None, *, where: str = "recipe") -> Recipe:
    try:
        data = _tomllib().loads(text)
    except Exception as e:  # noqa: BLE001 - TOMLDecodeError, one line for the user
        raise RecipeError(f"{where}: not valid TOML: {e}") from None
    return from_dict(data, base_dir, where=where)


def load(path: str | Path) -> Recipe:
    """A recipe from a TOML file, or the recipe embedded in a ``.safetensors`` file ckptlab merged (its
    ``from_model`` is then True: there is no recipe file to write pins back into)."""
    p = Path(path)
    if _is_model(p):
        return load_from_model(p)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe: {e.strerror or e}", p) from None
    except UnicodeDecodeError:
        raise RecipeError("recipe is not UTF-8 text", p) from None
    rec = loads(text, p.resolve().parent, where=str(p))
    rec.from_file = True
    return rec


def _is_model(p: Path) -> bool:
    from ckptlab.formats import MODEL_SUFFIXES

    if p.is_dir():
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False  # load() reports it
    return p.suffix.lower() in MODEL_SUFFIXES or (len(head) == 9 and head[8:9] == b"{")


def load_from_model(path: str | Path) -> Recipe:
    """The recipe a ckptlab merge embedded in its output (``__metadata__["ckptlab.recipe"]``), read from
    the header alone."""
    from ckptlab.formats import detect_format
    from ckptlab.formats.safetensors import read_header

    p = Path(path)
    if detect_format(p) != "safetensors":
        raise RecipeError("only .safetensors files made by ckptlab merge carry a recipe", p)
    text = read_header(p).metadata.get("ckptlab.recipe")
    if not text:
        raise RecipeError("this model carries no ckptlab recipe (an A1111 sd_merge_recipe records a merge "
                          "but cannot re-run it)", p)
    rec = loads(text, None, where=f"{p} (embedded recipe)")
    rec.from_model = True
    rec.untrusted = set(rec.inputs)
    return rec


def from_dict(data: dict, base_dir: Path | None = None, *, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: not a table")
    ver = data.get("version", RECIPE_VERSION)
    if ver != RECIPE_VERSION:
        raise RecipeError(f"{where}: recipe version {ver!r} is not supported (this ckptlab reads {RECIPE_VERSION})")
    unknown = set(data) - {"version", "inputs", "steps", "options"}
    if unknown:
        raise RecipeError(f"{where}: unknown top-level entries {sorted(unknown)}")
    raw_inputs = data.get("inputs", {})
    if not isinstance(raw_inputs, dict):
        raise RecipeError(f"{where}: [inputs] must be a table of named inputs")
    inputs = {}
    for name, v in raw_inputs.items():
        if isinstance(v, str):
            v = {"path": v}
        if not isinstance(v, dict) or not isinstance(v.get("path"), str):
            raise RecipeError(f"{where}: inputs.{name} needs a path")
        sha = v.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
            raise RecipeError(f"{where}: inputs.{name}.sha256 is not 64 hex digits")
        inputs[name] = RecipeInput(name, v["path"], sha.lower() if sha else None)
    steps = []
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        raise RecipeError(f"{where}: steps must be an array of tables ([[steps]])")
    for i, st in enumerate(raw_steps):
        if not isinstance(st, dict) or "method" not in st or "inputs" not in st:
            raise RecipeError(f"{where}: steps[{i}] needs method and inputs")
        st = dict(st)
        name = st.pop("name", f"step{i + 1}")
        method = st.pop("method")
        ins = st.pop("inputs")
        if not isinstance(ins, list) or not all(isinstance(x, str) for x in ins):
            raise RecipeError(f"{where}: steps[{i}].inputs must be a list of names")
        save = st.pop("save", None)
        dtype = st.pop("dtype", None)
        steps.append(RecipeStep(str(name), str(method), list(ins), st, save, dtype))
    options = data.get("options", {})
    if not isinstance(options, dict) or set(options) - set(_OPTION_KEYS):
        raise RecipeError(f"{where}: [options] takes only {', '.join(_OPTION_KEYS)}")
    r = Recipe(inputs, steps, dict(options), base_dir)
    r.validate()
    return r


# -- writing ---------------------------------------------------------------------------------------
def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise RecipeError(f"recipe value {v} is not finite")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_bare(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise RecipeError(f"cannot write {type(v).__name__} into a recipe")


def _bare(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _relative(path: Path, folder: Path) -> str | None:
    """``path`` relative to ``folder`` (both made absolute, symlinks kept), or None where there is no
    relative path (another drive)."""
    import os

    try:
        return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()
    except ValueError:
        return None


def dumps(recipe: Recipe, *, outputs: bool = True, absolute: bool = False, relative_to: Path | None = None) -> str:
    """TOML text for ``recipe``. ``outputs=False`` leaves out ``save`` paths (the embedded copy);
    ``absolute=True`` writes input paths resolved; ``relative_to``: the folder of the file the text goes to:
    paths are written relative to it, so the recipe runs from any working folder."""
    lines = ["# ckptlab merge recipe - run: ckptlab merge --recipe THIS_FILE -o OUT.safetensors",
             f"version = {RECIPE_VERSION}", ""]
    if relative_to is not None:
        lines.insert(1, "# paths are relative to this file's folder")
    for name, inp in recipe.inputs.items():
        lines.append(f"[inputs.{_bare(name)}]")
        path = str(recipe.input_path(name).resolve()) if absolute else inp.path
        if relative_to is not None and not absolute:
            path = _relative(recipe.input_path(name), relative_to) or str(recipe.input_path(name).absolute())
        lines.append(f"path = {_value(path)}")
        if inp.sha256:
            lines.append(f"sha256 = {_value(inp.sha256)}")
        lines.append("")
    for st in recipe.steps:
        lines.append("[[steps]]")
        lines.append(f"name = {_value(st.name)}")
        lines.append(f"method = {_value(st.method)}")
        lines.append(f"inputs = {_value(st.inputs)}")
        for k, v in st.params.items():
            lines.append(f"{_bare(k)} = {_value(v)}")
        if st.dtype:
            lines.append(f"dtype = {_value(st.dtype)}")
        if outputs and st.save:
            save = st.save
            if relative_to is not None:
                where = recipe.save_path(st)
                rel = _relative(where, relative_to) if where is not None else None
                if rel is None or rel.startswith("../") or rel == "..":
                    shown = str(where.absolute()) if where is not None else st.save
                    lines.append(f"# save: {_value(shown)} is outside this file's folder (a recipe only writes "
                                 "inside its own folder)")
                    save = None
                else:
                    save = rel
            if save:
                lines.append(f"save = {_value(save)}")
        lines.append("")
    opts = {k: v for k, v in recipe.options.items() if v is not None}
    if opts:
        lines.append("[options]")
        for k in _OPTION_KEYS:
            if k in opts:
                lines.append(f"{k} = {_value(opts[k])}")
        lines.append("")
    return "\n".join(lines)


_TABLE_RE = re.compile(r"""^\s*\[\s*inputs\s*\.\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*\]\s*(?:#.*)?$""")
_ANY_TABLE_RE = re.compile(r"^\s*\[")
_KEY_RE = re.compile(r"^(\s*)(sha256|path)(\s*=\s*)(\"[^\"]*\"|'[^']*')(.*)$")


def repin(text: str, pins: dict[str, str]) -> str:
    """``text`` with each ``[inputs.NAME]`` table's ``sha256`` set to ``pins[NAME]``: existing values are
    replaced in place, missing ones inserted after ``path``; comments and formatting are kept."""
    lines = text.split("\n")
    table: list[str | None] = []  # the [inputs.NAME] each line belongs to
    current: str | None = None
    for line in lines:
        if _ANY_TABLE_RE.match(line):
            m = _TABLE_RE.match(line)
            current = next(g for g in m.groups() if g is not None) if m else None
        table.append(current)
    has_pin = {t for line, t in zip(lines, table, strict=True)
               if t is not None and (m := _KEY_RE.match(line)) and m.group(2) == "sha256"}
    out: list[str] = []
    for line, t in zip(lines, table, strict=True):
        m = _KEY_RE.match(line) if t in pins else None
        if m is None:
            out.append(line)
            continue
        indent, key, eq, _, rest = m.groups()
        if key == "sha256":
            out.append(f"{indent}sha256{eq}{_value(pins[t])}{rest}")
        else:
            out.append(line)
            if t not in has_pin:
                out.append(f"{indent}sha256 = {_value(pins[t])}")
    return "\n".join(out)


def pin_text(recipe: Recipe, path: str | Path, *, what: str = "update") -> None:
    """Write the recipe with its (updated) pins to ``path`` (temp file, then rename). When ``path`` is the
    recipe's own file, only its ``sha256`` values change (comments kept), unless the file is laid out in a
    way that edit cannot follow (inline tables, dotted keys): then it is rewritten whole."""
    from ckptlab.errors import OutputError

    p = Path(path)
    folder = p.resolve().parent  # as load() resolves relative paths (a physical folder: ".." is exact)
    text = dumps(recipe, relative_to=folder)
    if what == "update":
        try:
            old = p.read_text(encoding="utf-8")
            new = repin(old, {n: i.sha256 for n, i in recipe.inputs.items() if i.sha256})
            again = loads(new, folder)
            again.from_file = recipe.from_file
            if dumps(again, relative_to=folder) == text:
                text = new
        except (OSError, UnicodeDecodeError, RecipeError):
            pass  # rewrite whole
    try:
        write_text_atomic(p, text)
    except OSError as e:
        raise OutputError(f"cannot {what} the recipe: {e.strerror or e}", p) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a recipe atomically (``ckptlab.atomic.write_atomic``)."""
    from ckptlab.atomic import write_atomic

    write_atomic(path, text.encode("utf-8"))


def check_recipe_target(path: str | Path, avoid: list[Path], *, overwrite: bool = False) -> Path:
    """Refuse a ``--save-recipe`` path that could not be written, or that exists without ``overwrite``,
    before any merge work is done."""
    import os

    from ckptlab.errors import OutputError

    p = Path(path)
    if p.is_dir():
        raise OutputError("--save-recipe: is a folder, not a file", p)
    parent = p.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"--save-recipe: the folder {parent} {what}", p)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--save-recipe: the folder {parent} is not writable", p)
    rp = p.resolve()
    if any(Path(a).resolve() == rp for a in avoid):
        raise OutputError("--save-recipe: is one of the inputs or the output", p)
    if os.path.lexists(p) and not overwrite:
        raise OutputError("--save-recipe: the file already exists (use --overwrite to replace it)", p)
    return p
