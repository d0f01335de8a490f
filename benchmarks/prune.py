"""``ckptlab prune --ema drop`` on a real-size SD1.5 fp32 checkpoint with EMA (~7.7 GB, like the field's
full releases) against the raw I/O it cannot avoid, measured in the same run.

    python benchmarks/prune.py --quick     # small layout, seconds
    python benchmarks/prune.py             # real size (generates ~7.7 GB once into .bench-cache/prune/)
    python benchmarks/prune.py --delete    # also remove the generated input afterwards

Baseline ("raw read+write"): a child process reads every byte of the input (prune must: the output's
metadata records the input's sha256) and writes as many bytes as prune's output holds, with fsync -
plain file I/O, no parsing, no hashing. A second baseline does the same with direct I/O (``O_DIRECT``
writes from an aligned buffer, as ckptlab's writer does where the filesystem allows it), so the ratio
against the cheapest raw I/O is shown as well. ckptlab: ``python -m ckptlab prune IN --ema drop`` (strict
header parse, mmap reads, sha256 of the input in a background thread, zero-copy writes of the kept
tensors, fsync and atomic rename). Both start from a warm page cache (the input is read once first);
the parent samples each child's RssAnon (anonymous memory - not page cache or mmapped file pages)
every 10 ms and keeps the peak. Targets (issue 5): wall <= 1.5x baseline, peak RssAnon <= 512 MiB.
The output is checked against the input tensor by tensor and deleted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _measure import cache_dir, mib, print_table, ratio, run_measured, use_src, warm

CACHE = cache_dir("prune")

RAW_COPY = """
import mmap, os, sys
src, dst, n, direct = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "direct"
total = n
buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
view = memoryview(buf)
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
fd = os.open(dst, flags, 0o644)
with open(src, "rb", buffering=0) as fi:
    while True:
        k = fi.readinto(buf)
        if not k:
            break
        w = min(k, n)
        if w > 0:
            os.write(fd, view[:-(-w // 4096) * 4096] if direct else view[:w])  # whole blocks
            n -= w
    os.ftruncate(fd, total)
    os.fsync(fd)
os.close(fd)
"""


def make_input(quick: bool) -> Path:
    """Real SD1.5 key layout and shapes (``ckptlab.sample``'s plan) with random values, written tensor by
    tensor (the sample builder's deterministic values are slower to make at 7.7 GB)."""
    import torch

    from ckptlab.formats.dtypes import to_torch
    from ckptlab.formats.writer import SafetensorsWriter
    from ckptlab.sample.build import plan

    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"sd15_ema_fp32{'_small' if quick else ''}.safetensors"
    if not p.exists():
        t = time.perf_counter()
        the_plan = plan("sd1_checkpoint", small=quick, dtype="F32", ema=True)
        g = torch.Generator().manual_seed(1)
        with SafetensorsWriter(p, the_plan, {"format": "pt"}) as w:
            for key, info in the_plan.items():
                dt = to_torch(info.dtype)
                if dt.is_floating_point:
                    w.write(key, torch.randn(info.shape, generator=g, dtype=torch.float32).to(dt))
                else:
                    w.write(key, torch.zeros(info.shape, dtype=dt))
        print(f"generated {p.name} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s", flush=True)
    return p


def check_output(src: Path, out: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(src), "pt") as fa, safe_open(str(out), "pt") as fb:
        want = [k for k in fa.keys() if not k.startswith("model_ema.")]
        if sorted(want) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k).view(-1).view(torch.uint8), fb.get_tensor(k).view(-1).view(torch.uint8))
                   for k in want)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small layout (seconds)")
    ap.add_argument("--delete", action="store_true", help="remove the generated input afterwards")
    args = ap.parse_args()

    use_src()
    src = make_input(args.quick)
    size = src.stat().st_size
    warm(src)  # both contenders start from a warm page cache
    out = CACHE / f"{src.stem}-pruned.safetensors"
    raw = CACHE / "raw_copy.bin"
    for p in (out, raw):
        p.unlink(missing_ok=True)
    py = sys.executable
    prune = run_measured([py, "-m", "ckptlab", "prune", str(src), "--ema", "drop", "--out-dir", str(CACHE)],
                         label="ckptlab prune")
    out_size = out.stat().st_size
    base = run_measured([py, "-c", RAW_COPY, str(src), str(raw), str(out_size), "buffered"], label="raw copy")
    raw.unlink(missing_ok=True)
    direct = run_measured([py, "-c", RAW_COPY, str(src), str(raw), str(out_size), "direct"], label="raw copy, direct")
    ok = check_output(src, out)
    print(f"\ninput {src.name}: {size / 1e9:.2f} GB -> pruned {out_size / 1e9:.2f} GB; kept tensors identical: {ok}")
    print_table(["contender", "wall s", "x raw", "peak RssAnon MiB"],
                [["raw read all + write output bytes", base.wall, 1.0, mib(base.peak)],
                 ["the same, written with O_DIRECT", direct.wall, ratio(direct.wall, base.wall), mib(direct.peak)],
                 ["ckptlab prune --ema drop", prune.wall, ratio(prune.wall, base.wall), mib(prune.peak)]],
                ["", ".2f", ".2f", ".0f"])
    print(f"ckptlab prune / direct raw copy: {ratio(prune.wall, direct.wall):.2f}x")
    print(f"targets: wall <= 1.5x raw -> {'met' if prune.wall <= 1.5 * base.wall else 'MISSED'}; "
          f"peak RssAnon <= 512 MiB -> {'met' if prune.peak <= 512 * 2**20 else 'MISSED'}")
    for p in (out, raw):
        p.unlink(missing_ok=True)
    if args.delete:
        src.unlink()
    if not ok:
        raise SystemExit("pruned output differs from the input's kept tensors")


if __name__ == "__main__":
    main()
