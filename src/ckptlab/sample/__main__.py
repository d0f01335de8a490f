"""``python -m ckptlab.sample DIR``: build the demo sample library (A1111 and ComfyUI layouts side by side)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ckptlab.sample", description=__doc__)
    ap.add_argument("dir", type=Path, help="folder to create the library in")
    ap.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    args = ap.parse_args(argv)
    from ckptlab.errors import CkptlabError
    from ckptlab.sample.build import build_library

    t0 = time.perf_counter()
    n = 0
    reuse: dict = {}
    try:
        for layout in ("a1111", "comfyui"):
            files = build_library(args.dir / layout, layout, small=True, overwrite=args.overwrite, reuse=reuse)
            n += len(files)
    except (CkptlabError, OSError) as e:
        print(f"ckptlab.sample: error: {e}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in args.dir.rglob("*") if f.is_file())
    from ckptlab.display import human_size

    print(f"sample library: {n} files, {human_size(size)} in {args.dir} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
