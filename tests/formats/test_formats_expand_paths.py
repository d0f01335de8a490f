"""``cli.common.expand_paths``: globs, folders walked recursively for model files only, hidden
entries skipped, diffusers folders (pipeline or single component) kept as one model."""

from __future__ import annotations

import json
from pathlib import Path

from ckptlab.cli.common import expand_paths
from ckptlab.formats.diffusers import is_diffusers_folder


def _touch(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def _library(root: Path) -> dict[str, Path]:
    f = {
        "ckpt": _touch(root / "Stable-diffusion" / "sd15.safetensors"),
        "ckpt_legacy": _touch(root / "Stable-diffusion" / "old" / "v1-5-pruned.ckpt"),
        "lora": _touch(root / "Lora" / "style.safetensors"),
        "gguf": _touch(root / "unet" / "flux1-dev-Q8_0.gguf"),
        "pt": _touch(root / "embeddings" / "easyneg.pt"),
        "upper": _touch(root / "VAE" / "SDXL_VAE.SafeTensors"),
        "preview": _touch(root / "Lora" / "style.preview.png"),
        "info": _touch(root / "Lora" / "style.civitai.info"),
        "hidden": _touch(root / "Lora" / ".trash" / "deleted.safetensors"),
        "hidden_file": _touch(root / "Lora" / ".partial.safetensors"),
    }
    pipe = root / "diffusers" / "sdxl-base"
    _touch(pipe / "model_index.json", json.dumps({"_class_name": "StableDiffusionXLPipeline"}).encode())
    _touch(pipe / "unet" / "config.json", b"{}")
    _touch(pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    _touch(pipe / "vae" / "diffusion_pytorch_model.safetensors")
    comp = root / "VAE" / "sdxl-vae-fp16-fix"
    _touch(comp / "config.json", b"{}")
    _touch(comp / "diffusion_pytorch_model.safetensors")
    sharded = root / "text_encoders" / "t5xxl"
    _touch(sharded / "config.json", b"{}")
    _touch(sharded / "model.safetensors.index.json", b"{}")
    _touch(sharded / "model-00001-of-00002.safetensors")
    _touch(sharded / "model-00002-of-00002.safetensors")
    # a config.json beside arbitrary files is not a diffusers component
    _touch(root / "upscale_models" / "config.json", b"{}")
    f["esrgan"] = _touch(root / "upscale_models" / "4x-UltraSharp.pth")
    f.update(pipe=pipe, comp=comp, sharded=sharded)
    return f


def test_folder_is_walked_recursively_in_name_order(tmp_path):
    f = _library(tmp_path)
    got = expand_paths([str(tmp_path)])
    expected = sorted([f["ckpt"], f["ckpt_legacy"], f["lora"], f["gguf"], f["pt"], f["upper"], f["esrgan"],
                       f["pipe"], f["comp"], f["sharded"]])
    assert sorted(got) == expected
    assert len(got) == len(set(got))  # nothing twice
    # sorted walk: each folder's entries in name order
    assert got.index(f["ckpt_legacy"]) < got.index(f["ckpt"])  # "old/" sorts before "sd15.safetensors"


def test_hidden_entries_previews_and_sidecars_are_skipped(tmp_path):
    f = _library(tmp_path)
    got = set(expand_paths([str(tmp_path / "Lora")]))
    assert got == {f["lora"]}


def test_diffusers_folders_are_one_model(tmp_path):
    f = _library(tmp_path)
    assert expand_paths([str(f["pipe"])]) == [f["pipe"]]
    assert expand_paths([str(f["comp"])]) == [f["comp"]]
    assert expand_paths([str(f["sharded"])]) == [f["sharded"]]
    got = expand_paths([str(tmp_path / "diffusers")])
    assert got == [f["pipe"]]  # not its unet/vae files
    assert is_diffusers_folder(f["pipe"]) and is_diffusers_folder(f["comp"])
    assert not is_diffusers_folder(tmp_path / "upscale_models")


def test_globs_keep_argument_order_and_unmatched_args_pass_through(tmp_path):
    f = _library(tmp_path)
    pattern = str(tmp_path / "**" / "*.gguf")
    missing = str(tmp_path / "nope.safetensors")
    got = expand_paths([str(f["lora"]), pattern, missing, str(tmp_path / "Stable-diffusion" / "*.safetensors")])
    assert got == [f["lora"], f["gguf"], Path(missing), f["ckpt"]]
    assert expand_paths([str(tmp_path / "*.nothing")]) == [Path(tmp_path / "*.nothing")]


def test_explicit_file_with_any_suffix_is_kept(tmp_path):
    odd = _touch(tmp_path / "model.weights")
    assert expand_paths([str(odd)]) == [odd]


def test_no_recurse_and_custom_suffixes(tmp_path):
    f = _library(tmp_path)
    assert expand_paths([str(tmp_path)], recurse=False) == []
    assert set(expand_paths([str(tmp_path)], suffixes=(".gguf",))) == {f["gguf"], f["pipe"], f["comp"], f["sharded"]}
