"""benchmarks/hub_answers.py runs end to end on a small catalog (no timing asserted): each task of each
implementation completes in its own process, and the old and the new implementation produce as much."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_runs_and_both_implementations_agree(tmp_path):
    db = tmp_path / "hub.db"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hub_answers.py"), "--rows", "1500", "--db", str(db),
                        "--json", "--timeout", "300"], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    by = {(x["task"], x["impl"]): x for x in results}
    assert set(by) == {(t, i) for t in ("report-json", "report-table", "dupes", "ls-unsafe-100") for i in ("old", "new")}
    assert all("error" not in x and x["rows"] == 1500 for x in results)
    for task in ("report-json", "report-table", "dupes", "ls-unsafe-100"):
        assert by[(task, "old")]["produced"] == by[(task, "new")]["produced"] > 0, task
    assert "x faster" in r.stdout and db.exists()
