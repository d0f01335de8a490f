"""library.lineage: the edges between files that ckptlab's own outputs record, checked on real outputs of
convert, prune, merge and lora bake (the oracle: the inputs each call was given, hashed with hashlib)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fakes.sample_files import make_model
from safetensors.numpy import load_file, save_file

import ckptlab
from ckptlab.library import lineage
from ckptlab.library.catalog import Catalog


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest().upper()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder with inputs and what convert / prune / merge / lora bake made of them, scanned with hashes."""
    d = tmp_path_factory.mktemp("lineage") / "lib"
    d.mkdir()
    ckpt = make_model(d / "orig.ckpt", "sd1_checkpoint", fmt="ckpt", ema=True)
    a = make_model(d / "a.safetensors", "sd1_checkpoint", ema=True, seed=1)
    b = make_model(d / "b.safetensors", "sd1_checkpoint", seed=2)
    lora = make_model(d / "style.safetensors", "sd1_kohya_lora", seed=3)
    out = d / "out"
    conv = ckptlab.convert(ckpt, out_dir=out)[0].output
    pruned = ckptlab.prune(a, out_dir=out)[0].output
    merged = ckptlab.merge("weighted_sum", [a, b], out / "ab-merge.safetensors", alpha=0.3).output
    baked = ckptlab.lora_bake(b, [lora], out / "b-baked.safetensors").output
    db = d / "catalog.db"
    ckptlab.scan(d, db=db, hash=True)
    return {"db": db, "ckpt": ckpt, "a": a, "b": b, "lora": lora, "conv": Path(conv), "pruned": Path(pruned),
            "merged": Path(merged), "baked": Path(baked)}


def _rec(cat, p):
    r = cat.get_by_path(p)
    assert r is not None, p
    return r


def _from(cat, made, name):
    ln = lineage.lineage(cat, _rec(cat, made[name]))
    return [(e["relation"], e["role"], e["path"], e["sha256"]) for e in ln["made_from"]]


def _into(cat, made, name):
    ln = lineage.lineage(cat, _rec(cat, made[name]))
    return sorted((e["relation"], e["role"], e["path"]) for e in ln["made_into"])


def test_made_from_names_the_inputs_each_operation_was_given(made):
    with Catalog(made["db"]) as cat:
        m = made
        assert _from(cat, m, "conv") == [("convert", "input 1", str(m["ckpt"]), _sha(m["ckpt"]))]
        assert _from(cat, m, "pruned") == [("prune", "input 1", str(m["a"]), _sha(m["a"]))]
        assert _from(cat, m, "merged") == [("merge", "A", str(m["a"]), _sha(m["a"])),
                                           ("merge", "B", str(m["b"]), _sha(m["b"]))]
        assert _from(cat, m, "baked") == [("lora-bake", "base", str(m["b"]), _sha(m["b"])),
                                          ("lora-bake", "LoRA", str(m["lora"]), _sha(m["lora"]))]
        assert _from(cat, m, "a") == []  # an original records nothing


def test_made_into_is_the_reverse_edge(made):
    with Catalog(made["db"]) as cat:
        m = made
        assert _into(cat, m, "a") == sorted([("prune", "input 1", str(m["pruned"])),
                                             ("merge", "A", str(m["merged"]))])
        assert _into(cat, m, "b") == sorted([("merge", "B", str(m["merged"])),
                                             ("lora-bake", "base", str(m["baked"]))])
        assert _into(cat, m, "lora") == [("lora-bake", "LoRA", str(m["baked"]))]
        assert _into(cat, m, "ckpt") == [("convert", "input 1", str(m["conv"]))]
        assert _into(cat, m, "merged") == []


def test_an_input_not_in_the_library_keeps_its_recorded_name_and_hash(made, tmp_path):
    """The catalog of the outputs alone: the inputs are known only by what the outputs recorded."""
    import shutil

    only = tmp_path / "only"
    only.mkdir()
    shutil.copy2(made["merged"], only / "ab-merge.safetensors")
    ckptlab.scan(only, db=tmp_path / "c.db", hash=True)
    with Catalog(tmp_path / "c.db") as cat:
        ln = lineage.lineage(cat, _rec(cat, only / "ab-merge.safetensors"))
    assert [(e["name"], e["sha256"], e["id"], e["path"]) for e in ln["made_from"]] == [
        ("a.safetensors", _sha(made["a"]), None, None), ("b.safetensors", _sha(made["b"]), None, None)]


def test_the_lineage_indexes_are_used(made):
    with Catalog(made["db"]) as cat:
        names = {r[0] for r in cat.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"files_lineage_derived", "files_lineage_trained"} <= names
        plan = cat.conn.execute(f"EXPLAIN QUERY PLAN SELECT f.id FROM files f WHERE {lineage.DERIVED_WHERE} AND "
                                "instr(f.info, 'x') > 0").fetchall()
        assert any("files_lineage_derived" in str(r) for r in plan)
        plan = cat.conn.execute(f"EXPLAIN QUERY PLAN SELECT f.id FROM files f WHERE {lineage.TRAINED_EXPR} = 'x'"
                                ).fetchall()
        assert any("files_lineage_trained" in str(r) for r in plan)


