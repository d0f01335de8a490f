"""Recipes: chains, saved intermediates, sha256 pins and --relink, metadata round trip, re-runs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.errors import MismatchError
from ckptlab.merging import load, loads, merge, run_recipe
from ckptlab.merging.recipe import RecipeError
from ckptlab.sample.build import write_model


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe")
    ms = {"modelspec.title": "Model A", "modelspec.architecture": "stable-diffusion-v1", "other.key": "x"}
    return [write_model(d / "a.safetensors", "sd1_checkpoint", seed=1, metadata=ms),
            write_model(d / "b.safetensors", "sd1_checkpoint", seed=2,
                        metadata={"modelspec.title": "Model B", "modelspec.author": "bee"}),
            write_model(d / "c.safetensors", "sd1_checkpoint", seed=3)]


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _meta(p) -> dict:
    with safe_open(p, "pt") as f:
        return f.metadata()


def _chain(a, b, c, save=None) -> str:
    return f"""
version = 1
[inputs.A]
path = "{a}"
[inputs.B]
path = "{b}"
[inputs.C]
path = "{c}"

[[steps]]
name = "mix"
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.3
{f'save = "{save}"' if save else ''}

[[steps]]
name = "detail"
method = "add_difference"
inputs = ["mix", "C", "A"]
alpha = "BASE=0,IN=0.5,M00=1,OUT=0.25"
"""


def test_chain_equals_steps_run_one_at_a_time(sd1, tmp_path):
    a, b, c = sd1
    out = tmp_path / "chain.safetensors"
    r = run_recipe(loads(_chain(a, b, c)), out)
    assert [s.method for s in r.steps] == ["weighted_sum", "add_difference"] and r.saved == []
    mid = tmp_path / "mid.safetensors"
    merge("weighted_sum", [a, b], mid, params={"alpha": 0.3})
    two = tmp_path / "two.safetensors"
    merge("add_difference", [mid, c, a], two, params={"alpha": "BASE=0,IN=0.5,M00=1,OUT=0.25"})
    x, y = load_file(out), load_file(two)
    assert set(x) == set(y) and all(x[k].equal(y[k]) for k in x)
    # and it is really the formula: mid + (C - A) * block weight, rounded to A's fp16 at each step
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    ta, tb, tc = (load_file(p)[k].float() for p in sd1)
    m = torch.lerp(ta, tb, 0.3).half().float()
    assert x[k].equal((m + (tc - ta) * 1.0).half())


def test_saved_intermediate_and_final_from_recipe_file(sd1, tmp_path):
    a, b, c = sd1
    save = tmp_path / "mix.safetensors"
    rf = tmp_path / "chain.toml"
    rf.write_text(_chain(a, b, c, save="mix.safetensors"))  # relative to the recipe's folder
    out = tmp_path / "out.safetensors"
    r = run_recipe(load(rf), out)
    assert r.saved == [str(save)] and save.exists()
    ref = tmp_path / "ref.safetensors"
    merge("weighted_sum", [a, b], ref, params={"alpha": 0.3})
    x, y = load_file(save), load_file(ref)
    assert all(x[k].equal(y[k]) for k in y)
    # the intermediate's own metadata holds a recipe of just its step
    assert "detail" not in _meta(save)["ckptlab.recipe"]


def test_metadata_round_trip_and_rerun_gives_same_sha256(sd1, tmp_path):
    a, b, c = sd1
    out = tmp_path / "o.safetensors"
    merge("add_difference", [a, b, c], out, params={"alpha": 0.6})
    md = _meta(out)
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sd1]
    rec = json.loads(md["sd_merge_recipe"])
    assert rec["interp_method"] == "Add difference" and rec["multiplier"] == 0.6
    assert [rec["primary_model_hash"], rec["secondary_model_hash"], rec["tertiary_model_hash"]] == hashes
    models = json.loads(md["sd_merge_models"])
    assert list(models) == hashes and models[hashes[0]]["name"] == "a"
    with open(a, "rb") as fh:
        fh.seek(0x100000)
        assert models[hashes[0]]["legacy_hash"] == hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    # modelspec from A first, keys A lacks from B; other metadata not copied
    assert md["modelspec.title"] == "Model A" and md["modelspec.author"] == "bee" and "other.key" not in md
    # the embedded recipe is executable as-is and reproduces the file byte for byte
    rf = tmp_path / "again.toml"
    rf.write_text(md["ckptlab.recipe"])
    again = tmp_path / "again.safetensors"
    run_recipe(load(rf), again)
    assert _sha(again) == _sha(out)
    # and a merge of a merge nests the parent's recipe like A1111 does
    out2 = tmp_path / "o2.safetensors"
    merge("weighted_sum", [out, c], out2)
    models2 = json.loads(_meta(out2)["sd_merge_models"])
    assert models2[_sha(out)]["sd_merge_recipe"]["interp_method"] == "Add difference"
    assert hashes[1] in models2


def test_pins_refuse_a_different_file_and_relink_updates(sd1, tmp_path):
    a, b, _ = sd1
    bb = tmp_path / "b.safetensors"
    bb.write_bytes(b.read_bytes())
    rf = tmp_path / "r.toml"
    out = tmp_path / "o.safetensors"
    rf.write_text(f'version = 1\n[inputs.A]\npath = "{a}"\nsha256 = "{_sha(a)}"\n'
                  f'[inputs.B]\npath = "b.safetensors"\nsha256 = "{_sha(bb)}"\n'
                  '[[steps]]\nmethod = "weighted_sum"\ninputs = ["A", "B"]\n')
    run_recipe(load(rf), out)  # relative path resolves against the recipe's folder
    write_model(bb, "sd1_checkpoint", seed=9, overwrite=True)  # same name, different content
    out2 = tmp_path / "o2.safetensors"
    with pytest.raises(MismatchError, match="--relink"):
        run_recipe(load(rf), out2)
    assert not out2.exists()
    r = run_recipe(load(rf), out2, relink=True, recipe_path=rf)
    assert r.recipe_updated and r.inputs[1].relinked
    assert load(rf).inputs["B"].sha256 == _sha(bb)
    run_recipe(load(rf), tmp_path / "o3.safetensors")  # pinned to the new file now


def test_relink_keeps_the_recipe_file_as_written(sd1, tmp_path):
    """--relink changes only the sha256 values: comments, order and spacing stay; a missing pin is added
    after its path; the result loads as the same recipe."""
    a, b, _ = sd1
    bb = tmp_path / "b.safetensors"
    bb.write_bytes(b.read_bytes())
    rf = tmp_path / "r.toml"
    old_pin = "0" * 64
    text = (f'# my favourite mix\nversion = 1\n\n[inputs.A]   # the base\npath = "{a}"\n\n'
            f'[inputs.B]\npath = "b.safetensors"   # relative to this file\nsha256  =  "{old_pin}"  # stale\n\n'
            '[[steps]]\nmethod = "weighted_sum"  # keep it simple\ninputs = ["A", "B"]\nalpha = 0.3\n')
    rf.write_text(text)
    r = run_recipe(load(rf), tmp_path / "o.safetensors", relink=True, recipe_path=rf)
    assert r.recipe_updated
    new = rf.read_text()
    want = text.replace(old_pin, _sha(bb)).replace(
        f'path = "{a}"\n', f'path = "{a}"\nsha256 = "{_sha(a)}"\n')
    assert new == want
    rec = load(rf)
    assert rec.inputs["A"].sha256 == _sha(a) and rec.inputs["B"].sha256 == _sha(bb)


def test_relink_rewrites_layouts_it_cannot_edit(sd1, tmp_path):
    a, b, _ = sd1
    rf = tmp_path / "inline.toml"
    rf.write_text(f'version = 1\ninputs = {{ A = {{ path = "{a}" }}, B = {{ path = "{b}", sha256 = "{"1" * 64}" }} }}\n'
                  '[[steps]]\nmethod = "weighted_sum"\ninputs = ["A", "B"]\n')
    run_recipe(load(rf), tmp_path / "o.safetensors", relink=True, recipe_path=rf)
    rec = load(rf)  # rewritten whole, still valid and pinned
    assert rec.inputs["A"].sha256 == _sha(a) and rec.inputs["B"].sha256 == _sha(b)


@pytest.mark.parametrize("text,msg", [
    ('version = 1\n[[steps]]\nmethod = "weighted_sum"\ninputs = ["A", "B"]\n', "unknown input"),
    ('version = 1\n[inputs.A]\npath = "a"\n[[steps]]\nmethod = "nope"\ninputs = ["A"]\n', "unknown merge method"),
    ('version = 1\n[inputs.A]\npath = "a"\n[[steps]]\nmethod = "slerp"\ninputs = ["A", "A"]\nfoo = 1\n',
     "no parameter 'foo'"),
    ('version = 2\n', "version"),
    ('version = 1\n[inputs.A]\npath = "a"\n', "no [[steps]]"),
    ('version = 1\n[inputs.A]\npath = "a"\nsha256 = "xyz"\n', "64 hex"),
    ("this is = not toml [", "not valid TOML"),
])
def test_bad_recipes(text, msg):
    with pytest.raises(RecipeError, match=msg.replace("[", r"\[")):
        loads(text)


def test_sha256_comes_from_the_library_catalog_when_it_has_the_file(sd1, tmp_path):
    """A file the catalog already hashed (same dev/inode/size/mtime) is not read again."""
    import os

    from ckptlab.hashes import Hashes
    from ckptlab.library.catalog import Catalog, default_db_path, hash_cache
    from ckptlab.merging import provenance

    a = tmp_path / "a.safetensors"
    a.write_bytes(sd1[0].read_bytes())
    st = os.stat(a)
    fake = "ab" * 32
    with Catalog() as cat:  # CKPTLAB_DB points into this test's tmp HOME
        cat.put_hashes((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                       Hashes(fake, "0" * 10, "0" * 10, None, "0" * 8, "0" * 64, st.st_size))
    provenance._CACHE.clear()
    r = merge("weighted_sum", [a, sd1[1]], tmp_path / "o.safetensors", cache=hash_cache(default_db_path()))
    assert r.inputs[0].sha256 == fake and r.inputs[1].sha256 == _sha(sd1[1])


def test_hashes_written_at_the_end_even_when_inputs_repeat(sd1, tmp_path):
    """Hashes are computed while merging and patched into the header; a repeated input makes the final
    header shorter than the placeholder one (padded), and the file is still valid and reproducible."""
    a = sd1[0]
    out = tmp_path / "o.safetensors"
    merge("weighted_sum", [a, a], out)
    md = _meta(out)  # parsed by the safetensors library itself
    assert list(json.loads(md["sd_merge_models"])) == [_sha(a)]
    assert "placeholder" not in md["ckptlab.recipe"] and _sha(a) in md["ckptlab.recipe"]
    rf = tmp_path / "r.toml"
    rf.write_text(md["ckptlab.recipe"])  # pinned now: hashed before merging, same bytes
    again = tmp_path / "again.safetensors"
    run_recipe(load(rf), again)
    assert _sha(again) == _sha(out)
    x, y = load_file(out), load_file(a)
    assert all(x[k].equal(y[k]) for k in y)


def test_hashing_can_be_cancelled(sd1):
    import threading

    from ckptlab.merging import provenance

    provenance._CACHE.clear()
    ev = threading.Event()
    ev.set()
    with pytest.raises(provenance.HashCancelled):
        provenance.sha256_many([sd1[0], sd1[1]], ev)
    assert provenance.sha256_many([sd1[0]]) == [_sha(sd1[0])]
