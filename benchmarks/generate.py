"""Generation benchmarks (issue 15): time to first image from one single-file checkpoint, ``ckptlab generate``
against diffusers' own single-file loading, same file, same settings, same run.

    python benchmarks/generate.py --quick             # small layouts, seconds (BENCH_QUICK=1 does the same)
    python benchmarks/generate.py                     # real size SD1.5 (fp16 file, 2.0 GiB), cached
    python benchmarks/generate.py --models sd1,sdxl   # also SDXL (fp16 file, 6.5 GiB; each contender peaks ~13.5-14 GiB)
    python benchmarks/generate.py --repeat 3          # best of 3 per contender
    python benchmarks/generate.py --threads 1         # one OpenMP thread per child (a busy shared machine)
    python benchmarks/generate.py --gpu               # also the CUDA it/s part (skipped, saying so, without CUDA)
    python benchmarks/generate.py --delete            # remove the generated inputs afterwards

Inputs are generated once into ``.bench-cache/generate/`` (git-ignored): ``ckptlab.sample``'s full-size layouts
(``sd1_checkpoint``, ``sdxl_checkpoint``: the real key names and shapes, seeded random values, fp16), and per
model a diffusers config folder (``model_index.json``, the component configs, the tokenizer files; no weights)
for diffusers' ``from_single_file(config=...)``.

Time to first image: each contender is a fresh child process (``python -m ckptlab`` / ``python`` + imports,
both timed), on a warm page cache, CPU, fp32 compute, offline (``HF_HUB_OFFLINE=1``), seed 1, Euler, 2 steps,
CFG 7, 64x64 by default (``--size``, ``--steps``): the sampling is a small, equal share, so loading dominates.
Wall time runs from the parent's ``Popen`` to the child's exit, the PNG written. The parent samples the
child's RssAnon (anonymous memory: not page cache or mmapped file pages) every 10 ms.

- ckptlab: ``ckptlab generate MODEL -p PROMPT --seed 1 --steps 2 --size 64x64 --sampler Euler --device cpu
  --db CATALOG -o OUT.png`` ("hash cached": ``ckptlab hash --db CATALOG`` ran first, as for a model already in
  the library; "cold catalog": a new catalog each run, so the sha256 of the whole file for the infotext's
  ``Model hash`` runs alongside the load; ``--no-cold`` skips it).
- diffusers: ``StableDiffusionPipeline.from_single_file(MODEL, config=FOLDER, local_files_only=True,
  torch_dtype=torch.float32)`` (``StableDiffusionXLPipeline`` for SDXL), ``EulerDiscreteScheduler`` from the
  pipeline's scheduler config, ``pipe(prompt, num_inference_steps=2, guidance_scale=7, height=64, width=64,
  generator=torch.Generator("cpu").manual_seed(1))``, the image saved as PNG.

Load only: the same two loaders in children that import torch, diffusers and transformers' CLIP classes
first, timing only ``generate.pipeline.load`` / ``from_single_file`` (what the loader itself costs, apart from
the imports both pay).

Both images are compared (max pixel difference, in 1/255 steps): the same pixels, or the timing compares
different work. Targets (issue 15): ckptlab's wall time ≤ 0.6x diffusers'; ckptlab's peak RssAnon ≤ the
weights at the compute dtype + 1 GiB.

``--gpu`` (CUDA only; says "skipped" without it): SD1.5 at 512x512, 20 steps, fp16, Euler: denoising it/s of
ckptlab's in-memory pipeline (``generate.pipeline.load``) against diffusers' ``from_single_file`` pipeline,
each in its own child, the same call timed after one warm-up; target: within 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _measure import (
    cache_dir,
    child_env,
    emit_wall,
    job_cmd,
    job_main,
    job_wall,
    mib,
    print_table,
    ratio,
    run_measured,
    use_src,
    warm,
)

CACHE = cache_dir("generate")
GIB = 2**30
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
SEED = 1
SPECS = {"sd1": "sd1_checkpoint", "sdxl": "sdxl_checkpoint"}
PIPES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


#: extra environment of every child (``--threads`` sets OMP_NUM_THREADS / MKL_NUM_THREADS for both contenders)
CHILD_ENV: dict[str, str] = {}


def _env() -> dict[str, str]:
    return child_env(**OFFLINE, **CHILD_ENV)


# -- inputs ------------------------------------------------------------------------------------------------
def model_file(model: str, quick: bool) -> Path:
    from ckptlab.sample.build import write_model

    p = CACHE / f"{SPECS[model]}{'_small' if quick else ''}.safetensors"
    if not p.exists():
        t = time.perf_counter()
        write_model(p, SPECS[model], small=quick, dtype="F16", seed=0)
        print(f"generated {p.name} ({p.stat().st_size / GIB:.2f} GiB) in {time.perf_counter() - t:.1f} s",
              flush=True)
    return p


def config_folder(model: str, path: Path) -> Path:
    """A diffusers repository without weights (configs from the file's shapes, the CLIP tokenizer files ckptlab
    ships): what ``from_single_file(config=...)`` reads instead of the hub."""
    from ckptlab.formats import open_model
    from ckptlab.ops import diffusers_config as cfgs
    from ckptlab.ops.diffusers_io import TEXT_ENCODERS, plan_to_diffusers

    out = CACHE / f"{path.stem}_config"
    if (out / "model_index.json").exists():
        return out
    src = open_model(path)
    try:
        fam, _, configs, _, _ = plan_to_diffusers(src)
    finally:
        src.close()
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    for rel, obj in configs.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(cfgs.dumps(obj))
    for folder, _, kind in TEXT_ENCODERS[fam]:
        tok = tmp / folder.replace("text_encoder", "tokenizer")
        tok.mkdir(parents=True, exist_ok=True)
        for name, data in cfgs.tokenizer_files("<|endoftext|>" if kind == "hf" else "!").items():
            (tok / name).write_bytes(data)
    tmp.rename(out)
    return out


def weights_bytes(path: Path, itemsize: int = 4) -> int:
    """The model's floating-point weights at the compute dtype (fp32: 4 bytes each)."""
    import math

    from ckptlab.formats import open_model

    src = open_model(path)
    try:
        return sum(math.prod(i.shape) * itemsize for i in src.infos().values() if i.dtype.startswith(("F", "BF")))
    finally:
        src.close()


