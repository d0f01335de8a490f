"""The kinds of job the app runs: for each, its form fields (named after the command's options, with the
command's defaults), how a submitted form becomes the API's arguments (validation: the command's own one-line
errors, the transforms' dry run included), the outputs it will write (one active job per output) and the API call
the worker makes.

A field's value arrives as a string from a form, or as a Python value from another page's code
(``jobs.submit(db, "apply-plan", {"plan": path})``); ``prepare`` turns either into the JSON-ready ``params`` the
worker reads back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ckptlab.errors import CkptlabError, FormatError, UsageError


@dataclass(frozen=True)
class Field:
    name: str                      # the params key and the form input's name
    option: str                    # the command's option, shown as the label (``--out-dir``)
    type: str = "text"             # text, path, paths (one per line), choice, bool, int, float, textarea
    default: object = None
    choices: tuple[str, ...] = ()
    required: bool = False
    must_exist: bool = False       # a path that must be there (an input)
    help: str = ""


@dataclass(frozen=True)
class Kind:
    name: str
    title: str
    fields: tuple[Field, ...]
    run: Callable                  # run(params, db, progress) -> result (the API's)
    command: str                   # the CLI command it is
    #: planned outputs: plan(params, db) -> list of paths (raises the API's errors for bad input)
    plan: Callable | None = None
    writes: bool = True            # changes files: the catalog learns about the outputs afterwards
    help: str = ""
    prefill: str = "path"          # the field ``?path=`` fills
    #: the worker scans the catalogued roots of the outputs afterwards (apply-plan and download catalogue
    #: what they change themselves)
    catalogue: bool = True
    #: started only by another page's own code (``jobs.submit``), never from the generic form or ``POST /jobs``
    #: (``apply-plan``: the disk page's reviewed plan, never any plan file a post names)
    internal: bool = False

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


PRECISIONS = ("fp16", "bf16", "fp32", "fp8_e4m3fn")
OVERWRITE = Field("overwrite", "--overwrite", "bool", False, help="Replace outputs that already exist.")
OUT_DIR = Field("out_dir", "--out-dir", "path", help="Folder for the outputs (default: next to each input).")


def _input(help_: str = "The model file.") -> Field:
    return Field("path", "INPUT", "path", required=True, must_exist=True, help=help_)


# ------------------------------------------------------------------------------------------------ parsing

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("", "0", "false", "off", "no")


def _parse(f: Field, raw) -> object:
    """One field's value from a form string or a Python value; None for empty."""
    if f.type == "bool":
        if isinstance(raw, bool):
            return raw
        if raw is None:
            return bool(f.default)
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise UsageError(f"{f.option}: expected on or off, not {str(raw)[:40]!r}")
    if raw is None or (isinstance(raw, str) and not raw.strip()) or (isinstance(raw, list) and not raw):
        return None
    if f.type == "paths":
        items = raw if isinstance(raw, list) else str(raw).splitlines()
        return [_path(f, str(x).strip()) for x in items if str(x).strip()] or None
    if isinstance(raw, list):
        raw = raw[-1]
    s = str(raw).strip()
    if f.type == "int":
        try:
            return int(s)
        except ValueError:
            raise UsageError(f"{f.option}: {s[:40]!r} is not a whole number") from None
    if f.type == "float":
        try:
            return float(s)
        except ValueError:
            raise UsageError(f"{f.option}: {s[:40]!r} is not a number") from None
    if f.type == "choice":
        if s not in f.choices:
            raise UsageError(f"{f.option}: {s[:40]!r} is not one of {', '.join(f.choices)}")
        return s
    if f.type == "path":
        return _path(f, s)
    return s


def _path(f: Field, s: str) -> str:
    if "\x00" in s:
        raise UsageError(f"{f.option}: a path cannot contain a NUL character")
    p = Path(s).expanduser()
    if not p.is_absolute():
        raise UsageError(f"{f.option}: give an absolute path (the server's working folder is not yours): {s}")
    p = Path(os.path.normpath(p))
    if f.must_exist and not p.exists():
        raise FormatError("no such file or folder", p)
    return str(p)


def _multi(raw) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple)):
        return [str(x) for x in raw if str(x).strip()]
    return [x.strip() for x in str(raw).split(",") if x.strip()]


