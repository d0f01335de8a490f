"""``ckptlab show`` includes the CivitAI link the hub stored (direct and inherited), text and --json."""

from __future__ import annotations

import hashlib
import json

from fakes.library_files import linked_lora_library, tensors, write_st

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan


def test_show_json_has_the_civitai_link(tmp_path, cli):
    db, a, b, sha_a = linked_lora_library(tmp_path)
    d = json.loads(cli("show", str(a), "--json", "--db", str(db)).stdout.splitlines()[0])
    assert d["civitai"] == {
        "model_id": 100, "version_id": 1000, "file_id": 5000, "model_name": "Detail Tweaker",
        "version_name": "v1.0 (fixed)", "type": "LORA", "base_model": "SD 1.5", "matched_by": "sha256",
        "inherited": False, "inherited_from": None, "trigger_words": ["detailed", "sharp"], "revisions": 2,
        "upstream_status": "ok", "url": "https://civitai.com/models/100?modelVersionId=1000"}
    d = json.loads(cli("show", str(b), "--json", "--db", str(db)).stdout.splitlines()[0])
    assert d["civitai"]["inherited"] is True and d["civitai"]["inherited_from"] == sha_a
    assert d["civitai"]["matched_by"] == "fingerprint" and d["civitai"]["version_id"] == 1000


def test_show_text_has_the_civitai_link(tmp_path, cli):
    db, a, b, sha_a = linked_lora_library(tmp_path)
    out = cli("show", str(b), "--db", str(db)).stdout
    assert (f"civitai: Detail Tweaker / v1.0 (fixed)  model 100 version 1000  [inherited from {sha_a[:12]} "
            "(same tensors)]  2 revision(s)") in out
    assert "    trigger words:\n      - detailed\n      - sharp\n" in out  # an indented list
    assert "https://civitai.com/models/100?modelVersionId=1000" in out
    assert "[matched by sha256]" in cli("show", str(a), "--db", str(db)).stdout


def test_show_without_hub_tables_or_link(tmp_path, cli):
    lora = write_st(tmp_path / "m" / "x.safetensors", tensors("sd1_kohya_lora", seed=4))
    db = tmp_path / "plain.db"
    import sqlite3

    with Catalog(db) as cat:
        scan([lora], cat, hash=True)
        cat.conn.execute("DROP TABLE civitai_links")  # a catalog the hub never touched
    raw = sqlite3.connect(db)
    raw.execute("DELETE FROM schema_versions WHERE component = 'hub'")
    raw.commit()
    raw.close()
    d = json.loads(cli("show", str(lora), "--json", "--db", str(db)).stdout.splitlines()[0])
    assert d["civitai"] is None


def test_show_by_the_first_8_hex_digits_ls_shows(tmp_path, cli):
    """``ls`` shows AutoV2 (the first 10 hex digits of SHA-256); people copy 8 of them. Fewer is too short."""
    p = write_st(tmp_path / "lib" / "emb.safetensors", tensors("sd1_embedding", seed=3))
    db = tmp_path / "c.db"
    assert cli("scan", tmp_path / "lib", "--hash", "--db", db).returncode == 0
    sha = hashlib.sha256(p.read_bytes()).hexdigest().upper()
    r = cli("show", sha[:8], "--json", "--db", db)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["path"] == str(p)
    r = cli("show", sha[:6], "--db", db)
    assert r.returncode == 2 and "at least 8 hex digits" in r.stderr and len(r.stderr.splitlines()) == 1
