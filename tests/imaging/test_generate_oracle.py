"""``generate`` images against diffusers' own pipeline (``from_single_file`` with configs written in the test).

Same seed (``torch.Generator("cpu").manual_seed``), same scheduler (diffusers' idiom ``Cls.from_config(
pipe.scheduler.config, **overrides)`` on the model's own scheduler config): the PNG pixels must agree within 1/255.
Every case also checks that what it varies (sampler, schedule, prediction type) changes the oracle's image, so
a setting we silently ignored could not pass.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from ckptlab.imaging.render import Settings, generate  # noqa: E402
from tests.fakes.diffusers_oracle import (  # noqa: E402
    max_diff,
    oracle_pipe,
    pixels,
    run_oracle,
    set_scheduler,
    write_config_dir,
)
from tests.fakes.sample_files import make_model  # noqa: E402

SEED = 1234
PROMPT = "a lighthouse at dusk, oil painting"
NEG = "blurry"

MODELS = {  # id -> (sample spec, family, v-prediction)
    "sd1": ("sd1_checkpoint", "sd1", False),
    "sd2": ("sd2_checkpoint", "sd2", False),
    "sd2v": ("sd2_768_v", "sd2", True),
    "sdxl": ("sdxl_checkpoint", "sdxl", False),
}


class Oracles:
    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, Path] = {}
        self.pipes: dict[str, object] = {}

    def model(self, mid: str) -> Path:
        if mid not in self.files:
            spec = MODELS[mid][0]
            self.files[mid] = make_model(self.root / f"{spec}.safetensors", spec)
        return self.files[mid]

    def pipe(self, mid: str):
        if mid not in self.pipes:
            _, fam, v = MODELS[mid]
            cdir = write_config_dir(self.root / f"config-{mid}", fam, v=v)
            self.pipes[mid] = oracle_pipe(self.model(mid), cdir, fam)
        return self.pipes[mid]


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    o = Oracles(tmp_path_factory.mktemp("oracle"))
    yield o
    o.pipes.clear()
    gc.collect()


def ours(model: Path, out: Path, sampler: str, schedule: str | None = None, *, steps=3, size=(64, 64), seed=SEED,
         prompt=PROMPT, negative=NEG, cfg=7.0):
    r = generate(model, out, Settings(prompt, negative, seed, steps, cfg, size[0], size[1], sampler, schedule),
                 device="cpu", overwrite=True)
    assert r.images == [out] and r.seeds == [seed] and r.dtype == "float32"
    return pixels(out)


CASES = [
    ("sd1", "DPM++ 2M", None), ("sd1", "Euler a", None), ("sd1", "DPM++ 2M SDE", None), ("sd1", "DDIM", None),
    ("sd1", "UniPC", None), ("sd1", "DPM++ 2M", "karras"),
    ("sd2", "Euler a", None), ("sd2v", "DDIM", None),
    ("sdxl", "Euler a", None), ("sdxl", "DPM++ 2M SDE", "karras"),
]


@pytest.mark.parametrize(("mid", "sampler", "schedule"), CASES, ids=[f"{m}-{s}-{k or 'auto'}" for m, s, k in CASES])
def test_image_equals_diffusers_pipeline(oracles, tmp_path, mid, sampler, schedule):
    pipe = set_scheduler(oracles.pipe(mid), sampler, karras=schedule == "karras")
    want = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    got = ours(oracles.model(mid), tmp_path / "out.png", sampler, schedule)
    assert max_diff(got, want) <= 1
    # the setting under test matters: the oracle with another sampler (or without karras) differs clearly
    other = "DDIM" if sampler != "DDIM" else "DPM++ 2M"
    pipe = set_scheduler(pipe, other if schedule is None else sampler, karras=False)
    different = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    assert max_diff(different, want) > 8


def test_v_prediction_is_used(oracles, tmp_path):
    """The SD2 768-v sample says v in its modelspec: the same weights run as eps would give another image."""
    pipe = set_scheduler(oracles.pipe("sd2v"), "DPM++ 2M")
    want = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    cfg = dict(pipe.scheduler.config)
    assert cfg["prediction_type"] == "v_prediction"
    import diffusers

    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config({**cfg, "prediction_type": "epsilon"})
    as_eps = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    got = ours(oracles.model("sd2v"), tmp_path / "v.png", "DPM++ 2M")
    assert max_diff(got, want) <= 1 and max_diff(got, as_eps) > 8


def test_v_pred_key_without_metadata(oracles, tmp_path):
    """A file that says v only through a top-level ``v_pred`` key (NoobAI/kohya convention) is run as v."""
    from safetensors.torch import load_file, save_file

    src = oracles.model("sd2")
    sd = load_file(str(src))
    import torch

    sd["v_pred"] = torch.zeros(0)
    vfile = tmp_path / "sd2-vpred.safetensors"
    save_file(sd, str(vfile))
    pipe = oracle_pipe(vfile, write_config_dir(tmp_path / "cfg", "sd2", v=True), "sd2")
    set_scheduler(pipe, "Euler")
    want = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=3, cfg=7.0, size=(64, 64))
    assert max_diff(ours(vfile, tmp_path / "o.png", "Euler"), want) <= 1


def test_default_size_is_the_family_native_size(oracles, tmp_path):
    """No --size: SD1 renders 512x512 (A1111's default for SD1); 1 step keeps it cheap."""
    r = generate(oracles.model("sd1"), tmp_path / "n.png", Settings("x", steps=1, seed=1), device="cpu")
    assert pixels(r.images[0]).shape == (512, 512, 3)


def test_non_square_size(oracles, tmp_path):
    pipe = set_scheduler(oracles.pipe("sd1"), "Euler")
    want = run_oracle(pipe, prompt=PROMPT, negative="", seed=7, steps=2, cfg=5.0, size=(96, 64))
    got = ours(oracles.model("sd1"), tmp_path / "w.png", "Euler", steps=2, size=(96, 64), seed=7, negative="",
               cfg=5.0)
    assert got.shape == (64, 96, 3) and max_diff(got, want) <= 1


# -- a real-size SD1.5 (random fp16 weights, SD1.5's real shapes) ---------------------------------------------------
@pytest.fixture(scope="module")
def real_sd15(tmp_path_factory):
    from ckptlab.sample.build import write_model

    root = tmp_path_factory.mktemp("real")
    path = write_model(root / "real-sd15.safetensors", "sd1_checkpoint", small=False, dtype="F16")
    yield path, root
    path.unlink(missing_ok=True)
    gc.collect()


def test_real_size_sd15_equals_diffusers(real_sd15):
    path, root = real_sd15
    assert path.stat().st_size > 1_900_000_000  # the real SD1.5 parameter count in fp16
    pipe = set_scheduler(oracle_pipe(path, write_config_dir(root / "config", "sd1", small=False), "sd1"), "DPM++ 2M")
    want = run_oracle(pipe, prompt=PROMPT, negative=NEG, seed=SEED, steps=2, cfg=7.0, size=(64, 64))
    del pipe
    gc.collect()
    got = ours(path, root / "real.png", "DPM++ 2M", steps=2)
    assert max_diff(got, want) <= 1