def prepare(db: Path, kind: str, params: dict) -> tuple[dict, list[str]]:
    """Check ``params`` for ``kind``: the JSON-ready params and the outputs the job will write.

    Raises:
        UsageError: an unknown kind, a missing or malformed field. CkptlabError: what the command itself refuses
        (a missing input, an existing output without overwrite, an unsafe file...), one line.
    """
    spec = KINDS.get(kind)
    if spec is None:
        raise UsageError(f"unknown job kind {kind!r} (kinds: {', '.join(KINDS)})")
    known = {f.name for f in spec.fields}
    unknown = sorted(k for k in params if k not in known and k not in ("kind", "csrf"))
    if unknown:
        raise UsageError(f"{kind} does not take {', '.join(unknown)}")
    clean: dict = {}
    for f in spec.fields:
        raw = params.get(f.name)
        if f.name == "only":
            value = _multi(raw) or None
            for v in value or ():
                if v not in ("unet", "vae", "te"):
                    raise UsageError(f"--only: {v[:40]!r} is not one of unet, vae, te")
        else:
            value = _parse(f, raw)
        if value is None and f.default is not None and f.type != "bool":
            value = f.default
        if value is None and f.required:
            raise UsageError(f"{f.option}: required")
        clean[f.name] = value
    outputs = spec.plan(clean, db) if spec.plan else []
    return clean, [str(o) for o in outputs if o]


#: query names another page's links use for an input, and the field they fill (the model page's
#: ``/jobs/new/lora-bake?lora=FILE``)
PREFILL_ALIASES = {"lora": "loras"}


def prefillable(f: Field) -> bool:
    """Fields a link may fill: existing input paths only. Never a switch (``overwrite``, ``allow_suspicious``),
    an output, or anything else a link on another site could use to pre-arm a destructive job."""
    return f.type in ("path", "paths") and f.must_exist


def form_values(kind: str, query: dict) -> dict:
    """A new form's values: the defaults, then the input paths the query string gives (``?path=...`` fills the
    kind's main input; an input field by its own name, ``?lora=`` the LoRA list). Nothing else is taken from the
    query string: a link must not be able to arm a switch or choose an output."""
    spec = KINDS[kind]
    values = {f.name: "" if f.default is None else f.default for f in spec.fields}
    given: dict = {}
    main = spec.field(spec.prefill)
    if main is not None and query.get("path") is not None:
        given[main.name] = query["path"]
    for alias, name in PREFILL_ALIASES.items():
        if query.get(alias) is not None:
            given.setdefault(name, query[alias])
    for f in spec.fields:
        if query.get(f.name) is not None:
            given.setdefault(f.name, query[f.name])
    for name, v in given.items():
        f = spec.field(name)
        if f is not None and prefillable(f):
            values[name] = v
    return values


def form_kinds() -> dict[str, Kind]:
    """The kinds the generic form and ``POST /jobs`` accept."""
    return {name: k for name, k in KINDS.items() if not k.internal}


# ------------------------------------------------------------------------------------------------ kinds


def _transform_plan(call):
    """A transform's outputs, from the API's own dry run (its errors are the form's)."""

    def plan(p: dict, db: Path) -> list[str]:
        results = call(p, db, None, dry_run=True)
        return [str(r.output) for r in results if r.output is not None and not r.unchanged]

    return plan


def _out_plan(name: str):
    def plan(p: dict, db: Path) -> list[str]:
        out = p.get(name)
        if out and Path(out).exists() and not p.get("overwrite"):
            raise CkptlabError("exists (tick --overwrite to replace it)", out)
        return [out] if out else []

    return plan


def _convert(p, db, progress, dry_run=False):
    import ckptlab

    return ckptlab.convert(p["path"], p["out"], out_dir=p["out_dir"], allow_suspicious=p["allow_suspicious"],
                           drop_ema=p["drop_ema"], overwrite=p["overwrite"], dry_run=dry_run, progress=progress,
                           db=db)


def _prune(p, db, progress, dry_run=False):
    import ckptlab

    return ckptlab.prune(p["path"], ema=p["ema"], precision=p["precision"], clamp=p["clamp"], out_dir=p["out_dir"],
                         overwrite=p["overwrite"], dry_run=dry_run, progress=progress, db=db)


def _precision(p, db, progress, dry_run=False):
    import ckptlab

    return ckptlab.precision(p["path"], p["to"], only=p["only"], clamp=p["clamp"], out_dir=p["out_dir"],
                             overwrite=p["overwrite"], dry_run=dry_run, progress=progress, db=db)


def _extract(p, db, progress, dry_run=False):
    import ckptlab

    return ckptlab.extract(p["path"], p["component"], out=p["out"], out_dir=p["out_dir"], overwrite=p["overwrite"],
                           dry_run=dry_run, progress=progress, db=db)


