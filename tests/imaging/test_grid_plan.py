"""The grid's bookkeeping with a stand-in renderer (no weights): which settings each cell gets, seeds, loop
order and loads, Prompt S/R, the merge recipe's parameters, the JSON record. The real renderer is in
test_grid_run.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from ckptlab.errors import UsageError  # noqa: E402
from ckptlab.imaging import imagefile, render  # noqa: E402
from ckptlab.imaging.grid import grid  # noqa: E402
from ckptlab.imaging.grid_axes import parse_axis  # noqa: E402
from ckptlab.imaging.render import Settings  # noqa: E402
from tests.fakes.sample_files import make_model  # noqa: E402


class FakeSession:
    """Records what it was opened with and every render; renders a flat image whose colour encodes the seed."""

    opened: list = []
    rendered: list = []

    def __init__(self, model, *, vae=None, loras=(), refiner=None, device="auto", dtype=None, cache=None,
                 source=None):
        FakeSession.opened.append((Path(model).name, vae, list(loras)))
        self.warnings = []
        self.identity = render.Identity(Path(model))
        self.family = "sd1"

    def render(self, s, **kw):
        FakeSession.rendered.append((FakeSession.opened[-1][0], Settings(**s.__dict__)))
        w, h = s.width or 512, s.height or 512
        return Image.new("RGB", (w, h), (s.seed % 256, s.steps, int(s.cfg))), s.seed, (w, h)

    def infotext(self, s, seed, size):
        return f"{s.prompt}\nNegative prompt: {s.negative}\nSeed: {seed}, Steps: {s.steps}, Size: {size[0]}x{size[1]}"

    def close(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    FakeSession.opened, FakeSession.rendered = [], []
    monkeypatch.setattr(render, "Session", FakeSession)
    return FakeSession


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    make_model(d / "a.safetensors", "sd1_checkpoint", dtype="F16")
    make_model(d / "b.safetensors", "sd1_checkpoint", dtype="F16", seed=1)
    make_model(d / "sdxl_vae.safetensors", "sdxl_vae", dtype="F16")  # the name tells its family
    return d


BASE = dict(prompt="a red cat", negative="red eyes", seed=7, steps=2, cfg=5.0, width=64, height=64)


def test_random_seed_is_one_for_the_whole_grid(fake, models, tmp_path):
    r = grid(models / "a.safetensors", tmp_path / "g.png", Settings(**{**BASE, "seed": -1}),
             [parse_axis("cfg=1,2,3"), parse_axis("steps=1,2")])
    seeds = {s.seed for _, s in fake.rendered}
    assert len(seeds) == 1 and seeds.pop() >= 0
    assert len(set(r.seeds)) == 1


def test_seed_axis_minus_one_is_random_per_value(fake, models, tmp_path):
    grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=5,-1,-1")])
    seeds = [s.seed for _, s in fake.rendered]
    assert seeds[0] == 5 and all(0 <= x for x in seeds) and seeds[1] != seeds[2]


def test_each_cell_gets_its_settings_and_grid_the_first_infotext(fake, models, tmp_path):
    r = grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis("prompt=red,blue"), parse_axis("clip-skip=1,2"), parse_axis("sampler=Euler,DDIM")],
             cells_dir=tmp_path / "cells")
    got = [(s.prompt, s.negative, s.clip_skip, s.sampler) for _, s in fake.rendered]
    # A1111's loop order z, y, x; Prompt S/R also in the negative prompt
    assert got == [(p, n, c, smp) for smp in ("Euler", "DDIM") for c in (1, 2)
                   for p, n in (("a red cat", "red eyes"), ("a blue cat", "blue eyes"))]
    assert r.shape == (2, 2, 2) and len(r.cells) == 8
    assert sorted(p.name for p in (tmp_path / "cells").iterdir())[:2] == ["cell-x00-y00-z00.png",
                                                                           "cell-x00-y00-z01.png"]
    with Image.open(tmp_path / "g.png") as g:
        assert imagefile.read_text_chunks(g)["parameters"] == r.infotext
    with Image.open(tmp_path / "cells" / "cell-x01-y01-z01.png") as c:
        text = imagefile.read_text_chunks(c)["parameters"]
    assert text.startswith("a blue cat\nNegative prompt: blue eyes")


def test_model_axis_outermost_whatever_its_place(fake, models, tmp_path):
    a, b = models / "a.safetensors", models / "b.safetensors"
    r = grid(None, tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=1,2"), parse_axis("cfg=3,4"),
                                                         parse_axis(f"model={a},{b}")])
    assert [o[0] for o in fake.opened] == ["a.safetensors", "b.safetensors"] and r.loads == 2
    fake.opened.clear()
    r = grid(None, tmp_path / "g2.png", Settings(**BASE), [parse_axis(f"model={a},{b}"), parse_axis("seed=1,2,3")])
    assert [o[0] for o in fake.opened] == ["a.safetensors", "b.safetensors"] and r.loads == 2
    assert [m for m, _ in fake.rendered[-6:]] == ["a.safetensors"] * 3 + ["b.safetensors"] * 3


def test_vae_of_another_family_refused_before_loading(fake, models, tmp_path):
    from ckptlab.errors import CkptlabError

    with pytest.raises(CkptlabError):
        grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis(f"vae=none,{models / 'sdxl_vae.safetensors'}")])
    assert fake.opened == [] and list(tmp_path.iterdir()) == []


def test_existing_outputs_refused_unless_overwrite(fake, models, tmp_path):
    from ckptlab.errors import OutputError

    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "cell-x01.png").write_bytes(b"keep")
    with pytest.raises(OutputError):
        grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=1,2")],
             cells_dir=cells)
    assert (cells / "cell-x01.png").read_bytes() == b"keep" and not (tmp_path / "g.png").exists()
    grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=1,2")], cells_dir=cells,
         overwrite=True)
    with Image.open(cells / "cell-x01.png") as im:
        assert im.getpixel((0, 0))[0] == 2


def test_axis_twice_and_model_conflicts(fake, models, tmp_path):
    with pytest.raises(UsageError, match="twice"):
        grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=1"), parse_axis("seed=2")])
    with pytest.raises(UsageError, match="either MODEL or a model axis"):
        grid(models / "a.safetensors", tmp_path / "g.png", Settings(**BASE),
             [parse_axis(f"model={models / 'b.safetensors'}")])
    with pytest.raises(UsageError, match="give a MODEL"):
        grid(None, tmp_path / "g.png", Settings(**BASE), [parse_axis("seed=1")])


def test_merge_params_of_a_recipe(tmp_path):
    from ckptlab.imaging.grid_merge import find_param, swept_params
    from ckptlab.merging.recipe import loads

    rec = loads('version = 1\n[inputs.A]\npath = "a"\n[inputs.B]\npath = "b"\n[inputs.C]\npath = "c"\n'
                '[[steps]]\nname = "one"\nmethod = "weighted_sum"\ninputs = ["A", "B"]\nalpha = 0.3\n'
                '[[steps]]\nname = "two"\nmethod = "add_difference"\ninputs = ["one", "C", "A"]\nalpha = 1\n')
    params = swept_params(rec)
    assert "alpha" in params and "one.alpha" in params and "two.alpha" in params
    assert find_param(rec, "alpha") == (1, "alpha")
    assert find_param(rec, "one.alpha") == (0, "alpha")
    with pytest.raises(UsageError, match="no step"):
        find_param(rec, "three.alpha")
    with pytest.raises(UsageError, match="takes"):
        find_param(rec, "one.beta")


def test_jpeg_grid_and_cells_carry_infotext_in_exif(fake, models, tmp_path):
    r = grid(models / "a.safetensors", tmp_path / "g.jpg", Settings(**BASE), [parse_axis("seed=1,2")],
             cells_dir=tmp_path / "cells")
    assert [p.name for p in r.cells] == ["cell-x00.jpg", "cell-x01.jpg"]
    with Image.open(tmp_path / "g.jpg") as g:
        assert g.format == "JPEG" and imagefile.read_text_chunks(g)["parameters"] == r.infotext
