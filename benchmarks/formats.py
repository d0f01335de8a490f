"""Model-file layer benchmark: header parsing and a streamed copy, ckptlab vs the safetensors library.

    python benchmarks/formats.py --quick          # small-layout SDXL checkpoint, a few seconds
    python benchmarks/formats.py                  # real-size: SDXL header, SD1.5 fp16 copy (2.1 GB)
    python benchmarks/formats.py --family sdxl    # real-size SDXL fp16 copy (6.9 GB; needs ~8 GB free RAM)

1. open: parse and validate the header of a real-size SDXL checkpoint (2.5k tensors; the file is
   sparse, only the header matters) and list every key's dtype and shape - ckptlab
   ``SafetensorsSource`` vs ``safetensors.safe_open`` (+ ``get_slice`` shapes). In-process, median.
2. copy: rewrite a whole checkpoint into a new file - ckptlab (mmap source -> ``SafetensorsWriter``,
   one tensor at a time, zero-copy ``write_raw``) vs safetensors (``load_file`` + ``save_file``).
   ckptlab fsyncs before the rename (safetensors does not), so two more runs compare like with
   like: ckptlab without the fsync, and safetensors followed by an fsync. Each in its own subprocess; the parent samples the child's RssAnon (anonymous memory, not page
   cache) every 10 ms. The input is generated once into .bench-cache/formats/ by ckptlab.sample
   with the real SDXL layout; by default it is sparse (header + holes: no 6.9 GB of disk writes to
   set up, and both tools read the same zero pages), ``--dense`` writes real values. Outputs are
   deleted after each run; ``--delete`` removes the cached input too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _measure import cache_dir, emit_wall, job_cmd, job_main, job_wall, ratio, run_measured, use_src, warm

CACHE = cache_dir("formats")


def make_input(family: str, quick: bool, dense: bool) -> Path:
    from ckptlab.sample.build import write_model

    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"{family}{'_small' if quick else ''}{'_dense' if dense else ''}.safetensors"
    if not p.exists():
        t = time.perf_counter()
        write_model(p, f"{family}_checkpoint", small=quick, sparse=not quick and not dense, dtype="F16", seed=3)
        print(f"generated {p.name} ({p.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s", flush=True)
    return p


# -- 1. header parsing (in process) --------------------------------------------------------------
def bench_open(path: Path, runs: int) -> list[dict]:
    from safetensors import safe_open

    from ckptlab.formats.safetensors import SafetensorsSource

    def ours():
        src = SafetensorsSource(path)
        return [(k, i.dtype, i.shape) for k, i in src.infos().items()]

    def theirs():
        with safe_open(str(path), "pt") as f:
            out = []
            for k in f.keys():
                s = f.get_slice(k)
                out.append((k, s.get_dtype(), tuple(s.get_shape())))
            return out

    assert sorted(k for k, *_ in ours()) == sorted(k for k, *_ in theirs())
    rows = []
    for name, fn in (("ckptlab", ours), ("safetensors", theirs)):
        fn()  # warm
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rows.append({"task": "open+list", "tool": name, "median_ms": round(statistics.median(times) * 1000, 2)})
    return rows


# -- 2. streamed copy (child processes) ----------------------------------------------------------
def job_ckptlab(src: str, out: str) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as for the other tool

    from ckptlab.formats.safetensors import SafetensorsSource
    from ckptlab.formats.writer import SafetensorsWriter

    t = time.perf_counter()
    with SafetensorsSource(src) as s, SafetensorsWriter(out, s.infos(), s.metadata, overwrite=True) as w:
        for k in s.keys():
            w.write_raw(k, s.raw_bytes(k))
    emit_wall(t)


def job_ckptlab_nofsync(src: str, out: str) -> None:
    """The same copy without the final fsync (what safetensors' save_file does not do either)."""
    os.fsync = lambda fd: None
    job_ckptlab(src, out)


def job_safetensors(src: str, out: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    save_file(load_file(src), out, metadata=meta)
    emit_wall(t)


def job_safetensors_fsync(src: str, out: str) -> None:
    """save_file, then fsync: the durability ckptlab's writer gives before its rename."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    t = time.perf_counter()
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    save_file(load_file(src), out, metadata=meta)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    emit_wall(t)


JOBS = {"ckptlab": job_ckptlab, "safetensors": job_safetensors, "ckptlab-no-fsync": job_ckptlab_nofsync,
        "safetensors+fsync": job_safetensors_fsync}


def run_job(name: str, src: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    m = run_measured(job_cmd(__file__, name, src, out), label=name)
    return {"task": "copy", "tool": name, "wall_s": round(job_wall(m), 2), "peak_rss_anon_mib": round(m.peak / 2**20, 1)}


def _same(a: Path, b: Path) -> bool:
    from ckptlab.formats.safetensors import SafetensorsSource

    with SafetensorsSource(a) as x, SafetensorsSource(b) as y:
        return x.metadata == y.metadata and set(x.keys()) == set(y.keys()) and all(
            x.info(k) == y.info(k) and bytes(x.raw_bytes(k)) == bytes(y.raw_bytes(k)) for k in x.keys())


def main() -> None:
    if job_main(JOBS):
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small-layout SDXL checkpoint (seconds)")
    ap.add_argument("--family", choices=("sd1", "sdxl"), default="sd1", help="checkpoint copied (default sd1)")
    ap.add_argument("--dense", action="store_true", help="write real values into the input (slow to set up)")
    ap.add_argument("--runs", type=int, default=20, help="header-parse repetitions")
    ap.add_argument("--delete", action="store_true", help="remove the cached input afterwards")
    args = ap.parse_args()
    use_src()
    head = make_input("sdxl", args.quick, False)
    src = head if args.quick else make_input(args.family, False, args.dense)
    print(f"header input: {head.name}; copy input: {src.name} ({src.stat().st_size / 2**30:.2f} GiB)")
    rows = bench_open(head, args.runs)
    warm(src)  # ckptlab's writer uses direct I/O, so a freshly generated input is not in the page cache
    outs = []
    for tool in JOBS:
        out = CACHE / f"out_{tool}.safetensors"
        rows.append(run_job(tool, src, out))
        outs.append(out)
    identical = _same(src, outs[0]) and all(_same(outs[0], o) for o in outs[1:])
    for o in outs:
        o.unlink(missing_ok=True)
    for r in rows:
        print(json.dumps(r))
    o_ck, o_st = rows[0]["median_ms"], rows[1]["median_ms"]
    c_ck, c_st, c_nf, c_sf = rows[2], rows[3], rows[4], rows[5]
    print(f"open+list: ckptlab {o_ck} ms vs safetensors {o_st} ms (ratio {ratio(o_st, o_ck):.2f}x)")
    print(f"copy: ckptlab {c_ck['wall_s']} s / {c_ck['peak_rss_anon_mib']} MiB anon vs safetensors "
          f"{c_st['wall_s']} s / {c_st['peak_rss_anon_mib']} MiB anon "
          f"(time ratio {ratio(c_st['wall_s'], c_ck['wall_s']):.2f}x, memory ratio "
          f"{ratio(c_st['peak_rss_anon_mib'], c_ck['peak_rss_anon_mib']):.1f}x); outputs identical tensors: "
          f"{identical}")
    print(f"copy without fsync: ckptlab {c_nf['wall_s']} s vs safetensors {c_st['wall_s']} s "
          f"(time ratio {ratio(c_st['wall_s'], c_nf['wall_s']):.2f}x)")
    print(f"copy with fsync: ckptlab {c_ck['wall_s']} s vs safetensors+fsync {c_sf['wall_s']} s "
          f"(time ratio {ratio(c_sf['wall_s'], c_ck['wall_s']):.2f}x)")
    if args.delete:
        src.unlink(missing_ok=True)
        head.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
