"""A LoRA's trigger words in the library: ``scan`` stores them (``files.triggers``), ``ls --search`` finds them,
``show`` lists every word with its sources, and a catalog from before the column gains it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import torch
from fakes.sample_files import make_model
from safetensors.torch import save_file

from ckptlab.library import catalog as cat_mod
from ckptlab.library import scanner as scan_mod
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

_MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
# by hand: folder token "mychar" (the only kohya <repeats>_<name> folder), then the tags by total count:
# 1girl 7+3 = 10, mychar (already a folder token), red hair 4, smile 2
TAGS = {"10_mychar": {"mychar": 7, "1girl": 7, "red hair": 4}, "2_extra": {"1girl": 3, "smile": 2}}
DIRS = {"10_mychar": {"n_repeats": 10, "img_count": 7}, "2_extra": {"n_repeats": 2, "img_count": 1}}
WANT = ["mychar", "extra", "1girl", "red hair", "smile"]  # "extra": 1 image x 2 repeats, after mychar's 70


def _lora(path: Path, tags=TAGS, dirs=DIRS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    save_file({f"{_MOD}.lora_down.weight": torch.randn(4, 320, generator=g),
               f"{_MOD}.lora_up.weight": torch.randn(320, 4, generator=g), f"{_MOD}.alpha": torch.tensor(2.0)},
              str(path), metadata={"ss_tag_frequency": json.dumps(tags), "ss_dataset_dirs": json.dumps(dirs),
                                   "ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora"})
    return path


def _words(rec) -> list[str]:
    return [t["word"] for t in rec.triggers]


def _ls(cli, db, *args) -> list[str]:
    r = cli("ls", "--json", "--db", db, *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line)["path"] for line in r.stdout.splitlines()]


def test_scan_stores_trigger_words_and_ls_search_finds_them(tmp_path, cli):
    lib = tmp_path / "lib"
    lora = _lora(lib / "loras" / "mychar_v1.safetensors")
    (lib / "embeddings").mkdir()
    emb = make_model(lib / "embeddings" / "neg.safetensors", "sd1_embedding")
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([lib], cat)
        rec = cat.get_by_path(lora)
        assert _words(rec) == WANT
        assert rec.triggers[2] == {"word": "1girl", "count": 10, "sources": ["tag frequency"]}
        assert rec.triggers[0]["sources"] == ["dataset folder", "tag frequency"]
        assert cat.get_by_path(emb).triggers is None  # not a LoRA: never computed
    assert _ls(cli, db, "--search", "RED HAIR") == [str(lora)]
    assert _ls(cli, db, "--search", "smile") == [str(lora)]
    assert _ls(cli, db, "--search", "no-such-trigger") == []
    d = json.loads(cli("ls", "--json", "--db", db, "--search", "smile").stdout)
    assert [t["word"] for t in d["triggers"]] == WANT
    human = cli("ls", "--db", db, "--search", "smile").stdout
    assert "[metadata triggers: mychar, extra, 1girl]" in human


def test_changed_file_gets_new_trigger_words(tmp_path):
    lora = _lora(tmp_path / "lib" / "a.safetensors")
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([tmp_path / "lib"], cat)
        _lora(lora, tags={"x": {"newtag": 3}}, dirs={})
        s = scan([tmp_path / "lib"], cat)
        assert s.changed == 1
        assert _words(cat.get_by_path(lora)) == ["newtag"]


def test_show_lists_every_word_with_its_source_and_sidecar_words_stay(tmp_path, cli):
    lora = _lora(tmp_path / "lib" / "mychar.safetensors")
    (tmp_path / "lib" / "mychar.civitai.info").write_text(json.dumps(
        {"id": 2, "modelId": 1, "files": [], "model": {"name": "My char"}, "trainedWords": ["MyChar", "sidecarword"]}))
    db = tmp_path / "c.db"
    assert cli("scan", tmp_path / "lib", "--db", db).returncode == 0
    assert _ls(cli, db, "--search", "sidecarword") == [str(lora)]  # CivitAI sidecar words are searched as before
    d = json.loads(cli("show", lora, "--json", "--db", db).stdout.splitlines()[0])
    by = {t["word"]: t for t in d["trigger_words"]}
    assert by["mychar"]["sources"] == ["dataset folder", "tag frequency", "sidecar mychar.civitai.info"]
    assert by["sidecarword"]["sources"] == ["sidecar mychar.civitai.info"]
    assert by["red hair"] == {"word": "red hair", "sources": ["tag frequency"], "count": 4}
    assert d["sidecars"]["trigger_words"] == ["MyChar", "sidecarword"]  # the sidecar summary is unchanged
    human = cli("show", lora, "--db", db).stdout
    assert "    - 1girl  [tag frequency 10]" in human
    assert "    - sidecarword  [sidecar mychar.civitai.info]" in human


def test_catalog_from_before_the_trigger_column(tmp_path, monkeypatch, cli):
    """A catalog written by the previous ckptlab (core schema 2, no ``triggers`` component): opening it adds
    the column, and the next scan fills in the LoRA's words from the metadata its row already stores, without
    re-reading the unchanged file."""
    lora = _lora(tmp_path / "lib" / "a.safetensors")
    db = tmp_path / "old.db"
    # the previous ckptlab: no triggers component (nor the later ones, whose triggers may read files.triggers: the
    # web index), no triggers fact, no backfill
    from ckptlab.hub import store

    monkeypatch.setattr(cat_mod, "_REGISTERED", {k: v for k, v in cat_mod._REGISTERED.items() if k == store.COMPONENT})
    monkeypatch.setattr(scan_mod, "_FACT_COLS", tuple(c for c in scan_mod._FACT_COLS if c != "triggers"))
    monkeypatch.setattr(scan_mod, "TRIGGER_KINDS", ())
    monkeypatch.setattr(scan_mod, "_backfill_triggers", lambda catalog: 0)
    with Catalog(db) as cat:
        scan([tmp_path / "lib"], cat)
    raw = sqlite3.connect(db)
    assert "triggers" not in {r[1] for r in raw.execute("PRAGMA table_info(files)")}
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
    assert raw.execute("SELECT count(*) FROM schema_versions WHERE component = 'triggers'").fetchone()[0] == 0
    raw.close()
    monkeypatch.undo()

    with Catalog(db) as cat:
        assert cat.component_version("triggers") == 1 and cat.schema_version == 2
        assert cat.get_by_path(lora).triggers is None
    assert _ls(cli, db, "--search", "red hair") == []  # not known until the next scan
    with Catalog(db) as cat:
        s = scan([tmp_path / "lib"], cat)
        assert (s.unchanged, s.changed, s.new) == (1, 0, 0)
        assert _words(cat.get_by_path(lora)) == WANT
    assert _ls(cli, db, "--search", "red hair") == [str(lora)]