def _replace(p, db, progress, dry_run=False):
    import ckptlab

    return ckptlab.replace(p["path"], vae=p["vae"], clip_l=p["clip_l"], clip_g=p["clip_g"], unet=p["unet"],
                           out=p["out"], out_dir=p["out_dir"], overwrite=p["overwrite"], dry_run=dry_run,
                           progress=progress, db=db)


def _scan(p, db, progress):
    import ckptlab

    return ckptlab.scan(p["path"], db=db, hash=p["hash"], fingerprint=p["fingerprint"], progress=progress)


def _hash(p, db, progress):
    import ckptlab

    return ckptlab.hash_file(p["path"], db=db, progress=progress)


def _check(p, db, progress):
    import ckptlab

    progress(0, description=f"check {Path(p['path']).name}")
    return ckptlab.check(p["path"], deep=p["deep"])


def _models(p) -> list[str]:
    return [m for m in (p["model_a"], p["model_b"], p["model_c"]) if m]


def recipe_params(p: dict) -> dict:
    return {"alpha": p.get("alpha"), "beta": p.get("beta"), "gamma": p.get("gamma"), "density": p.get("density")}


def recipe_text(p: dict) -> str:
    """The TOML recipe a merge job will run (``ckptlab merge --save-recipe``'s text, before the pins)."""
    from ckptlab.merging import dumps, one_step_recipe

    rec = one_step_recipe(p["method"], _models(p), params=recipe_params(p), dtype=p.get("dtype"),
                          merge_dtype=p.get("merge_dtype"), missing=p.get("missing"), seed=p.get("seed"),
                          prune=bool(p.get("prune")), vae=p.get("vae"))
    return dumps(rec, absolute=False)


def merge_preview(values: dict) -> str:
    """The recipe text of a merge form's current values (the form's live preview); the merge's own one-line
    error when a value is wrong. The output is not checked here."""
    clean: dict = {}
    for f in KINDS["merge"].fields:
        value = _parse(f, values.get(f.name))
        clean[f.name] = f.default if value is None and f.type != "bool" else value
    return recipe_text(clean)


def _merge_plan(p: dict, db: Path) -> list[str]:
    recipe_text(p)  # an unknown method or parameter: the merge's own error
    if not p["model_b"]:
        raise UsageError("--model-b: a merge takes two models or more")
    return _out_plan("output")(p, db)


def _merge(p, db, progress):
    import ckptlab

    return ckptlab.merge(p["method"], _models(p), p["output"], alpha=p["alpha"], beta=p["beta"], gamma=p["gamma"],
                         density=p["density"], seed=p["seed"], precision=p["dtype"], merge_dtype=p["merge_dtype"],
                         missing=p["missing"], vae=p["vae"], prune=p["prune"], threads=p["threads"],
                         device=p["device"], overwrite=p["overwrite"], progress=progress, db=db)


def _floats(s: str | None, option: str) -> list[float] | None:
    if not s:
        return None
    try:
        return [float(x) for x in str(s).replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"{option}: expected numbers separated by commas, not {str(s)[:40]!r}") from None


def _bake_plan(p: dict, db: Path) -> list[str]:
    _floats(p["strengths"], "--strength")
    _floats(p["te_strengths"], "--te-strength")
    return _out_plan("output")(p, db)


def _lora_bake(p, db, progress):
    import ckptlab

    return ckptlab.lora_bake(p["path"], p["loras"], p["output"], strengths=_floats(p["strengths"], "--strength"),
                             te_strengths=_floats(p["te_strengths"], "--te-strength"), precision=p["precision"],
                             overwrite=p["overwrite"], progress=progress, db=db)


def _lora_extract(p, db, progress):
    import ckptlab

    return ckptlab.lora_extract(p["path"], p["base"], p["output"], rank=p["rank"], conv_rank=p["conv_rank"],
                                sv_fro=p["sv_fro"], sv_ratio=p["sv_ratio"], clamp_quantile=p["clamp_quantile"],
                                min_diff=p["min_diff"], precision=p["precision"], overwrite=p["overwrite"],
                                progress=progress, db=db)


def _download(p, db, progress):
    import ckptlab

    return ckptlab.download(p["source"], dest=p["dest"], layout=p["layout"], model_type=p["model_type"],
                            file_id=p["file_id"], write_sidecars=p["write_sidecars"], db=db, progress=progress)


