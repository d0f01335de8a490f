"""`ckptlab merge` through the real CLI: output, --json, recipes, exit codes and one-line errors."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from ckptlab.sample.build import write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return (write_model(d / "a.safetensors", "sd1_checkpoint", seed=1),
            write_model(d / "b.safetensors", "sd1_checkpoint", seed=2),
            write_model(d / "xl.safetensors", "sdxl_checkpoint", seed=3))


def test_merge_json_and_recipe_rerun(cli, models, tmp_path):
    a, b, _ = models
    out = tmp_path / "o.safetensors"
    rf = tmp_path / "r.toml"
    r = cli("merge", "weighted_sum", a, b, "--alpha", "0.25", "-o", out, "--json", "--save-recipe", rf)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["output"] == str(out) and res["method"] == "weighted_sum" and res["family"] == "sd1"
    assert res["steps"][0]["merged"] > 1000 and len(res["inputs"]) == 2
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    ta, tb = load_file(a)[k].float(), load_file(b)[k].float()
    assert load_file(out)[k].equal((ta * 0.75 + tb * 0.25).half())
    out2 = tmp_path / "o2.safetensors"
    r2 = cli("merge", "--recipe", rf, "-o", out2)
    assert r2.returncode == 0, r2.stderr
    assert "wrote" in r2.stdout and out2.read_bytes() == out.read_bytes()


def test_recipe_read_from_a_merged_model(cli, models, tmp_path):
    """`--recipe MERGED.safetensors` re-makes the merge from the header's embedded recipe, byte for byte."""
    a, b, _ = models
    chained = tmp_path / "chain.toml"
    chained.write_text(f'version = 1\n[inputs.A]\npath = "{a}"\n[inputs.B]\npath = "{b}"\n'
                       '[[steps]]\nname = "one"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = "GRAD_V"\n'
                       '[[steps]]\nname = "two"\nmethod = "add_difference"\ninputs = ["one", "A", "B"]\nalpha = 0.3\n')
    out = tmp_path / "o.safetensors"
    assert cli("merge", "--recipe", chained, "-o", out).returncode == 0
    again = tmp_path / "again.safetensors"
    r = cli("merge", "--recipe", out, "-o", again)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()
    # a model without a recipe, and a pickle: one line, exit 2, nothing written
    for src, words in ((a, "carries no ckptlab recipe"), (tmp_path / "x.ckpt", "only .safetensors")):
        if src.suffix == ".ckpt":
            import torch
            torch.save({"state_dict": {"w": torch.zeros(2)}}, src)
        bad = tmp_path / "bad.safetensors"
        r = cli("merge", "--recipe", src, "-o", bad)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_refusal_is_one_line_and_nonzero(cli, models, tmp_path):
    a, _, xl = models
    out = tmp_path / "o.safetensors"
    r = cli("merge", "weighted_sum", a, xl, "-o", out)
    assert r.returncode == 1
    assert r.stderr.startswith("ckptlab: error: cannot merge different model families") and "sdxl" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = cli("merge", "weighted_sum", a, a, "--alpha", "1,2,3", "-o", out)
    assert r.returncode == 2 and "26" in r.stderr and "Traceback" not in r.stderr
    r = cli("merge", "weighted_sum", a, tmp_path / "missing.safetensors", "-o", out)
    assert r.returncode != 0 and r.stderr.startswith("ckptlab: error:")
    r = cli("merge", "weighted_sum", a)
    assert r.returncode != 0 and "Traceback" not in r.stderr


def test_list_methods(cli):
    r = cli("merge", "--list-methods", "--json")
    assert r.returncode == 0
    names = {json.loads(line)["name"] for line in r.stdout.splitlines()}
    assert {"weighted_sum", "add_difference", "slerp", "triple_sum", "sum_twice", "train_difference", "ties",
            "dare", "add_cosine", "subtract", "extract"} <= names


@pytest.mark.parametrize("where", ["under-a-file", "missing-folder", "a-folder"])
def test_unwritable_save_recipe_is_refused_before_the_merge(cli, models, tmp_path, where):
    a, b, _ = models
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    target = {"under-a-file": tmp_path / "afile" / "r.toml", "missing-folder": tmp_path / "nope" / "r.toml",
              "a-folder": tmp_path / "adir"}[where]
    out = tmp_path / "o.safetensors"
    r = cli("merge", "weighted_sum", a, b, "-a", "0.5", "-o", out, "--save-recipe", target)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("ckptlab: error:") and "--save-recipe" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


def test_out_of_range_density_is_a_usage_error(cli, models, tmp_path):
    a, b, _ = models
    out = tmp_path / "o.safetensors"
    r = cli("merge", "ties", a, b, b, "--density", "7", "-o", out)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "ckptlab: error: --density 7 is outside (0, 1] (fraction of each task vector kept " \
                               "(top magnitudes))"
    assert list(tmp_path.iterdir()) == []
