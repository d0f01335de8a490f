"""The public API's image functions (``ckptlab.generate/grid/images/preview``) do what the commands do.

Oracles: the CLI run in a subprocess on the same model and settings (pixels and infotext must be identical), and
hashlib for the hash the catalog resolves."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from fakes.sample_files import make_model

pytest.importorskip("diffusers")
from PIL import Image  # noqa: E402

import ckptlab  # noqa: E402

ARGS = dict(seed=7, steps=2, size="64x64", device="cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "tiny-sd1.safetensors", "sd1_checkpoint")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_equals_the_command(model, tmp_path, cli_in_process):
    r = ckptlab.generate(model, tmp_path / "api.png", "a red barn, dusk: calm", negative="blurry", **ARGS)
    assert r.images == [tmp_path / "api.png"] and r.seeds == [7] and r.family == "sd1"
    c = cli_in_process("generate", model, "-p", "a red barn, dusk: calm", "-n", "blurry", "--seed", "7", "--steps", "2",
            "--size", "64x64", "--device", "cpu", "-o", tmp_path / "cli.png")
    assert c.returncode == 0, c.stderr
    assert np.array_equal(pixels(tmp_path / "api.png"), pixels(tmp_path / "cli.png"))
    assert Image.open(tmp_path / "api.png").text["parameters"] == Image.open(tmp_path / "cli.png").text["parameters"]
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    assert f"Model hash: {sha[:10]}, Model: tiny-sd1" in r.infotexts[0]


def test_grid_cells_are_generate_images(model, tmp_path):
    r = ckptlab.grid(model, tmp_path / "g.png", "a red barn", x="seed=7,8", cells=tmp_path / "cells", **ARGS)
    assert r.shape == (2, 1, 1) and len(r.cells) == 2 and (tmp_path / "g.png").is_file()
    for seed, cell in zip((7, 8), sorted(r.cells), strict=True):
        one = ckptlab.generate(model, tmp_path / f"one-{seed}.png", "a red barn", **{**ARGS, "seed": seed})
        assert np.array_equal(pixels(cell), pixels(one.images[0]))


def test_images_reads_back_and_resolves_through_the_catalog(model, tmp_path):
    out = ckptlab.generate(model, tmp_path / "made.png", "a lighthouse", **ARGS).images[0]
    unresolved = ckptlab.images(out)
    assert len(unresolved) == 1 and unresolved[0].prompt == "a lighthouse"
    assert unresolved[0].params["Seed"] == "7" and unresolved[0].params["Steps"] == "2"
    db = tmp_path / "lib.db"
    ckptlab.scan(model.parent, db=db, hash=True)
    [rep] = ckptlab.images(out, db=db)
    ckpt = [m for m in rep.models if m.role == "checkpoint"]
    assert ckpt and ckpt[0].status == "found"
    assert ckpt[0].sha256.lower() == hashlib.sha256(model.read_bytes()).hexdigest()
    # recorded: show lists the image as made with the model
    [shown] = ckptlab.show(model, db=db)
    assert json.loads(json.dumps(shown, default=str))["images"]["count"] == 1


def test_preview_writes_the_a1111_name_once(model, tmp_path):
    import shutil

    m = tmp_path / "mine.safetensors"
    shutil.copyfile(model, m)
    [r] = ckptlab.preview(m, prompt="a quiet harbour", steps=2, size=64, device="cpu")
    assert r.status == "written" and r.preview == tmp_path / "mine.preview.png"
    assert Image.open(r.preview).text["parameters"].startswith("a quiet harbour\nSteps: 2,")
    [again] = ckptlab.preview(m, prompt="something else", steps=2, size=64, device="cpu")
    assert again.status == "skipped"
    assert Image.open(r.preview).text["parameters"].startswith("a quiet harbour\n")


def test_an_image_too_big_for_webp_is_one_error_and_no_file(tmp_path):
    """WebP stops at 16,383 pixels a side (a wide grid reaches that): an ``OutputError``, not an internal error."""
    from ckptlab.errors import OutputError
    from ckptlab.imaging.imagefile import save_image

    with pytest.raises(OutputError, match="WEBP"):
        save_image(tmp_path / "wide.webp", Image.new("RGB", (17000, 8)), "x")
    assert list(tmp_path.iterdir()) == []


def test_sd2_without_metadata_says_its_prediction_was_guessed(tmp_path):
    """An SD2 file with no metadata: the prediction comes from identify's one-tensor heuristic through the LoRA
    overlay (which once hid the file's raw reader, so the heuristic never ran), and the user is told."""
    m = make_model(tmp_path / "sd2.safetensors", "sd2_checkpoint")
    r = ckptlab.generate(m, tmp_path / "o.png", "x", **ARGS)
    assert any("guessed" in w for w in r.warnings), r.warnings


def test_an_sd3_sampler_that_cannot_work_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """SD3 is flow matching: DPM++ 2M is refused before a weight is read (it was refused only after the load)."""
    import ckptlab.imaging.weights as weights
    from ckptlab.errors import UsageError

    def fail(*a, **kw):
        raise AssertionError("a weight was read before the refusal")

    monkeypatch.setattr(weights, "value_of", fail)
    m = make_model(tmp_path / "sd3.safetensors", "sd3_medium")
    with pytest.raises(UsageError, match="does not work on SD3"):
        ckptlab.generate(m, tmp_path / "o.png", "x", sampler="DPM++ 2M", **ARGS)
    assert not (tmp_path / "o.png").exists()


def test_lora_hash_is_autov3_computed_by_hand(tmp_path):
    """The infotext's LoRA hash: SHA-256 of the bytes after the 8-byte length and the header (AutoV3)."""
    import struct

    from fakes.models import lora_bytes

    from ckptlab.imaging.render import lora_hash

    data = lora_bytes()
    (tmp_path / "l.safetensors").write_bytes(data)
    (n,) = struct.unpack("<Q", data[:8])
    assert lora_hash(tmp_path / "l.safetensors") == hashlib.sha256(data[8 + n:]).hexdigest()
    (tmp_path / "l.pt").write_bytes(b"PK not safetensors")
    assert lora_hash(tmp_path / "l.pt") == hashlib.sha256(b"PK not safetensors").hexdigest()