def _lines(s: str | None) -> list[str] | None:
    if not s:
        return None
    return [x.strip() for x in str(s).splitlines() if x.strip()] or None


def _generate(p, db, progress):
    import ckptlab

    return ckptlab.generate(p["path"], p["output"], p["prompt"], negative=p["negative"] or "", seed=p["seed"],
                            steps=p["steps"], cfg=p["cfg"], size=p["size"], sampler=p["sampler"],
                            schedule=p["schedule"], vae=p["vae"], loras=_lines(p["loras"]), clip_skip=p["clip_skip"],
                            device=p["device"], precision=p["precision"], count=p["count"],
                            overwrite=p["overwrite"], progress=progress, db=db)


def _grid(p, db, progress):
    import ckptlab

    return ckptlab.grid(p["path"], p["output"], p["prompt"], x=p["x"], y=p["y"], z=p["z"], merge=p["merge"],
                        negative=p["negative"] or "", seed=p["seed"], steps=p["steps"], cfg=p["cfg"], size=p["size"],
                        sampler=p["sampler"], vae=p["vae"], loras=_lines(p["loras"]), device=p["device"],
                        precision=p["precision"], overwrite=p["overwrite"], progress=progress, db=db)


def _reviewed_plan(p: dict, db: Path) -> Path:
    """The plan file, which must lie inside the disk page's plans folder (``pages_disk.plans_dir``): the only
    plans this app applies are the ones its review saved there."""
    from ckptlab.web.pages_disk import plans_dir

    plan = os.path.realpath(p["plan"])
    folder = os.path.realpath(plans_dir(Path(db)))
    if os.path.commonpath([folder, plan]) != folder or plan == folder:
        raise UsageError("apply-plan applies only plans reviewed on the Duplicates & disk page "
                         f"(saved in {folder}), not {p['plan']}")
    return Path(plan)


def _apply_plan_check(p: dict, db: Path) -> list[str]:
    from ckptlab.library.plan import SpacePlan

    SpacePlan.load(_reviewed_plan(p, db))  # a plan that does not load: its own error, now
    return []


def _apply_plan(p, db, progress):
    from ckptlab.library.apply_plan import apply_plan

    return apply_plan(_reviewed_plan(p, db), catalog_path=Path(db), progress=progress)


_GEN_COMMON = (
    Field("prompt", "PROMPT", "textarea", required=True),
    Field("negative", "--negative", "textarea"),
    Field("seed", "--seed", "int", -1, help="-1: random."),
    Field("steps", "--steps", "int", 20),
    Field("cfg", "--cfg", "float", 7.0),
    Field("size", "--size", help="WxH (default: the family's native size)."),
    Field("sampler", "--sampler", help="As A1111 names them (default DPM++ 2M)."),
)
_GEN_TAIL = (
    Field("vae", "--vae", "path", must_exist=True),
    Field("loras", "--lora", "textarea", help="One per line: FILE or FILE:STRENGTH."),
    Field("device", "--device", "choice", "auto", ("auto", "cpu", "cuda", "mps")),
    Field("precision", "--precision", "choice", None, ("fp32", "fp16", "bf16")),
)

