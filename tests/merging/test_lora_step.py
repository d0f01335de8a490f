"""The ``lora`` recipe step: "bake a LoRA into A, then weighted_sum with B" in one recipe equals ``lora bake``
then ``merge`` run one after the other (every tensor equal); pins, the embedded recipe's re-run, refusals."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from fakes.sample_files import make_model
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.merging import load, loads, run_recipe
from ckptlab.merging.recipe import RecipeError, dumps


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_step")
    return {"A": make_model(d / "a.safetensors", "sd1_checkpoint", seed=1,
                            metadata={"modelspec.title": "Model A"}),
            "B": make_model(d / "b.safetensors", "sd1_checkpoint", seed=2),
            "L": make_model(d / "style.safetensors", "sd1_kohya_lora"),
            "P": make_model(d / "peft.safetensors", "sd1_peft_lora"),
            "X": make_model(d / "xl.safetensors", "sdxl_kohya_lora")}


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _recipe(f, steps_extra: str = "", lora_line: str = 'strengths = [0.7, -0.4]\nte_strengths = [0.3]') -> str:
    return f"""
version = 1
[inputs.A]
path = "{f['A']}"
[inputs.B]
path = "{f['B']}"
[inputs.L]
path = "{f['L']}"
[inputs.P]
path = "{f['P']}"

[[steps]]
name = "baked"
method = "lora"
inputs = ["A", "L", "P"]
{lora_line}

[[steps]]
name = "mix"
method = "weighted_sum"
inputs = ["baked", "B"]
alpha = 0.4
{steps_extra}
"""


def test_recipe_equals_bake_then_merge(files, tmp_path, cli):
    rf = tmp_path / "r.toml"
    rf.write_text(_recipe(files))
    out = tmp_path / "recipe.safetensors"
    r = cli("merge", "--recipe", rf, "-o", out)
    assert r.returncode == 0, r.stderr
    baked = tmp_path / "baked.safetensors"
    r = cli("lora", "bake", files["A"], files["L"], files["P"], "-s", "0.7", "-s", "-0.4", "--te-strength", "0.3",
            "-o", baked)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two.safetensors"
    r = cli("merge", "weighted_sum", baked, files["B"], "--alpha", "0.4", "-o", two)
    assert r.returncode == 0, r.stderr
    a, b, c = load_file(out), load_file(two), load_file(files["A"])
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the LoRA did change the merge (not a vacuous equality): the baked A differs from A
    ba = load_file(baked)
    assert sum(not torch.equal(ba[k], c[k]) for k in c) == 264


def test_pins_embedded_recipe_rerun_and_round_trip(files, tmp_path):
    rec = loads(_recipe(files))
    assert loads(dumps(rec)).steps[0].params == {"strengths": [0.7, -0.4], "te_strengths": [0.3]}
    assert dumps(loads(dumps(rec))) == dumps(rec)
    out = tmp_path / "o.safetensors"
    res = run_recipe(rec, out)
    assert [s.method for s in res.steps] == ["lora", "weighted_sum"] and res.steps[0].merged == 264
    with safe_open(out, "pt") as f:
        md = f.metadata()
    inputs = {i["name"]: i["sha256"] for i in json.loads(md["ckptlab.inputs"])}
    assert inputs["style.safetensors"] == _sha(files["L"]) and inputs["peft.safetensors"] == _sha(files["P"])
    assert md["modelspec.title"] == "Model A"  # the LoRA's modelspec is not the model's
    emb = loads(md["ckptlab.recipe"])
    assert emb.inputs["L"].sha256 == _sha(files["L"]) and emb.steps[0].method == "lora"
    rf = tmp_path / "again.toml"
    rf.write_text(md["ckptlab.recipe"])
    again = tmp_path / "again.safetensors"
    run_recipe(load(rf), again)
    assert _sha(again) == _sha(out)


def test_lora_step_refusals(files, tmp_path, cli):
    with pytest.raises(RecipeError, match="3 values for 2 LoRAs"):
        loads(_recipe(files, lora_line="strengths = [1, 2, 3]"))
    with pytest.raises(RecipeError, match="takes only strengths, te_strengths"):
        loads(_recipe(files, lora_line="alpha = 0.5"))
    with pytest.raises(RecipeError, match="must be a recipe input"):
        loads(_recipe(files, steps_extra='[[steps]]\nname = "again"\nmethod = "lora"\ninputs = ["A", "mix"]\n'))
    with pytest.raises(RecipeError, match="is not a number"):
        loads(_recipe(files, lora_line='strengths = ["x"]'))
    rf = tmp_path / "bad.toml"
    rf.write_text(_recipe(files, lora_line="strengths = [1, 2, 3]"))
    r = cli("merge", "--recipe", rf, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.startswith("ckptlab: error:")
    # a LoRA of another family is refused as the command refuses it; nothing written
    xl = _recipe(files).replace(str(files["P"]), str(files["X"]))
    rf.write_text(xl)
    r = cli("merge", "--recipe", rf, "-o", tmp_path / "x.safetensors")
    assert r.returncode not in (0, 70) and "SDXL" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
    # a LoRA is still no merge input, and "lora" is no merge method
    r = cli("merge", "weighted_sum", files["A"], files["L"], "-o", tmp_path / "y.safetensors")
    assert r.returncode != 0 and "not a full model" in r.stderr
    r = cli("merge", "lora", files["A"], files["L"], "-o", tmp_path / "y.safetensors")
    assert r.returncode != 0 and "unknown merge method" in r.stderr


def test_lora_as_last_step_with_dtype(files, tmp_path):
    """A recipe that only bakes, with options.dtype: merge's rule (every float tensor cast), the baked values
    those of `lora bake` at full precision, cast."""
    from ckptlab.lora.bake import bake

    text = f"""
version = 1
[inputs.A]
path = "{files['A']}"
[inputs.L]
path = "{files['L']}"
[[steps]]
name = "baked"
method = "lora"
inputs = ["A", "L"]
strengths = 0.5
[options]
dtype = "fp16"
"""
    out = tmp_path / "o.safetensors"
    run_recipe(loads(text), out)
    ref = tmp_path / "ref.safetensors"
    bake(files["A"], [files["L"]], ref, strengths=[0.5])
    a, b = load_file(out), load_file(ref)
    assert list(a) == list(b)
    for k in a:
        want = b[k].to(torch.float16) if b[k].is_floating_point() else b[k]
        assert a[k].dtype == want.dtype and torch.equal(a[k], want), k


def test_recipe_bytes_do_not_depend_on_threads(files, tmp_path, cli):
    """A review found the lora step's bytes changed with --threads (a BLAS kernel rounding with its intra-op
    thread count): one thread, two threads and the bake command must agree."""
    rf = tmp_path / "r.toml"
    rf.write_text(_recipe(files))
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.safetensors"
        r = cli("merge", "--recipe", rf, "-o", out, "--threads", threads)
        assert r.returncode == 0, r.stderr
        outs.append(load_file(out))
    assert list(outs[0]) == list(outs[1])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
