"""Sidecars of other tools are read, classified by their keys, shown, and never written."""

from __future__ import annotations

import json
import os

from fakes.library_files import tensors, write_st

from ckptlab.library import sidecars
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

A1111_USER = {"description": "my lora", "sd version": "SD1", "activation text": "detailed, sharp",
              "preferred weight": 0.7, "notes": "works at 0.7", "negative text": ""}
SDNEXT_MODEL = {"id": 4201, "name": "Detailer", "type": "LORA", "modelVersions": [{"id": 1, "name": "v1"}]}
CIVITAI_INFO = {"id": 9876, "modelId": 4201, "name": "v2.0", "baseModel": "SD 1.5", "trainedWords": ["dtl"],
                "model": {"name": "Detailer", "type": "LORA"},
                "files": [{"primary": True, "hashes": {"SHA256": "AB" * 32, "AutoV2": "ABABABABAB"}}]}
CM_INFO = {"ModelId": 4201, "ModelName": "Detailer", "VersionId": 9876, "VersionName": "v2.0", "BaseModel": "SD 1.5",
           "ModelType": "LORA", "TrainedWords": ["dtl", "sharp"], "Hashes": {"SHA256": "AB" * 32}}
LM_META = {"file_name": "x", "model_name": "Detailer", "sha256": "ab" * 32, "base_model": "SD 1.5",
           "civitai": {"id": 9876, "modelId": 4201, "trainedWords": ["dtl"]}, "tags": ["style"]}


