"""bf16 copies of an fp32 model match it through the bf16 fingerprint; an fp16 copy matches through the
fp16 one; a bf16 file made from the fp16 copy (double rounding) and different weights do not."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from fakes.library_files import pruned, tensors, write_ckpt, write_st

from ckptlab.library import catalog as cat_mod
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import find_dupes
from ckptlab.library.fingerprint import fingerprint_file
from ckptlab.library.scanner import scan

KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
# 1 + 2^-8 + 2^-12: fp16 rounds it to 1 + 2^-8, a bf16 tie that rounds to even (1.0), while bf16
# rounding of the fp32 value gives 1 + 2^-7. 1e-6 is an fp16 subnormal (4 significant bits).
TRICKY = [1 + 2**-8 + 2**-12, 1e-6, -3.3e-7]


def cast(sd, fn):
    return {k: fn(v) if v.dtype == torch.float32 else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    fp32 = pruned(tensors("sd1_checkpoint", seed=1))
    flat = fp32[KEY].reshape(-1)
    flat[:len(TRICKY)] = torch.tensor(TRICKY)
    bf16 = cast(fp32, lambda v: v.to(torch.bfloat16))
    via_fp16 = cast(fp32, lambda v: v.half().to(torch.bfloat16))
    assert not torch.equal(bf16[KEY], via_fp16[KEY])  # torch agrees: double rounding changes values
    return {
        "fp32": write_st(d / "lib" / "a-fp32.safetensors", fp32),
        "bf16": write_st(d / "lib" / "b-bf16.safetensors", bf16),
        "bf16_ckpt": write_ckpt(d / "lib" / "c-bf16.ckpt", bf16),
        "fp16": write_st(d / "lib" / "d-fp16.safetensors", cast(fp32, torch.Tensor.half)),
        "bf16_via_fp16": write_st(d / "lib" / "e-bf16-from-fp16.safetensors", via_fp16),
        "other_bf16": write_st(d / "lib" / "f-other.safetensors",
                               cast(pruned(tensors("sd1_checkpoint", seed=2)), lambda v: v.to(torch.bfloat16))),
    }


def test_bf16_fingerprints(forms):
    fp = {name: fingerprint_file(p) for name, p in forms.items()}
    assert fp["fp32"].bf16 == fp["bf16"].bf16 == fp["bf16_ckpt"].bf16 is not None
    assert fp["fp32"].bf16_components == fp["bf16"].bf16_components
    assert set(fp["bf16"].bf16_components) == {"unet", "vae", "clip_l"}
    assert fp["fp16"].bf16 is None  # an fp16 file cannot give back the bf16 rounding of its source
    assert fp["bf16_via_fp16"].bf16 != fp["fp32"].bf16
    assert fp["other_bf16"].bf16 != fp["fp32"].bf16
    # the fp16 fingerprint is unchanged: fp32 and fp16 match there, bf16 copies do not
    assert fp["fp32"].fingerprint == fp["fp16"].fingerprint != fp["bf16"].fingerprint
    assert fp["bf16_via_fp16"].bf16_components["unet"] != fp["fp32"].bf16_components["unet"]


def test_dupes_group_fp32_fp16_and_bf16_copies(forms, tmp_path):
    with Catalog(tmp_path / "c.db") as cat:
        scan([forms["fp32"].parent], cat, fingerprint=True)
        res = find_dupes(cat)
    (g,) = [g for g in res.groups if g.kind == "same_weights"]
    names = {c.path.rsplit("/", 1)[-1] for c in g.copies}
    assert names == {"a-fp32.safetensors", "b-bf16.safetensors", "c-bf16.ckpt", "d-fp16.safetensors"}
    assert g.keep == str(forms["fp32"]) and "bf16 rounding" in g.reason


def test_migration_2_adds_bf16_columns_and_drops_stale_fingerprints(tmp_path, monkeypatch):
    db = tmp_path / "old.db"
    monkeypatch.setattr(cat_mod, "_CORE_MIGRATIONS", cat_mod._CORE_MIGRATIONS[:1])
    # the ckptlab that wrote version 1 knew none of today's components (their tables and triggers may use columns
    # of later core versions: library.copies reads components_bf16)
    monkeypatch.setattr(cat_mod, "_REGISTERED", {})
    with Catalog(db) as c:  # a version-1 catalog with a cached fingerprint
        c.conn.execute("INSERT INTO content(dev, ino, size, mtime_ns, sha256, fingerprint, components) "
                       "VALUES (1, 2, 3, 4, 'AB', 'old', '{}')")
    monkeypatch.undo()
    with Catalog(db) as c:
        assert c.schema_version == 2
        got = c.content((1, 2, 3, 4))
        assert got["fingerprint"] is None and got["fingerprint_bf16"] is None and got["hashes"].sha256 == "AB"
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(content)")}
    assert {"fingerprint_bf16", "components_bf16"} <= cols
