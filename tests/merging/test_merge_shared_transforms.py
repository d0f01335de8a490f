"""``merge --vae/--prune`` are the transforms' own code (issue 13 §2), and each recipe step is parsed once.

- ``merge A B --vae V --prune`` equals ``merge A B``, then ``replace --vae V``, then ``prune``, tensor by tensor
  (same keys, dtypes and bytes): the VAE key table (``ops.components.vae_bake_map``) and the pruned keys
  (``ops.prune.pruned_keys``) are one piece of code. The VAE tensors are also compared with the VAE file's
  own (read with the safetensors library), and the dropped keys with a hand-written rule.
- ``--alpha`` text from the command line and the same weights in a TOML recipe resolve to the same numbers
  (hand-written expected values for SD1's 26 blocks).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ckptlab.sample.build import write_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    return {
        "a": write_model(d / "a.safetensors", "sd1_checkpoint", dtype="F32", seed=1, ema=True),
        "b": write_model(d / "b.safetensors", "sd1_checkpoint", dtype="F32", seed=2, ema=True),
        "vae": write_model(d / "vae.safetensors", "sd1_vae", dtype="F32", seed=5),
    }


def _same_tensors(x: dict, y: dict) -> None:
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert torch.equal(x[k], y[k]), k


def test_merge_vae_prune_equals_merge_then_replace_then_prune(files, tmp_path):
    from ckptlab.merging import merge
    from ckptlab.ops.components import replace
    from ckptlab.ops.prune import prune

    one = tmp_path / "one.safetensors"
    r = merge("weighted_sum", [files["a"], files["b"]], one, params={"alpha": 0.3}, vae=files["vae"], prune=True)
    plain = tmp_path / "plain.safetensors"
    merge("weighted_sum", [files["a"], files["b"]], plain, params={"alpha": 0.3})
    [baked] = replace([plain], vae=files["vae"], out=tmp_path / "baked.safetensors")
    [pruned] = prune([baked.output], outputs=[tmp_path / "pruned.safetensors"])
    got, want = load_file(one), load_file(pruned.output)
    _same_tensors(got, want)
    vae = load_file(files["vae"])
    for k, t in vae.items():  # the VAE file's own tensors, under the checkpoint's names
        assert torch.equal(got["first_stage_model." + k], t)
    merged = load_file(plain)
    dropped = {k for k in merged if k.startswith("model_ema.")}  # EMA weights and their bookkeeping
    assert dropped and "model_ema.decay" in dropped
    assert set(got) == set(merged) - dropped and r.pruned == len(dropped) == pruned.dropped["ema"]


def test_merge_vae_prune_cli_equals_the_transform_commands(files, tmp_path, cli):
    one, plain = tmp_path / "one.safetensors", tmp_path / "plain.safetensors"
    for args in (("merge", "weighted_sum", files["a"], files["b"], "-a", "0.5", "--vae", files["vae"], "--prune",
                  "-o", one),
                 ("merge", "weighted_sum", files["a"], files["b"], "-a", "0.5", "-o", plain),
                 ("replace", plain, "--vae", files["vae"], "-o", tmp_path / "baked.safetensors"),
                 ("prune", tmp_path / "baked.safetensors", "--out-dir", tmp_path / "p")):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
    _same_tensors(load_file(one), load_file(tmp_path / "p" / "baked-pruned.safetensors"))


# -- one parser for --alpha ---------------------------------------------------------------------------
SD1 = ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]


def _resolved_alpha(recipe):
    from ckptlab.merging.recipe import resolve_steps

    [step] = resolve_steps(recipe, {n: "sd1" for n in recipe.inputs})
    a = step.params["alpha"]
    return a if isinstance(a, float) else a.as_dict()


def _cli_form(text: str):
    from ckptlab.merging import one_step_recipe

    return _resolved_alpha(one_step_recipe("weighted_sum", ["a.safetensors", "b.safetensors"],
                                           params={"alpha": text}))


def _toml_form(value: str):
    from ckptlab.merging.recipe import loads

    return _resolved_alpha(loads('[inputs]\nA = "a.safetensors"\nB = "b.safetensors"\n'
                                 f'[[steps]]\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = {value}\n'))


@pytest.mark.parametrize(("cli_text", "toml_values", "expected"), [
    ("0.3", ["0.3", '"0.3"'], 0.3),
    ("IN=0.2,M00=0.5,OUT=0.8", ['"IN=0.2,M00=0.5,OUT=0.8"', "{IN = 0.2, M00 = 0.5, OUT = 0.8}"],
     {"BASE": 0.0, **{f"IN{i:02}": 0.2 for i in range(12)}, "M00": 0.5, **{f"OUT{i:02}": 0.8 for i in range(12)}}),
    ("0.1,IN00=1", ['"0.1,IN00=1"'], {**{b: 0.1 for b in SD1}, "IN00": 1.0}),
    (",".join(str(i / 100) for i in range(26)), ["[" + ", ".join(str(i / 100) for i in range(26)) + "]"],
     {b: i / 100 for i, b in enumerate(SD1)}),
    ("GRAD_V:0.25", ['"GRAD_V:0.25"'],  # 1 - (0 rising by 1/12 to 1 at M00, then back down)
     {"BASE": 0.25, **{f"IN{i:02}": 1 - i / 12 for i in range(12)}, "M00": 0.0,
      **{f"OUT{i:02}": 1 - (11 - i) / 12 for i in range(12)}}),
])
def test_one_alpha_parser_for_cli_and_recipe(cli_text, toml_values, expected):
    got = _cli_form(cli_text)
    if isinstance(expected, float):
        assert got == expected
    else:
        assert list(got) == SD1 and got == pytest.approx(expected)
    for v in toml_values:
        assert _toml_form(v) == got
