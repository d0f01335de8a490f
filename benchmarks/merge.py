"""Merge benchmark: ckptlab vs sd-mecha vs a load-everything merge, same inputs, same run.

    python benchmarks/merge.py --quick          # small-layout SD1 files, a few seconds
    python benchmarks/merge.py                  # real-size SD1.5 fp16 pair (2 x 2.1 GB, cached)
    python benchmarks/merge.py --family sdxl    # real-size SDXL fp16 pair (2 x 6.9 GB, cached)
    python benchmarks/merge.py --method ties    # another method (a third input C is generated when needed)

Inputs are generated once into .bench-cache/merge/ (real key layout and shapes from ckptlab.sample,
seeded random values, data written - not sparse). Each tool runs in its own subprocess on a warm page
cache; the parent samples the child's RssAnon from /proc every 10 ms (anonymous memory only: mmap'ed
file pages are page cache, not the tool's memory). Wall time is the merge call itself (imports not
counted; sd-mecha's ~5 s import would otherwise dominate). Job: weighted_sum alpha 0.5, fp32 math,
fp16 output. ckptlab's time includes the sha256 of both inputs (the recipe pins them) and an fsync of the
output; "ckptlab-catalogued" is the same merge when the inputs' hashes are already in the catalog. ``--delete`` removes the generated inputs afterwards.

``--method`` measures another method: ties and extract take A (base), B and C; slerp and add_cosine A and
B. sd-mecha runs its counterpart where it has one (slerp, add_cosine_a, add_difference); "ckptlab-weighted_sum" (the same inputs' A and B) is always there as a reference for what a
method costs beyond the streaming minimum.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _measure import (
    cache_dir,
    child_env,
    emit_wall,
    job_cmd,
    job_main,
    job_wall,
    print_table,
    ratio,
    run_measured,
    warm,
)

CACHE = cache_dir("merge")


#: method -> (inputs, ckptlab params, sd-mecha builder or None)
METHODS = {
    "weighted_sum": (2, {"alpha": 0.5}, lambda m, xs: m.weighted_sum(*xs, alpha=0.5)),
    "add_difference": (3, {"alpha": 1.0}, lambda m, xs: m.add_difference(*xs, alpha=1.0)),
    "slerp": (2, {"alpha": 0.5}, lambda m, xs: m.slerp(*xs, alpha=0.5)),
    "add_cosine": (2, {"alpha": 0.5}, lambda m, xs: m.add_cosine_a(*xs, alpha=0.5)),
    # sd-mecha 1.1.8: add_difference_ties and ties_sum over subtract() fail with "NoneType has no identifier"
    "ties": (3, {"alpha": 1.0, "density": 0.2}, None),
    "dare": (3, {"alpha": 1.0, "density": 0.5}, None),
    "extract": (3, {"alpha": 0.5, "beta": 0.0, "gamma": 1.0}, None),
    "train_difference": (3, {"alpha": 1.0}, None),
}


def make_inputs(family: str, quick: bool, count: int = 2) -> list[Path]:
    from ckptlab.sample.build import write_model

    spec = {"sd1": "sd1_checkpoint", "sdxl": "sdxl_checkpoint"}[family]
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{family}{'_small' if quick else ''}"
    paths = []
    for n, seed in (("a", 11), ("b", 12), ("c", 13))[:count]:
        p = CACHE / f"{tag}_{n}.safetensors"
        if not p.exists():
            t = time.perf_counter()
            write_model(p, spec, small=quick, dtype="F16", seed=seed)
            print(f"generated {p.name} ({p.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s",
                  flush=True)
        paths.append(p)
    return paths


# -- jobs (run in a child process) ---------------------------------------------------------------
def job_ckptlab(method: str, out: str, threads: str, *inputs: str) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as for the other tools

    from ckptlab.hashes import NO_CACHE
    from ckptlab.library.catalog import hash_cache
    from ckptlab.merging import merge

    # "ckptlab-catalogued": the inputs' sha256 come from a catalog, as the CLI passes it from --db
    catalog = os.environ.get("BENCH_CATALOG")
    cache = hash_cache(catalog) if catalog else NO_CACHE
    t = time.perf_counter()
    merge(method, list(inputs), out, params=METHODS[method][1], dtype="fp16", threads=int(threads), overwrite=True,
          cache=cache)
    emit_wall(t)


def job_mecha(method: str, out: str, threads: str, *inputs: str) -> None:
    import sd_mecha
    import torch

    t = time.perf_counter()
    recipe = METHODS[method][2](sd_mecha, [sd_mecha.model(x) for x in inputs])
    sd_mecha.merge(recipe, output=out, merge_device="cpu", merge_dtype=torch.float32, output_device="cpu",
                   output_dtype=torch.float16)
    emit_wall(t)


def job_naive(method: str, out: str, threads: str, a: str, b: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    sa, sb = load_file(a), load_file(b)
    res = {k: torch.lerp(v.float(), sb[k].float(), 0.5).half() if v.is_floating_point() else v
           for k, v in sa.items()}
    save_file(res, out)
    emit_wall(t)


JOBS = {"ckptlab": job_ckptlab, "ckptlab-catalogued": job_ckptlab, "ckptlab-weighted_sum": job_ckptlab,
        "sd-mecha": job_mecha, "load-everything": job_naive}


def catalogue_inputs(*paths: Path) -> Path:
    """A catalog that already holds the inputs' hashes, as after ``ckptlab scan --hash`` of a library:
    the "ckptlab-catalogued" run then pins its recipe without reading the inputs a second time."""
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import hash_paths

    db = CACHE / "catalog.db"
    with Catalog(db) as cat:
        hash_paths(list(paths), cat)
    return db


def run_job(name: str, method: str, inputs: list[Path], out: Path, threads: int) -> dict:
    out.unlink(missing_ok=True)
    extra = {"BENCH_CATALOG": str(catalogue_inputs(*inputs))} if name == "ckptlab-catalogued" else {}
    if name in ("ckptlab-weighted_sum", "load-everything"):
        method, inputs = "weighted_sum", inputs[:2]
    m = run_measured(job_cmd(__file__, name, method, out, threads, *inputs),
                     env=child_env(TQDM_DISABLE="1", **extra), label=name)
    return {"tool": name, "wall_s": round(job_wall(m), 2), "peak_rss_anon_mib": round(m.peak / 2**20, 1)}


def _same_tensors(x: Path, y: Path) -> bool:
    from safetensors import safe_open

    with safe_open(x, "pt") as fx, safe_open(y, "pt") as fy:
        keys = [k for k in fx.keys() if k in set(fy.keys())]
        return all(fx.get_tensor(k).equal(fy.get_tensor(k)) for k in keys)


def main() -> None:
    if job_main(JOBS):
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small-layout files (seconds)")
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", choices=sorted(METHODS), default="weighted_sum")
    ap.add_argument("--tools", default=None,
                    help="ckptlab hashes both inputs while merging (sha256 pins the recipe); ckptlab-catalogued "
                         "finds them in a catalog made beforehand by `ckptlab hash`, as in a scanned library")
    ap.add_argument("--delete", action="store_true", help="delete the generated inputs afterwards")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool, interleaved; the best is reported")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n_in, _, peer = METHODS[args.method]
    if args.tools is None:
        args.tools = ("ckptlab,ckptlab-catalogued,sd-mecha,load-everything" if args.method == "weighted_sum" else
                      "ckptlab," + ("sd-mecha," if peer else "") + "ckptlab-weighted_sum")
    inputs = make_inputs(args.family, args.quick, n_in)
    a, b = inputs[:2]
    outs = {}
    rows = []
    warm(*inputs)
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for name in args.tools.split(","):
            out = CACHE / f"out_{name}.safetensors"
            r = run_job(name, args.method, inputs, out, args.threads)
            print(r, flush=True)
            outs[name] = out
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = {**r, "peak_rss_anon_mib": max(r["peak_rss_anon_mib"],
                                                            best.get(name, r)["peak_rss_anon_mib"])}
    rows = list(best.values())
    base = next((r for r in rows if r["tool"] == "sd-mecha"), None)
    for r in rows:
        r["wall_vs_sd_mecha"] = round(ratio(r["wall_s"], base["wall_s"]), 3) if base else None
    if "ckptlab" in outs and "load-everything" in outs:
        rows[0]["same_tensors_as_load_everything"] = _same_tensors(outs["ckptlab"], outs["load-everything"])
    size = a.stat().st_size / 2**30
    print(f"\n{args.family}{' (quick)' if args.quick else ''}: {args.method} of {n_in} x {size:.2f} GiB fp16, "
          f"fp32 math, fp16 out, {os.cpu_count()} CPUs, best wall of {args.repeat} (peak memory: worst), "
          f"load average {os.getloadavg()[0]:.1f}")
    print_table(("tool", "wall s", "x sd-mecha", "peak RssAnon MiB"),
                ((r["tool"], r["wall_s"], r["wall_vs_sd_mecha"] if base else "-", r["peak_rss_anon_mib"])
                 for r in rows), ("", ".2f", ".3f" if base else "", ".1f"))
    if "same_tensors_as_load_everything" in rows[0]:
        print(f"ckptlab output tensors identical to the load-everything merge: "
              f"{rows[0]['same_tensors_as_load_everything']}")
    if args.json:
        print(json.dumps(rows))
    for out in outs.values():
        out.unlink(missing_ok=True)
    if args.delete:
        for p in inputs:
            p.unlink()


if __name__ == "__main__":
    main()
