"""Model files with real key names for the library tests (values seeded, shapes shrunk to <= 4 per
dimension so a whole library writes in milliseconds), written with the peer libraries
(``safetensors.torch.save_file``, ``torch.save``)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ckptlab.hub import store
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan
from ckptlab.sample.build import write_model
from ckptlab.sample.layouts import add_ema, keys

_TORCH = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}


def tensors(spec: str, seed: int = 0, ema: bool = False, dim_cap: int = 4) -> dict[str, torch.Tensor]:
    """fp32 (fixed-dtype buffers kept) tensors for ``spec`` with real key names."""
    lay = keys(spec, small=True)
    if ema:
        lay = add_ema(lay)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (dtype, shape) in lay.items():
        shape = tuple(min(d, dim_cap) for d in shape)
        dt = _TORCH.get(dtype, torch.float32)
        if dt.is_floating_point:
            out[k] = torch.randn(shape, generator=g, dtype=torch.float32).to(dt)
        else:
            out[k] = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=dt).reshape(shape)
    return out


def half(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.dtype == torch.float32 else v for k, v in sd.items()}


def pruned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("model_ema")}


def write_st(path: Path, sd: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata)
    return path


def write_ckpt(path: Path, sd: dict, extra: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "global_step": 1234, **(extra or {})}, str(path))
    return path


def a1111_library(root: Path) -> dict[str, Path]:
    """A small A1111 install: checkpoint, LoRA, VAE, embedding (root-level ``embeddings/``)."""
    ck = tensors("sd1_checkpoint", seed=1)
    return {
        "checkpoint": write_st(root / "models" / "Stable-diffusion" / "sd15.safetensors", ck),
        "vae": write_st(root / "models" / "VAE" / "vae-ft-mse.safetensors", tensors("sd1_vae", seed=2)),
        "lora": write_st(root / "models" / "Lora" / "style" / "detailer.safetensors",
                         tensors("sd1_loha", seed=3), {"ss_network_module": "lycoris.kohya"}),
        "embedding": write_st(root / "embeddings" / "easyneg.safetensors", tensors("sd1_embedding", seed=4)),
    }


def comfy_library(root: Path) -> dict[str, Path]:
    return {
        "checkpoint": write_st(root / "models" / "checkpoints" / "xl.safetensors", tensors("sdxl_checkpoint", seed=5)),
        "unet": write_st(root / "models" / "diffusion_models" / "unet.safetensors", tensors("sd1_unet", seed=6)),
        "clip": write_st(root / "models" / "clip" / "clip_l.safetensors", tensors("clip_l", seed=7)),
        "upscaler": write_st(root / "models" / "upscale_models" / "4x.safetensors", tensors("esrgan_x4", seed=8)),
    }


def touch_garbage(path: Path, data: bytes = b"\x00garbage" * 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stat_key(path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


SPARSE = {  # spec -> (A1111 folder, ComfyUI folder)
    "sd1_checkpoint": ("models/Stable-diffusion", "models/checkpoints"),
    "sdxl_checkpoint": ("models/Stable-diffusion", "models/checkpoints"),
    "sd1_vae": ("models/VAE", "models/vae"),
    "sd1_kohya_lora": ("models/Lora/characters", "models/loras"),
    "sd1_embedding": ("embeddings", "models/embeddings"),
    "sd1_controlnet": ("models/ControlNet", "models/controlnet"),
    "clip_l": (None, "models/clip"),
    "flux_schnell": (None, "models/unet"),
}


def sparse_library(root, layout):
    """Real-size headers, sparse data: identification works from headers, nothing big hits the disk."""
    out = {}
    for spec, folders in SPARSE.items():
        folder = folders[0 if layout == "a1111" else 1]
        if folder is None:
            continue
        p = root / folder / f"{spec}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        out[spec] = write_model(p, spec, sparse=True)
    return out


VERSION = {"id": 1000, "modelId": 100, "name": "v1.0", "baseModel": "SD 1.5",
           "model": {"name": "Detail Tweaker", "type": "LORA"}, "trainedWords": ["detailed", "sharp"]}


def linked_lora_library(tmp_path):
    """Two copies of a LoRA in a scanned catalog, linked to a CivitAI version (the second inherited)."""
    lora = tensors("sd1_kohya_lora", seed=3)
    a = write_st(tmp_path / "models" / "Lora" / "detail.safetensors", lora)
    b = write_st(tmp_path / "models" / "Lora" / "detail-fp16.safetensors", half(lora))
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([tmp_path / "models"], cat, hash=True)
        store.store_record(cat, "version", 1000, VERSION)
        store.store_record(cat, "version", 1000, {**VERSION, "name": "v1.0 (fixed)"})  # revision 2
        store.store_record(cat, "model", 100, {"id": 100, "name": "Detail Tweaker", "type": "LORA"})
        sha_a = hashlib.sha256(a.read_bytes()).hexdigest().upper()
        sha_b = hashlib.sha256(b.read_bytes()).hexdigest().upper()
        store.put_link(cat, sha_a, 1000, 100, matched_by="sha256", file_id=5000)
        store.put_link(cat, sha_b, 1000, 100, matched_by="fingerprint", inherited_from=sha_a)
    return db, a, b, sha_a
