"""Library scan benchmark: a synthetic library of sparse real-layout files, first scan vs re-scan.

    python benchmarks/scan.py --quick       # 1,000 files, seconds
    python benchmarks/scan.py               # 10,000 files (the issue's size)
    python benchmarks/scan.py --delete      # remove the generated library afterwards

The library (under ``.bench-cache/scan/``) mixes A1111 and ComfyUI folders: 70 % LoRAs, 10 %
embeddings, 10 % checkpoints (SD1.5 / SDXL), 5 % VAEs, 5 % ControlNets. Every file carries the real
header of its kind (``ckptlab.sample``, real widths) and a sparse data region, so the apparent
library size is several TB while the disk holds only headers. No hashing: the scan reads headers,
identifies, records sidecar-free rows. The first scan starts from an empty catalog; the second
scan of the unchanged tree must be >= 100x faster (issue 4); the target for the first scan is
<= 10 s per 1,000 files. Peak RssAnon (anonymous memory, not page cache) is printed for each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from _measure import PeakRss, cache_dir, use_src

CACHE = cache_dir("scan")

MIX = (  # spec, share, A1111 folder, ComfyUI folder
    ("sd1_kohya_lora", 0.50, "models/Lora", "models/loras"),
    ("sdxl_kohya_lora", 0.20, "models/Lora", "models/loras"),
    ("sd1_embedding", 0.10, "embeddings", "models/embeddings"),
    ("sd1_checkpoint", 0.06, "models/Stable-diffusion", "models/checkpoints"),
    ("sdxl_checkpoint", 0.04, "models/Stable-diffusion", "models/checkpoints"),
    ("sd1_vae", 0.05, "models/VAE", "models/vae"),
    ("sd1_controlnet", 0.05, "models/ControlNet", "models/controlnet"),
)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (worker processes)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def make_library(n: int) -> Path:
    from ckptlab.formats.writer import build_header
    from ckptlab.sample.build import plan

    lib = CACHE / f"lib_{n}"
    if (lib / ".complete").exists():
        return lib
    if lib.exists():
        shutil.rmtree(lib)
    t = time.perf_counter()
    headers = {}
    for spec, *_ in MIX:
        p = plan(spec, small=False, dtype="F16")
        headers[spec] = (build_header(p, {"ss_output_name": spec}), sum(i.nbytes for i in p.values()))
    i = 0
    for spec, share, a_dir, c_dir in MIX:
        count = max(1, round(n * share))
        header, data_len = headers[spec]
        for j in range(count):
            if i >= n:
                break
            layout, folder = ("a1111", a_dir) if j % 2 == 0 else ("comfyui", c_dir)
            d = lib / layout / folder / f"group{j % 50:02d}"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{spec}_{j:05d}.safetensors", "wb") as fh:
                fh.write(header)
                fh.truncate(len(header) + data_len)
            i += 1
    (lib / ".complete").write_text("ok")
    print(f"generated {i} sparse files in {time.perf_counter() - t:.1f} s under {lib}")
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 files instead of 10,000")
    ap.add_argument("--files", type=int, default=None)
    ap.add_argument("--delete", action="store_true", help="delete the generated library afterwards")
    args = ap.parse_args()
    use_src()
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan

    n = args.files or (1000 if args.quick else 10000)
    lib = make_library(n)
    db = CACHE / f"bench_{n}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    apparent = sum(f.stat().st_size for f in lib.rglob("*.safetensors"))
    with Catalog(db) as cat:
        with PeakRss() as r1:
            t, c = time.perf_counter(), cpu_seconds()
            s1 = scan([lib], cat)
            first, cpu1 = time.perf_counter() - t, cpu_seconds() - c
        with PeakRss() as r2:
            t = time.perf_counter()
            s2 = scan([lib], cat)
            second = time.perf_counter() - t
    print(f"library: {s1.files} files, {apparent / 2**40:.2f} TiB apparent (sparse), {os.cpu_count()} CPUs")
    print(f"first scan : {first:7.2f} s  {s1.files / first:8.0f} files/s  {first / s1.files * 1000:6.2f} s per 1,000 "
          f"files (target <= 10)  new={s1.new} errors={s1.errors}  peak RssAnon {r1.peak / 2**20:.0f} MiB")
    print(f"first scan CPU time: {cpu1:.1f} s ({cpu1 / s1.files * 1000:.2f} CPU-s per 1,000 files; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs while measuring)")
    print(f"second scan: {second:7.3f} s  {s2.files / second:8.0f} files/s  unchanged={s2.unchanged}  "
          f"peak RssAnon {r2.peak / 2**20:.0f} MiB")
    print(f"speed-up second vs first: {first / second:.0f}x (target >= 100x)")
    if s1.error_list:
        print("first errors:", s1.error_list[:3])
    if args.delete:
        shutil.rmtree(lib)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
