"""Download memory/throughput check: ``ckptlab download`` of a large file from the loopback fake
CivitAI, versus a 1 MiB download in the same run (the baseline: interpreter + CLI start-up).

    python benchmarks/download.py [--quick] [--size-mib N]

Prints the peak anonymous memory (RssAnon from /proc, sampled every 10 ms; page cache is not
counted) of the CLI process for both and the ratio. Streaming means the ratio stays near 1 whatever
the size. The fake server keeps the file in this process's memory, so sizes are limited by RAM.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _measure import ROOT, child_env, mib, ratio, run_measured, use_src

sys.path.insert(0, str(ROOT / "tests"))
use_src()

from fakes.civitai_server import FakeCivitai


def run(vid: int, dest: Path, env: dict) -> tuple[float, int]:
    """Wall time and peak RssAnon of one ``ckptlab download`` process."""
    m = run_measured([sys.executable, "-m", "ckptlab", "download", f"civitai:{vid}", "--dir", str(dest),
                      "--layout", "flat", "--no-catalog"], env=env, label="download")
    return m.wall, m.peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 2048 MiB")
    ap.add_argument("--size-mib", type=int, default=None)
    args = ap.parse_args()
    big = (args.size_mib or (64 if args.quick else 2048)) << 20
    fake = FakeCivitai().start()
    try:
        fake.add_model(1, "Bench", "Checkpoint")
        fake.add_version(10, 1, [(100, "small.bin", os.urandom(1 << 20))])
        fake.add_version(11, 1, [(110, "big.bin", os.urandom(big))])
        with tempfile.TemporaryDirectory() as tmp:
            env = child_env(CKPTLAB_CIVITAI_URL=fake.api_url, CIVITAI_API_TOKEN=fake.token, HOME=tmp,
                            CKPTLAB_DB=f"{tmp}/catalog.db")
            base_t, base_mem = run(10, Path(tmp) / "dl", env)
            t, mem = run(11, Path(tmp) / "dl", env)
        print(f"baseline 1 MiB : {base_t:6.2f} s, peak RssAnon {mib(base_mem):7.1f} MiB")
        print(f"{big >> 20:6d} MiB     : {t:6.2f} s, peak RssAnon {mib(mem):7.1f} MiB, "
              f"{ratio(big >> 20, t - base_t):7.1f} MiB/s after start-up")
        print(f"memory ratio big/baseline: {ratio(mem, base_mem):.2f}")
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