KINDS: dict[str, Kind] = {k.name: k for k in [
    Kind("scan", "Scan a folder", (
        Field("path", "ROOT", "path", required=True, must_exist=True, help="A model folder (A1111/ComfyUI root)."),
        Field("hash", "--hash", "bool", False, help="Also compute the CivitAI hashes."),
        Field("fingerprint", "--fingerprint", "bool", False, help="Also compute tensor fingerprints."),
    ), _scan, "ckptlab scan", writes=False, help="Walk a folder into this catalog (incremental)."),
    Kind("hash", "Hash a file", (_input("The file."),), _hash, "ckptlab hash", writes=False,
         help="SHA256, AutoV1/V2/V3, CRC32 and BLAKE3 in one read (kept in the catalog)."),
    Kind("check", "Safety check", (
        _input("A pickle, .safetensors or .gguf file."),
        Field("deep", "--deep", "bool", False, help="Also read every tensor (CRCs, NaN/Inf)."),
    ), _check, "ckptlab check", writes=False, help="A safety verdict without executing anything in the file."),
    Kind("convert", "Convert to .safetensors", (
        _input("A pickle checkpoint (.ckpt .pt .pth .bin)."),
        Field("out", "--output", "path", help="Output file (default: <stem>.safetensors)."),
        OUT_DIR,
        Field("drop_ema", "--drop-ema", "bool", False, help="Leave out the EMA weights (model_ema.*)."),
        Field("allow_suspicious", "--allow-suspicious", "bool", False,
              help="Also convert files check calls suspicious (never malicious ones)."),
        OVERWRITE,
    ), _convert, "ckptlab convert", plan=_transform_plan(_convert),
         help="Pickle to .safetensors without executing anything in it."),
    Kind("prune", "Prune", (
        _input(),
        Field("ema", "--ema", "choice", "drop", ("drop", "keep", "use"),
              help="EMA weights: drop, keep, or use (replace the UNet = emaonly)."),
        Field("precision", "--precision", "choice", None, PRECISIONS, help="Also convert."),
        Field("clamp", "--clamp", "bool", False, help="Clamp values that overflow fp16 instead of refusing."),
        OUT_DIR, OVERWRITE,
    ), _prune, "ckptlab prune", plan=_transform_plan(_prune), help="Drop training state and EMA weights."),
    Kind("precision", "Change precision", (
        _input(),
        Field("to", "--to", "choice", None, PRECISIONS, required=True),
        Field("only", "--only", "text", help="Convert only these components: unet, vae, te (comma-separated)."),
        Field("clamp", "--clamp", "bool", False, help="Clamp values that overflow instead of refusing."),
        OUT_DIR, OVERWRITE,
    ), _precision, "ckptlab precision", plan=_transform_plan(_precision),
         help="Convert weights exactly; the VAE stays fp32 unless --only vae."),
    Kind("extract", "Extract a component", (
        _input("A checkpoint."),
        Field("component", "--component", "choice", None,
              ("unet", "vae", "clip_l", "clip_g", "openclip_h", "t5xxl", "ema"), required=True),
        Field("out", "--output", "path"), OUT_DIR, OVERWRITE,
    ), _extract, "ckptlab extract", plan=_transform_plan(_extract),
         help="Write one component as a standalone file."),
    Kind("replace", "Replace components", (
        _input("A checkpoint."),
        Field("vae", "--vae", "path", must_exist=True), Field("clip_l", "--clip-l", "path", must_exist=True),
        Field("clip_g", "--clip-g", "path", must_exist=True), Field("unet", "--unet", "path", must_exist=True),
        Field("out", "--output", "path"), OUT_DIR, OVERWRITE,
    ), _replace, "ckptlab replace", plan=_transform_plan(_replace),
         help="Bake components into a checkpoint, checking family and every shape first."),
    Kind("merge", "Merge models", (
        Field("method", "METHOD", "choice", "weighted_sum",
              ("weighted_sum", "add_difference", "triple_sum", "sum_twice", "slerp", "train_difference", "ties",
               "dare", "add_cosine", "subtract", "extract"), required=True),
        Field("model_a", "A", "path", required=True, must_exist=True, help="A decides layout and dtype."),
        Field("model_b", "B", "path", must_exist=True),
        Field("model_c", "C", "path", must_exist=True, help="Methods of three models."),
        Field("output", "--output", "path", required=True),
        Field("alpha", "--alpha", help="Number or block weights (preset, 26/20 values, NAME=V)."),
        Field("beta", "--beta"), Field("gamma", "--gamma", "float"), Field("density", "--density"),
        Field("seed", "--seed", "int"),
        Field("dtype", "--dtype", "choice", None, ("fp16", "bf16", "fp32", "fp64", "fp8_e4m3fn", "fp8_e5m2"),
              help="Output dtype (default: A's)."),
        Field("merge_dtype", "--merge-dtype", "choice", None, ("fp32", "fp64", "fp16", "bf16")),
        Field("missing", "--missing", "choice", None, ("keep-a", "union", "intersect", "error")),
        Field("vae", "--vae", "path", must_exist=True, help="Bake this VAE into the output."),
        Field("prune", "--prune", "bool", False, help="Drop EMA weights and training state."),
        Field("threads", "--threads", "int", 2), Field("device", "--device", "text", "cpu"),
        OVERWRITE,
    ), _merge, "ckptlab merge", plan=_merge_plan, prefill="model_a",
         help="Merge models, streaming one tensor at a time."),
    Kind("lora-bake", "Bake LoRAs", (
        Field("path", "BASE", "path", required=True, must_exist=True),
        Field("loras", "LORA", "paths", required=True, must_exist=True, help="One file per line."),
        Field("output", "--output", "path", required=True),
        Field("strengths", "--strength", help="One per LoRA, or one for all (comma-separated; default 1)."),
        Field("te_strengths", "--te-strength", help="The same for text-encoder weights."),
        Field("precision", "--precision", "choice", None, ("fp16", "bf16", "fp32")), OVERWRITE,
    ), _lora_bake, "ckptlab lora bake", plan=_bake_plan, help="Bake LoRAs into a checkpoint."),
    Kind("lora-extract", "Extract a LoRA", (
        Field("path", "TUNED", "path", required=True, must_exist=True),
        Field("base", "BASE", "path", required=True, must_exist=True),
        Field("output", "--output", "path", required=True),
        Field("rank", "--rank", "int", required=True),
        Field("conv_rank", "--conv-rank", "int"), Field("sv_fro", "--sv-fro", "float"),
        Field("sv_ratio", "--sv-ratio", "float"), Field("clamp_quantile", "--clamp-quantile", "float"),
        Field("min_diff", "--min-diff", "float", 0.01),
        Field("precision", "--precision", "choice", None, ("fp16", "bf16", "fp32")), OVERWRITE,
    ), _lora_extract, "ckptlab lora extract", plan=_out_plan("output"),
         help="A kohya LoRA of TUNED - BASE by SVD."),
    Kind("download", "Download", (
        Field("source", "SOURCE", required=True,
              help="civitai:ID, a civitai.com URL or AIR, hf:ORG/REPO/PATH[@REV] or a URL."),
        Field("dest", "--dir", "path", help="Library root (default: the config's [download] dir)."),
        Field("layout", "--layout", "choice", None, ("auto", "a1111", "comfyui", "flat")),
        Field("model_type", "--type", help="Folder type for URL/hf sources (lora, checkpoint, vae...)."),
        Field("file_id", "--file-id", "int"),
        Field("write_sidecars", "--write-sidecars", "bool", False),
    ), _download, "ckptlab download", prefill="source", catalogue=False,
         help="Resumable, SHA256-verified download into the library, then catalogued."),
    Kind("generate", "Generate images", (
        Field("path", "MODEL", "path", required=True, must_exist=True),
        Field("output", "--output", "path", required=True, help="The image (.png, .jpg, .webp)."),
        *_GEN_COMMON,
        Field("schedule", "--schedule"),
        Field("clip_skip", "--clip-skip", "int", 1),
        Field("count", "--count", "int", 1),
        *_GEN_TAIL, OVERWRITE,
    ), _generate, "ckptlab generate", plan=_out_plan("output"), help="Render images offline."),
    Kind("grid", "X/Y/Z grid", (
        Field("path", "MODEL", "path", must_exist=True),
        Field("output", "--output", "path", required=True),
        Field("x", "--x", required=True, help="AXIS=V1,V2,... (model, merge:PARAM, lora, seed, steps, cfg...)."),
        Field("y", "--y"), Field("z", "--z"),
        Field("merge", "--merge", "path", must_exist=True, help="A merge recipe computed in memory."),
        *_GEN_COMMON, *_GEN_TAIL, OVERWRITE,
    ), _grid, "ckptlab grid", plan=_out_plan("output"), help="A comparison grid."),
    Kind("apply-plan", "Apply a disk plan", (
        Field("plan", "PLAN", "path", required=True, must_exist=True, help="A plan written by plan-space."),
    ), _apply_plan, "ckptlab apply-plan", plan=_apply_plan_check, prefill="plan", catalogue=False, internal=True,
         help="Carry out a reviewed plan step by step (each kept copy re-verified first)."),
]}


# ------------------------------------------------------------------------------------------------ results


def made_paths(result) -> list[str]:
    """The files a job's API result says it wrote."""
    out: list[str] = []

    def add(p) -> None:
        if p:
            out.append(os.path.abspath(os.fspath(p)))

    items = result if isinstance(result, list) else [result]
    for r in items:
        if r is None or getattr(r, "dry_run", False) or getattr(r, "unchanged", None):
            continue
        if type(r).__name__ == "StepResult":
            if getattr(r, "status", None) == "done" and getattr(r, "new_path", None):
                add(r.new_path)
            continue
        if type(r).__name__ == "DownloadResult":
            add(getattr(r, "path", None))
            continue
        images = getattr(r, "images", None)
        if isinstance(images, list):
            for im in images:
                add(getattr(im, "path", im))
        output = getattr(r, "output", None)
        if isinstance(output, (str, os.PathLike)):
            add(output)
    return [p for p in dict.fromkeys(out) if os.path.exists(p)]
