"""apply-plan: the library's plan-space plan carried out file by file, catalog and sidecars kept linked."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from fakes.sample_files import load, make_model, sha256

from ckptlab.library.apply_plan import apply_plan
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import plan_space
from ckptlab.library.scanner import scan

UNET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "models"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint", ema=True)
    shutil.copyfile(a, lib / "a copy.safetensors")
    (lib / "a copy.preview.png").write_bytes(b"\x89PNG fake preview")
    b = make_model(lib / "b.ckpt", "sd1_checkpoint", ema=True, fmt="ckpt", seed=5)
    (lib / "b.civitai.info").write_text('{"id": 1}')
    db = tmp_path / "catalog.db"
    with Catalog(db) as cat:
        scan([lib], cat, hash=True)
        plan = plan_space(cat)
    plan_path = plan.save(tmp_path / "plan.json")
    return lib, db, plan_path, {"a": load(a), "b_sha": sha256(b)}


def test_apply_plan_end_to_end(library, cli):
    lib, db, plan_path, orig = library
    with Catalog(db) as cat:
        b_id = cat.get_by_path(lib / "b.ckpt").id
    steps = json.loads(plan_path.read_text())["steps"]
    actions = [(s["action"], s["path"].rsplit("/", 1)[1]) for s in steps]
    assert ("delete_duplicate", "a copy.safetensors") in actions or ("delete_duplicate", "a.safetensors") in actions
    assert ("transform", "b.ckpt") in actions
    assert next(s for s in steps if s["path"].endswith("b.ckpt"))["ops"] == ["convert_pickle", "prune", "to_fp16"]

    r = cli("apply-plan", plan_path, "--dry-run", "--db", db)
    assert r.returncode == 0, r.stderr
    assert "would-do" in r.stdout and (lib / "b.ckpt").exists() and (lib / "a copy.safetensors").exists()

    r = cli("apply-plan", plan_path, "--db", db, "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert all(x["status"] == "done" for x in recs), recs

    names = sorted(p.name for p in lib.iterdir())
    kept = "a.safetensors" if "a.safetensors" in names else "a copy.safetensors"
    stem = kept.rsplit(".", 1)[0]
    assert names == sorted([kept, f"{stem}.preview.png", "b.civitai.info", "b.safetensors"])
    # a: pruned then fp16, values equal torch's cast of the original
    a = load(lib / kept)
    assert not any(k.startswith("model_ema.") for k in a)
    assert a[UNET].dtype == torch.float16 and torch.equal(a[UNET], orig["a"][UNET].half())
    # b: converted from the pickle, pruned, fp16; sidecar still named after the stem
    b = load(lib / "b.safetensors")
    assert b[UNET].dtype == torch.float16 and not any(k.startswith("model_ema.") for k in b)
    with Catalog(db) as cat:
        rec = cat.get_by_path(lib / "b.safetensors")
        assert rec is not None and rec.id == b_id and rec.status == "present" and rec.format == "safetensors"
        assert cat.get_by_path(lib / "a copy.safetensors" if kept == "a.safetensors" else lib / "a.safetensors"
                               ).status == "missing"


def test_stale_plan_touches_nothing(library):
    lib, db, plan_path, orig = library
    (lib / "b.ckpt").write_bytes((lib / "b.ckpt").read_bytes() + b"x")  # changed after planning
    before = sha256(lib / "b.ckpt")
    results = apply_plan(plan_path)  # updates the catalog named in the plan
    (b_step,) = [r for r in results if r.path.name == "b.ckpt"]
    assert b_step.status == "failed" and "plan saw" in b_step.message
    assert sha256(lib / "b.ckpt") == before and not (lib / "b.safetensors").exists()


def test_duplicate_not_deleted_when_keep_changed(library):
    lib, db, plan_path, orig = library
    plan = json.loads(plan_path.read_text())
    dup = next(s for s in plan["steps"] if s["action"] == "delete_duplicate")
    keep = lib / dup["keep"].rsplit("/", 1)[1]
    st = keep.stat()
    data = bytearray(keep.read_bytes())
    data[-1] ^= 1
    keep.write_bytes(bytes(data))
    os.utime(keep, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its size and mtime as planned
    results = apply_plan(plan_path, catalog_path=db, rescan=False)
    r = next(r for r in results if r.action == "delete_duplicate")
    assert r.status == "failed" and "not identical" in r.message
    assert (lib / dup["path"].rsplit("/", 1)[1]).exists()


def test_catalog_move_file_repoints_row(tmp_path):
    """The Catalog method apply-plan uses: a plain move with its stat identity keeps the row (id, hashes)
    and the next scan finds it unchanged; without the identity the next scan re-reads it; a name that
    already has its own row is refused."""
    lib = tmp_path / "lib"
    lib.mkdir()
    make_model(lib / "a.safetensors", "sd1_checkpoint")
    make_model(lib / "b.safetensors", "sd1_checkpoint", seed=3)
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat, hash=True)
        a, b = cat.get_by_path(lib / "a.safetensors"), cat.get_by_path(lib / "b.safetensors")
        assert not cat.move_file(a.id, lib / "b.safetensors")  # b's row holds that name
        assert cat.get_by_path(lib / "b.safetensors").id == b.id

        shutil.copy2(lib / "a.safetensors", lib / "moved.safetensors")  # a move across devices: new inode
        (lib / "a.safetensors").unlink()
        st = (lib / "moved.safetensors").stat()
        assert cat.move_file(a.id, lib / "moved.safetensors", (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        assert cat.get_by_path(lib / "a.safetensors") is None
        rec = cat.get_by_path(lib / "moved.safetensors")
        assert (rec.id, rec.name, rec.sha256) == (a.id, "moved.safetensors", sha256(lib / "moved.safetensors").upper())
        s = scan([lib], cat)
        assert (s.unchanged, s.changed, s.new, s.missing) == (2, 0, 0, 0)

        (lib / "b.safetensors").rename(lib / "b2.safetensors")
        make_model(lib / "b2.safetensors", "sd1_checkpoint", seed=4)  # new content under the new name
        assert cat.move_file(b.id, lib / "b2.safetensors")  # content changed: no stat identity
        s = scan([lib], cat, hash=True)
        assert (s.unchanged, s.changed, s.new) == (1, 1, 0)
        assert cat.get_by_path(lib / "b2.safetensors").sha256 == sha256(lib / "b2.safetensors").upper()
