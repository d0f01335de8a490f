"""What a MODEL argument names (``generate.models``): a file, a diffusers folder read in memory, a catalog hash or
name; ambiguous and missing ones are one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
from fakes.library_files import tensors, write_st
from fakes.sample_files import make_model

from ckptlab.errors import CkptlabError, FormatError, NotInCatalogError, UsageError
from ckptlab.imaging.models import DiffusersAsSingleFile, open_model_source, resolve_model
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A small SD1 checkpoint and the diffusers folder ``to-diffusers`` writes from it."""
    from ckptlab.ops.diffusers_io import to_diffusers

    d = tmp_path_factory.mktemp("sd1")
    model = make_model(d / "model.safetensors", "sd1_checkpoint")
    to_diffusers(model, d / "model_diffusers")
    return model, d / "model_diffusers"


def _render(path):
    from ckptlab.imaging.render import Session, Settings

    s = Settings("a red lighthouse at dusk", negative="blurry", seed=7, steps=2, width=64, height=64,
                 sampler="Euler a")
    with Session(path, device="cpu") as ses:
        image, seed, size = ses.render(s)
        return np.asarray(image).astype(int), ses.infotext(s, seed, size)


def test_diffusers_folder_renders_the_pixels_of_the_single_file(sd1):
    model, folder = sd1
    a, _ = _render(model)
    b, info = _render(folder)
    assert a.shape == b.shape == (64, 64, 3)
    assert a.std() > 5  # a real image, not a flat one
    assert np.abs(a - b).max() == 0
    assert "Model: model_diffusers" in info and "Model hash" not in info  # a folder has no file hash


def test_plain_diffusers_folder_without_our_extras_renders_the_same(sd1, tmp_path):
    """A folder as diffusers writes it (no ckptlab_extra.safetensors: no schedule buffers, no position_ids)."""
    model, folder = sd1
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "ckptlab_extra.safetensors").unlink()
    a, _ = _render(model)
    b, _ = _render(plain)
    assert np.abs(a - b).max() == 0


