"""The same commands on the same library, catalogued in SQLite and in PostgreSQL: the SQLite output is the oracle
(every command works on PostgreSQL unchanged). One library per module; the PostgreSQL server is the worker's."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli_in_process
from fakes.library_files import a1111_library, tensors, write_st

pytestmark = pytest.mark.xdist_group("test_pg_commands")  # one module per worker: its module fixtures built once


def _norm(text: str, *dbs) -> str:
    """Output with the catalog's own name taken out (the one thing that differs) and the timings."""
    for db in dbs:
        text = text.replace(str(db), "<db>")
    text = re.sub(r"in \d+(\.\d+)? s", "in N s", text)
    text = re.sub(r"\"seconds\": [\d.]+", "\"seconds\": 0", text)
    text = re.sub(r"\b1\d{9}\.\d+", "<time>", text)  # first_seen, last_seen: when each scan ran
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<utc time>", text)  # when a plan/report was made


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("pglib")
    files = a1111_library(root / "lib")
    # a byte copy (same SHA-256: a dupes group) and a file that is not a model (an error row)
    files["copy"] = write_st(root / "lib" / "models" / "Lora" / "copy of detailer.safetensors",
                             tensors("sd1_loha", seed=3), {"ss_network_module": "lycoris.kohya"})
    (root / "lib" / "models" / "Lora" / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return root, files


@pytest.fixture
def both(library, pg_url, tmp_path):
    """(sqlite file, postgres url) with the library scanned (hashes, fingerprints) into each."""
    root, _files = library
    dbs = (tmp_path / "c.db", pg_url)
    for db in dbs:
        r = run_cli_in_process("scan", root / "lib", "--hash", "--fingerprint", "--db", db)
        assert r.returncode == 0, r.stderr
    return dbs


def _same(both, *args, code=0):
    outs = []
    for db in both:
        r = run_cli_in_process(*args, "--db", db)
        assert r.returncode == code, (db, r.stdout, r.stderr)
        outs.append(_norm(r.stdout, *both))
    assert outs[0] == outs[1]
    return outs[0]


def test_ls_show_dupes_report_plan_space_agree(both, library):
    _root, files = library
    ls = _same(both, "ls", "--json")
    rows = [json.loads(x) for x in ls.splitlines()]
    assert len(rows) == len(files) + 1  # every file once, the broken one included
    _same(both, "ls")
    _same(both, "ls", "--sort", "size")
    _same(both, "ls", "--kind", "lora", "--json")
    _same(both, "show", files["vae"], "--json")
    _same(both, "show", files["lora"])
    sha = next(r["sha256"] for r in rows if r["path"] == str(files["vae"]))
    _same(both, "show", sha[:10].lower())
    dupes = _same(both, "dupes", "--json")
    assert len(dupes.splitlines()) == 1 and str(files["copy"]) in dupes
    _same(both, "dupes")
    _same(both, "report", "--format", "json")
    _same(both, "report")
    _same(both, "plan-space", "--json")


def test_rescan_after_changes_agrees(both, library, tmp_path):
    root, files = library
    moved = root / "lib" / "models" / "VAE" / "renamed.safetensors"
    files["vae"].rename(moved)
    try:
        out = _same(both, "scan", root / "lib", "--json")
        summary = json.loads(out)
        assert summary["new"] == 0 and summary["files"] == len(files) + 1
        _same(both, "ls", "--json")
        _same(both, "show", moved, "--json")
    finally:
        moved.rename(files["vae"])


def test_hash_command_uses_the_catalog_cache(both, library):
    _root, files = library
    out = _same(both, "hash", files["checkpoint"], "--json")
    import hashlib

    assert json.loads(out)["sha256"] == hashlib.sha256(files["checkpoint"].read_bytes()).hexdigest().upper()
    assert json.loads(out).get("cached") in (True, None)


def test_env_var_names_the_database(both, library, monkeypatch):
    _root, files = library
    sqlite_out = run_cli_in_process("ls", "--json", "--db", both[0]).stdout
    monkeypatch.setenv("CKPTLAB_DB", both[1])
    r = run_cli_in_process("ls", "--json")
    assert r.returncode == 0, r.stderr
    assert _norm(r.stdout, *both) == _norm(sqlite_out, *both)
