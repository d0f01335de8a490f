"""Measurement plumbing shared by the benchmark scripts in this folder (not a benchmark itself).

- ``cache_dir(name)``: where a script keeps its generated inputs (``.bench-cache/<name>/``, git-ignored);
- ``use_src()`` / ``child_env()``: the repository's ``src/`` first on ``sys.path`` / ``PYTHONPATH``;
- ``run_measured(cmd)``: wall time and peak RssAnon (anonymous memory from ``/proc``, not page cache or
  mmapped file pages) of a child process, sampled every 10 ms by default;
- ``PeakRss``: the same sampling for this process, around a block of code;
- ``job_main`` / ``emit_wall`` / ``job_wall``: a script re-run as ``--job`` child that reports its own wall time;
- ``warm``, ``ratio``, ``mib``, ``print_table``: page-cache warming and consistent figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def cache_dir(name: str) -> Path:
    """``.bench-cache/<name>/`` under the repository root (not created here)."""
    return ROOT / ".bench-cache" / name


def use_src() -> None:
    """Import ``ckptlab`` from this checkout's ``src/`` even without the editable install."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``src/`` first on ``PYTHONPATH``, plus ``extra`` variables."""
    pythonpath = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=pythonpath, **extra)


def rss_anon(pid: int | str = "self") -> int:
    """RssAnon of a process in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Measured:
    wall: float  # seconds from start to exit, as seen by the parent
    peak: int  # peak sampled RssAnon, bytes
    stdout: str


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 interval: float = 0.01, label: str | None = None) -> Measured:
    """Run ``cmd`` (with ``child_env()`` unless ``env`` is given), sampling its RssAnon every ``interval``
    seconds. Output goes to temporary files (a full pipe cannot stall the child). A non-zero exit raises
    ``SystemExit`` with the end of its stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=child_env() if env is None else env, cwd=cwd, stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(interval)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{label or ' '.join(map(str, cmd[:4]))} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    return Measured(wall, peak, stdout)


class PeakRss:
    """``with PeakRss() as r: ...`` - ``r.base`` is this process's RssAnon at entry, ``r.peak`` the highest
    value sampled (every 10 ms) until exit."""

    def __enter__(self) -> PeakRss:
        self.base = self.peak = rss_anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())


# -- a script re-running itself as a measured child: ``python script.py --job NAME ARGS...`` ----------
def job_main(jobs: dict, argv: list[str] | None = None) -> bool:
    """If this process is a ``--job`` child, run ``jobs[NAME](*ARGS)`` and return True."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["--job"]:
        return False
    jobs[argv[1]](*argv[2:])
    return True


def job_cmd(script: str, name: str, *args: object) -> list[str]:
    return [sys.executable, script, "--job", name, *map(str, args)]


def emit_wall(t0: float) -> None:
    """Child side: report the wall time since ``t0`` (the timed work only, imports excluded)."""
    print(json.dumps({"wall": time.perf_counter() - t0}), flush=True)


def job_wall(m: Measured) -> float:
    """Parent side: the wall time a ``--job`` child reported with ``emit_wall``."""
    return json.loads(m.stdout.strip().splitlines()[-1])["wall"]


# -- figures ------------------------------------------------------------------------------------------
def warm(*paths: Path) -> None:
    """Read files once so every contender starts from a warm page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def mib(n: float) -> float:
    return n / 2**20


def ratio(a: float, b: float) -> float:
    """``a / b``, with ``b`` kept away from zero."""
    return a / max(b, 1e-9)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]], formats: Sequence[str]) -> None:
    """Print rows under headers: the first column left-aligned, the others right-aligned, each cell
    formatted with its column's format spec (``""`` for text, ``".2f"``...)."""
    cells = [list(headers)] + [[format(v, f) for v, f in zip(row, formats, strict=True)] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
