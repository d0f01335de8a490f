"""The write path shared by transforms and merges (issue 13 §2-3).

- The hash cache is a parameter: no transform or merge reads the default catalog (``$CKPTLAB_DB``) unless the
  caller passes it; a cache passed in is used, and the input is then not hashed at all.
- One atomic-output helper (``ckptlab.atomic.Staged``): a writer that fails midway leaves neither a temporary
  nor a final file, for model files, diffusers folders and small files alike.

Oracles: ``hashlib`` over the file's bytes for sha256; the folder listing for leftovers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes.sample_files import make_model, sha256
from safetensors import safe_open

WRONG = "ab" * 32


def _plant(db: Path, path: Path, digest: str) -> None:
    """Record ``digest`` as ``path``'s sha256 in catalog ``db``, as ``ckptlab hash`` records real ones."""
    from ckptlab.hashes import Hashes
    from ckptlab.library.catalog import Catalog

    st = os.stat(path)
    with Catalog(db) as cat:
        cat.put_hashes((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                       Hashes(digest, "0" * 10, "0" * 10, None, "0" * 8, "0" * 64, st.st_size))


def _inputs_meta(path: Path) -> list[dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ckptlab.inputs"])


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return make_model(d / "model.safetensors", "sd1_checkpoint", ema=True)


@pytest.fixture
def vae_file(tmp_path, model):
    from ckptlab.ops.components import extract

    [r] = extract([model], "vae", out=tmp_path / "in" / "vae.safetensors")
    return r.output


@pytest.fixture
def poisoned_default_catalog(model, vae_file):
    """The default catalog ($CKPTLAB_DB, set per test by conftest) holds a WRONG sha256 for the inputs."""
    db = Path(os.environ["CKPTLAB_DB"])
    _plant(db, model, WRONG)
    _plant(db, vae_file, WRONG)
    return db


def _transforms(model: Path, vae_file: Path, out: Path):
    from ckptlab.ops.components import extract, replace
    from ckptlab.ops.precision import convert_precision
    from ckptlab.ops.prune import prune

    yield "prune", lambda **kw: prune([model], outputs=[out / "p.safetensors"], **kw)
    yield "precision", lambda **kw: convert_precision([model], "fp16", outputs=[out / "f.safetensors"], **kw)
    yield "extract", lambda **kw: extract([model], "unet", out=out / "u.safetensors", **kw)
    yield "replace", lambda **kw: replace([model], vae=vae_file, out=out / "r.safetensors", **kw)


def test_no_transform_reads_the_default_catalog(tmp_path, model, vae_file, poisoned_default_catalog):
    """With no cache given, the provenance carries each input's true sha256 (hashlib), never the wrong
    digest the default catalog holds."""
    out = tmp_path / "out"
    out.mkdir()
    truth = {model.name: sha256(model), vae_file.name: sha256(vae_file)}
    for name, run in _transforms(model, vae_file, out):
        [r] = run()
        recorded = _inputs_meta(r.output)
        assert recorded and all(e["sha256"] == truth[e["name"]] for e in recorded), name
        assert r.input_sha256 == truth[model.name], name


def test_no_diffusers_conversion_reads_the_default_catalog(tmp_path, model, poisoned_default_catalog):
    from ckptlab.ops.diffusers_io import from_diffusers, to_diffusers

    folder = tmp_path / "pipe"
    to_diffusers(model, folder)
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ckptlab.inputs"])[0]["sha256"] == sha256(model)
    weights = sorted(folder.rglob("*.safetensors"))
    for w in weights:
        _plant(poisoned_default_catalog, w, WRONG)
    r = from_diffusers(folder, tmp_path / "back.safetensors")
    recorded = sorted(e["sha256"] for e in _inputs_meta(r.output))
    assert recorded == sorted(sha256(w) for w in weights) and WRONG not in recorded


def test_merge_does_not_read_the_default_catalog(tmp_path, model, vae_file, poisoned_default_catalog):
    from ckptlab.merging import merge, provenance

    b = make_model(tmp_path / "in" / "b.safetensors", "sd1_checkpoint", seed=1)
    provenance._CACHE.clear()  # hashes this process computed earlier
    r = merge("weighted_sum", [model, b], tmp_path / "m.safetensors", vae=vae_file)
    assert [i.sha256 for i in r.inputs] == [sha256(model), sha256(b), sha256(vae_file)]
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert WRONG not in json.dumps(meta)
    # the transforms' provenance keys, written by the same function
    assert json.loads(meta["ckptlab.inputs"]) == [{"name": p.name, "sha256": sha256(p)} for p in (model, b, vae_file)]
    assert meta["ckptlab.operation"] == "merge" and meta["ckptlab.version"].startswith("ckptlab ")
    assert json.loads(meta["ckptlab.options"]) == {"method": "weighted_sum", "steps": 1}


def _no_hashing(monkeypatch):
    """Make any sha256 computation of an input fail the test: a digest must then come from the cache."""
    def refuse(*a, **k):
        raise AssertionError(f"input hashed although the cache knows it: {a[0]}")

    monkeypatch.setattr("ckptlab.ops.stream.sha256_file", refuse)
    monkeypatch.setattr("ckptlab.merging.provenance.sha256_file", refuse)


def test_a_cache_passed_in_is_used_and_the_input_not_hashed(tmp_path, model, vae_file, monkeypatch):
    from ckptlab.library.catalog import hash_cache
    from ckptlab.merging import merge, provenance

    db = tmp_path / "mine.db"
    for p in (model, vae_file):
        _plant(db, p, sha256(p))  # the right digests, computed here with hashlib
    b = make_model(tmp_path / "in" / "b.safetensors", "sd1_checkpoint", seed=1)
    _plant(db, b, sha256(b))
    cache = hash_cache(db)
    _no_hashing(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    for name, run in _transforms(model, vae_file, out):
        [r] = run(cache=cache)
        assert {e["name"]: e["sha256"] for e in _inputs_meta(r.output)}.get(model.name) == sha256(model), name
    provenance._CACHE.clear()
    r = merge("weighted_sum", [model, b], tmp_path / "m.safetensors", cache=cache)
    assert [i.sha256 for i in r.inputs] == [sha256(model), sha256(b)]


def test_cli_builds_the_cache_from_db(tmp_path, cli, model):
    """The CLI passes the catalog --db names: its digest lands in the provenance (a marker proves which
    catalog was read); a --db that does not exist is no cache, not an error, and is not created."""
    db = tmp_path / "mine.db"
    _plant(db, model, WRONG)
    r = cli("extract", model, "--component", "vae", "-o", tmp_path / "a.safetensors", "--db", db)
    assert r.returncode == 0, r.stderr
    assert _inputs_meta(tmp_path / "a.safetensors")[0]["sha256"] == WRONG
    none = tmp_path / "none.db"
    r = cli("extract", model, "--component", "vae", "-o", tmp_path / "b.safetensors", "--db", none)
    assert r.returncode == 0, r.stderr
    assert _inputs_meta(tmp_path / "b.safetensors")[0]["sha256"] == sha256(model) and not none.exists()


# -- atomic outputs -------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_model_writer_failing_midway_leaves_nothing(tmp_path, model):
    """A ``produce()`` that raises after some tensors were written: no temporary, no final file."""
    from ckptlab.ops.stream import Out, open_input, write_plan

    out_dir = tmp_path / "o"
    out_dir.mkdir()
    src = open_input(model)
    try:
        keys = list(src.keys())
        items = [Out.copy(k, src) for k in keys[:5]]
        items.append(Out("boom", src.info(keys[5]), produce=lambda: (_ for _ in ()).throw(Boom())))
        items += [Out.copy(k, src) for k in keys[6:10]]
        with pytest.raises(Boom):
            write_plan(out_dir / "x.safetensors", items, {"format": "pt"})
    finally:
        src.close()
    assert _leftovers(out_dir) == []


def test_merge_failing_midway_leaves_nothing(tmp_path, model, monkeypatch):
    from ckptlab.merging import merge
    from ckptlab.merging.graph import StepNode

    b = make_model(tmp_path / "in" / "b.safetensors", "sd1_checkpoint", seed=1)
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    calls = []
    real = StepNode.tensor

    def tensor(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise Boom
        return real(self, key)

    monkeypatch.setattr(StepNode, "tensor", tensor)
    with pytest.raises(Boom):
        merge("weighted_sum", [model, b], out_dir / "m.safetensors", threads=1)
    assert len(calls) == 20 and _leftovers(out_dir) == []


def test_diffusers_folder_failing_midway_leaves_nothing(tmp_path, model, monkeypatch):
    """to-diffusers writes config files and several weight files; a tensor failing in the second weight
    file leaves no temporary folder and no output folder."""
    from ckptlab.ops import stream
    from ckptlab.ops.diffusers_io import to_diffusers

    out_dir = tmp_path / "o"
    out_dir.mkdir()
    written = []
    real = stream.write_plan

    def write_plan(path, items, *a, **k):
        written.append(path)
        if len(written) == 2:
            items = [*items[:3], stream.Out("boom", items[3].info, produce=lambda: (_ for _ in ()).throw(Boom())),
                     *items[4:]]
        return real(path, items, *a, **k)

    monkeypatch.setattr("ckptlab.ops.diffusers_io.write_plan", write_plan)
    with pytest.raises(Boom):
        to_diffusers(model, out_dir / "pipe")
    assert len(written) == 2 and _leftovers(out_dir) == []


def test_existing_diffusers_folder_kept_when_a_rewrite_fails(tmp_path, model, monkeypatch):
    from ckptlab.ops.diffusers_io import to_diffusers

    out = tmp_path / "pipe"
    to_diffusers(model, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*a, **k):
        raise Boom

    monkeypatch.setattr("ckptlab.ops.diffusers_io.write_plan", fail)
    with pytest.raises(Boom):
        to_diffusers(model, out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _leftovers(tmp_path) == sorted(["in", "pipe"])


def test_small_file_writer_failing_midway_leaves_nothing(tmp_path):
    from ckptlab.atomic import write_atomic

    def produce(fh):
        fh.write(b"half of a report")
        raise Boom

    with pytest.raises(Boom):
        write_atomic(tmp_path / "report.json", produce)
    assert _leftovers(tmp_path) == []
    (tmp_path / "report.json").write_bytes(b"old")
    with pytest.raises(Boom):
        write_atomic(tmp_path / "report.json", produce)
    assert _leftovers(tmp_path) == ["report.json"] and (tmp_path / "report.json").read_bytes() == b"old"


def test_no_clobber_placing_refuses_a_name_that_appeared(tmp_path):
    """Without overwrite, a final name that appears while the temporary is filled is never replaced."""
    from ckptlab.atomic import Staged, write_atomic

    target = tmp_path / "plan.json"

    def produce(fh):
        fh.write(b"mine")
        target.write_bytes(b"theirs")  # someone else's file appears meanwhile

    with pytest.raises(FileExistsError):
        write_atomic(target, produce, overwrite=False)
    assert target.read_bytes() == b"theirs" and _leftovers(tmp_path) == ["plan.json"]
    folder = tmp_path / "pipe"
    with pytest.raises(FileExistsError), Staged(folder) as st:
        tmp = st.create_folder()
        (tmp / "model_index.json").write_text("{}")
        folder.mkdir()
        st.commit()
    assert _leftovers(tmp_path) == ["pipe", "plan.json"] and list(folder.iterdir()) == []


def test_diffusers_conversions_plan_every_input_before_writing(tmp_path, model):
    """A bad second input stops to-diffusers / from-diffusers before the first output is written (the loop
    that lived in the CLI is ``ops.diffusers_io.to_diffusers_each`` / ``from_diffusers_each``)."""
    from ckptlab.errors import CkptlabError
    from ckptlab.ops.diffusers_io import from_diffusers_each, to_diffusers_each

    vae = make_model(tmp_path / "in" / "vae.safetensors", "sd1_vae")
    with pytest.raises(CkptlabError):
        to_diffusers_each([model, vae], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    [r] = to_diffusers_each([model], out_dir=tmp_path / "pipes")
    assert r.output == tmp_path / "pipes" / "model-diffusers"
    broken = tmp_path / "pipes" / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    with pytest.raises(CkptlabError):
        from_diffusers_each([r.output, broken], out_dir=tmp_path / "single")
    assert not (tmp_path / "single").exists()
    with pytest.raises(CkptlabError, match="takes one input"):
        to_diffusers_each([model, model], output=tmp_path / "x")
    with pytest.raises(CkptlabError, match="both be written"):
        to_diffusers_each([model, model], out_dir=tmp_path / "y")


def _computed_items(n: int, fail_at: int | None = None):
    """``n`` computed items of different sizes; item ``fail_at`` raises while being produced."""
    import numpy as np

    from ckptlab.formats.base import TensorInfo
    from ckptlab.ops.stream import Out

    items = []
    for i in range(n):
        shape = (1 + i % 7, 3 + i % 5)

        def produce(i=i, shape=shape):
            if i == fail_at:
                raise ValueError("boom")
            return np.full(shape, i, dtype=np.float32) + np.arange(shape[1], dtype=np.float32)

        items.append(Out(f"t{i:03d}", TensorInfo("F32", shape), produce=produce))
    return items


@pytest.mark.parametrize("threads", [2, 3])
def test_worker_threads_write_the_same_bytes_in_plan_order(tmp_path, threads):
    from ckptlab.ops.stream import write_plan

    one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
    write_plan(one, _computed_items(40), {"k": "v"})
    write_plan(many, _computed_items(40), {"k": "v"}, threads=threads)
    assert one.read_bytes() == many.read_bytes()


def test_a_worker_failing_leaves_nothing(tmp_path):
    from ckptlab.ops.stream import write_plan

    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="boom"):
        write_plan(out, _computed_items(40, fail_at=23), {}, threads=2)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_as_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The interrupt of a Ctrl-C is raised when the ``open`` call returns, after the file exists: the writer must
    still remove it (a CI run left ``.unet.safetensors.<token>.tmp`` behind this way)."""
    import ckptlab.atomic as atomic
    from ckptlab.formats.base import TensorInfo
    from ckptlab.formats.writer import SafetensorsWriter

    real_open = os.open

    def open_then_interrupt(*a, **kw):
        real_open(*a, **kw)  # the file now exists; the descriptor is lost with the interrupt
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # os.open restored before pytest's own teardown removes tmp_path with it
        m.setattr(atomic.os, "open", open_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            with SafetensorsWriter(tmp_path / "out.safetensors", {"a": TensorInfo("F32", (2,))}, {}):
                pass
    assert list(tmp_path.iterdir()) == []
