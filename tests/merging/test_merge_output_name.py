"""`merge` output names (reviewer defects): a merge writes safetensors, so an output named ``.ckpt``/``.bin``/
``.pth`` or with no suffix is refused before any work, like every other transform (``ops.stream.check_suffix``);
``--save-recipe`` never overwrites an existing file without ``--overwrite``; the input hashes a person reads
are upper case. Through the real CLI, test models with real key names (``ckptlab.sample``)."""

from __future__ import annotations

import hashlib
import stat

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


def test_save_recipe_never_overwrites_an_existing_file_without_overwrite(cli, m, tmp_path):
    """`--save-recipe m/rec/mix.toml` silently replaced an existing recipe."""
    (tmp_path / "rec").mkdir()
    rf = tmp_path / "rec" / "mix.toml"
    rf.write_text("# my hand-written recipe\n", encoding="utf-8")
    out = tmp_path / "o.safetensors"
    r = cli("merge", "weighted_sum", m["a"], m["b"], "-o", out, "--save-recipe", rf)
    _one_line_refusal(r, "--save-recipe: the file already exists (use --overwrite to replace it)")
    assert rf.read_text(encoding="utf-8") == "# my hand-written recipe\n"
    assert not out.exists()  # checked before the merge ran
    r = cli("merge", "weighted_sum", m["a"], m["b"], "-o", out, "--save-recipe", rf, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "[[steps]]" in rf.read_text(encoding="utf-8")
    assert [p.name for p in (tmp_path / "rec").iterdir()] == ["mix.toml"]  # no temporary file left


def test_save_recipe_gets_the_permissions_of_any_new_file(cli, m, tmp_path):
    """Written atomically, but not with mkstemp's 0600: mode 0666 less the umask, as `touch` would make it."""
    (tmp_path / "touched").touch()
    expected = stat.S_IMODE((tmp_path / "touched").stat().st_mode)
    rf = tmp_path / "new.toml"
    r = cli("merge", "weighted_sum", m["a"], m["b"], "-o", tmp_path / "o.safetensors", "--save-recipe", rf)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(rf.stat().st_mode) == expected


def test_merge_prints_input_hashes_upper_case(cli, m, tmp_path):
    """A person reads these: upper case like `hash` prints them (it printed "sha256 31c038c9487e")."""
    r = cli("merge", "weighted_sum", m["a"], m["b"], "-o", tmp_path / "o.safetensors")
    assert r.returncode == 0, r.stderr
    for k in "ab":
        want = hashlib.sha256(m[k].read_bytes()).hexdigest()[:12].upper()
        assert f"sha256 {want}" in r.stdout, r.stdout
