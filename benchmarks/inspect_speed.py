"""How long ``ckptlab inspect`` takes on a real-size SDXL checkpoint, against a full load of a model.

1. inspect: the whole CLI process, ``python -m ckptlab inspect --json sd_xl_base.safetensors``, on a real-size
   SDXL single file (6.9 GB of fp16 tensors, real key layout from ``ckptlab.sample``). The file is sparse
   (header + holes): inspect reads only the header, so holes or data make no difference to it.
2. full load: ``safetensors.torch.load_file`` of a real-size, **non-sparse** SD1.5 fp16 checkpoint (2.13 GB of
   written bytes) in its own process - what a tool pays to learn the same things by loading the model. The
   page cache is warm for both (the file was just written), which favours the full load.

Each run is a subprocess; the parent samples its RssAnon (anonymous memory, not page cache) every 5 ms. Inputs
are generated into .bench-cache/inspect/; the dense SD1.5 file is deleted at the end unless ``--keep``.
``--quick`` uses a small SD1.5 file for the full load (seconds); the SDXL header is real-size either way.

    python benchmarks/inspect_speed.py [--quick] [--runs N] [--keep]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # this file shadows stdlib ``inspect``

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench-cache" / "inspect"


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak sampled RssAnon bytes, stdout) of one subprocess."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon(proc.pid))
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-500:]}")
    return wall, peak, out


def sdxl_sparse() -> Path:
    from ckptlab.sample.build import write_model

    p = CACHE / "sd_xl_base_1.0.safetensors"
    if not p.exists():
        write_model(p, "sdxl_checkpoint", small=False, sparse=True)
    return p


def sd15_dense(quick: bool) -> Path:
    """Real (or small) SD1.5 layout with every data byte written (no holes): header + 1 MiB random blocks."""
    from ckptlab.formats.dtypes import itemsize
    from ckptlab.sample import layouts

    p = CACHE / f"v1-5-fp16{'_small' if quick else ''}-dense.safetensors"
    if p.exists():
        return p
    header, pos = {}, 0
    for key, (dtype, shape) in layouts.keys("sd1_checkpoint", small=quick).items():
        dtype = "F16" if dtype == "F32" else dtype
        n = itemsize(dtype)
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(1 << 20)
    tmp = p.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
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
    CACHE.mkdir(parents=True, exist_ok=True)
    sdxl = sdxl_sparse()
    dense = sd15_dense(args.quick)
    py = sys.executable

    inspect_cmd = [py, "-m", "ckptlab", "inspect", "--json", str(sdxl)]
    load_cmd = [py, "-c", "import sys; from safetensors.torch import load_file; sd = load_file(sys.argv[1]); "
                "print(len(sd))", str(dense)]
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
          f"{args.runs}, peak RssAnon {m_ins / 2**20:.0f} MiB -> {obj['kind']}/{obj['family']}, "
          f"{obj['params']:,} params")
    print(f"load     SD1.5 {gb(dense.stat().st_size):.2f} GB (dense, warm cache), safetensors.torch.load_file: "
          f"median {t_load:.3f} s of {len(loads)}, peak RssAnon {m_load / 2**20:.0f} MiB")
    print(f"ratio    full load / inspect: {t_load / t_ins:.1f}x time, {m_load / max(m_ins, 1):.1f}x anonymous memory "
          f"(inspect {'meets' if t_ins <= 0.5 else 'MISSES'} the 0.5 s target)")
    if not args.keep:
        dense.unlink()


if __name__ == "__main__":
    main()
