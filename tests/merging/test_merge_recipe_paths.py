"""Where recipes read and write (issue 11 §3, §5; issue 12 §3).

- a recipe written by ``--save-recipe`` re-runs from any working folder (paths relative to the recipe file);
  old recipes with working-folder-relative paths still load;
- a recipe FILE's ``save`` paths are relative to its folder and stay inside it;
- a model's embedded recipe never chooses an output location, and its inputs are read only where their
  sha256 pins match (a catalogued file with that hash, or a regular file at the recorded path);
- ``--db`` / ``CKPTLAB_DB`` choose the catalog merge reads hashes from.
Everything through the real CLI (one error line, documented exit code, nothing written), plus API checks.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptlab.merging import load, merge, run_recipe
from ckptlab.merging.recipe import RecipeError
from ckptlab.sample.build import write_model


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _meta(p) -> dict:
    with safe_open(p, "pt") as f:
        return f.metadata()


def _data(p) -> tuple[dict, bytes]:
    """A safetensors file's tensor table and data bytes (the header's metadata names input paths, which
    differ once files move)."""
    raw = open(p, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n:]


def _one_error(r, code: int, words: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ") and words in lines[0], r.stderr


@pytest.fixture
def tree(tmp_path):
    """work/models/{a,b,c}.safetensors (real SD1 key names), work/recipes/, and a folder elsewhere."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "recipes").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for i, n in enumerate("abc"):
        write_model(work / "models" / f"{n}.safetensors", "sd1_checkpoint", seed=i + 1)
    return work