def test_a_hash_in_other_text_is_not_an_edge(tmp_path):
    """A file whose metadata merely mentions another file's hash (a comment) is not made from it; a kohya LoRA
    whose ss_new_sd_model_hash is the checkpoint's SHA-256 was trained on it."""
    base = make_model(tmp_path / "base.safetensors", "sd1_checkpoint")
    sha = hashlib.sha256(base.read_bytes()).hexdigest()
    lora = make_model(tmp_path / "src.safetensors", "sd1_kohya_lora")
    t = load_file(str(lora))
    save_file(t, str(tmp_path / "trained.safetensors"), metadata={
        "ss_new_sd_model_hash": sha, "ss_sd_model_name": "base.safetensors", "ss_network_module": "networks.lora"})
    save_file(t, str(tmp_path / "mention.safetensors"), metadata={
        "ckptlab.operation": "lora-resize", "ckptlab.inputs": json.dumps([{"name": "x", "sha256": "0" * 64}]),
        "ss_training_comment": f"compare with {sha}"})
    lora.unlink()
    ckptlab.scan(tmp_path, db=tmp_path / "c.db", hash=True)
    with Catalog(tmp_path / "c.db") as cat:
        ln = lineage.lineage(cat, _rec(cat, base))
        assert [(e["relation"], e["path"]) for e in ln["made_into"]] == [
            ("trained on", str(tmp_path / "trained.safetensors"))]
        got = lineage.lineage(cat, _rec(cat, tmp_path / "trained.safetensors"))["made_from"]
        assert [(e["relation"], e["name"], e["path"]) for e in got] == [("trained on", "base.safetensors", str(base))]


def test_recorded_inputs_survive_malformed_metadata():
    bad = [None, {}, {"ckptlab.inputs": "[not json"}, {"ckptlab.inputs": [1, "x", {"sha256": 5}]},
           {"sd_merge_models": "{\"zz\": 1}", "sd_merge_recipe": [1]}, {"ss_new_sd_model_hash": "abc"}]
    for md in bad:
        out = lineage.recorded_inputs(md)
        assert all(e["sha256"] is None or len(e["sha256"]) == 64 for e in out)


def test_a1111_merge_record_direct_inputs(tmp_path):
    """An A1111 merge (no ckptlab provenance): the recipe's primary/secondary hashes are the direct inputs, their
    names from sd_merge_models (which also lists grandparents: not direct)."""
    a, b, g = ("a" * 64, "b" * 64, "c" * 64)
    md = {"sd_merge_recipe": {"type": "webui", "primary_model_hash": a, "secondary_model_hash": b,
                              "tertiary_model_hash": None},
          "sd_merge_models": {a: {"name": "A"}, b: {"name": "B"}, g: {"name": "grandparent"}}}
    assert [(e["role"], e["name"], e["sha256"]) for e in lineage.recorded_inputs(md)] == [
        ("A", "A", a.upper()), ("B", "B", b.upper())]


def test_a1111_merge_file_is_found_from_its_inputs(tmp_path):
    """A file written as A1111's merger writes it (no ckptlab provenance): its inputs, catalogued, list it as made
    into; the grandparent its sd_merge_models also names is not a direct input."""
    a = make_model(tmp_path / "a.safetensors", "sd1_kohya_lora", seed=1)
    b = make_model(tmp_path / "b.safetensors", "sd1_kohya_lora", seed=2)
    sa, sb = hashlib.sha256(a.read_bytes()).hexdigest(), hashlib.sha256(b.read_bytes()).hexdigest()
    grand = "d" * 64
    save_file(load_file(str(a)), str(tmp_path / "merged.safetensors"), metadata={
        "sd_merge_recipe": json.dumps({"type": "webui", "primary_model_hash": sa, "secondary_model_hash": sb,
                                       "tertiary_model_hash": None, "interp_method": "Weighted sum"}),
        "sd_merge_models": json.dumps({sa: {"name": "a"}, sb: {"name": "b"}, grand: {"name": "old"}})})
    ckptlab.scan(tmp_path, db=tmp_path / "c.db", hash=True)
    with Catalog(tmp_path / "c.db") as cat:
        merged = str(tmp_path / "merged.safetensors")
        assert [(e["relation"], e["role"], e["path"]) for e in lineage.lineage(cat, _rec(cat, a))["made_into"]] == [
            ("merge", "A", merged)]
        assert [(e["role"], e["path"]) for e in lineage.lineage(cat, _rec(cat, b))["made_into"]] == [("B", merged)]
        assert lineage.made_into(cat, grand) == []
        got = lineage.lineage(cat, _rec(cat, tmp_path / "merged.safetensors"))["made_from"]
        assert [(e["role"], e["path"]) for e in got] == [("A", str(a)), ("B", str(b))]
