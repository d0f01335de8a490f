"""Inventory report in four formats, checked against totals computed here from the files."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from fakes.library_files import a1111_library, half, tensors, write_ckpt

from ckptlab.library.catalog import Catalog
from ckptlab.library.report import build_inventory, render_csv, render_html, render_table
from ckptlab.library.scanner import scan


@pytest.fixture
def lib(tmp_path):
    files = a1111_library(tmp_path / "lib")
    files["pickle"] = write_ckpt(tmp_path / "lib" / "models" / "Stable-diffusion" / "old.ckpt",
                                 half(tensors("sd1_vae", seed=5)))
    (tmp_path / "lib" / "models" / "Lora" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([tmp_path / "lib"], cat, hash=True)
    return files, db


def test_inventory_totals(lib):
    files, db = lib
    with Catalog(db) as cat:
        inv = build_inventory(cat)
    sizes = [p.stat().st_size for p in files.values()]
    bad = (db.parent / "lib" / "models" / "Lora" / "bad.safetensors").stat().st_size
    assert inv.files == len(files) + 1 and inv.bytes == sum(sizes) + bad
    assert inv.errors == 1 and inv.error_files[0]["path"].endswith("bad.safetensors")
    assert {d["format"]: d["files"] for d in inv.by_format} == {"safetensors": len(files), "pickle": 1}
    kinds = {d["kind"]: d["bytes"] for d in inv.by_kind}
    assert kinds["vae"] == files["vae"].stat().st_size + files["pickle"].stat().st_size
    assert [p["path"] for p in inv.pickles] == [str(files["pickle"])]
    assert inv.pickles[0]["safety"] != "unchecked"
    assert sum(d["files"] for d in inv.by_size) == inv.files


def test_csv_one_row_per_file(lib):
    files, db = lib
    with Catalog(db) as cat:
        rows = list(csv.DictReader(io.StringIO(render_csv(build_inventory(cat)))))
    assert len(rows) == len(files) + 1
    by_path = {r["path"]: r for r in rows}
    import hashlib

    vae = str(files["vae"])
    assert by_path[vae]["sha256"] == hashlib.sha256(files["vae"].read_bytes()).hexdigest().upper()
    assert int(by_path[vae]["size"]) == files["vae"].stat().st_size


def test_html_is_self_contained_and_sortable(lib):
    files, db = lib
    with Catalog(db) as cat:
        page = render_html(build_inventory(cat))
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert "<script>" in page and "<style>" in page and page.count('class="sortable"') >= 5
    assert files["lora"].name in page


def test_table_mentions_every_section(lib):
    _, db = lib
    with Catalog(db) as cat:
        text = render_table(build_inventory(cat))
    for title in ("By kind", "By format", "By precision", "By size", "Pickles", "Errors"):
        assert title in text


@pytest.mark.parametrize("fmt", ["json", "csv", "html", "table"])
def test_cli_report_formats(lib, cli, tmp_path, fmt):
    files, db = lib
    out = tmp_path / f"report.{fmt}"
    r = cli("report", "--format", fmt, "-o", str(out), "--db", str(db))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    if fmt == "json":
        assert json.loads(text)["files"] == len(files) + 1
    assert str(files["vae"].name) in text or fmt == "table"


def test_cli_report_unknown_format(lib, cli):
    _, db = lib
    r = cli("report", "--format", "pdf", "--db", str(db))
    assert r.returncode == 2 and r.stderr.startswith("ckptlab: error: --format")


def test_cli_show_by_hash(lib, cli):
    files, db = lib
    import hashlib

    sha = hashlib.sha256(files["lora"].read_bytes()).hexdigest()
    for value in (sha, sha[:10], sha.upper()):
        r = cli("show", value, "--json", "--db", str(db))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == str(files["lora"])
    r = cli("show", "deadbeefdeadbeef", "--db", str(db))
    assert r.returncode == 1 and "not in the catalog" in r.stderr
