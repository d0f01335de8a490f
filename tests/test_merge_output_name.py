"""`merge` output names (reviewer defects): a merge writes safetensors, so an output named ``.ckpt``/``.bin``/
``.pth`` or with no suffix is refused before any work, like every other transform (``ops.stream.check_suffix``);
``--save-recipe`` never overwrites an existing file without ``--overwrite``; the input hashes a person reads
are upper case. Through the real CLI, test models with real key names (``ckptlab.sample``)."""

from __future__ import annotations

import pytest

from ckptlab.sample.build import write_model


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    return {k: write_model(d / f"{k}.safetensors", "sd1_checkpoint", dtype="F32", seed=i + 1)
            for i, k in enumerate("ab")}


def _one_line_refusal(r, words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: "), r.stderr
    assert words in lines[0], lines[0]


@pytest.mark.parametrize("name, hint", [("m/x.ckpt", "x.safetensors"), ("x.bin", "x.safetensors"),
                                        ("x", "x.safetensors"), ("x.pth", "x.safetensors")])
def test_cli_merge_refuses_a_non_safetensors_output_name(cli, m, tmp_path, name, hint):
    (tmp_path / "m").mkdir()
    r = cli("merge", "weighted_sum", m["a"], m["b"], "-o", tmp_path / name)
    _one_line_refusal(r, f"name it .safetensors (e.g. {hint})")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m"]


def test_cli_merge_recipe_from_a_model_refuses_a_pickle_output_name(cli, m, tmp_path):
    first = tmp_path / "first.safetensors"
    assert cli("merge", "weighted_sum", m["a"], m["b"], "-o", first).returncode == 0
    r = cli("merge", "--recipe", first, "-o", tmp_path / "x.pth")
    _one_line_refusal(r, "e.g. x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors"]


def test_cli_merge_recipe_file_save_must_be_safetensors(cli, m, tmp_path):
    rec = tmp_path / "r.toml"
    rec.write_text(f'version = 1\n[inputs.A]\npath = "{m["a"]}"\n[inputs.B]\npath = "{m["b"]}"\n'
                   '[[steps]]\nname = "s1"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = 0.5\n'
                   'save = "ok.ckpt"\n'
                   '[[steps]]\nname = "s2"\nmethod = "weighted_sum"\ninputs = ["s1", "B"]\nalpha = 0.5\n',
                   encoding="utf-8")
    r = cli("merge", "--recipe", rec, "-o", tmp_path / "out.safetensors")
    _one_line_refusal(r, "e.g. ok.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]
    # the same file as the final step's save (no -o)
    rec.write_text(rec.read_text(encoding="utf-8").replace('save = "ok.ckpt"\n', "") + 'save = "fin.ckpt"\n',
                   encoding="utf-8")
    r = cli("merge", "--recipe", rec)
    _one_line_refusal(r, "e.g. fin.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]
