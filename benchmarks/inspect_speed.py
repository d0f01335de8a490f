"""How long ``ckptlab inspect`` takes on a real-size SDXL checkpoint, against a full load of a model.

1. inspect: the whole CLI process, ``python -m ckptlab inspect --json sd_xl_base.safetensors``, on a real-size
   SDXL single file (6.9 GB of fp16 tensors, real key layout from ``ckptlab.sample``). The file is sparse
   (header + holes): inspect reads only the header, so holes or data make no difference to it.
2. full load: ``safetensors.torch.load_file`` of a real-size, **non-sparse** SD1.5 fp16 checkpoint (2.13 GB of
   written bytes) in its own process - what a tool pays to learn the same things by loading the model. The
   page cache is warm for both (read once first), which favours the full load.

Each run is a subprocess; the parent samples its RssAnon (anonymous memory, not page cache) every 5 ms. Inputs
are generated into .bench-cache/inspect/; the dense SD1.5 file is deleted at the end unless ``--keep``.
``--quick`` uses a small SD1.5 file for the full load (seconds); the SDXL header is real-size either way.

    python benchmarks/inspect_speed.py [--quick] [--runs N] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _measure import ROOT, cache_dir, mib, ratio, run_measured, use_src, warm

CACHE = cache_dir("inspect")


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak sampled RssAnon bytes, stdout) of one subprocess."""
    m = run_measured(cmd, cwd=ROOT, interval=0.005)
    return m.wall, m.peak, m.stdout


def sdxl_sparse() -> Path:
    from ckptlab.sample.build import write_model

    p = CACHE / "sd_xl_base_1.0.safetensors"
    if not p.exists():
        write_model(p, "sdxl_checkpoint", small=False, sparse=True)
    return p


def sd15_dense(quick: bool) -> Path:
    """Real (or small) SD1.5 layout with every data byte written (no holes): header + 1 MiB random blocks."""
    from ckptlab.sample import layouts

    p = CACHE / f"v1-5-fp16{'_small' if quick else ''}-dense.safetensors"
    if p.exists():
        return p
    from ckptlab.formats.base import TensorInfo
    from ckptlab.formats.writer import build_header

    plan = {key: TensorInfo("F16" if dtype == "F32" else dtype, tuple(shape))
            for key, (dtype, shape) in layouts.keys("sd1_checkpoint", small=quick).items()}
    head, pos = build_header(plan, None), sum(i.nbytes for i in plan.values())
    block = os.urandom(1 << 20)
    tmp = p.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(head)
        left = pos
        while left:
            chunk = block[: min(left, len(block))]
            fh.write(chunk)
            left -= len(chunk)
    tmp.rename(p)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small SD1.5 file for the full load (seconds)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the dense SD1.5 file in .bench-cache/")
    args = ap.parse_args()
    use_src()
    CACHE.mkdir(parents=True, exist_ok=True)
    sdxl = sdxl_sparse()
    dense = sd15_dense(args.quick)
    py = sys.executable

    inspect_cmd = [py, "-m", "ckptlab", "inspect", "--json", str(sdxl)]
    load_cmd = [py, "-c", "import sys; from safetensors.torch import load_file; sd = load_file(sys.argv[1]); "
                "print(len(sd))", str(dense)]
    warm(dense)
    run(inspect_cmd)  # warm the interpreter's own files in the page cache
    ins = [run(inspect_cmd) for _ in range(args.runs)]
    obj = json.loads(ins[0][2].splitlines()[0])
    loads = [run(load_cmd) for _ in range(max(1, args.runs // 2))]

    t_ins = statistics.median(w for w, _, _ in ins)
    m_ins = max(m for _, m, _ in ins)
    t_load = statistics.median(w for w, _, _ in loads)
    m_load = max(m for _, m, _ in loads)
    gb = lambda n: n / 1e9  # noqa: E731
    print(f"inspect  SDXL {gb(sdxl.stat().st_size):.2f} GB (sparse), whole CLI process: median {t_ins:.3f} s of "
          f"{args.runs}, peak RssAnon {mib(m_ins):.0f} MiB -> {obj['kind']}/{obj['family']}, "
          f"{obj['params']:,} params")
    print(f"load     SD1.5 {gb(dense.stat().st_size):.2f} GB (dense, warm cache), safetensors.torch.load_file: "
          f"median {t_load:.3f} s of {len(loads)}, peak RssAnon {mib(m_load):.0f} MiB")
    print(f"ratio    full load / inspect: {ratio(t_load, t_ins):.1f}x time, {ratio(m_load, m_ins):.1f}x anonymous memory "
          f"(inspect {'meets' if t_ins <= 0.5 else 'MISSES'} the 0.5 s target)")
    if not args.keep:
        dense.unlink()


if __name__ == "__main__":
    main()
