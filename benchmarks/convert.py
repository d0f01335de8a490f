"""Pickle -> safetensors conversion: ``ckptlab convert`` vs ``torch.load`` + ``safetensors.torch.save_file``.

    python benchmarks/convert.py --quick     # small-layout SD1.5 Lightning checkpoint, seconds
    python benchmarks/convert.py             # real-size SD1.5 fp32 checkpoint (~4.3 GB, like v1-5-pruned-emaonly.ckpt)
    python benchmarks/convert.py --delete    # also remove the generated input afterwards

The input is generated once into ``.bench-cache/convert/`` by ``ckptlab.sample`` (real SD1.5 key
layout, Lightning-wrapped torch zip, random values). The file is read once first so every contender
starts from a warm page cache. Each contender runs in its own subprocess; the parent samples the
child's RssAnon (anonymous memory: the heap, not mmapped file pages or page cache) every 10 ms and
keeps the peak. Contenders:

- ``ckptlab convert`` (data-only reader, mmap-backed tensors, streamed writer with fsync, sha256 of the
  input computed alongside for the provenance metadata);
- baseline: ``torch.load(map_location="cpu")["state_dict"]`` + ``save_file`` (what most converter
  scripts do);
- baseline with ``torch.load(..., mmap=True)`` (torch >= 2.1), the best case for torch.

The outputs are compared tensor by tensor (bit-identical) and deleted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _measure import cache_dir, child_env, mib, print_table, ratio, run_measured, warm

CACHE = cache_dir("convert")

BASELINE = """
import sys, torch
from safetensors.torch import save_file
obj = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=sys.argv[3] == "mmap")
sd = obj.get("state_dict", obj)
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2], metadata={"format": "pt"})
"""


def make_input(quick: bool, dtype: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"sd15_{dtype.lower()}{'_small' if quick else ''}.ckpt"
    if not p.exists():
        t = time.perf_counter()
        # in a child process: torch.save needs the whole model in memory, this process should not keep it
        code = ("import sys; from ckptlab.sample.build import write_model; "
                "write_model(sys.argv[1], 'sd1_checkpoint', small=sys.argv[2] == '1', dtype=sys.argv[3], fmt='ckpt', "
                "seed=1)")
        subprocess.run([sys.executable, "-c", code, str(p), "1" if quick else "0", dtype], check=True,
                       env=child_env())
        print(f"generated {p.name} ({p.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s",
              flush=True)
    return p


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k).view(-1).view(torch.uint8), fb.get_tensor(k).view(-1).view(torch.uint8))
                   for k in fa.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small layout (seconds)")
    ap.add_argument("--dtype", default="F32", help="tensor dtype of the generated checkpoint (F32, F16, BF16)")
    ap.add_argument("--delete", action="store_true", help="remove the generated input afterwards")
    args = ap.parse_args()

    src = make_input(args.quick, args.dtype)
    size = src.stat().st_size
    warm(src)  # every contender reads from memory
    outs = {name: CACHE / f"out_{name}.safetensors" for name in ("ckptlab", "torch", "torch_mmap")}
    for p in outs.values():
        p.unlink(missing_ok=True)
    py = sys.executable
    results = {
        "ckptlab convert": run_measured([py, "-m", "ckptlab", "convert", str(src), "-o", str(outs["ckptlab"])]),
        "torch.load + save_file (baseline)": run_measured([py, "-c", BASELINE, str(src), str(outs["torch"]), "plain"]),
        "torch.load(mmap=True) + save_file": run_measured([py, "-c", BASELINE, str(src), str(outs["torch_mmap"]),
                                                           "mmap"]),
    }
    ok = same_tensors(outs["ckptlab"], outs["torch"])
    base = results["torch.load + save_file (baseline)"]
    print(f"\ninput: {src.name}, {size / 2**30:.2f} GiB; outputs identical: {ok}")
    print_table(("contender", "wall s", "x base", "peak RssAnon MiB", "x base"),
                ((name, m.wall, ratio(m.wall, base.wall), mib(m.peak), ratio(m.peak, base.peak))
                 for name, m in results.items()),
                ("", ".2f", ".2f", ".0f", ".2f"))
    for p in outs.values():
        p.unlink(missing_ok=True)
    if args.delete:
        src.unlink()
    if not ok:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