# -- --save-recipe: paths relative to the recipe file -------------------------------------------------
def test_saved_recipe_reruns_from_any_working_folder_and_after_moving(cli, tree, tmp_path):
    r = cli("merge", "weighted_sum", "models/a.safetensors", "models/b.safetensors", "--alpha", "0.3",
            "-o", "out.safetensors", "--save-recipe", "recipes/mix.toml", cwd=tree)
    assert r.returncode == 0, r.stderr
    text = (tree / "recipes" / "mix.toml").read_text()
    assert 'path = "../models/a.safetensors"' in text and 'path = "../models/b.safetensors"' in text, text
    first = (tree / "out.safetensors").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    r = cli("merge", "--recipe", tree / "recipes" / "mix.toml", "-o", "again.safetensors", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert (elsewhere / "again.safetensors").read_bytes() == first
    # the whole tree moved: the paths move with it
    moved = tmp_path / "moved"
    tree.rename(moved)
    r = cli("merge", "--recipe", "moved/recipes/mix.toml", "-o", elsewhere / "third.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _data(elsewhere / "third.safetensors") == _data(moved / "out.safetensors")


def test_saved_recipe_of_a_recipe_run_rewrites_paths_for_its_new_folder(tree, tmp_path):
    src = tree / "recipes" / "chain.toml"
    src.write_text('version = 1\n[inputs.A]\npath = "../models/a.safetensors"\n[inputs.B]\n'
                   'path = "../models/b.safetensors"\n[[steps]]\nmethod = "weighted_sum"\ninputs = ["A", "B"]\n')
    copy = tmp_path / "elsewhere" / "deeper" / "copy.toml"
    copy.parent.mkdir()
    run_recipe(load(src), tmp_path / "o1.safetensors", save_recipe=copy)
    assert 'path = "../../work/models/a.safetensors"' in copy.read_text()
    run_recipe(load(copy), tmp_path / "o2.safetensors")
    assert _sha(tmp_path / "o1.safetensors") == _sha(tmp_path / "o2.safetensors")


def test_old_recipe_with_working_folder_relative_paths_still_loads(cli, tree, tmp_path):
    """Recipes written before this change stored paths as typed (relative to the working folder)."""
    a, b = tree / "models" / "a.safetensors", tree / "models" / "b.safetensors"
    old = tree / "recipes" / "old.toml"
    old.write_text(f'version = 1\n[inputs.A]\npath = "models/a.safetensors"\nsha256 = "{_sha(a)}"\n'
                   f'[inputs.B]\npath = "models/b.safetensors"\nsha256 = "{_sha(b)}"\n'
                   '[[steps]]\nname = "merge"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = 0.3\n')
    r = cli("merge", "--recipe", "recipes/old.toml", "-o", "old-out.safetensors", cwd=tree)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.safetensors"
    merge("weighted_sum", [a, b], ref, params={"alpha": 0.3})
    assert load_file(tree / "old-out.safetensors").keys() == load_file(ref).keys()
    assert all(load_file(tree / "old-out.safetensors")[k].equal(t) for k, t in load_file(ref).items())
    # from another folder those names point nowhere: one line, nothing written
    r = cli("merge", "--recipe", old, "-o", "x.safetensors", cwd=tmp_path / "elsewhere")
    assert r.returncode != 0 and r.returncode != 70 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []


# -- a recipe file's own save paths -----------------------------------------------------------------
def _chain(save_mix: str | None = None, save_final: str | None = None) -> str:
    return ('version = 1\n[inputs.A]\npath = "../models/a.safetensors"\n[inputs.B]\npath = "../models/b.safetensors"\n'
            '[inputs.C]\npath = "../models/c.safetensors"\n'
            '[[steps]]\nname = "mix"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = 0.3\n'
            + (f'save = "{save_mix}"\n' if save_mix else "")
            + '[[steps]]\nname = "detail"\nmethod = "add_difference"\ninputs = ["mix", "C", "A"]\nalpha = 0.5\n'
            + (f'save = "{save_final}"\n' if save_final else ""))


def test_recipe_file_saves_resolve_inside_its_folder(cli, tree, tmp_path):
    rf = tree / "recipes" / "chain.toml"
    rf.write_text(_chain(save_mix="mid.safetensors", save_final="final.safetensors"))
    elsewhere = tmp_path / "elsewhere"
    r = cli("merge", "--recipe", rf, cwd=elsewhere)  # no -o: the last step's own save
    assert r.returncode == 0, r.stderr
    assert (tree / "recipes" / "mid.safetensors").is_file() and (tree / "recipes" / "final.safetensors").is_file()
    assert list(elsewhere.iterdir()) == []
    ref = tmp_path / "ref.safetensors"
    merge("weighted_sum", [tree / "models" / "a.safetensors", tree / "models" / "b.safetensors"], ref,
          params={"alpha": 0.3})
    x, y = load_file(tree / "recipes" / "mid.safetensors"), load_file(ref)
    assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in y)


@pytest.mark.parametrize("save", ["../escape.safetensors", "sub/../../escape.safetensors", "ABS", "~/x.safetensors"])
def test_recipe_file_save_outside_its_folder_is_refused(cli, tree, tmp_path, save):
    target = tmp_path / "escape.safetensors"
    save = str(target) if save == "ABS" else save
    rf = tree / "recipes" / "chain.toml"
    for text in (_chain(save_mix=save), _chain(save_final=save)):
        rf.write_text(text)
        r = cli("merge", "--recipe", rf, "-o", tmp_path / "elsewhere" / "o.safetensors", cwd=tree)
        _one_error(r, 2, "save = ")
        assert not target.exists() and list((tmp_path / "elsewhere").iterdir()) == []
        assert sorted(p.name for p in (tree / "recipes").iterdir()) == ["chain.toml"]
    with pytest.raises(RecipeError, match="recipe's folder"):
        run_recipe(load(rf), tmp_path / "elsewhere" / "o.safetensors")


def test_a_symlink_out_of_the_recipe_folder_is_refused(cli, tree, tmp_path):
    (tree / "recipes" / "link").symlink_to(tmp_path / "elsewhere")
    rf = tree / "recipes" / "chain.toml"
    rf.write_text(_chain(save_mix="link/mid.safetensors"))
    r = cli("merge", "--recipe", rf, "-o", tree / "o.safetensors")
    _one_error(r, 2, "leaves the recipe's folder")
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tree / "o.safetensors").exists()


# -- a model's embedded recipe -------------------------------------------------------------------------
@pytest.fixture
def merged(tree, tmp_path):
    """A model merged from a and b (its header carries the pinned recipe with absolute input paths)."""
    out = tmp_path / "merged.safetensors"
    merge("weighted_sum", [tree / "models" / "a.safetensors", tree / "models" / "b.safetensors"], out,
          params={"alpha": 0.4})
    return out


def _hostile(merged, path, edit) -> object:
    """A copy of ``merged`` whose embedded recipe text went through ``edit`` (as a hostile upload would)."""
    md = _meta(merged)
    md["ckptlab.recipe"] = edit(md["ckptlab.recipe"])
    save_file(load_file(merged), path, metadata=md)
    return path


def _add_save(text: str, save: str, step: int = -1) -> str:
    parts = text.split("[[steps]]\n")
    idx = step if step >= 0 else len(parts) + step
    parts[idx] = parts[idx].replace("method = ", f"save = {json.dumps(save)}\nmethod = ", 1)
    return "[[steps]]\n".join(parts)