# -- diffusers' own path (run as ``--job`` children) ---------------------------------------------------------
def job_diffusers(model: str, path: str, config: str, out: str, size: str, steps: str) -> None:
    import diffusers
    import torch

    cls = getattr(diffusers, PIPES[model])
    kw = {"safety_checker": None, "requires_safety_checker": False} if model == "sd1" else {}
    pipe = cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=torch.float32, **kw)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(x) for x in size.split("x"))
    with torch.inference_mode():
        image = pipe(PROMPT, num_inference_steps=int(steps), guidance_scale=7.0, height=h, width=w,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    image.save(out)


def job_gpu(who: str, model: str, path: str, config: str) -> None:
    """CUDA it/s of one pipeline: 512x512, 20 steps, fp16, Euler, latents only; one warm-up call."""
    import torch

    if who == "ckptlab":
        from ckptlab.formats import open_model
        from ckptlab.imaging.pipeline import load

        pipe = load(open_model(Path(path)), device="cuda", dtype=torch.float16).pipe
    else:
        import diffusers

        cls = getattr(diffusers, PIPES[model])
        kw = {"safety_checker": None, "requires_safety_checker": False} if model == "sd1" else {}
        pipe = cls.from_single_file(path, config=config, local_files_only=True, torch_dtype=torch.float16,
                                    **kw).to("cuda")
    import diffusers

    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    steps = 20

    def run() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.0, height=512, width=512, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(SEED))
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run()
    best = min(run() for _ in range(3))
    print(json.dumps({"its": steps / best, "card": torch.cuda.get_device_name(0)}), flush=True)


