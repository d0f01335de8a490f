"""``check`` over folders: a diffusers model is checked file by file, so one hostile shard is found."""

from __future__ import annotations

import json

import torch
from hostile.corpus import os_system, p2

from ckptlab.formats.writer import write_safetensors
from ckptlab.security import check_many


def test_diffusers_folder_is_checked_file_by_file(tmp_path, cli):
    root = tmp_path / "sd15-diffusers"
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    torch.save({"conv_in.weight": torch.ones(2, 2)}, root / "unet" / "diffusion_pytorch_model.bin")
    write_safetensors(root / "vae" / "diffusion_pytorch_model.safetensors", {"decoder.conv_in.bias": torch.ones(2)})
    results = {r.path.parent.name: r.verdict for r in check_many([root])}
    assert results == {"unet": "safe", "vae": "safe"}
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(p2(os_system(tmp_path / "canary")))
    r = cli("check", root, "--json")
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 4 and len(recs) == 2
    assert {x["verdict"] for x in recs} == {"safe", "malicious"}
    assert not (tmp_path / "canary").exists()


def test_folder_without_model_files_and_missing_path(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    [r] = check_many([tmp_path / "empty"])
    assert r.verdict == "corrupt"
    out = cli("check", tmp_path / "missing.ckpt")
    assert out.returncode == 5 and "cannot open" in out.stdout and "Traceback" not in out.stderr
