"""``ckptlab images``: the models images name, found in a real catalog (sample files scanned with ``--hash``).

The hashes images carry are computed here with hashlib/blake3 from the files' bytes (the definitions in the
reference: sha256[:10], AutoV3 = SHA-256 after the safetensors header, AutoV1 = SHA-256 of 64 KiB at 1 MiB), never
taken from ckptlab.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from ckptlab.imaging.images import CatalogIndex, missing_models, resolve_image
from ckptlab.imaging.metadata import read_metadata


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def autov3(p: Path) -> str:
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def autov1(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()[0x100000:0x110000]).hexdigest()[:8]


def blake3_of(p: Path) -> str:
    import blake3

    return blake3.blake3(p.read_bytes()).hexdigest()


def save_png(path: Path, **texts) -> Path:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def infotext(prompt: str, **params) -> str:
    base = {"Steps": 4, "Sampler": "Euler", "CFG scale": 7, "Seed": 1}
    from ckptlab.imaging.infotext import format_infotext

    return format_infotext(prompt, "", base | {k.replace("_", " "): v for k, v in params.items()})


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A library: an SD1 checkpoint (and a byte copy of it), two small LoRAs (under 1 MiB: the same AutoV1, as all
    small files have), a VAE; catalogued with hashes; a CivitAI Helper sidecar names the first LoRA's version."""
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan
    from ckptlab.sample.build import write_model

    root = tmp_path_factory.mktemp("lib")
    write_model(root / "v15.safetensors", "sd1_checkpoint", small=True)
    (root / "copies").mkdir()
    shutil.copyfile(root / "v15.safetensors", root / "copies" / "v15-copy.safetensors")
    write_model(root / "add_detail.safetensors", "sd1_kohya_lora", small=True)
    write_model(root / "locon_style.safetensors", "sd1_locon", small=True)
    write_model(root / "vae-ft-mse.safetensors", "sd1_vae", small=True)
    (root / "add_detail.civitai.info").write_text(json.dumps({"id": 62833, "modelId": 58390, "name": "v1",
                                                              "model": {"name": "Detail Tweaker"}, "files": []}))
    db = tmp_path_factory.mktemp("db") / "cat.db"
    with Catalog(db) as cat:
        scan([root], cat, hash=True)
    return root, db


@pytest.fixture(scope="module")
def index(lib):
    from ckptlab.library.catalog import Catalog

    with Catalog(lib[1], must_exist=True) as cat:
        return CatalogIndex.from_catalog(cat)


def resolve(tmp_path, index, text=None, **texts):
    p = save_png(tmp_path / "img.png", **({"parameters": text} if text is not None else texts))
    return resolve_image(read_metadata(p), index).models


def test_the_samples_are_what_the_cases_need(lib):
    root, _ = lib
    assert os.path.getsize(root / "add_detail.safetensors") < 0x100000 > os.path.getsize(root / "locon_style.safetensors")
    assert autov1(root / "add_detail.safetensors") == autov1(root / "locon_style.safetensors")  # both empty-slice
    assert os.path.getsize(root / "v15.safetensors") > 0x110000


def test_each_hash_rule(tmp_path, lib, index):
    root, _ = lib
    ckpt, lora, vae = root / "v15.safetensors", root / "add_detail.safetensors", root / "vae-ft-mse.safetensors"
    cases = [  # (what the image writes, the rule that must find it, the file)
        (infotext("p", Model_hash=sha256(ckpt)[:10], Model="renamed"), "sha256[:10] (AutoV2)", ckpt),
        (infotext("p", Model_hash=autov1(ckpt), Model="old"), "AutoV1", ckpt),
        (infotext("p", Model_hash=sha256(ckpt).upper(), Model="x"), "sha256", ckpt),
        (infotext("<lora:x:0.5>", Lora_hashes=f"x: {autov3(lora)}"), "AutoV3[:12]", lora),
        (infotext("<lora:x:0.5>", Lora_hashes=f"x: {sha256(lora)[:12]}"), "sha256[:12]", lora),  # dgenerate/.pt
        (infotext("<lora:x:0.5>", Lora_hashes=f"x: {sha256(lora)[:10]}"), "sha256[:10] (AutoV2)", lora),  # Forge
        (infotext("<lora:x:0.5>", Lora_hashes=f"x: {autov3(lora)[:10]}"), "AutoV3[:10]", lora),
        (infotext("p", VAE_hash=sha256(vae)[:10], VAE="v.pt"), "sha256[:10] (AutoV2)", vae),
    ]
    for text, rule, path in cases:
        (m,) = resolve(tmp_path, index, text)
        assert (m.status, m.matched_by, str(path) in m.paths) == ("found", rule, True), text
        assert m.sha256 == sha256(path).upper()


def test_copies_are_one_content_not_ambiguous(tmp_path, lib, index):
    root, _ = lib
    (m,) = resolve(tmp_path, index, infotext("p", Model_hash=sha256(root / "v15.safetensors")[:10]))
    assert m.status == "found" and m.paths == sorted([str(root / "copies" / "v15-copy.safetensors"),
                                                      str(root / "v15.safetensors")])


def test_ambiguous_prefix_is_never_picked(tmp_path, lib, index):
    root, _ = lib
    h = autov1(root / "add_detail.safetensors")  # shared by every file under 1 MiB
    (m,) = resolve(tmp_path, index, infotext("<lora:x:1>", Lora_hashes=f"x: {h}"))
    assert m.status == "ambiguous" and m.matched_by == "AutoV1" and m.sha256 is None and m.paths == []
    assert {c["sha256"] for c in m.candidates} >= {sha256(root / "add_detail.safetensors").upper(),
                                                  sha256(root / "locon_style.safetensors").upper()}


