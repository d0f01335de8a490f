"""``ckptlab images`` as a user runs it: folders, bad files among good ones, --json, --missing, the links that
``show`` and ``ls`` then report."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest


def save_png(path: Path, **texts) -> Path:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def text_for(model_hash: str, lora: str = "add_detail", lora_hash: str = "0123456789ab") -> str:
    return (f"a cat <lora:{lora}:0.7>\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, "
            f'Size: 8x8, Model hash: {model_hash}, Model: v15, Lora hashes: "{lora}: {lora_hash}", '
            f'TI hashes: "easyneg: c74b4e810b03"')


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan
    from ckptlab.sample.build import write_model

    root = tmp_path_factory.mktemp("lib")
    write_model(root / "v15.safetensors", "sd1_checkpoint", small=True)
    write_model(root / "add_detail.safetensors", "sd1_kohya_lora", small=True)
    db = tmp_path_factory.mktemp("db") / "cat.db"
    with Catalog(db) as cat:
        scan([root], cat, hash=True)
    return root, db


@pytest.fixture
def setup(lib, tmp_path):
    """A fresh copy of the catalog, and a folder of images: two that use the library's checkpoint, one ComfyUI,
    a text file and a hidden folder (both skipped), and a symlink loop."""
    root, db = lib
    mine = tmp_path / "cat.db"
    shutil.copyfile(db, mine)
    imgs = tmp_path / "imgs"
    h10 = sha(root / "v15.safetensors")[:10]
    save_png(imgs / "a.png", parameters=text_for(h10))
    save_png(imgs / "sub" / "b.png", parameters=text_for(h10))
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v15.safetensors"}}}
    save_png(imgs / "sub" / "c.PNG", prompt=json.dumps(graph))
    (imgs / "notes.txt").write_text("not an image")
    save_png(imgs / ".hidden" / "h.png", parameters=text_for(h10))
    os.symlink(imgs, imgs / "sub" / "loop")
    return root, mine, imgs


def test_folder_report(cli, setup):
    root, db, imgs = setup
    r = cli("images", "--db", db, imgs)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout
    headers = [ln for ln in out.splitlines() if not ln.startswith(" ")]
    assert headers == [f"{imgs / 'a.png'}  (a1111, 8x8)", f"{imgs / 'sub' / 'b.png'}  (a1111, 8x8)",
                       f"{imgs / 'sub' / 'c.PNG'}  (comfyui, 8x8)"]
    assert out.count(f"-> {root / 'v15.safetensors'} by sha256[:10] (AutoV2)") == 2
    assert f"-> {root / 'v15.safetensors'} by name" in out
    assert out.count("MISSING") == 4  # add_detail (other bytes) and easyneg, twice
    assert "has this name but other bytes" in out
    assert "  settings: Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 8x8" in out


def test_json_lines(cli, setup):
    root, db, imgs = setup
    r = cli("images", "--json", "--db", db, imgs / "a.png")
    assert r.returncode == 0, r.stderr
    (obj,) = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert obj["prompt"] == "a cat <lora:add_detail:0.7>" and obj["negative"] == "ugly"
    assert obj["params"]["Lora hashes"] == "add_detail: 0123456789ab"
    ck = obj["models"][0]
    assert (ck["role"], ck["name"], ck["hashes"], ck["status"], ck["sha256"]) == (
        "checkpoint", "v15", [sha(root / "v15.safetensors")[:10]], "found", sha(root / "v15.safetensors").upper())


def test_missing(cli, setup):
    root, db, imgs = setup
    r = cli("images", "--missing", "--db", db, imgs)
    assert r.returncode == 0, r.stderr  # a report: models missing is no failure
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["KIND", "IMAGES", "HASH", "NAME"]
    assert lines[1].split() == ["embedding", "2", "c74b4e810b03", "easyneg"]  # most used first, then by kind
    assert lines[2].split()[:4] == ["lora", "2", "0123456789ab", "add_detail"]
    assert "has this name but other bytes" in lines[2]
    assert lines[-1] == "2 model(s) missing, named by 3 image(s) read"
    r = cli("images", "--missing", "--json", "--db", db, imgs)
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [(x["role"], x["name"], x["images"]) for x in rows] == [("embedding", "easyneg", 2), ("lora", "add_detail", 2)]
    assert rows[1]["examples"] == [str(imgs / "a.png"), str(imgs / "sub" / "b.png")]


def test_bad_files_are_one_line_each_and_the_rest_goes_on(cli, setup):
    root, db, imgs = setup
    (imgs / "junk.png").write_bytes(b"this is text, not a PNG")
    good = (imgs / "a.png").read_bytes()
    (imgs / "cut.png").write_bytes(good[: len(good) // 2])
    r = cli("images", "--db", db, imgs, imgs / "nope.png")
    assert r.returncode == 1
    errors = r.stderr.splitlines()
    assert len(errors) == 3
    assert errors[0].startswith(f"ckptlab: error: {imgs / 'cut.png'}: truncated PNG")
    assert errors[1:] == [f"ckptlab: error: {imgs / 'junk.png'}: not a PNG, JPEG or WebP image",
                          f"ckptlab: error: {imgs / 'nope.png'}: no such file or folder"]
    assert r.stdout.count("(a1111, 8x8)") == 2 and "(comfyui, 8x8)" in r.stdout


def test_links_recorded_and_shown(cli, setup):
    root, db, imgs = setup
    assert cli("images", "--db", db, imgs).returncode == 0
    assert cli("images", "--db", db, imgs / "a.png").returncode == 0  # again: replaced, not added
    r = cli("show", "--db", db, root / "v15.safetensors")
    assert "  images made with it: 3 (as checkpoint), latest:" in r.stdout
    for name in ("a.png", "sub/b.png", "sub/c.PNG"):
        assert f"    - {imgs / name}" in r.stdout
    d = json.loads(cli("show", "--json", "--db", db, root / "v15.safetensors").stdout)
    assert d["images"]["count"] == 3 and d["images"]["roles"] == ["checkpoint"]
    rows = {Path(x["path"]).name: x for x in map(json.loads, cli("ls", "--json", "--db", db).stdout.splitlines())}
    assert rows["v15.safetensors"]["images"] == 3 and rows["add_detail.safetensors"]["images"] is None
    # the image now names another model: its old link goes
    save_png(imgs / "a.png", parameters=text_for("ffffffffff"))
    assert cli("images", "--db", db, imgs / "a.png").returncode == 0
    d = json.loads(cli("show", "--json", "--db", db, root / "v15.safetensors").stdout)
    assert d["images"]["count"] == 2


def test_without_a_catalog(cli, setup, tmp_path):
    root, db, imgs = setup
    env = {"CKPTLAB_DB": str(tmp_path / "none.db")}
    r = cli("images", "--json", imgs / "a.png", env=env)
    assert r.returncode == 0
    assert r.stderr.startswith("ckptlab: warning: no catalog at") and len(r.stderr.splitlines()) == 1
    obj = json.loads(r.stdout)
    assert {m["status"] for m in obj["models"]} == {"unchecked"}
    assert not (tmp_path / "none.db").exists()
    r = cli("images", "--missing", imgs / "a.png", env=env)
    assert r.returncode == 2 and "--missing needs a catalog" in r.stderr
    r = cli("images", "--json", imgs / "a.png", env={"CKPTLAB_DB": str(db)})  # the default catalog, as elsewhere
    assert r.returncode == 0 and r.stderr == "" and json.loads(r.stdout)["models"][0]["status"] == "found"
    r = cli("images", "--db", tmp_path / "typo.db", imgs / "a.png")
    assert r.returncode == 1 and "no catalog here yet" in r.stderr


def test_a_catalog_that_cannot_be_written_is_a_warning(setup, monkeypatch, capsys):
    """The links are a by-product: a read-only or locked catalog leaves the report intact (exit 0, one warning).
    The failure is injected where the write happens (as root, file modes cannot make a catalog read-only)."""
    from ckptlab.cli import main as cli_main
    from ckptlab.errors import CatalogWriteError
    from ckptlab.library import image_links

    root, db, imgs = setup

    def refuse(cat, images):
        raise CatalogWriteError("cannot write the catalog: the catalog is read-only", cat.path)

    monkeypatch.setattr(image_links, "record", refuse)
    with pytest.raises(SystemExit) as ei:
        cli_main.main(["images", "--db", str(db), str(imgs / "a.png")])
    out = capsys.readouterr()
    assert ei.value.code in (0, None)
    assert out.err.startswith("ckptlab: warning: ") and "links from images to models were not recorded" in out.err
    assert f"-> {root / 'v15.safetensors'}" in out.out


def test_an_image_from_ckptlab_generate_reads_back_to_its_model(cli, cli_in_process, lib, tmp_path):
    """The closed loop: `ckptlab generate` writes A1111's infotext, `ckptlab images` finds the model by it
    (generate through the CLI entry point in this process: it pays no torch import in a subprocess)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    root, db = lib
    mine = tmp_path / "cat.db"
    shutil.copyfile(db, mine)
    out = tmp_path / "gen.png"
    r = cli_in_process("generate", root / "v15.safetensors", "-p", "a lighthouse, <lora:add_detail:0.5>", "--steps", "2",
            "--size", "64x64", "--seed", "7", "-o", out, "--db", mine)
    assert r.returncode == 0, r.stderr
    r = cli("images", "--json", "--db", mine, out)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["generator"] == "a1111" and obj["prompt"] == "a lighthouse, <lora:add_detail:0.5>"
    assert obj["params"]["Seed"] == "7" and obj["params"]["Size"] == "64x64" and obj["params"]["Steps"] == "2"
    ck, lo = obj["models"]
    assert (ck["role"], ck["hashes"], ck["status"], ck["matched_by"]) == (
        "checkpoint", [sha(root / "v15.safetensors")[:10]], "found", "sha256[:10] (AutoV2)")
    assert (lo["role"], lo["name"], lo["weight"], lo["status"]) == ("lora", "add_detail", 0.5, "found")