def test_embedded_recipe_never_chooses_the_output(cli, merged, tmp_path):
    """Issue 12 §3: `save = "/any/dir"` was honoured, and --overwrite then replaced an unrelated file."""
    victim = tmp_path / "victim" / "precious.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(b"the user's own file")
    hostile = _hostile(merged, tmp_path / "downloaded.safetensors", lambda t: _add_save(t, str(victim)))
    r = cli("merge", "--recipe", hostile, "--overwrite", cwd=tmp_path / "elsewhere")
    _one_error(r, 2, "a model's embedded recipe never chooses where ckptlab writes")
    assert victim.read_bytes() == b"the user's own file"
    assert list((tmp_path / "elsewhere").iterdir()) == []
    mine = tmp_path / "elsewhere" / "mine.safetensors"
    r = cli("merge", "--recipe", hostile, "-o", mine, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"the user's own file"
    said = r.stdout.replace("\n", "")
    assert "ignored" in said and str(victim) in said
    assert mine.read_bytes() == merged.read_bytes()  # the same merge, written where the user said


def test_embedded_recipe_intermediate_saves_are_ignored(merged, tree, tmp_path):
    """A chain whose first step `save`s over a user file: the step is computed, nothing written there."""
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep")
    chain = tree / "recipes" / "two.toml"
    chain.write_text(_chain())
    two = tmp_path / "two.safetensors"
    run_recipe(load(chain), two)
    hostile = _hostile(two, tmp_path / "h.safetensors", lambda t: _add_save(t, str(victim), step=1))
    r = run_recipe(load(hostile), tmp_path / "again.safetensors", overwrite=True)
    assert victim.read_bytes() == b"keep" and r.saved == []
    assert any("ignored" in w for w in r.warnings)
    assert _sha(tmp_path / "again.safetensors") == _sha(two)


def _repath(text: str, old, new: str) -> str:
    assert json.dumps(str(old)) in text
    return text.replace(json.dumps(str(old)), json.dumps(new))


@pytest.mark.parametrize("where", ["/dev/zero", "FIFO", "/proc/self/environ"])
def test_embedded_recipe_inputs_must_be_regular_files(cli, merged, tree, tmp_path, where):
    """Reading /dev/zero or a FIFO would never end; /proc is not a model either. Refused before reading."""
    if where == "FIFO":
        where = str(tmp_path / "pipe")
        os.mkfifo(where)
    a = (tree / "models" / "a.safetensors").resolve()
    hostile = _hostile(merged, tmp_path / "h.safetensors", lambda t: _repath(t, a, where))
    out = tmp_path / "elsewhere" / "o.safetensors"
    r = cli("merge", "--recipe", hostile, "-o", out, timeout=120)
    _one_error(r, 1, "is not a regular model file: refused")
    assert not out.exists()


def test_embedded_recipe_inputs_need_pins(cli, merged, tree, tmp_path):
    def unpin(text: str) -> str:
        return "\n".join(line for line in text.split("\n") if not line.startswith("sha256 ="))

    hostile = _hostile(merged, tmp_path / "h.safetensors", unpin)
    out = tmp_path / "elsewhere" / "o.safetensors"
    r = cli("merge", "--recipe", hostile, "-o", out)
    _one_error(r, 1, "has no sha256 pin")
    assert not out.exists()


def test_embedded_recipe_input_is_verified_before_it_is_parsed(cli, merged, tree, tmp_path):
    """A file at the recorded path that is not the pinned one is refused by its hash, never opened as a model
    (here a pickle: parsing it would give the unsafe-file exit 4; the pin check answers first)."""
    bait = tmp_path / "bait.ckpt"
    bait.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    a = (tree / "models" / "a.safetensors").resolve()
    hostile = _hostile(merged, tmp_path / "h.safetensors", lambda t: _repath(t, a, str(bait)))
    out = tmp_path / "elsewhere" / "o.safetensors"
    r = cli("merge", "--recipe", hostile, "-o", out)
    _one_error(r, 1, "the recipe pins")
    assert not out.exists()


def test_embedded_recipe_inputs_found_in_the_chosen_catalog(cli, merged, tree, tmp_path):
    """The recorded paths are the author's: the inputs are found by their pinned sha256 in the user's
    catalog (--db or CKPTLAB_DB), or the merge is refused with a hint. Never the default catalog when --db
    names another."""
    lib = tmp_path / "library"
    (tree / "models").rename(lib)  # the recorded paths no longer exist
    db = tmp_path / "mine.db"
    for args in (("scan", "--db", db, lib), ("hash", "--db", db, lib / "a.safetensors", lib / "b.safetensors")):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
    out = tmp_path / "elsewhere" / "o.safetensors"
    r = cli("merge", "--recipe", merged, "-o", out)  # CKPTLAB_DB: the test's empty default catalog
    _one_error(r, 1, "no catalogued file has its sha256")
    assert not out.exists()
    r = cli("merge", "--recipe", merged, "-o", out, "--db", db)
    assert r.returncode == 0, r.stderr
    assert _data(out) == _data(merged) and str(lib / "a.safetensors") in r.stdout.replace("\n", "")
    out2 = tmp_path / "elsewhere" / "o2.safetensors"
    r = cli("merge", "--recipe", merged, "-o", out2, env={"CKPTLAB_DB": str(db)})
    assert r.returncode == 0, r.stderr
    assert _data(out2) == _data(merged)


# -- --db -------------------------------------------------------------------------------------------------
def _plant(db, path, fake: str) -> None:
    """Record ``fake`` as ``path``'s sha256 in catalog ``db`` (as `ckptlab hash` records real ones)."""
    from ckptlab.hashes import Hashes
    from ckptlab.library.catalog import Catalog

    st = os.stat(path)
    with Catalog(db) as cat:
        cat.put_hashes((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                       Hashes(fake, "0" * 10, "0" * 10, None, "0" * 8, "0" * 64, st.st_size))


def test_db_option_chooses_the_catalog_merge_reads(cli, tree, tmp_path):
    """merge read the default catalog silently (issue 11 §5). A hash planted in one catalog shows which one
    was read; the real sha256 (hashlib) shows none was."""
    a, b = tree / "models" / "a.safetensors", tree / "models" / "b.safetensors"
    chosen, default = tmp_path / "chosen.db", tmp_path / "default.db"
    _plant(chosen, a, "ab" * 32)
    _plant(default, a, "cd" * 32)
    env = {"CKPTLAB_DB": str(default)}

    def sha_a(*extra) -> str:
        out = tmp_path / "elsewhere" / "o.safetensors"
        r = cli("merge", "weighted_sum", a, b, "-o", out, "--overwrite", "--json", *extra, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["inputs"][0]["sha256"]

    assert sha_a("--db", chosen) == "ab" * 32
    assert sha_a() == "cd" * 32  # CKPTLAB_DB
    missing = tmp_path / "none.db"
    assert sha_a("--db", missing) == _sha(a) and not missing.exists()  # a cache: never created


def test_db_argument_at_api_level(tree, tmp_path):
    from ckptlab.library.catalog import hash_cache
    from ckptlab.merging import provenance

    a, b = tree / "models" / "a.safetensors", tree / "models" / "b.safetensors"
    db = tmp_path / "x.db"
    _plant(db, a, "ef" * 32)
    provenance._CACHE.clear()
    r = merge("weighted_sum", [a, b], tmp_path / "o.safetensors", cache=hash_cache(db))
    assert r.inputs[0].sha256 == "ef" * 32 and r.inputs[1].sha256 == _sha(b)
    r = merge("weighted_sum", [a, b], tmp_path / "o2.safetensors")  # CKPTLAB_DB: the test's empty catalog
    assert r.inputs[0].sha256 == _sha(a)


def test_embedded_recipe_rules_at_api_level(merged, tree, tmp_path):
    """The same rules for ``run_recipe(load(MODEL))``: no output without ``output``, special files refused."""
    from ckptlab.errors import MismatchError

    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep")
    hostile = _hostile(merged, tmp_path / "h.safetensors", lambda t: _add_save(t, str(victim)))
    with pytest.raises(RecipeError, match="never chooses where ckptlab writes"):
        run_recipe(load(hostile), overwrite=True)
    assert victim.read_bytes() == b"keep"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    a = (tree / "models" / "a.safetensors").resolve()
    hostile2 = _hostile(merged, tmp_path / "h2.safetensors", lambda t: _repath(t, a, str(fifo)))
    with pytest.raises(MismatchError, match="not a regular model file"):
        run_recipe(load(hostile2), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_saved_recipe_keeps_saves_inside_its_folder_only(tree, tmp_path):
    """--save-recipe of a chain with a saved intermediate: written relative to the new file when it lies in
    its folder; otherwise left as a comment, so the new recipe never writes outside its own folder."""
    rf = tree / "recipes" / "chain.toml"
    (tree / "recipes" / "mid").mkdir()
    rf.write_text(_chain(save_mix="mid/m.safetensors"))
    inside = tree / "recipes" / "mid" / "again.toml"
    run_recipe(load(rf), tmp_path / "o1.safetensors", save_recipe=inside)
    assert 'save = "m.safetensors"' in inside.read_text()
    assert load(inside).save_path(load(inside).steps[0]) == (tree / "recipes" / "mid" / "m.safetensors").resolve()
    outside = tmp_path / "elsewhere" / "copy.toml"
    run_recipe(load(rf), tmp_path / "o2.safetensors", save_recipe=outside, overwrite=True)
    text = outside.read_text()
    assert "\nsave =" not in text and "is outside this file's folder" in text
    assert load(outside).steps[0].save is None