def make(tmp_path):
    lora = tmp_path / "models" / "Lora"
    m1 = write_st(lora / "detailer.safetensors", tensors("sd1_embedding", seed=1))
    m2 = write_st(lora / "sdnext.safetensors", tensors("sd1_embedding", seed=2))
    files = {
        lora / "detailer.json": json.dumps(A1111_USER, indent=4),
        lora / "detailer.civitai.info": json.dumps(CIVITAI_INFO),
        lora / "detailer.cm-info.json": json.dumps(CM_INFO),
        lora / "detailer.metadata.json": json.dumps(LM_META),
        lora / "detailer.description.txt": "A detail LoRA.\n",
        lora / "sdnext.json": json.dumps(SDNEXT_MODEL),
        lora / "sdnext.civitai.info": "{not json",
    }
    for p, text in files.items():
        p.write_text(text)
    (lora / "detailer.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return m1, m2, files


def test_find_order_and_classification(tmp_path):
    m1, m2, _ = make(tmp_path)
    found = sidecars.find(m1)
    assert found == {"json": "detailer.json", "civitai_info": "detailer.civitai.info",
                     "cm_info": "detailer.cm-info.json", "metadata_json": "detailer.metadata.json",
                     "description": "detailer.description.txt", "preview": "detailer.preview.png"}
    assert sidecars.classify_json(A1111_USER) == "a1111"
    assert sidecars.classify_json(SDNEXT_MODEL) == "sdnext_civitai"
    # A1111 order: <stem>.png wins over <stem>.preview.png
    (m1.parent / "detailer.png").write_bytes(b"\x89PNG")
    assert sidecars.find(m1)["preview"] == "detailer.png"


def test_read_summaries(tmp_path):
    m1, m2, _ = make(tmp_path)
    s = sidecars.read(m1)
    assert s["json"]["kind"] == "a1111" and s["json"]["activation_text"] == "detailed, sharp"
    assert s["json"]["preferred_weight"] == 0.7
    assert s["civitai_info"]["version_id"] == 9876 and s["civitai_info"]["hashes"]["AutoV2"] == "ABABABABAB"
    assert s["cm_info"]["kind"] == "stability_matrix" and s["cm_info"]["trained_words"] == ["dtl", "sharp"]
    assert s["metadata_json"]["kind"] == "lora_manager" and s["metadata_json"]["sha256"] == "ab" * 32
    assert s["civitai"] == {"model_id": 4201, "version_id": 9876, "from": "detailer.civitai.info"}
    assert s["trigger_words"] == ["dtl", "sharp"]
    assert s["description"] == "A detail LoRA."
    s2 = sidecars.read(m2)
    assert s2["json"] == {"kind": "sdnext_civitai", "model_id": 4201, "model_name": "Detailer", "type": "LORA",
                          "versions": 1}
    assert s2["civitai_info"]["kind"] == "unreadable"


def test_scan_and_show_never_write_sidecars(tmp_path, cli):
    m1, m2, files = make(tmp_path)
    before = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in files}
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([tmp_path / "models"], cat, hash=True)
        rec = cat.get_by_path(m1)
        assert rec.sidecars["civitai"]["version_id"] == 9876
    r = cli("show", str(m1), "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout.splitlines()[0])
    assert shown["sidecars"]["json"]["activation_text"] == "detailed, sharp"
    assert shown["hashes"]["SHA256"] == rec.sha256
    r = cli("ls", "--search", "dtl", "--json", "--db", str(db))  # sidecar text is searchable
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["detailer.safetensors"]
    after = {p: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in files}
    assert after == before


def test_sidecar_edit_is_noticed_without_rereading_the_model(tmp_path):
    m1, _, files = make(tmp_path)
    with Catalog(tmp_path / "c.db") as cat:
        scan([tmp_path / "models"], cat)
        p = m1.parent / "detailer.json"
        p.write_text(json.dumps({**A1111_USER, "activation text": "new words"}))
        os.utime(p, ns=(os.stat(p).st_mtime_ns + 10**9,) * 2)
        s = scan([tmp_path / "models"], cat)
        assert s.unchanged == 2
        assert cat.get_by_path(m1).sidecars["json"]["activation_text"] == "new words"


def test_deeply_nested_sidecar_json_is_unreadable_not_an_internal_error(tmp_path, cli):
    """json's decoder recurses per level: a 100,000-deep sidecar raised RecursionError (exit 70 from a
    re-scan after the sidecar changed, and from show)."""
    model = write_st(tmp_path / "lib" / "x.safetensors", tensors("sd1_embedding", seed=1))
    db = tmp_path / "c.db"
    assert cli("scan", str(tmp_path / "lib"), "--db", str(db)).returncode == 0
    side = tmp_path / "lib" / "x.civitai.info"
    side.write_text('{"model": ' * 100_000 + "1" + "}" * 100_000)
    r = cli("scan", str(tmp_path / "lib"), "--db", str(db), "--json")  # an edit noticed on an unchanged model
    assert r.returncode == 0, r.stderr
    with Catalog(db) as cat:
        info = cat.get_by_path(model).sidecars["civitai_info"]
    assert info == {"kind": "unreadable", "error": "not valid JSON: nested too deeply"}
    r = cli("show", str(model), "--db", str(db))
    assert r.returncode == 0 and "civitai_info: x.civitai.info" in r.stdout, r.stderr


def test_sidecars_that_are_fifos_or_huge_word_lists(tmp_path, cli):
    """A FIFO named like a sidecar would block the scan (and show) on open; 300,000 trigger words were
    deduplicated in quadratic time. FIFOs are skipped; words are kept once each, at most 500."""
    lib = tmp_path / "lib"
    model = write_st(lib / "x.safetensors", tensors("sd1_embedding", seed=1))
    os.mkfifo(lib / "x.txt")
    os.mkfifo(lib / "x.cm-info.json")
    words = [f"w{i}" for i in range(300_000)]
    (lib / "x.civitai.info").write_text(json.dumps({**CIVITAI_INFO, "trainedWords": words + words[:10]}))
    db = tmp_path / "c.db"
    r = cli("scan", str(lib), "--db", str(db), timeout=120)
    assert r.returncode == 0, r.stderr
    with Catalog(db) as cat:
        sc = cat.get_by_path(model).sidecars
    assert sc["trigger_words"] == words[:500]
    assert sc["civitai_info"]["trained_words"] == words[:500]
    assert sc["cm_info"] == {"kind": "unreadable", "error": "not a regular file"}
    assert "description" not in sc
    r = cli("show", str(model), "--db", str(db), timeout=120)
    assert r.returncode == 0 and "      - w499\n" in r.stdout, r.stderr
