"""``report`` at hub scale: counts from SQL aggregates, per-file sections streamed, hub figures added.

Oracles: the report before hub scale (tests/fakes/hub_old_report.py, verbatim: it loaded every record and
tallied in Python) for the text of every format, and plain Python over the catalog's raw rows (read with
``sqlite3`` here) for the aggregates and the dedup figures.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sqlite3
from collections import defaultdict

import fakes.hub_old_report as old
import pytest
from fakes.hub_catalog import build
from fakes.library_files import a1111_library, half, tensors, write_ckpt, write_st

from ckptlab.library import hub_queries, report
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

NEW_SECTIONS = ("By verdict", "Duplicates (dedup would save)")


@pytest.fixture(scope="module")
def real_db(tmp_path_factory):
    """A scanned A1111 library with copies, an fp16 copy, a pickle, a broken file and a missing file."""
    root = tmp_path_factory.mktemp("hubreport")
    files = a1111_library(root / "lib")
    write_ckpt(root / "lib" / "models" / "Stable-diffusion" / "old.ckpt", half(tensors("sd1_vae", seed=5)))
    shutil.copy2(files["checkpoint"], root / "lib" / "models" / "Stable-diffusion" / "copy.safetensors")
    write_st(root / "lib" / "models" / "Lora" / "style" / "=cmd|evil\u202e-fp16.safetensors",
             half(tensors("sd1_loha", seed=3)), {"ss_network_module": "lycoris.kohya"})
    (root / "lib" / "models" / "Lora" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    gone = write_st(root / "lib" / "models" / "VAE" / "gone.safetensors", tensors("sd1_vae", seed=9))
    db = root / "c.db"
    with Catalog(db) as cat:
        scan([root / "lib"], cat, hash=True, fingerprint=True, workers=1)
        gone.unlink()
        scan([root / "lib"], cat, workers=1)
    return db


@pytest.fixture(scope="module")
def hub_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("hubreport_syn") / "hub.db"
    build(db, 3000, seed=5, hostile=True, dup_share=0.2)
    return db


def _strip_new_html(text: str) -> str:
    for title in NEW_SECTIONS:
        text = re.sub(rf"<h2>{re.escape(title)}</h2><table.*?</table>", "", text, flags=re.S)
    return re.sub(r"generated [0-9TZ:-]+", "generated X", text)


def _strip_new_table(text: str) -> str:
    """The table text without the sections the hub figures added (each a title line and its box)."""
    out, skip = [], False
    for line in text.splitlines(keepends=True):
        if line.rstrip() in NEW_SECTIONS:
            skip = True
        elif skip and line.startswith(("┏", "┃", "┡", "│", "└")):
            continue
        else:
            skip = False
        if not skip:
            out.append(line)
    return "".join(out)


@pytest.mark.parametrize("which", ["real", "hub"])
@pytest.mark.parametrize("fmt", ["table", "json", "csv", "html"])
def test_same_text_as_before_plus_the_hub_figures(real_db, hub_db, which, fmt):
    db = real_db if which == "real" else hub_db
    with Catalog(db) as cat:
        want = old.render_report(old.build_inventory(cat), fmt)
        got = report.report(cat, fmt)
        got_listed = report.render_report(report.build_inventory(cat), fmt)  # lists instead of streamed rows
    assert got == got_listed or fmt in ("json", "html")  # (json/html carry a timestamp)
    if fmt == "csv":
        assert got == want
    elif fmt == "table":
        assert got.startswith(want) and _strip_new_table(got) == want
        assert "By verdict" in got
    elif fmt == "html":
        assert _strip_new_html(got) == _strip_new_html(want)
        assert "<h2>By verdict</h2>" in got
    else:
        g, w = json.loads(got), json.loads(want)
        assert set(g) - set(w) == {"by_safety", "dedup"}
        for d in (g, w):
            d.pop("generated")
        assert {k: v for k, v in g.items() if k in w} == w
        # the text itself is json.dumps(indent=2)'s, streamed: parse and re-dump gives it back
        assert got == json.dumps(json.loads(got), indent=2, ensure_ascii=False) + "\n"


def _raw(db):
    con = sqlite3.connect(db)
    files = con.execute("SELECT id, dev, ino, size, mtime_ns, kind, family, format, safety, error, status, is_link "
                        "FROM files").fetchall()
    content = con.execute("SELECT dev, ino, size, mtime_ns, sha256, fingerprint, fingerprint_bf16, components "
                          "FROM content").fetchall()
    con.close()
    return files, content


def test_aggregates_equal_plain_python_over_the_rows(hub_db):
    files, content = _raw(hub_db)
    present = [f for f in files if f[10] == "present"]
    with Catalog(hub_db) as cat:
        inv = report.build_inventory(cat)
    assert inv.files == len(present) and inv.bytes == sum(f[3] or 0 for f in present)
    assert inv.missing == sum(1 for f in files if f[10] == "missing")
    assert inv.errors == sum(1 for f in present if f[9])

    def tally(col, label, name=lambda v: v):
        out = defaultdict(lambda: [0, 0])
        for f in present:
            k = name(f[col]) or "unknown"
            out[k][0] += 1
            out[k][1] += f[3] or 0
        return {k: tuple(v) for k, v in out.items()}

    for col, label, rows in ((5, "kind", inv.by_kind), (6, "family", inv.by_family), (7, "format", inv.by_format)):
        assert {d[label]: (d["files"], d["bytes"]) for d in rows} == tally(col, label)
        assert [d["bytes"] for d in rows] == sorted((d["bytes"] for d in rows), reverse=True)
    verdicts = tally(8, "safety", lambda v: v or "unchecked")
    assert {d["safety"]: (d["files"], d["bytes"]) for d in inv.by_safety} == verdicts
    assert [d["safety"] for d in inv.by_safety][:3] == ["malicious", "suspicious", "corrupt"]
    assert len(inv.unsafe) == sum(1 for f in present if f[8] != "safe")
    assert len(inv.pickles) == sum(1 for f in present if f[7] == "pickle")

    # dedup: per key, the physical files (content rows) of the compared files, grouped by value
    compared = {f[1:5] for f in present if f[9] is None and f[1] is not None
                and not (f[7] == "pickle" and f[8] != "safe")}
    for key, col in (("sha256", 4), ("fingerprint", 5), ("fingerprint_bf16", 6)):
        groups = defaultdict(list)
        for c in content:
            if c[:4] in compared and c[col] and (key == "sha256" or json.loads(c[7] or "null")):
                groups[c[col]].append(c[2] or 0)
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        assert inv.dedup[key] == {"groups": len(groups), "copies": sum(len(v) for v in groups.values()),
                                  "bytes_saved": sum(sum(v) - max(v) for v in groups.values())}, key
    assert inv.dedup["sha256"]["groups"] > 20 and inv.dedup["fingerprint"]["groups"] > 20
    assert inv.dedup["fingerprint_bf16"]["groups"] > 5


def test_table_lists_a_page_of_each_file_section_and_counts_the_rest(hub_db, monkeypatch):
    monkeypatch.setattr(report, "TABLE_ROWS", 5)
    with Catalog(hub_db) as cat:
        text = report.report(cat, "table")
        n = len(report.build_inventory(cat, lazy=True).pickles)
    assert f"... {n - 5} more (all of them: report --format csv|json|html)" in text


def test_streamed_report_reads_records_only_for_the_file_rows(hub_db, monkeypatch):
    loaded = []
    real = hub_queries.record_of
    monkeypatch.setattr(hub_queries, "record_of", lambda row: loaded.append(row[0]) or real(row))
    with Catalog(hub_db) as cat:
        report.report(cat, "table")
        assert loaded == []  # every figure of the table is an aggregate or a light per-file query
        report.report(cat, "csv")
        rows = cat.conn.execute("SELECT count(*) FROM files WHERE status IN ('present', 'missing')").fetchone()[0]
    assert len(loaded) == rows  # the CSV: each row once, streamed


def test_cli_writes_the_same_report_atomically(hub_db, tmp_path, cli):
    out = tmp_path / "r.csv"
    r = cli("report", "--format", "csv", "-o", str(out), "--db", str(hub_db))
    assert r.returncode == 0 and r.stdout == ""
    with Catalog(hub_db) as cat:
        want = old.render_csv(old.build_inventory(cat))
    assert out.read_text(encoding="utf-8") == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary file left
    again = cli("report", "--format", "csv", "-o", str(out), "--db", str(hub_db))
    assert again.returncode == 1 and "already exists" in again.stderr
    j = json.loads(cli("report", "--format", "json", "--db", str(hub_db)).stdout)
    assert j["dedup"]["sha256"]["groups"] > 0 and len(j["rows"]) == len(list(csv.reader(io.StringIO(want)))) - 1
