"""prune: EMA keep/drop/use, training state, position_ids repair, provenance, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from fakes.sample_files import load, make_model, sha256
from safetensors import safe_open

from ckptlab.arch.components import ema_key
from ckptlab.errors import CkptlabError, MismatchError, UnsafeFileError
from ckptlab.ops.prune import prune

UNET_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture
def ema_model(tmp_path):
    return make_model(tmp_path / "model.safetensors", "sd1_checkpoint", ema=True)


def test_drop_ema_keeps_everything_else_bit_identical(tmp_path, ema_model):
    before = sha256(ema_model)
    (tmp_path / "out").mkdir()
    [r] = prune([ema_model], ema="drop", out_dir=tmp_path / "out")
    src, out = load(ema_model), load(r.output)
    assert r.output.name == "model-pruned.safetensors"
    assert set(out) == {k for k in src if not k.startswith("model_ema.")}
    for k in out:
        assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
    assert r.dropped == {"ema": 688}
    assert sha256(ema_model) == before
    # provenance: operation, version, input sha256 (computed independently here)
    meta = safe_open(str(r.output), "pt").metadata()
    assert meta["ckptlab.operation"] == "prune"
    assert meta["ckptlab.version"].startswith("ckptlab ")
    assert json.loads(meta["ckptlab.inputs"]) == [{"name": "model.safetensors", "sha256": before}]
    assert r.input_sha256 == before


def test_use_ema_replaces_unet_with_ema_values(tmp_path, ema_model):
    [r] = prune([ema_model], ema="use")
    src, out = load(ema_model), load(r.output)
    assert r.output.name == "model-pruned-emaonly.safetensors"
    assert not any(k.startswith("model_ema.") for k in out)
    unet_keys = [k for k in src if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == 686
    for k in unet_keys:
        assert torch.equal(out[k], src[ema_key(k)]), k
    assert not torch.equal(out[UNET_KEY], src[UNET_KEY])  # the sample's EMA differs from the UNet
    vae = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(out[vae], src[vae])


def test_keep_ema(tmp_path, ema_model):
    [r] = prune([ema_model], ema="keep")
    assert set(load(r.output)) == set(load(ema_model))


def test_use_ema_without_ema_refused(tmp_path):
    p = make_model(tmp_path / "plain.safetensors", "sd1_checkpoint")
    with pytest.raises(MismatchError, match="no EMA weights"):
        prune([p], ema="use")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plain.safetensors"]


def test_training_state_dropped_from_lightning_ckpt(tmp_path):
    p = make_model(tmp_path / "train.ckpt", "sd1_checkpoint", ema=True, fmt="ckpt", training_state=True)
    [r] = prune([p], ema="drop")
    out = load(r.output)
    assert r.output.suffix == ".safetensors"
    assert not any(k.startswith(("optimizer", "model_ema.", "lr_schedulers")) for k in out)
    assert UNET_KEY in out


def test_precision_at_the_same_time_and_vae_stays_fp32(tmp_path, ema_model):
    [r] = prune([ema_model], ema="use", precision="fp16")
    src, out = load(ema_model), load(r.output)
    assert r.output.name == "model-pruned-emaonly-fp16.safetensors"
    assert torch.equal(out[UNET_KEY], src[ema_key(UNET_KEY)].to(torch.float16))
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(out[te], src[te].to(torch.float16))
    assert out["first_stage_model.decoder.conv_in.weight"].dtype == torch.float32
    assert out["alphas_cumprod"].dtype == torch.float32  # schedule buffers untouched
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert out[pid].dtype == torch.int64


def test_float_position_ids_repaired(tmp_path):
    p = make_model(tmp_path / "merged.safetensors", "sd1_merged")
    pid = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    src = load(p)
    assert src[pid].is_floating_point() and not torch.equal(src[pid], src[pid].round())
    [r] = prune([p])
    out = load(r.output)
    assert out[pid].dtype == torch.int64
    assert torch.equal(out[pid], torch.arange(src[pid].shape[-1]).reshape(src[pid].shape))
    assert any("position_ids" in w for w in r.warnings)


def test_dry_run_and_existing_output(tmp_path, ema_model):
    [r] = prune([ema_model], dry_run=True)
    assert r.dry_run and not r.output.exists() and r.tensors_out == 1143
    prune([ema_model])
    from ckptlab.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        prune([ema_model])


def test_malicious_pickle_refused(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("echo pwned",))

    p = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "x": Evil()}, protocol=2))
    from ckptlab.security import check

    assert check(p).verdict == "malicious"
    before = sha256(p)
    with pytest.raises(UnsafeFileError):
        prune([p])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["evil.ckpt"]
    assert sha256(p) == before


def test_cli_prune_many_inputs(tmp_path, cli):
    a = make_model(tmp_path / "a.safetensors", "sd1_checkpoint", ema=True)
    b = make_model(tmp_path / "b.safetensors", "sd1_checkpoint", ema=True, seed=1)
    (tmp_path / "out").mkdir()
    r = cli("prune", a, b, "--ema", "use", "--out-dir", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["output"] for x in recs] == [str(tmp_path / "out/a-pruned-emaonly.safetensors"),
                                           str(tmp_path / "out/b-pruned-emaonly.safetensors")]
    r = cli("prune", a, "--ema", "sideways")
    assert r.returncode == 2 and "Invalid value for '--ema'" in r.stderr, r.stderr


def test_progress_reports_every_output_byte(tmp_path, ema_model):
    other = make_model(tmp_path / "other.safetensors", "sd1_checkpoint", ema=True, seed=2)
    calls = {"total": [], "advance": 0}

    def progress(advance=0, *, total=None, description=None):
        if total is not None:
            calls["total"].append(total)
        calls["advance"] += advance

    results = prune([ema_model, other], ema="use", progress=progress)
    written = sum(r.bytes_out for r in results)
    assert calls["total"] == [written] and calls["advance"] == written
    # bytes_out is the tensor data of the file actually written (file = 8-byte length + header + data)
    from ckptlab.formats.safetensors import read_header

    for r in results:
        h = read_header(r.output)
        assert h.file_size - h.data_start == r.bytes_out


def test_unchanged_tensors_are_copied_raw_not_materialised(tmp_path, ema_model, monkeypatch):
    from ckptlab.formats.safetensors import SafetensorsSource

    got = []
    real_array = SafetensorsSource.array  # the one data path (get() is built on it)
    monkeypatch.setattr(SafetensorsSource, "array", lambda self, key: got.append(key) or real_array(self, key))
    prune([ema_model], ema="use")
    assert got == []  # every tensor went from the mmap to the writer as bytes (no array built)
    prune([ema_model], ema="drop", precision="fp16")
    assert len(got) == 686 + 196  # only the converted tensors were read as tensors, one at a time


def test_input_sha256_reused_from_the_library_catalog(tmp_path, ema_model):
    """A catalog passed as ``cache=`` supplies the input's sha256 (the file is not hashed again); the API
    never reads a catalog nobody passed."""
    from ckptlab.library.catalog import Catalog, default_db_path, hash_cache
    from ckptlab.library.scanner import scan
    from ckptlab.ops.stream import FileHasher

    cache = hash_cache(default_db_path())  # $CKPTLAB_DB points into tmp (conftest)
    assert not FileHasher(ema_model, cache=cache).from_cache  # no catalog yet: hashed
    with Catalog(default_db_path()) as cat:
        scan([tmp_path], cat, hash=True)
    h = FileHasher(ema_model, cache=cache)
    assert h.from_cache and h.result() == sha256(ema_model)
    assert not FileHasher(ema_model).from_cache  # no cache given: the catalog is not consulted
    [r] = prune([ema_model], cache=cache)
    meta = safe_open(str(r.output), "pt").metadata()
    assert json.loads(meta["ckptlab.inputs"])[0]["sha256"] == sha256(ema_model)
    ema_model.write_bytes(ema_model.read_bytes())  # new mtime: the cached value no longer applies
    assert not FileHasher(ema_model, cache=cache).from_cache


def test_unknown_ema_mode_refused_in_api_and_cli(tmp_path, cli):
    """prune: ``ema`` outside keep/drop/use is a one-line CkptlabError from the API, a usage error
    (exit 2) from the CLI; to-diffusers takes only drop/use. Nothing is written."""
    from ckptlab.ops.diffusers_io import to_diffusers

    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    with pytest.raises(CkptlabError, match="--ema 'weird': use one of keep, drop, use"):
        prune([src], ema="weird")
    with pytest.raises(CkptlabError, match="--ema 'keep': use one of drop, use"):
        to_diffusers(src, tmp_path / "pipe", ema="keep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    for argv in (["prune", str(src), "--ema", "weird"], ["to-diffusers", str(src), "--ema", "keep"]):
        r = cli(*argv)
        assert r.returncode == 2 and "Invalid value for '--ema'" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("case", ["pickle-without-tensors", "only-ema"])
def test_nothing_left_to_write_is_refused(tmp_path, cli, case):
    """A transform whose output would hold no tensor refuses (one line, exit 1) and writes nothing,
    instead of writing an empty model file."""
    from safetensors.torch import save_file

    from ckptlab.ops.precision import convert_precision

    out = tmp_path / "out"
    out.mkdir()
    if case == "pickle-without-tensors":
        src = tmp_path / "state.ckpt"
        torch.save({"epoch": 3, "global_step": 1200}, src)
    else:
        src = tmp_path / "ema.safetensors"
        save_file({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}, str(src))
    with pytest.raises(CkptlabError, match="no tensors to write"):
        prune([src], out_dir=out)
    if case == "pickle-without-tensors":
        with pytest.raises(CkptlabError, match="no tensors to write"):
            convert_precision([src], "fp16", out_dir=out)
    r = cli("prune", str(src), "--out-dir", str(out))
    assert r.returncode == 1, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        f"ckptlab: error: {src}: no tensors to write; no output made"]
    assert list(out.iterdir()) == []


def test_already_pruned_file_writes_nothing(tmp_path, cli, ema_model):
    """Pruning a pruned file wrote a full copy. The CLI says so, writes nothing and exits 0; the API writes
    the copy only when not asked to skip (with a warning), and a dry run reports the same decision."""
    (tmp_path / "out").mkdir()
    [first] = prune([ema_model], out_dir=tmp_path / "out")
    pruned = first.output
    listing = sorted(p.name for p in (tmp_path / "out").iterdir())

    r = cli("prune", pruned)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{pruned}: nothing to prune (no EMA weights or training state); nothing written"
    assert r.stderr == ""
    r = cli("prune", pruned, "--json", "--dry-run")
    rec = json.loads(r.stdout)
    assert rec["output"] is None and rec["unchanged"].startswith("nothing to prune"), rec
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == listing

    # mixed: the pruned file is skipped, the unpruned one is written, results in input order
    r = cli("prune", pruned, ema_model, "--out-dir", tmp_path / "o2", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["output"] for x in recs] == [None, str(tmp_path / "o2" / "model-pruned.safetensors")]
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == ["model-pruned.safetensors"]

    [api] = prune([pruned], skip_unchanged=True)
    assert api.output is None and api.unchanged
    [copy] = prune([pruned])  # the library default still writes (apply-plan's in-place rewrite relies on it)
    assert copy.output.is_file() and any("plain copy" in w for w in copy.warnings)
    assert set(load(copy.output)) == set(load(pruned))


def test_a_pickle_with_nothing_to_prune_points_to_convert(tmp_path, cli):
    src = make_model(tmp_path / "m.ckpt", "sd1_checkpoint", fmt="ckpt")
    r = cli("prune", src)
    assert r.returncode == 0, r.stderr
    assert "nothing written" in r.stdout and "ckptlab convert" in r.stdout, r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_prune_with_precision_is_a_change(tmp_path, cli):
    """Nothing to drop but a dtype to change: that is work, not a no-op."""
    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("prune", src, "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "m-pruned-fp16.safetensors").is_file()


def test_out_dir_is_created_only_when_writing(tmp_path, cli, ema_model):
    """--out-dir out/ failed when out/ did not exist. It is created (with parents) once every check passed;
    a dry run or a refused input creates nothing; a path under a file is refused."""
    target = tmp_path / "new" / "deeper"
    r = cli("prune", ema_model, "--out-dir", target, "--dry-run")
    assert r.returncode == 0 and not (tmp_path / "new").exists(), r.stderr
    r = cli("prune", ema_model, tmp_path / "missing.safetensors", "--out-dir", target)
    assert r.returncode == 1 and not (tmp_path / "new").exists(), r.stderr
    r = cli("prune", ema_model, "--out-dir", target)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in target.iterdir()) == ["model-pruned.safetensors"]
    (tmp_path / "afile").write_text("x")
    r = cli("prune", ema_model, "--out-dir", tmp_path / "afile" / "sub")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"ckptlab: error: {tmp_path / 'afile' / 'sub' / 'model-pruned.safetensors'}: "
                                     f"cannot create the output folder {tmp_path / 'afile' / 'sub'}: "
                                     f"{tmp_path / 'afile'} is not a folder"]


def test_db_chooses_the_catalog_consulted_for_input_hashes(tmp_path, cli, ema_model):
    """Transforms looked input sha256 up in the default catalog whatever --db said. A catalog whose row for
    the input holds a marker digest proves which catalog was read: with --db (or $CKPTLAB_DB) the marker
    lands in the output's provenance; with another catalog, the file's real sha256."""
    import sqlite3

    lib = tmp_path / "lib"
    lib.mkdir()
    src = ema_model.rename(lib / "model.safetensors")
    db = tmp_path / "mine.db"
    r = cli("scan", "--db", db, "--hash", lib)
    assert r.returncode == 0, r.stderr
    marker = "ab" * 32
    with sqlite3.connect(db) as con:
        assert con.execute("UPDATE content SET sha256 = ?", (marker.upper(),)).rowcount == 1

    def recorded(out_dir, *extra, env=None):
        r = cli("prune", src, "--out-dir", out_dir, *extra, env=env)
        assert r.returncode == 0, r.stderr
        meta = safe_open(str(out_dir / "model-pruned.safetensors"), "pt").metadata()
        return json.loads(meta["ckptlab.inputs"])[0]["sha256"]

    assert recorded(tmp_path / "a", "--db", db) == marker
    assert recorded(tmp_path / "b", env={"CKPTLAB_DB": str(db)}) == marker
    assert recorded(tmp_path / "c") == sha256(src)  # the default catalog ($CKPTLAB_DB of conftest) is empty
    assert recorded(tmp_path / "d", "--db", tmp_path / "none.db") == sha256(src)
    assert not (tmp_path / "none.db").exists()  # looking a hash up never creates a catalog


def test_nothing_to_prune_with_ema_keep_says_the_ema_was_kept(cli, tmp_path):
    """``--ema keep`` on a file with EMA but no training state: the reason names the kept EMA, not 'no EMA'."""
    src = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    r = cli("prune", src, "--ema", "keep", "--out-dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "--ema keep keeps the EMA weights" in r.stdout and "no EMA" not in r.stdout, r.stdout
