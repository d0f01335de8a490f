"""``grid`` against independent runs: every cell equals ``generate`` with the cell's settings (pixel for pixel,
same infotext); a merge-axis cell equals generating from the file ``ckptlab merge`` writes at that alpha, and
grid writes no model file; LoRA-axis cells equal ``generate --lora FILE:S``; VAE-axis cells equal
``generate --vae``. Spies prove the loop order (one model load per model) and the re-save after every row."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

from ckptlab.imaging import imagefile, render  # noqa: E402
from ckptlab.imaging.grid import grid  # noqa: E402
from ckptlab.imaging.grid_axes import parse_axis  # noqa: E402
from ckptlab.imaging.grid_draw import PENDING  # noqa: E402
from ckptlab.imaging.render import Settings, generate  # noqa: E402
from tests.fakes.sample_files import make_model  # noqa: E402

pytestmark = pytest.mark.slow

BASE = dict(prompt="a red cat", seed=7, steps=2, cfg=5.0, width=64, height=64, sampler="Euler")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("gridlib")
    make_model(d / "a.safetensors", "sd1_checkpoint", dtype="F16")
    make_model(d / "b.safetensors", "sd1_checkpoint", dtype="F16", seed=1)
    make_model(d / "style.safetensors", "sd1_kohya_lora", dtype="F16")
    make_model(d / "vae.safetensors", "sd1_vae", dtype="F16", seed=2)
    (d / "mix.toml").write_text('version = 1\n[inputs.A]\npath = "a.safetensors"\n[inputs.B]\npath = "b.safetensors"\n'
                                '[[steps]]\nname = "mix"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = 0.3\n')
    return d


def pixels(p: Path) -> np.ndarray:
    with Image.open(p) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def infotext(p: Path) -> str:
    with Image.open(p) as im:
        return imagefile.read_text_chunks(im)["parameters"]


_ORACLES: dict = {}


def oracle(tmp: Path, name: str, model: Path, settings: Settings, **kw) -> Path:
    """``generate`` with these settings (a fresh model load each time; runs with equal arguments shared)."""
    key = (str(model), tuple(sorted(settings.__dict__.items())), repr(sorted(kw.items())))
    if key in _ORACLES and _ORACLES[key].exists():
        return _ORACLES[key]
    out = tmp / "oracle" / f"{name}.png"
    out.parent.mkdir(exist_ok=True)
    r = generate(model, out, settings, **kw)
    _ORACLES[key] = r.images[0]
    return r.images[0]


def cell(cells: Path, ix: int, iy: int | None = None, iz: int | None = None) -> Path:
    name = f"cell-x{ix:02d}" + (f"-y{iy:02d}" if iy is not None else "") + (f"-z{iz:02d}" if iz is not None else "")
    return cells / f"{name}.png"


def test_cells_equal_generate(lib, tmp_path):
    cells = tmp_path / "cells"
    r = grid(lib / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis("seed=11,12"), parse_axis("cfg=2,7.5")], cells_dir=cells)
    assert r.shape == (2, 2, 1)
    assert len(r.cells) == 4 and r.loads == 1
    for ix, seed in enumerate((11, 12)):
        for iy, cfg in enumerate((2.0, 7.5)):
            want = oracle(tmp_path, f"s{seed}c{cfg}", lib / "a.safetensors", Settings(**{**BASE, "seed": seed, "cfg": cfg}))
            got = cell(cells, ix, iy)
            assert np.array_equal(pixels(got), pixels(want)), (seed, cfg)
            assert infotext(got) == infotext(want)
    # the grid carries the first cell's infotext (A1111), and holds the cells in their slots
    assert infotext(tmp_path / "g.png") == infotext(cell(cells, 0, 0))
    assert "Seed: 11" in infotext(tmp_path / "g.png")


def test_sampler_prompt_sr_and_clip_skip_cells_equal_generate(lib, tmp_path):
    cells = tmp_path / "cells"
    base = Settings(**{**BASE, "prompt": "a red cat on a red mat", "clip_skip": 2})
    grid(lib / "a.safetensors", tmp_path / "g.png", base,
         [parse_axis("sampler=Euler a,DDIM"), parse_axis("prompt=red,blue")], cells_dir=cells)
    for ix, sampler in enumerate(("Euler a", "DDIM")):
        for iy, colour in enumerate(("red", "blue")):
            s = Settings(**{**base.__dict__, "sampler": sampler, "prompt": f"a {colour} cat on a {colour} mat"})
            want = oracle(tmp_path, f"{ix}{iy}", lib / "a.safetensors", s)
            assert np.array_equal(pixels(cell(cells, ix, iy)), pixels(want)), (sampler, colour)
            assert infotext(cell(cells, ix, iy)) == infotext(want)


def test_size_and_steps_axes(lib, tmp_path):
    cells = tmp_path / "cells"
    r = grid(lib / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis("size=64x64,96x64"), parse_axis("steps=1-2")], cells_dir=cells, legend=False)
    with Image.open(tmp_path / "g.png") as g:
        assert g.size == r.size
    for ix, w in enumerate((64, 96)):
        for iy, steps in enumerate((1, 2)):
            s = Settings(**{**BASE, "width": w, "steps": steps})
            want = oracle(tmp_path, f"{w}-{steps}", lib / "a.safetensors", s)
            got = pixels(cell(cells, ix, iy))
            assert got.shape == (64, w, 3)
            assert np.array_equal(got, pixels(want))


def test_merge_axis_equals_merged_file_and_writes_no_model(lib, tmp_path):
    from ckptlab.merging import merge

    work = tmp_path / "work"
    work.mkdir()
    before = sorted(p.name for p in lib.iterdir())
    cells = work / "cells"
    r = grid(None, work / "g.png", Settings(**BASE), [parse_axis("alpha=0.25,0.8", merge_params=("alpha",))],
             merge=lib / "mix.toml", cells_dir=cells)
    assert r.loads == 1  # one pipeline; the second alpha recomputes the weights in place
    assert sorted(p.name for p in lib.iterdir()) == before
    assert sorted(p.name for p in work.rglob("*")) == ["cell-x00.png", "cell-x01.png", "cells", "g.png"]
    for ix, alpha in enumerate((0.25, 0.8)):
        merged = tmp_path / f"m{alpha}.safetensors"
        merge("weighted_sum", [lib / "a.safetensors", lib / "b.safetensors"], merged, params={"alpha": alpha})
        want = pixels(oracle(tmp_path, f"m{alpha}", merged, Settings(**BASE)))
        got = pixels(cell(cells, ix))
        assert np.abs(got - want).max() <= 1, alpha
        text = infotext(cell(cells, ix))
        assert "Model hash" not in text  # no file: no hash to claim
        assert f"alpha {alpha:g}" in text
    # the two alphas really differ (the sweep is not a no-op)
    assert not np.array_equal(pixels(cell(cells, 0)), pixels(cell(cells, 1)))


def test_merge_axis_from_a_merged_models_embedded_recipe(lib, tmp_path):
    from ckptlab.merging import merge

    merged = tmp_path / "m.safetensors"
    merge("weighted_sum", [lib / "a.safetensors", lib / "b.safetensors"], merged, params={"alpha": 0.3})
    r = grid(None, tmp_path / "g.png", Settings(**BASE), [parse_axis("merge:alpha=0.6")], merge=merged,
             cells_dir=tmp_path / "cells")
    assert r.loads == 1
    other = tmp_path / "m6.safetensors"
    merge("weighted_sum", [lib / "a.safetensors", lib / "b.safetensors"], other, params={"alpha": 0.6})
    want = pixels(oracle(tmp_path, "m6", other, Settings(**BASE)))
    assert np.abs(pixels(cell(tmp_path / "cells", 0)) - want).max() <= 1


def test_lora_axis_equals_generate_with_lora(lib, tmp_path):
    lora = lib / "style.safetensors"
    cells = tmp_path / "cells"
    r = grid(lib / "a.safetensors", tmp_path / "g.png", Settings(**BASE), [parse_axis("lora=0,0.5,1")],
             loras=[(lora, 1.0)], cells_dir=cells)
    assert r.loads == 1
    for ix, s in enumerate((0.0, 0.5, 1.0)):
        want = oracle(tmp_path, f"l{s}", lib / "a.safetensors", Settings(**BASE), loras=[(lora, s)])
        assert np.array_equal(pixels(cell(cells, ix)), pixels(want)), s
        assert infotext(cell(cells, ix)) == infotext(want)
    assert not np.array_equal(pixels(cell(cells, 0)), pixels(cell(cells, 2)))


def test_vae_axis_reloads_only_the_vae(lib, tmp_path, monkeypatch):
    cells = tmp_path / "cells"
    r = grid(lib / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis(f"vae=none,{lib / 'vae.safetensors'},none")], cells_dir=cells)
    assert r.loads == 1
    for ix, vae in enumerate((None, lib / "vae.safetensors", None)):
        want = oracle(tmp_path, f"v{ix}", lib / "a.safetensors", Settings(**BASE), vae=vae)
        assert np.array_equal(pixels(cell(cells, ix)), pixels(want)), vae
        assert infotext(cell(cells, ix)) == infotext(want)
    assert not np.array_equal(pixels(cell(cells, 0)), pixels(cell(cells, 1)))


class _Counting(render.Session):
    made: list = []

    def __init__(self, model, **kw):
        _Counting.made.append(Path(model).name)
        super().__init__(model, **kw)


def test_model_axis_loads_each_model_once(lib, tmp_path, monkeypatch):
    _Counting.made = []
    monkeypatch.setattr(render, "Session", _Counting)
    # model on the inner (x) axis: A1111 order would load 2 x 3 times; cost ordering loads each once
    r = grid(None, tmp_path / "g.png", Settings(**BASE),
             [parse_axis(f"model={lib / 'a.safetensors'},{lib / 'b.safetensors'}"), parse_axis("seed=1,2,3")],
             cells_dir=tmp_path / "cells")
    assert _Counting.made == ["a.safetensors", "b.safetensors"]
    assert r.loads == 2
    want = oracle(tmp_path, "b2", lib / "b.safetensors", Settings(**{**BASE, "seed": 2}))
    assert np.array_equal(pixels(cell(tmp_path / "cells", 1, 1)), pixels(want))


def test_grid_resaved_after_every_row(lib, tmp_path, monkeypatch):
    saved = []
    real = imagefile.save_image

    def spy(path, image, text, **kw):
        if Path(path).name == "g.png":
            saved.append(np.asarray(image.convert("RGB")).copy())
        return real(path, image, text, **kw)

    monkeypatch.setattr(imagefile, "save_image", spy)
    r = grid(lib / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis("seed=1,2"), parse_axis("cfg=1,2,3")], legend=False)
    assert len(saved) == 3 == r.saves  # one per row
    from ckptlab.imaging.grid_draw import layout

    lay = layout((64, 64), ["Seed: 1", "Seed: 2"], ["CFG: 1", "CFG: 2", "CFG: 3"], [""], [])
    for k, img in enumerate(saved):
        assert img.shape[:2] == (r.size[1], r.size[0])  # final size from the first save
        for iy in range(3):
            x, y = lay.box(0, iy, 0)
            grey = (img[y:y + 64, x:x + 64] == PENDING).all()
            assert grey == (iy > k), (k, iy)


def test_ctrl_c_leaves_whole_files_only(lib, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = render.Session.render

    def interrupted(self, s, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, s, **kw)

    monkeypatch.setattr(render.Session, "render", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        grid(lib / "a.safetensors", out / "g.png", Settings(**BASE), [parse_axis("seed=1,2"), parse_axis("cfg=1,2")],
             cells_dir=out / "cells")
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert names == ["cells", "cells/cell-x00-y00.png", "cells/cell-x00-y01.png", "cells/cell-x01-y00.png",
                     "g.png"]
    with Image.open(out / "g.png") as g:  # the grid of the first row, whole
        g.load()
    for p in (out / "cells").iterdir():
        with Image.open(p) as im:
            im.load()


def test_nothing_written_on_bad_input(lib, tmp_path):
    from ckptlab.errors import CkptlabError

    out = tmp_path / "out"
    out.mkdir()
    bad = [
        dict(model=lib / "a.safetensors", axes=[parse_axis("prompt=dog,cat")]),  # S/R text not in the prompt
        dict(model=None, axes=[parse_axis(f"model={lib / 'a.safetensors'},{lib / 'nope.safetensors'}")]),
        dict(model=lib / "a.safetensors", axes=[parse_axis("merge:alpha=0,1")]),  # no --merge
        dict(model=lib / "a.safetensors", axes=[parse_axis("lora=0,1")]),  # no --lora
        dict(model=lib / "a.safetensors", axes=[parse_axis("sampler=Euler,Nope")]),
        dict(model=lib / "a.safetensors", axes=[parse_axis("steps=0,2")]),
        dict(model=lib / "a.safetensors", axes=[parse_axis("merge:alpha=0,1")], merge=lib / "mix.toml"),
        dict(model=None, axes=[parse_axis("merge:beta=0,1")], merge=lib / "mix.toml"),
        dict(model=lib / "a.safetensors", axes=[parse_axis(f"vae={lib / 'nope.safetensors'}")]),
    ]
    for case in bad:
        with pytest.raises(CkptlabError) as e:
            grid(case["model"], out / "g.png", Settings(**BASE), case["axes"], merge=case.get("merge"),
                 cells_dir=out / "cells")
        assert "\n" not in str(e.value)
        assert list(out.iterdir()) == [], case


def test_cli_grid_merge_json(lib, tmp_path, cli):
    import json

    shutil.copy(lib / "mix.toml", tmp_path / "mix.toml")
    for n in ("a", "b"):
        (tmp_path / f"{n}.safetensors").symlink_to(lib / f"{n}.safetensors")
    r = cli("grid", "--merge", tmp_path / "mix.toml", "-p", "a cat", "--seed", "3", "--steps", "2", "--size", "64x64",
            "--x", "alpha=0,1", "--y", "cfg=3,7", "-o", tmp_path / "g.png", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["shape"] == [2, 2, 1] and rec["loads"] == 1 and rec["saves"] == 2
    with Image.open(tmp_path / "g.png") as g:
        assert list(g.size) == rec["size"]