def test_folder_source_has_the_single_file_tensors_and_writes_nothing(sd1):
    """Key names and bytes equal the file the folder was made from (to-diffusers keeps every tensor)."""
    from safetensors.numpy import load_file

    model, folder = sd1
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    want = load_file(str(model))
    with open_model_source(folder) as src:
        assert isinstance(src, DiffusersAsSingleFile)
        assert set(src.keys()) == set(want)
        for k, v in want.items():
            got = src.array(k)
            assert src.info(k).shape == v.shape == got.shape, k
            assert got.tobytes() == v.tobytes(), k
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_v_prediction_of_a_diffusers_folder_comes_from_its_scheduler_config(tmp_path):
    from ckptlab.ops.diffusers_io import plan_to_diffusers, to_diffusers

    model = make_model(tmp_path / "v.safetensors", "sd2_768_v")
    to_diffusers(model, tmp_path / "v_diff")
    cfg = json.loads((tmp_path / "v_diff" / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "v_prediction"
    (tmp_path / "v_diff" / "ckptlab_extra.safetensors").unlink()
    with open_model_source(tmp_path / "v_diff") as src:
        assert plan_to_diffusers(src)[2]["scheduler/scheduler_config.json"]["prediction_type"] == "v_prediction"
    cfg["prediction_type"] = "epsilon"
    (tmp_path / "v_diff" / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with open_model_source(tmp_path / "v_diff") as src:
        assert plan_to_diffusers(src)[2]["scheduler/scheduler_config.json"]["prediction_type"] == "epsilon"


def test_a_folder_that_is_no_pipeline_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no model_index.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(FormatError, match="no model_index.json"):
        open_model_source(tmp_path / "empty")


def test_a_hostile_pickle_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(CkptlabError) as e:
        open_model_source(resolve_model(p))
    assert "os.system" in str(e.value) or "malicious" in str(e.value).lower() or "unsafe" in str(e.value).lower()


# ---------------------------------------------------------------------------------------------------------------
# the catalog


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "lib"
    a = write_st(lib / "alpha.safetensors", tensors("sd1_embedding", seed=1))
    b = write_st(lib / "beta.safetensors", tensors("sd1_embedding", seed=2))
    copy = lib / "copies" / "alpha-copy.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(a, copy)
    twin = write_st(lib / "other" / "beta.safetensors", tensors("sd1_embedding", seed=3))  # same name, other bytes
    db = tmp_path / "cat.db"
    with Catalog(db) as cat:
        scan([lib], cat, hash=True)
    return db, a, b, copy, twin


def _autov3(path) -> str:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_hashes_resolve_to_the_catalogued_file(library):
    db, a, b, copy, _ = library
    sha = hashlib.sha256(b.read_bytes()).hexdigest()
    for text in (sha, sha.upper(), sha[:8], sha[:10], sha[:12], _autov3(b), _autov3(b).upper(), "0x" + sha[:10]):
        assert resolve_model(text, db=db) == b, text


def test_copies_with_the_same_bytes_are_one_model(library):
    db, a, _, copy, _ = library
    sha = hashlib.sha256(a.read_bytes()).hexdigest()
    assert resolve_model(sha[:10], db=db) in (a, copy)


def test_a_catalog_name_or_stem_resolves(library):
    db, a, _, copy, _ = library
    assert resolve_model("alpha-copy.safetensors", db=db) == copy
    assert resolve_model("ALPHA-COPY", db=db) == copy
    assert resolve_model("alpha", db=db) == a


def test_an_existing_path_wins_over_the_catalog(library, tmp_path, monkeypatch):
    db, a, *_ = library
    monkeypatch.chdir(a.parent)
    assert resolve_model("alpha.safetensors", db=db) == a.relative_to(a.parent)


def test_ambiguous_name_lists_the_candidates(library):
    db, _, b, _, twin = library
    with pytest.raises(UsageError) as e:
        resolve_model("beta", db=db)
    msg = str(e.value)
    assert "ambiguous" in msg and str(b) in msg and str(twin) in msg and "\n" not in msg
    assert hashlib.sha256(twin.read_bytes()).hexdigest()[:10] in msg


def test_missing_and_short_and_no_catalog(library, tmp_path):
    db, *_ = library
    with pytest.raises(NotInCatalogError, match="no model in the catalog"):
        resolve_model("gamma", db=db)
    with pytest.raises(NotInCatalogError, match="no model in the catalog"):
        resolve_model("deadbeef00", db=db)
    with pytest.raises(UsageError, match="at least 8 hex"):
        resolve_model("abc12", db=db)
    with pytest.raises(NotInCatalogError, match="no catalog"):
        resolve_model("alpha", db=tmp_path / "none.db")
    assert not (tmp_path / "none.db").exists()
    with pytest.raises(NotInCatalogError, match="no such file"):
        resolve_model(str(tmp_path / "nothing" / "m.safetensors"), db=db)


def test_a_catalogued_file_that_is_gone(library):
    db, _, b, _, _ = library
    sha = hashlib.sha256(b.read_bytes()).hexdigest()
    b.unlink()
    with pytest.raises(NotInCatalogError, match="gone"):
        resolve_model(sha[:10], db=db)


def test_generate_cli_takes_a_catalog_hash_and_a_diffusers_folder(sd1, tmp_path, cli_in_process):
    """The wiring: ``ckptlab generate`` resolves MODEL with ``resolve_model`` and opens it with
    ``open_model_source``: a hash of the catalogued file and the folder give the file's own pixels. Through
    the CLI's entry point in this process (the subprocess is test_generate_cli.py's)."""
    cli = cli_in_process
    from PIL import Image

    model, folder = sd1
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copyfile(model, lib / "model.safetensors")
    db = tmp_path / "c.db"
    assert cli("scan", lib, "--hash", "--db", db).returncode == 0
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    common = ["-p", "a lighthouse", "--seed", "5", "--steps", "2", "--size", "64x64", "--sampler", "Euler",
              "--device", "cpu", "--db", db]
    r = cli("generate", sha[:10], *common, "-o", tmp_path / "a.png")
    assert r.returncode == 0, r.stderr
    r = cli("generate", folder, *common, "-o", tmp_path / "b.png")
    assert r.returncode == 0, r.stderr
    r = cli("generate", model, *common, "-o", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    px = [np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")).astype(int) for n in "abc"]
    assert np.abs(px[0] - px[2]).max() == 0 and np.abs(px[1] - px[2]).max() == 0
    with Image.open(tmp_path / "a.png") as im:
        assert f"Model hash: {sha[:10]}, Model: model," in im.text["parameters"]
    r = cli("generate", "nosuchmodel", *common, "-o", tmp_path / "d.png")
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error: 'nosuchmodel': no such file")


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_hostile_pickle_inside_a_diffusers_folder_is_refused(sd1, tmp_path):
    import pickle

    from ckptlab.errors import UnsafeFileError

    _, folder = sd1
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    (evil / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    canary = tmp_path / "CANARY"
    (evil / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps({"conv_in.weight": _Canary(str(canary))}, protocol=2))
    with pytest.raises(UnsafeFileError):
        open_model_source(resolve_model(evil))
    assert not canary.exists()