def _import_all(model: str):
    """Everything both loaders import, imported before the timed load (the load-only rows)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    getattr(diffusers, PIPES[model]), diffusers.UNet2DConditionModel, diffusers.AutoencoderKL  # noqa: B018
    return torch, diffusers


def job_load(who: str, model: str, path: str, config: str) -> None:
    """Load only: the libraries imported first, then the pipeline built (fp32, CPU), timed with ``emit_wall``."""
    torch, diffusers = _import_all(model)
    if who == "ckptlab":
        from ckptlab.formats import open_model
        from ckptlab.imaging.pipeline import load

        t0 = time.perf_counter()
        load(open_model(Path(path)), device="cpu", dtype=torch.float32)
    else:
        kw = {"safety_checker": None, "requires_safety_checker": False} if model == "sd1" else {}
        t0 = time.perf_counter()
        getattr(diffusers, PIPES[model]).from_single_file(path, config=config, local_files_only=True,
                                                          torch_dtype=torch.float32, **kw)
    emit_wall(t0)


JOBS = {"diffusers": job_diffusers, "gpu": job_gpu, "load": job_load}


# -- measurements ------------------------------------------------------------------------------------------
def max_pixel_diff(a: Path, b: Path) -> int:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max()) if x.shape == y.shape else 255


def _measured(cmd: list, label: str):
    """``run_measured`` plus the child's CPU time (user + system, from ``RUSAGE_CHILDREN``): on a busy shared
    machine wall time swings with the neighbours' load, CPU time much less."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = run_measured([str(c) for c in cmd], env=_env(), label=label)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m.cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return m


def _best(runs):
    return min(runs, key=lambda m: m.wall), max(m.peak for m in runs)


def bench_model(model: str, quick: bool, size: str, steps: int, repeat: int, tools: set[str],
                cold: bool = True) -> list[dict]:
    path = model_file(model, quick)
    config = config_folder(model, path)
    wbytes = weights_bytes(path)
    work = Path(tempfile.mkdtemp(prefix="gen-", dir=CACHE))
    try:
        warm(path)
        ours = [sys.executable, "-m", "ckptlab", "generate", str(path), "-p", PROMPT, "--seed", str(SEED),
                "--steps", str(steps), "--size", size, "--sampler", "Euler", "--device", "cpu", "--overwrite"]
        cached_db = work / "cached.db"
        rows: dict[str, tuple] = {}
        images: dict[str, Path] = {}
        if "ckptlab" in tools:
            # ``ckptlab hash`` fills the catalog's hash cache first (a model already in the library)
            _measured([sys.executable, "-m", "ckptlab", "hash", str(path), "--db", str(cached_db)], "hash")
            variants = [("ckptlab (hash cached)", lambda i: cached_db)]
            if cold:
                variants.append(("ckptlab (cold catalog)", lambda i: work / f"cold{i}.db"))
            for name, db in variants:
                out = work / f"{name.split()[1][1:]}.png"
                runs = [_measured([*ours, "--db", str(db(i)), "-o", str(out)], name) for i in range(repeat)]
                rows[name] = _best(runs)
                images[name] = out
        if "diffusers" in tools:
            out = work / "diffusers.png"
            cmd = job_cmd(__file__, "diffusers", model, path, config, out, size, steps)
            rows["diffusers from_single_file"] = _best([_measured(cmd, "diffusers") for _ in range(repeat)])
            images["diffusers from_single_file"] = out
        base = rows.get("diffusers from_single_file", (None,))[0]
        ref = images.get("diffusers from_single_file")
        table, out_rows = [], []
        for name, (m, peak) in rows.items():
            x = ratio(m.wall, base.wall) if base else float("nan")
            diff = max_pixel_diff(images[name], ref) if ref and name in images and images[name] != ref else 0
            cx = ratio(m.cpu, base.cpu) if base else float("nan")
            table.append((name, m.wall, x, m.cpu, cx, mib(peak), ratio(peak, wbytes), diff))
            out_rows.append({"model": model, "contender": name, "wall_s": round(m.wall, 2), "x_diffusers": round(x, 3),
                             "cpu_s": round(m.cpu, 2), "cpu_x_diffusers": round(cx, 3),
                             "peak_rss_mib": round(mib(peak)), "weights_fp32_mib": round(mib(wbytes)),
                             "max_pixel_diff": diff, "size": size, "steps": steps, "quick": quick})
        print(f"\n{model}: {path.name} ({path.stat().st_size / GIB:.2f} GiB fp16 file, weights at fp32 "
              f"{wbytes / GIB:.2f} GiB), CPU fp32, {size}, {steps} steps, Euler, best of {repeat}")
        print_table(("contender", "wall s", "x diffusers", "cpu s", "x diffusers", "peak RssAnon MiB",
                     "x fp32 weights", "max px diff"), table, ("", ".2f", ".2f", ".2f", ".2f", ".0f", ".2f", "d"))
        for name, (m, peak) in rows.items():
            if name.startswith("ckptlab") and base is not None:
                t_ok = m.wall <= 0.6 * base.wall
                r_ok = peak <= wbytes + GIB
                print(f"  {name}: time {'met' if t_ok else 'NOT met'} (≤ 0.6x), peak RSS {'met' if r_ok else 'NOT met'}"
                      f" (≤ weights + 1 GiB = {mib(wbytes + GIB):.0f} MiB)")
        load_rows = {}
        for who in ("ckptlab", "diffusers"):
            if who in tools:
                runs = [_measured(job_cmd(__file__, "load", who, model, path, config), f"load {who}")
                        for _ in range(repeat)]
                load_rows[who] = min(job_wall(m) for m in runs), max(m.peak for m in runs)
        if load_rows:
            lb = load_rows.get("diffusers", (None,))[0]
            print(f"{model}: load only (libraries imported first, in the same child; fp32 CPU), best of {repeat}")
            print_table(("loader", "load s", "x diffusers", "peak RssAnon MiB"),
                        [(k, w, ratio(w, lb) if lb else float("nan"), mib(pk)) for k, (w, pk) in load_rows.items()],
                        ("", ".2f", ".2f", ".0f"))
            out_rows += [{"model": model, "contender": f"load only: {k}", "wall_s": round(w, 2),
                          "x_diffusers": round(ratio(w, lb), 3) if lb else None, "peak_rss_mib": round(mib(pk))}
                         for k, (w, pk) in load_rows.items()]
        return out_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_gpu(quick: bool) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print("\ngpu: skipped: no CUDA device here (torch.cuda.is_available() is False); the it/s comparison "
              "runs only with CUDA")
        return []
    path = model_file("sd1", quick)
    config = config_folder("sd1", path)
    res = {}
    for who in ("ckptlab", "diffusers"):
        m = run_measured(job_cmd(__file__, "gpu", who, "sd1", path, config), env=_env(), label=f"gpu {who}")
        res[who] = json.loads(m.stdout.strip().splitlines()[-1])
    card = res["ckptlab"]["card"]
    x = ratio(res["ckptlab"]["its"], res["diffusers"]["its"])
    print(f"\ngpu: SD1.5 512x512, 20 steps, fp16, Euler, on {card}")
    print_table(("contender", "it/s", "x diffusers"),
                [("ckptlab", res["ckptlab"]["its"], x), ("diffusers", res["diffusers"]["its"], 1.0)],
                ("", ".2f", ".3f"))
    print(f"  target within 5 %: {'met' if abs(x - 1) <= 0.05 else 'NOT met'}")
    return [{"gpu": card, "contender": k, "its": round(v["its"], 3)} for k, v in res.items()]


