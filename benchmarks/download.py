"""Download memory/throughput check: ``ckptlab download`` of a large file from the loopback fake
CivitAI, versus a 1 MiB download in the same run (the baseline: interpreter + CLI start-up).

    python benchmarks/download.py [--quick] [--size-mib N]

Prints the peak anonymous memory (RssAnon from /proc, sampled every 10 ms; page cache is not
counted) of the CLI process for both and the ratio. Streaming means the ratio stays near 1 whatever
the size. The fake server keeps the file in this process's memory, so sizes are limited by RAM.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# this folder holds scripts named like stdlib modules (inspect.py): keep it off the import path
sys.path[:] = [p for p in sys.path if p not in ("", __import__("os").path.dirname(__file__))]

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from fakes.civitai_server import FakeCivitai


def run(fake: FakeCivitai, vid: int, dest: Path, env: dict) -> tuple[float, int, int]:
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "ckptlab", "download", f"civitai:{vid}", "--dir", str(dest),
                          "--layout", "flat", "--no-catalog"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)
    if p.returncode != 0:
        raise SystemExit(f"download failed: {p.stderr.read().decode()}")
    return time.perf_counter() - t, peak, p.returncode


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
            env = dict(os.environ, CKPTLAB_CIVITAI_URL=fake.api_url, CIVITAI_API_TOKEN=fake.token,
                       HOME=tmp, CKPTLAB_DB=f"{tmp}/catalog.db", PYTHONPATH=str(ROOT / "src"))
            base_t, base_mem, _ = run(fake, 10, Path(tmp) / "dl", env)
            t, mem, _ = run(fake, 11, Path(tmp) / "dl", env)
        print(f"baseline 1 MiB : {base_t:6.2f} s, peak RssAnon {base_mem / 2**20:7.1f} MiB")
        print(f"{big >> 20:6d} MiB     : {t:6.2f} s, peak RssAnon {mem / 2**20:7.1f} MiB, "
              f"{(big >> 20) / max(t - base_t, 1e-9):7.1f} MiB/s after start-up")
        print(f"memory ratio big/baseline: {mem / base_mem:.2f}")
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
