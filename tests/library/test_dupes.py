"""Tensor fingerprints across forms, duplicate groups, keep rules, plan-space."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import blake3
import pytest
from fakes.library_files import half, pruned, tensors, write_ckpt, write_st

from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import find_dupes, plan_space
from ckptlab.library.fingerprint import fingerprint_file
from ckptlab.library.plan import SpacePlan
from ckptlab.library.scanner import scan


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """One SD1 checkpoint (with EMA) in five forms, plus genuinely different weights."""
    d = tmp_path_factory.mktemp("forms")
    full = tensors("sd1_checkpoint", seed=1, ema=True)
    out = {
        "ckpt_fp32_full": write_ckpt(d / "a.ckpt", full, {"optimizer_states": [{"lr": 1e-4}]}),
        "st_fp32_full": write_st(d / "b.safetensors", full),
        "st_fp16_pruned": write_st(d / "c.safetensors", half(pruned(full))),
        "st_fp32_pruned_meta": write_st(d / "d.safetensors", pruned(full), {"modelspec.title": "edited"}),
        "ckpt_fp16_pruned": write_ckpt(d / "e.ckpt", half(pruned(full))),
    }
    other = dict(full)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    other[key] = other[key] + 0.01
    out["unet_changed"] = write_st(d / "f.safetensors", pruned(other))
    out["different"] = write_st(d / "g.safetensors", pruned(tensors("sd1_checkpoint", seed=2)))
    return out


def test_fingerprint_equal_across_forms(forms):
    fps = {name: fingerprint_file(forms[name]) for name in
           ("ckpt_fp32_full", "st_fp32_full", "st_fp16_pruned", "st_fp32_pruned_meta", "ckpt_fp16_pruned")}
    assert len({f.fingerprint for f in fps.values()}) == 1
    assert set(fps["st_fp16_pruned"].components) == {"unet", "vae", "clip_l"}


def test_fingerprint_differs_for_different_weights(forms):
    base = fingerprint_file(forms["st_fp32_pruned_meta"])
    changed = fingerprint_file(forms["unet_changed"])
    other = fingerprint_file(forms["different"])
    assert changed.fingerprint != base.fingerprint and other.fingerprint != base.fingerprint
    # one UNet weight changed: UNet differs, VAE and text encoder are still the same
    assert changed.components["unet"] != base.components["unet"]
    assert changed.components["vae"] == base.components["vae"]
    assert changed.components["clip_l"] == base.components["clip_l"]
    assert all(other.components[c] != base.components[c] for c in base.components)


def test_component_equals_standalone_file_and_documented_formula(tmp_path):
    ck = pruned(tensors("sd1_checkpoint", seed=3))
    write_st(tmp_path / "ck.safetensors", ck)
    vae = {k[len("first_stage_model."):]: v for k, v in ck.items() if k.startswith("first_stage_model.")}
    write_st(tmp_path / "vae.safetensors", half(vae))
    fa, fb = fingerprint_file(tmp_path / "ck.safetensors"), fingerprint_file(tmp_path / "vae.safetensors")
    assert fa.components["vae"] == fb.components["vae"]
    # the documented formula, computed here: sorted "key\tshape\tblake3(fp16 bytes)\n" lines, SHA-256
    lines = "".join(f"{k}\t{list(v.shape)}\t{blake3.blake3(v.half().contiguous().numpy().tobytes()).hexdigest()}\n"
                    for k, v in sorted(vae.items()))
    assert fb.components["vae"] == hashlib.sha256(lines.encode()).hexdigest()
    assert fb.fingerprint == hashlib.sha256(f"vae:{fb.components['vae']}\n".encode()).hexdigest()


def test_old_clip_naming_is_canonicalised(tmp_path):
    ck = pruned(tensors("sd1_checkpoint", seed=4))
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in ck.items()}
    assert old.keys() != ck.keys()
    write_st(tmp_path / "new.safetensors", ck)
    write_st(tmp_path / "old.safetensors", old)
    assert fingerprint_file(tmp_path / "new.safetensors") == fingerprint_file(tmp_path / "old.safetensors")


@pytest.fixture
def library(tmp_path, forms):
    """An A1111 folder holding the five forms, an exact copy, and the different models."""
    sd = tmp_path / "lib" / "models" / "Stable-diffusion"
    sd.mkdir(parents=True)
    names = {}
    for name in ("ckpt_fp32_full", "st_fp32_full", "st_fp16_pruned", "st_fp32_pruned_meta", "different"):
        src = forms[name]
        names[name] = shutil.copy(src, sd / f"{name}{src.suffix}")
    (tmp_path / "lib" / "backup").mkdir()
    names["exact_copy"] = shutil.copy(forms["different"], tmp_path / "lib" / "backup" / "different.safetensors")
    cat = Catalog(tmp_path / "c.db")
    scan([tmp_path / "lib"], cat, hash=True, fingerprint=True)
    yield cat, {k: str(v) for k, v in names.items()}
    cat.close()


def test_dupes_groups_and_keep_rules(library):
    cat, p = library
    res = find_dupes(cat)
    by_kind = {g.kind: g for g in res.groups}
    assert set(by_kind) == {"exact", "same_weights"}
    exact = by_kind["exact"]
    # the copy inside a known UI folder is kept over the one in backup/
    assert exact.keep == p["different"] and {c.path for c in exact.copies} == {p["different"], p["exact_copy"]}
    size = lambda k: __import__("os").path.getsize(p[k])  # noqa: E731
    assert exact.bytes_freed == size("exact_copy")
    same = by_kind["same_weights"]
    # safetensors over pickle, pruned over full, fp32 over fp16 by default
    assert same.keep == p["st_fp32_pruned_meta"]
    assert {c.path for c in same.copies} == {p[k] for k in ("ckpt_fp32_full", "st_fp32_full", "st_fp16_pruned",
                                                             "st_fp32_pruned_meta")}
    # all in the A1111 folder: linked to the kept copy (the fp16 copy's name would lie: left alone)
    acts = {c.path: c.action for c in same.copies}
    assert acts == {p["st_fp32_pruned_meta"]: "keep", p["ckpt_fp32_full"]: "link", p["st_fp32_full"]: "link",
                    p["st_fp16_pruned"]: "leave"}
    assert same.bytes_freed == sum(size(k) for k in ("ckpt_fp32_full", "st_fp32_full"))
    assert res.bytes_freed == exact.bytes_freed + same.bytes_freed
    # smaller precision only when asked
    smaller = {g.kind: g for g in find_dupes(cat, prefer_smaller=True).groups}["same_weights"]
    assert smaller.keep == p["st_fp16_pruned"]


def test_shared_component_groups(tmp_path, forms):
    lib = tmp_path / "lib" / "models" / "Stable-diffusion"
    lib.mkdir(parents=True)
    shutil.copy(forms["st_fp32_pruned_meta"], lib / "a.safetensors")
    shutil.copy(forms["unet_changed"], lib / "b.safetensors")
    with Catalog(tmp_path / "c.db") as cat:
        scan([tmp_path / "lib"], cat, fingerprint=True)
        groups = find_dupes(cat, components=True).groups
        assert {(g.kind, g.component) for g in groups} == {("shared_component", "vae"),
                                                           ("shared_component", "clip_l")}
        assert all(g.bytes_freed == 0 and len(g.copies) == 2 for g in groups)


def test_plan_space_steps_and_bytes(tmp_path):
    """One step per file; a transform's bill is what its output really is (the outcome is the oracle: the
    step is carried out and the file measured); a duplicate frees its size."""
    from ckptlab.library.apply_plan import apply_plan

    sd = tmp_path / "lib" / "models" / "Stable-diffusion"
    full = tensors("sd1_checkpoint", seed=7, ema=True, dim_cap=8)
    ck = write_ckpt(sd / "old.ckpt", pruned(tensors("sd1_checkpoint", seed=8, dim_cap=8)))
    st_full = write_st(sd / "full.safetensors", half(full))
    st_32 = write_st(sd / "sd32.safetensors", pruned(tensors("sd1_checkpoint", seed=9, dim_cap=8)))
    dup = shutil.copy(st_32, tmp_path / "lib" / "copy.safetensors")
    with Catalog(tmp_path / "c.db") as cat:
        scan([tmp_path / "lib"], cat, hash=True)
        plan = plan_space(cat)
    steps = {(s.label, s.path): s for s in plan.steps}
    assert set(steps) == {("delete_duplicate", str(dup)), ("convert_pickle+to_fp16", str(ck)),
                          ("prune", str(st_full)), ("to_fp16", str(st_32))}
    assert steps[("delete_duplicate", str(dup))].keep == str(st_32)
    assert steps[("delete_duplicate", str(dup))].bytes_freed == st_32.stat().st_size
    assert plan.steps[0].action == "delete_duplicate"
    assert plan.total_bytes_freed == sum(s.bytes_freed for s in plan.steps)
    before = {p: os.path.getsize(p) for p in (ck, st_full, st_32)}
    plan.save(tmp_path / "plan.json")
    results = apply_plan(tmp_path / "plan.json", catalog_path=tmp_path / "c.db", rescan=False)
    assert all(r.status == "done" for r in results), [(r.path, r.message) for r in results]
    after = {ck: sd / "old.safetensors", st_full: st_full, st_32: st_32}
    for (_label, path), step in steps.items():
        if step.action == "transform":
            assert before[Path(path)] - after[Path(path)].stat().st_size == step.bytes_freed
    # against the safetensors library: prune frees what a file without the EMA tensors saves, less the
    # provenance metadata (under 1 KiB) the rewritten header gains
    peer = write_st(tmp_path / "peer.safetensors", pruned(half(full)))
    saved = before[st_full] - peer.stat().st_size
    assert saved - 1024 < steps[("prune", str(st_full))].bytes_freed < saved


def test_cli_dupes_and_plan_space(library, cli, tmp_path):
    cat, p = library
    r = cli("dupes", "--json", "--db", str(cat.path))
    assert r.returncode == 0, r.stderr
    groups = [json.loads(x) for x in r.stdout.splitlines()]
    assert sorted(g["kind"] for g in groups) == ["exact", "same_weights"]
    r = cli("plan-space", "-o", str(tmp_path / "plan.json"), "--db", str(cat.path))
    assert r.returncode == 0 and "dry run" in r.stdout
    plan = SpacePlan.load(tmp_path / "plan.json")
    deletes = {s.path for s in plan.steps if s.action == "delete_duplicate"}
    assert deletes == {p["exact_copy"]}  # the only copy outside a UI folder
    links = {s.path: s for s in plan.steps if s.action == "link_duplicate"}
    assert set(links) == {p["ckpt_fp32_full"], p["st_fp32_full"]}  # in the A1111 folder: linked, not removed
    assert links[p["ckpt_fp32_full"]].link_path == p["ckpt_fp32_full"][:-len(".ckpt")] + ".safetensors"
    # the fp16 copy's name says fp16: a link to the fp32 keeper would lie, so it is left as it is
    assert any(n.startswith(p["st_fp16_pruned"]) for n in plan.notes)
    # a dry run: every file is still there
    assert all(__import__("os").path.exists(x) for x in p.values())
