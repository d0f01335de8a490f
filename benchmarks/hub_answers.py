"""Hub answers at scale: ``report``, ``dupes`` and ``ls --unsafe --limit 100`` on a synthetic catalog of a million
rows, the SQL-driven implementation against the one before it (which loaded every row into Python), in one run.

    python benchmarks/hub_answers.py                  # 1,000,000 rows, SQLite in a temporary folder
    python benchmarks/hub_answers.py --rows 100000    # smaller
    python benchmarks/hub_answers.py --only new       # skip the old implementation (it needs GBs of memory)
    CKPTLAB_BENCH_PG=postgresql://... python benchmarks/hub_answers.py   # also on PostgreSQL (when the catalog
                                                                         # supports it in this build)

The catalog (tests/fakes/hub_catalog.py) has a hub's mix: ~80 % objects in S3 (URL paths, ``dev = REMOTE_DEV``),
local files, families / kinds / formats / verdicts, ~5 % of the rows in duplicate groups (exact copies, fp16 and
bf16 variants), hard links, missing and error rows. It is written with ``executemany`` in one transaction.

Each (task, implementation) runs in its own fresh process with both implementations' modules imported; its peak
RSS is measured from just before the task (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere
``ru_maxrss``), and reported over its RSS at that moment (the interpreter and the code), with ``RssAnon`` at the
end. The old
implementation is the code of library/dupes.py and library/report.py before hub scale, kept verbatim in
tests/fakes/hub_old_*.py (the tests' oracle); ``ls``'s old path is ``show.list_files`` (every row, then the first
100 printed). Output goes to /dev/null, as to a pipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

TASKS = ("report-json", "report-table", "dupes", "ls-unsafe-100")
IMPLS = ("old", "new")


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (0 where there is none)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``; Linux >= 4.0: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def run_one(task: str, impl: str, db: str) -> dict:
    """Run ``task`` with ``impl`` on catalog ``db`` in this process; time, peak RSS and what it produced."""
    import importlib

    for name in ("ckptlab.jsonable", "ckptlab.library.catalog", "ckptlab.library.report", "ckptlab.library.dupes",
                 "ckptlab.library.hub_queries", "ckptlab.library.show", "ckptlab.hub.link", "rich.table",
                 "rich.console", "fakes.hub_old_report", "fakes.hub_old_dupes"):
        importlib.import_module(name)  # both implementations' code loaded before the baseline is taken
    from ckptlab.jsonable import dumps
    from ckptlab.library.catalog import Catalog

    Catalog(db, must_exist=True).close()  # any schema migration runs here, untimed (bench() ran them already)
    base = _status("VmRSS")
    reset = _reset_peak()  # the peak from here on: not the imports' transient allocations
    out = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    produced = 0
    with Catalog(db, must_exist=True) as cat:
        if task.startswith("report"):
            fmt = task.split("-", 1)[1]
            if impl == "new":
                from ckptlab.library.report import stream_report

                stream_report(cat, fmt, out=out)
            else:
                import fakes.hub_old_report as old

                out.write(old.render_report(old.build_inventory(cat), fmt))
            produced = cat.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        elif task == "dupes":
            if impl == "new":
                from ckptlab.library.dupes import iter_dupes

                for g in iter_dupes(cat):
                    out.write(dumps(g) + "\n")
                    produced += 1
            else:
                import fakes.hub_old_dupes as old

                for g in old.find_dupes(cat).groups:
                    out.write(dumps(g) + "\n")
                    produced += 1
        elif task == "ls-unsafe-100":
            from ckptlab.hub.link import link_lookup
            from ckptlab.library.report import file_row

            if impl == "new":
                from ckptlab.library.hub_queries import iter_listed

                listed = list(iter_listed(cat, unsafe=True, limit=100, civitai=link_lookup(cat)))
            else:
                from ckptlab.library.show import list_files

                listed = list_files(cat, unsafe=True, civitai=link_lookup(cat))[:100]
            for r, c in listed:
                out.write(dumps(file_row(r) | {"civitai": c}) + "\n")
                produced += 1
        else:
            raise SystemExit(f"unknown task {task!r}")
    seconds = time.perf_counter() - t0
    out.close()
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    return {"task": task, "impl": impl, "seconds": round(seconds, 3), "peak_rss_mib": round(peak / 1024, 1),
            "peak_over_baseline_mib": round((peak - base) / 1024, 1), "rss_anon_end_mib": round(_status("RssAnon") / 1024, 1),
            "produced": produced}


def measure(task: str, impl: str, db: str, timeout: float) -> dict:
    """``run_one`` in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--one", task, impl, db]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"task": task, "impl": impl, "error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0:
        return {"task": task, "impl": impl, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(db: str, rows: int, impls, timeout: float, label: str, tasks=TASKS, reuse: bool = False) -> list[dict]:
    from fakes.hub_catalog import build

    import ckptlab.hub.link  # noqa: F401 - every component registers its tables before the catalog is opened,
    import ckptlab.library.copies  # noqa: F401 - so that no measured run pays a one-time migration
    import ckptlab.library.show  # noqa: F401
    from ckptlab.library.catalog import Catalog

    t0 = time.perf_counter()
    if reuse:
        with Catalog(db, must_exist=True) as cat:
            rows_, remote = cat.conn.execute("SELECT count(*), coalesce(sum(CASE WHEN dev = -1 THEN 1 ELSE 0 END), "
                                             "0) FROM files").fetchone()
            counts = {"rows": int(rows_), "remote": int(remote), "dup_rows": -1}  # -1: not known from the rows
    else:
        counts = build(db, rows)
    built = time.perf_counter() - t0
    Catalog(db, must_exist=True).close()
    print(f"{label}: {'reused' if reuse else 'built'} {counts['rows']:,} rows ({counts['remote']:,} remote, "
          f"{counts['dup_rows']:,} in duplicate groups) in {built:.1f} s; migrations: "
          f"{time.perf_counter() - t0 - built:.1f} s", flush=True)
    results = []
    for task in tasks:
        for impl in impls:
            res = measure(task, impl, db, timeout)
            results.append(res | {"backend": label, "rows": counts["rows"], "build_seconds": round(built, 1)})
            print("  " + json.dumps(res), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = [f"{'backend':<9} {'task':<14} {'old s':>8} {'new s':>8} {'x faster':>9} {'old MiB':>9} {'new MiB':>9} "
             f"{'x less':>7}"]
    by = {(r["backend"], r["task"], r["impl"]): r for r in results}
    for backend in dict.fromkeys(r["backend"] for r in results):
        for task in dict.fromkeys(r["task"] for r in results if r["backend"] == backend):
            o, n = by.get((backend, task, "old"), {}), by.get((backend, task, "new"), {})

            def cell(d, k):
                return f"{d[k]:.2f}" if k in d else ("error" if "error" in d else "-")

            speed = f"{o['seconds'] / n['seconds']:.1f}" if "seconds" in o and "seconds" in n and n["seconds"] else "-"
            mem = (f"{o['peak_over_baseline_mib'] / max(n['peak_over_baseline_mib'], 1):.1f}"
                   if "seconds" in o and "seconds" in n else "-")
            lines.append(f"{backend:<9} {task:<14} {cell(o, 'seconds'):>8} {cell(n, 'seconds'):>8} {speed:>9} "
                         f"{cell(o, 'peak_over_baseline_mib'):>9} {cell(n, 'peak_over_baseline_mib'):>9} {mem:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--only", choices=IMPLS, help="run one implementation only")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per (task, implementation)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON list at the end")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--db", help="use (and keep) this SQLite catalog: built when missing, else reused")
    ap.add_argument("--one", nargs=3, metavar=("TASK", "IMPL", "DB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one)))
        return 0
    impls = (args.only,) if args.only else IMPLS
    results = []
    if args.db:
        results += bench(args.db, args.rows, impls, args.timeout, "sqlite", args.tasks, reuse=Path(args.db).exists())
    else:
        with tempfile.TemporaryDirectory(prefix="ckptlab-hub-bench-") as d:
            results += bench(str(Path(d) / "hub.db"), args.rows, impls, args.timeout, "sqlite", args.tasks)
    pg = os.environ.get("CKPTLAB_BENCH_PG")
    if pg:
        try:
            results += bench(pg, args.rows, impls, args.timeout, "postgres", args.tasks)
        except Exception as e:  # noqa: BLE001 - an optional second backend: say why, keep the SQLite figures
            print(f"postgres: skipped ({type(e).__name__}: {e})")
    print()
    print("peak RSS over the interpreter's baseline; x = old / new")
    print(table(results))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
