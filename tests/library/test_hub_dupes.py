"""``dupes`` at hub scale: candidate groups from SQL, records loaded per batch of groups, groups streamed.

The oracle is the implementation before hub scale (tests/fakes/hub_old_dupes.py, verbatim), which loaded every
record and grouped in Python: on real scanned libraries the results must be identical, option by option; on a
synthetic hub catalog (remote objects, hostile names, hard links, symlinks, unsafe pickles) the groups must be
identical and only the decisions that touch object storage differ, as documented.
"""

from __future__ import annotations

import json
import os
import shutil

import fakes.hub_old_dupes as old
import pytest
import torch
from fakes.hub_catalog import build
from fakes.library_files import half, pruned, tensors, write_ckpt, write_st
from test_scan_diffusers import pipeline

from ckptlab.jsonable import to_jsonable
from ckptlab.library import catalog as cat_mod
from ckptlab.library import copies, hub_queries
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import REMOTE_NOTE, find_dupes, iter_dupes
from ckptlab.library.scanner import scan
from ckptlab.remote import REMOTE_DEV, is_remote


def _bf16(sd):
    return {k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def real_lib(tmp_path_factory):
    """A scanned library with every kind of group: exact copies in and out of UI folders, one model in five
    forms (pickle/safetensors, fp32/fp16/bf16, full/pruned), a hard link, a symlink, a diffusers folder of a
    model, a LoRA and its fp16 copy under a hostile name, and a model held once."""
    root = tmp_path_factory.mktemp("hubdupes")
    sd = root / "webui" / "models" / "Stable-diffusion"
    lora = root / "webui" / "models" / "Lora"
    comfy = root / "ComfyUI" / "models" / "checkpoints"
    dl = root / "Downloads"
    for d in (sd, lora, comfy, dl):
        d.mkdir(parents=True)
    full = tensors("sd1_checkpoint", seed=11, ema=True)
    write_ckpt(sd / "m1.ckpt", full)
    write_st(comfy / "m1.safetensors", pruned(full))
    write_st(dl / "m1-fp16.safetensors", half(pruned(full)))
    write_st(dl / "m1-bf16.safetensors", _bf16(pruned(full)))
    write_st(sd / "m2.safetensors", pruned(tensors("sd1_checkpoint", seed=12)))
    shutil.copy2(sd / "m2.safetensors", comfy / "m2.safetensors")
    shutil.copy2(sd / "m2.safetensors", dl / "m2.safetensors")
    os.link(sd / "m2.safetensors", dl / "m2-hardlink.safetensors")
    os.symlink(comfy / "m2.safetensors", sd / "m2-link.safetensors")
    write_st(sd / "alone.safetensors", pruned(tensors("sd1_checkpoint", seed=13)))
    l1 = tensors("sd1_kohya_lora", seed=14)
    write_st(lora / "detail.safetensors", l1)
    write_st(lora / "evil\n\u202ename-fp16.safetensors", half(l1))
    pipeline(root / "diffusers" / "pipe", seed=15)
    db = root / "c.db"
    with Catalog(db) as cat:
        scan([root / "webui", root / "ComfyUI", dl, root / "diffusers"], cat, hash=True, fingerprint=True, workers=1)
    return db


OPTIONS = [dict(), dict(prefer_smaller=True), dict(components=True), dict(link="none"), dict(link="sym"),
           dict(link="hard", prefer_smaller=True, components=True)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_same_result_as_before_on_a_real_library(real_lib, opts):
    with Catalog(real_lib) as cat:
        want = old.find_dupes(cat, **opts)
        got = find_dupes(cat, **opts)
    assert len(want.groups) >= 3  # the library has groups of every kind
    assert to_jsonable(got.to_dict()) == to_jsonable(want.to_dict())


def test_same_result_when_a_pickle_is_not_safe(real_lib, tmp_path):
    db = tmp_path / "c.db"
    shutil.copy(real_lib, db)
    with Catalog(db) as cat:
        with cat.transaction():
            n = cat.conn.execute("UPDATE files SET safety = 'suspicious' WHERE format = 'pickle'").rowcount
        assert n == 1
        want, got = old.find_dupes(cat), find_dupes(cat)
    assert to_jsonable(got.to_dict()) == to_jsonable(want.to_dict())
    assert not any(c.path.endswith("m1.ckpt") for g in got.groups for c in g.copies)


@pytest.fixture(scope="module")
def hub_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("hubsyn") / "hub.db"
    assert copies.COMPONENT in cat_mod._REGISTERED  # the catalog indexes component fingerprints from the start
    build(db, 6000, seed=3, hostile=True, dup_share=0.3)
    return db


def _shape(g):
    return (g.kind, g.key, g.keep, g.reason, g.component, [(c.id, c.path, c.keep, c.match, c.in_ui) for c in g.copies])


@pytest.mark.parametrize("index", [True, False], ids=["component-index", "no-component-index"])
def test_synthetic_hub_catalog_same_groups_and_objects_never_acted_on(hub_db, tmp_path, monkeypatch, index):
    if not index:  # a catalog without library.copies' component table: --components reads every fingerprinted row
        shutil.copy(hub_db, tmp_path / "hub.db")
        hub_db = tmp_path / "hub.db"
        monkeypatch.delitem(cat_mod._REGISTERED, copies.COMPONENT)
        with Catalog(hub_db) as cat:
            cat.conn.execute("DELETE FROM schema_versions WHERE component = ?", (copies.COMPONENT,))
            cat.conn.execute("DROP TABLE component_fps")
    with Catalog(hub_db) as cat:
        assert (cat.conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'component_fps'").fetchone()[0]
                == int(index))
    touched = []
    for mod, name in ((os, "stat"), (os.path, "lexists"), (os.path, "islink")):
        real = getattr(mod, name)

        def spy(p, *a, _real=real, **kw):
            if is_remote(os.fspath(p) if isinstance(p, os.PathLike) else p):
                touched.append(p)
            return _real(p, *a, **kw)

        monkeypatch.setattr(mod, name, spy)
    with Catalog(hub_db) as cat:
        got = find_dupes(cat, components=True)
        monkeypatch.undo()
        want = old.find_dupes(cat, components=True)
        remote_ids = {r[0] for r in cat.conn.execute("SELECT id FROM files WHERE dev = ?", (REMOTE_DEV,))}
    assert touched == []  # no URL was ever stat'ed or tested as a local path
    assert (got.unhashed, got.unfingerprinted) == (want.unhashed, want.unfingerprinted)
    assert [_shape(g) for g in got.groups] == [_shape(g) for g in want.groups]
    kinds = {g.kind for g in got.groups}
    assert {"exact", "same_weights", "shared_component"} <= kinds
    n_remote = n_local_for_remote = 0
    for g, w in zip(got.groups, want.groups, strict=True):
        if g.kind == "shared_component":
            continue
        keeper = next(c for c in g.copies if c.keep)
        for c, o in zip(g.copies, w.copies, strict=True):
            if c.keep:
                continue
            if c.id in remote_ids and c.note == REMOTE_NOTE:  # reported: what removing it saves, never an action
                n_remote += 1
                assert (c.action, c.bytes_freed, c.link) == ("leave", c.size, None)
            elif keeper.id in remote_ids and o.action in ("delete", "link"):
                n_local_for_remote += 1
                assert (c.action, c.bytes_freed) == ("leave", 0) and "object storage" in c.note
            else:
                assert (c.action, c.note, c.bytes_freed, c.link, c.link_path) == (
                    o.action, o.note, o.bytes_freed, o.link, o.link_path)
        assert g.bytes_freed == sum(c.bytes_freed for c in g.copies)
    assert n_remote > 10 and n_local_for_remote > 0
    assert not any(c.action in ("delete", "link") and c.id in remote_ids for g in got.groups for c in g.copies)


def test_only_the_candidates_records_are_loaded_and_groups_stream(hub_db, monkeypatch):
    loaded = []
    real = hub_queries.record_of
    monkeypatch.setattr(hub_queries, "record_of", lambda row: loaded.append(row[0]) or real(row))
    with Catalog(hub_db) as cat:
        total = cat.conn.execute("SELECT count(*) FROM files").fetchone()[0]
        stream = iter_dupes(cat)
        first = next(iter(stream))
        assert first.copies and len(loaded) <= 600  # one batch of groups, not the catalog
        rest = list(stream)
    in_groups = {c.id for g in [first, *rest] for c in g.copies}
    assert set(loaded) == in_groups  # exactly the groups' records: every other row stays in the database
    assert len(loaded) < total / 2
    assert len(set(loaded)) == len(loaded)  # each record once


def test_cli_streams_json_lines_and_sorts_by_bytes(real_lib, cli):
    with Catalog(real_lib) as cat:
        want = [to_jsonable(g) for g in old.find_dupes(cat).groups]
    got = [json.loads(x) for x in cli("dupes", "--json", "--db", str(real_lib)).stdout.splitlines()]
    assert got == want
    top = [json.loads(x) for x in cli("dupes", "--json", "--sort", "bytes", "--limit", "2", "--db",
                                       str(real_lib)).stdout.splitlines()]
    by_bytes = sorted(enumerate(want), key=lambda t: (-t[1]["bytes_freed"], t[0]))
    assert top == [g for _, g in by_bytes[:2]]
    first = [json.loads(x) for x in cli("dupes", "--json", "--limit", "1", "--db", str(real_lib)).stdout.splitlines()]
    assert first == want[:1]
    text = cli("dupes", "--db", str(real_lib)).stdout
    assert f"{len(want)} groups" in text.splitlines()[-1]
    assert "evil" in text and "\u202e" not in text and "evil\n" not in text  # shown visibly, never raw


def test_cli_shows_object_urls_and_why_they_are_left(hub_db, cli):
    out = cli("dupes", "--limit", "400", "--db", str(hub_db)).stdout
    lines = [ln for ln in out.splitlines() if "s3://hub-bucket/" in ln and REMOTE_NOTE in ln]
    assert lines and all(ln.lstrip().startswith("leave") for ln in lines)
