"""``ckptlab preview``: ``<stem>.preview.png`` next to each model with A1111's infotext, a user's preview never
replaced without --overwrite, models that cannot render reported while the others go on, recorded in the
catalog and printed by ``show``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from fakes.sample_files import make_model
from PIL import Image

from ckptlab.imaging.preview import DEFAULT_SEED, NEUTRAL_PROMPT, preview, preview_path
from ckptlab.imaging.render import Settings, generate

FAST = ["--steps", "2", "--size", "64x64", "--sampler", "Euler"]


def fast(prompt: str = "", **kw) -> Settings:
    return Settings(prompt, seed=kw.pop("seed", DEFAULT_SEED), steps=2, width=64, height=64, sampler="Euler", **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    make_model(d / "sd1.safetensors", "sd1_checkpoint")
    make_model(d / "lora.safetensors", "sd1_kohya_lora")
    make_model(d / "vae.safetensors", "sd1_vae")
    return d


@pytest.fixture
def lib(models, tmp_path):
    d = tmp_path / "lib"
    shutil.copytree(models, d)
    return d


def parse_a1111(text: str) -> tuple[str, dict[str, str]]:
    """An A1111-format reader written here (prompt lines, then the ``k: v, ...`` last line; JSON-quoted values)."""
    *head, last = text.strip().split("\n")
    params, i = {}, 0
    while i < len(last):
        k, _, rest = last[i:].partition(": ")
        if rest.startswith('"'):
            j = 1
            while rest[j] != '"':
                j += 2 if rest[j] == "\\" else 1
            params[k.strip()] = json.loads(rest[:j + 1])
            i += len(k) + 2 + j + 1 + 2
        else:
            v = rest.split(", ")[0]
            params[k.strip()] = v
            i += len(k) + 2 + len(v) + 2
    return "\n".join(h for h in head if not h.startswith("Negative prompt:")), params


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def test_preview_is_stem_preview_png_with_the_infotext_and_generates_pixels(lib, tmp_path):
    [r] = preview([str(lib / "sd1.safetensors")], fast(), device="cpu", db=tmp_path / "no.db")
    assert r.status == "written" and r.preview == lib / "sd1.preview.png" == preview_path(lib / "sd1.safetensors")
    with Image.open(r.preview) as im:
        assert im.format == "PNG"
        text = im.text["parameters"]
    prompt, params = parse_a1111(text)
    assert prompt == NEUTRAL_PROMPT  # no catalog: no trigger words
    assert params["Seed"] == str(DEFAULT_SEED) and params["Steps"] == "2" and params["Size"] == "64x64"
    assert params["Model"] == "sd1"
    assert params["Model hash"] == hashlib.sha256((lib / "sd1.safetensors").read_bytes()).hexdigest()[:10]
    # the same image `generate` makes with the same settings
    generate(lib / "sd1.safetensors", tmp_path / "g.png", fast(NEUTRAL_PROMPT), device="cpu")
    assert np.abs(pixels(r.preview) - pixels(tmp_path / "g.png")).max() == 0
    assert not [p for p in lib.iterdir() if p.name.startswith(".")]  # no temp file left


def test_a_users_preview_is_never_replaced_without_overwrite(lib):
    for name in ("sd1.preview.png", "sd1.jpg"):
        for p in lib.glob("sd1.*.png"):
            p.unlink()
        for p in lib.glob("sd1.jpg"):
            p.unlink()
        (lib / name).write_bytes(b"the user's own preview")
        [r] = preview([str(lib / "sd1.safetensors")], fast(), device="cpu")
        assert r.status == "skipped" and "has a preview" in r.warnings[0]
        assert (lib / name).read_bytes() == b"the user's own preview"
        assert not (lib / "sd1.preview.png").exists() or name == "sd1.preview.png"
    # --overwrite: our name is written; the other preview stays, named in a warning
    (lib / "sd1.preview.png").write_bytes(b"old")
    [r] = preview([str(lib / "sd1.safetensors")], fast(), device="cpu", overwrite=True)
    assert r.status == "written"
    assert (lib / "sd1.jpg").read_bytes() == b"the user's own preview"
    assert any("sd1.jpg" in w for w in r.warnings)
    with Image.open(lib / "sd1.preview.png") as im:
        assert "parameters" in im.text


def test_models_that_cannot_render_fail_one_line_each_and_the_others_go_on(lib):
    rs = preview([str(lib / "lora.safetensors"), str(lib / "vae.safetensors"), str(lib / "nope.safetensors"),
                  str(lib / "sd1.safetensors")], fast(), device="cpu")
    assert [r.status for r in rs] == ["failed", "failed", "failed", "written"]
    assert "--base" in rs[0].error and "\n" not in rs[1].error and "no such file" in rs[2].error
    assert sorted(p.name for p in lib.glob("*.png")) == ["sd1.preview.png"]


def test_a_lora_renders_on_base(lib, tmp_path):
    [r] = preview([str(lib / "lora.safetensors")], fast(), device="cpu", base=str(lib / "sd1.safetensors"))
    assert r.status == "written" and r.preview == lib / "lora.preview.png" and r.base == lib / "sd1.safetensors"
    with Image.open(r.preview) as im:
        prompt, params = parse_a1111(im.text["parameters"])
    assert prompt == f"{NEUTRAL_PROMPT} <lora:lora:1>"
    data = (lib / "lora.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert params["Lora hashes"] == f"lora: {hashlib.sha256(data[8 + n:]).hexdigest()[:12]}"
    assert params["Model"] == "sd1"
    generate(lib / "sd1.safetensors", tmp_path / "g.png", fast(NEUTRAL_PROMPT), device="cpu",
             loras=[(lib / "lora.safetensors", 1.0)])
    assert np.abs(pixels(r.preview) - pixels(tmp_path / "g.png")).max() == 0


def test_diffusers_folder_preview_goes_beside_the_folder(lib, tmp_path):
    from ckptlab.ops.diffusers_io import to_diffusers

    to_diffusers(lib / "sd1.safetensors", lib / "pipe")
    before = sorted(p.relative_to(lib / "pipe") for p in (lib / "pipe").rglob("*"))
    [r] = preview([str(lib / "pipe")], fast(), device="cpu")
    assert r.status == "written" and r.preview == lib / "pipe.preview.png"
    assert sorted(p.relative_to(lib / "pipe") for p in (lib / "pipe").rglob("*")) == before
    generate(lib / "sd1.safetensors", tmp_path / "g.png", fast(NEUTRAL_PROMPT), device="cpu")
    assert np.abs(pixels(r.preview) - pixels(tmp_path / "g.png")).max() == 0


def test_something_in_the_way_is_an_output_error(lib):
    (lib / "sd1.preview.png").mkdir()
    [r] = preview([str(lib / "sd1.safetensors")], fast(), device="cpu", overwrite=True)
    assert r.status == "failed" and "in the way" in r.error and r.exit_code == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_model_folder(lib):
    lib.chmod(0o555)
    try:
        [r] = preview([str(lib / "sd1.safetensors")], fast(), device="cpu")
    finally:
        lib.chmod(0o755)
    assert r.status == "failed" and "not writable" in r.error


# ---------------------------------------------------------------------------------------------------------------
# the catalog


def test_cli_records_the_preview_and_show_prints_it(lib, tmp_path, cli_in_process):
    cli = cli_in_process  # the entry point in this process; the real subprocess is the next test's
    db = tmp_path / "c.db"
    (lib / "sd1.json").write_text(json.dumps({"activation text": "mdjrny-v4 style", "sd version": "SD1"}))
    assert cli("scan", lib, "--hash", "--db", db).returncode == 0
    sha = hashlib.sha256((lib / "sd1.safetensors").read_bytes()).hexdigest()
    r = cli("preview", sha[:10], *FAST, "--db", db, "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.splitlines()[0])
    assert d["status"] == "written" and d["recorded"] is True and d["path"] == str(lib / "sd1.safetensors")
    # the trigger words the catalog knows (A1111's own <stem>.json activation text), then the neutral prompt
    assert d["prompt"] == f"mdjrny-v4 style, {NEUTRAL_PROMPT}"
    with Image.open(lib / "sd1.preview.png") as im:
        assert parse_a1111(im.text["parameters"])[0] == d["prompt"]
    shown = json.loads(cli("show", str(lib / "sd1.safetensors"), "--json", "--db", db).stdout.splitlines()[0])
    assert shown["preview"]["path"] == str(lib / "sd1.preview.png") and shown["preview"]["seed"] == DEFAULT_SEED
    assert shown["preview"]["exists"] is True
    text = cli("show", sha[:12], "--db", db).stdout
    assert f"  preview: {lib / 'sd1.preview.png'} (ckptlab preview, seed {DEFAULT_SEED})" in text


def test_cli_exit_status_after_a_failure_and_one_error_line(lib, cli, cli_in_process):
    r = cli("preview", lib / "vae.safetensors", lib / "sd1.safetensors", *FAST, "--device", "cpu")
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("ckptlab: error:")]
    assert len(errors) == 1 and "vae.safetensors" in errors[0] and "Traceback" not in r.stderr
    assert f"wrote {lib / 'sd1.preview.png'}" in r.stdout
    r = cli_in_process("preview", lib / "sd1.safetensors", *FAST, "--device", "cpu")
    assert r.returncode == 0 and f"skipped {lib / 'sd1.safetensors'}" in r.stdout and "--overwrite" in r.stderr


def test_default_prompt_uses_the_trigger_words_the_catalog_knows(tmp_path):
    """A LoRA's own metadata (dataset folder token, then its most frequent tags: the first three), and where
    CivitAI states trained words (a Civitai Helper sidecar here) those instead."""
    from fakes.library_files import tensors, write_st

    from ckptlab.imaging.preview import default_prompt
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan

    lib = tmp_path / "lib"
    freq = {"10_zkz woman": {"zkz woman": 10, "smile": 7, "outdoors": 4, "hat": 2}}
    lora = write_st(lib / "zkz.safetensors", tensors("sd1_kohya_lora", seed=2),
                    metadata={"ss_tag_frequency": json.dumps(freq)})
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([lib], cat, hash=True)
    assert default_prompt(lora, db) == f"zkz woman, smile, outdoors, {NEUTRAL_PROMPT}"
    assert default_prompt(lora, tmp_path / "none.db") == NEUTRAL_PROMPT
    (lib / "zkz.civitai.info").write_text(json.dumps({"modelId": 1, "id": 2, "trainedWords": ["zkzw", "red hat"],
                                                      "files": []}))
    assert default_prompt(lora, db) == f"zkzw, red hat, {NEUTRAL_PROMPT}"