def test_invokeai_blake3_and_sha256_prefixes(tmp_path, lib, index):
    root, _ = lib
    d = {"positive_prompt": "p", "model": {"name": "m", "hash": "blake3:" + blake3_of(root / "v15.safetensors")},
         "loras": [{"model": {"name": "l", "hash": "sha256:" + sha256(root / "add_detail.safetensors")}, "weight": 1}]}
    a, b = resolve(tmp_path, index, invokeai_metadata=json.dumps(d))
    assert (a.status, a.matched_by, a.sha256) == ("found", "BLAKE3", sha256(root / "v15.safetensors").upper())
    assert (b.status, b.matched_by) == ("found", "sha256")


def test_names(tmp_path, lib, index):
    root, _ = lib
    lora = root / "add_detail.safetensors"
    (m,) = resolve(tmp_path, index, infotext("a <lora:ADD_DETAIL:0.6>"))  # no hash: the stem, case ignored
    assert (m.status, m.matched_by, m.weight, m.paths) == ("found", "name", 0.6, [str(lora)])
    (m,) = resolve(tmp_path, index, infotext("<lora:add_detail:1>", Lora_hashes="add_detail: 0123456789ab"))
    assert m.status == "missing" and "other bytes" in m.note  # same name, other bytes: not that file
    (m,) = resolve(tmp_path, index, infotext("<lora:v15:1>"))  # a checkpoint is no LoRA
    assert m.status == "missing"
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "SD1.5\\v15.safetensors"}},
             "2": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse.safetensors"}},
             "3": {"class_type": "LoraLoader", "inputs": {"lora_name": "sub/locon_style.safetensors",
                                                          "strength_model": 0.5, "strength_clip": 1}}}
    ck, vae, lo = resolve(tmp_path, index, prompt=json.dumps(graph))
    assert (ck.status, ck.matched_by) == ("found", "name") and str(root / "v15.safetensors") in ck.paths
    assert (vae.status, vae.matched_by) == ("found", "name")
    assert (lo.status, lo.paths, lo.weight) == ("found", [str(root / "locon_style.safetensors")], 0.5)


def test_civitai_versions_from_sidecars_and_links(tmp_path, lib, index):
    root, db = lib
    res = [{"type": "lora", "modelVersionId": 62833, "weight": 0.8}, {"type": "checkpoint", "modelVersionId": 128713}]
    quoted = infotext("<lora:add_detail:0.8>", Civitai_resources=json.dumps(res))  # quoted like any value
    text = quoted.replace(json.dumps(json.dumps(res)), json.dumps(res))  # raw, as CivitAI writes it
    assert text != quoted
    assert [m.status for m in resolve(tmp_path, index, quoted)] == ["found", "missing"]
    models = resolve(tmp_path, index, text)
    assert [(m.role, m.status, m.matched_by) for m in models] == [("lora", "found", "name"),
                                                                 ("checkpoint", "missing", None)]
    assert models[0].version_id == 62833 and "Civitai resources" in models[0].sources  # merged: one LoRA
    from ckptlab.hub import store
    from ckptlab.library.catalog import Catalog

    linked = tmp_path / "linked.db"
    shutil.copyfile(db, linked)
    with store.open_catalog(linked) as cat:
        store.put_link(cat, sha256(root / "v15.safetensors"), 128713, 4384, matched_by="sha256")
    with Catalog(linked, must_exist=True) as cat:
        idx = CatalogIndex.from_catalog(cat)
    models = resolve(tmp_path, idx, text)
    assert (models[1].status, models[1].matched_by, models[1].sha256) == (
        "found", "CivitAI version", sha256(root / "v15.safetensors").upper())


def test_unhashed_files_match_by_name_and_gone_files_are_missing(tmp_path):
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan
    from ckptlab.sample.build import write_model

    root = tmp_path / "lib"
    root.mkdir()
    write_model(root / "style.safetensors", "sd1_kohya_lora", small=True)
    write_model(root / "gone.safetensors", "sd1_locon", small=True)
    h_gone = autov3(root / "gone.safetensors")
    with Catalog(tmp_path / "unhashed.db") as cat:
        scan([root], cat, hash=False)
        idx = CatalogIndex.from_catalog(cat)
    (m,) = resolve(tmp_path, idx, infotext("<lora:style:1>", Lora_hashes="style: 0123456789ab"))
    assert m.status == "found" and m.matched_by.startswith("name (file not hashed")
    with Catalog(tmp_path / "hashed.db") as cat:
        scan([root], cat, hash=True)
        (root / "gone.safetensors").unlink()
        scan([root], cat, hash=True)
        idx = CatalogIndex.from_catalog(cat)
    for text in (infotext("<lora:x:1>", Lora_hashes=f"x: {h_gone}"), infotext("<lora:gone:1>")):
        (m,) = resolve(tmp_path, idx, text)
        assert m.status == "missing" and m.note == f"catalogued at {root / 'gone.safetensors'}, which is gone"


def test_missing_summary_counts_images(tmp_path, index):
    reps = []
    for i in range(3):
        text = infotext(f"<lora:nowhere:1> {i}", Lora_hashes="nowhere: aaaaaaaaaaaa", TI_hashes="neg: bbbbbbbbbbbb")
        p = save_png(tmp_path / f"{i}.png", parameters=text if i < 2 else infotext("<lora:nowhere:1>"))
        reps.append(resolve_image(read_metadata(p), index))
    rows = missing_models(reps)
    assert [(r["role"], r["name"], r["images"], r["hashes"]) for r in rows] == [
        ("lora", "nowhere", 3, ["aaaaaaaaaaaa"]), ("embedding", "neg", 2, ["bbbbbbbbbbbb"])]
    assert len(rows[0]["examples"]) == 3