def main() -> None:
    use_src()
    if job_main(JOBS):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                    help="small layouts (seconds); also BENCH_QUICK=1")
    ap.add_argument("--models", default="sd1", help="comma-separated: sd1, sdxl")
    ap.add_argument("--tools", default="ckptlab,diffusers", help="comma-separated: ckptlab, diffusers")
    ap.add_argument("--size", default="64x64", help="image size WxH (default 64x64: loading dominates)")
    ap.add_argument("--steps", type=int, default=2, help="sampling steps (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per contender, the fastest reported")
    ap.add_argument("--gpu", action="store_true", help="also the CUDA it/s comparison (skipped without CUDA)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-catalog row (hash computed in the run)")
    ap.add_argument("--delete", action="store_true", help="delete the generated inputs afterwards")
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS / MKL_NUM_THREADS of every child (default: torch's own choice); on a "
                         "busy machine 1 avoids OpenMP threads spinning for each other")
    args = ap.parse_args()
    if args.threads:
        CHILD_ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    models = [m for m in args.models.split(",") if m]
    tools = {t for t in args.tools.split(",") if t}
    if bad := [m for m in models if m not in SPECS] + sorted(tools - {"ckptlab", "diffusers"}):
        ap.error(f"unknown: {', '.join(bad)}")
    CACHE.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in models:
        rows += bench_model(m, args.quick, args.size, args.steps, max(1, args.repeat), tools, not args.no_cold)
    if args.gpu:
        rows += bench_gpu(args.quick)
    if args.json:
        print(json.dumps(rows))
    if args.delete:
        for p in CACHE.iterdir():
            if p.name.endswith("_small.safetensors" if args.quick else ".safetensors") or (
                    p.is_dir() and p.name.endswith("_config") and args.quick == ("_small" in p.name)):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


if __name__ == "__main__":
    main()
