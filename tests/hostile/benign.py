"""Benign pickle checkpoints shaped like the real ones (real SD key names, small widths), plus the
oracle: a throwaway subprocess that loads each with ``torch.load(weights_only=False)`` (or
``pickle.load`` for plain pickles, which torch refuses) and writes the flattened tensors back with
``torch.save`` so the test can read them with ``weights_only=True``.

Lightning checkpoints use the real class names (``pytorch_lightning...ModelCheckpoint`` as a key of
``callbacks``, ``argparse.Namespace`` hyper-parameters, numpy scalars); the Lightning module is
stood in by a tiny module registered under its real name (in the writer and in the oracle).
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .zipbuild import Member, build_zip

PL_MODULE = "pytorch_lightning.callbacks.model_checkpoint"

FAKE_PL = f"""
import sys, types
for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "{PL_MODULE}"):
    sys.modules.setdefault(name, types.ModuleType(name))
class ModelCheckpoint:
    pass
ModelCheckpoint.__module__ = "{PL_MODULE}"
sys.modules["{PL_MODULE}"].ModelCheckpoint = ModelCheckpoint
"""


def _fake_lightning():
    ns: dict = {}
    exec(FAKE_PL, ns)  # noqa: S102 - defines a stand-in class in this (test) process
    return ns["ModelCheckpoint"]


def _layout_tensors(spec: str, dtype=torch.float32, ema: bool = False, seed: int = 0, limit: int | None = None):
    from ckptlab.sample import layouts

    keys = layouts.keys(spec, small=True)
    if ema:
        keys = layouts.add_ema(keys)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, (_dt, shape)) in enumerate(keys.items()):
        if limit is not None and i >= limit:
            break
        out[k] = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    return out


def build_benign(folder: Path) -> dict[str, Path]:
    """name -> path of each benign file."""
    from ckptlab.sample.build import write_model

    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def path(name: str) -> Path:
        files[name] = folder / name
        return files[name]

    # 1. SD1 Lightning training checkpoint with EMA, optimizer state, a real ModelCheckpoint key,
    #    numpy scalars and argparse.Namespace hyper-parameters
    mc = _fake_lightning()
    sd = _layout_tensors("sd1_checkpoint", ema=True, limit=400)
    params = [k for k in sd if sd[k].ndim >= 1][:3]
    obj = {
        "epoch": 6, "global_step": np.int64(840000), "pytorch-lightning_version": "1.6.0", "state_dict": sd,
        "callbacks": {mc: {"best_model_score": np.float64(0.25), "best_model_path": "/ckpt/last.ckpt",
                           "current_score": np.float32(0.5)}},
        "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros_like(sd[k])} for i, k in enumerate(params)},
                              "param_groups": [{"lr": 1e-4, "params": list(range(len(params)))}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 3}],
        "hyper_parameters": argparse.Namespace(base_learning_rate=1e-4, target="ldm.models.diffusion.ddpm"),
    }
    torch.save(obj, path("sd1_lightning.ckpt"))
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", PL_MODULE):
        sys.modules.pop(name, None)
    # 2. the sample helper's Lightning-wrapped checkpoint with training state
    write_model(path("sample_sd1.ckpt"), "sd1_checkpoint", fmt="ckpt", ema=True, training_state=True, dtype="F16")
    # 3. protocol 4 (torch's weights_only refuses it: "Unsupported operand 149")
    torch.save({"state_dict": _layout_tensors("sd1_vae", torch.float16, seed=1)}, path("sd1_vae_proto4.ckpt"),
               pickle_protocol=4)
    # 4. bf16 storages
    torch.save({"state_dict": _layout_tensors("sd1_unet", torch.bfloat16, seed=2, limit=200), "global_step": 12},
               path("sd1_unet_bf16.ckpt"))
    # 5. legacy non-zip serialization
    torch.save({"state_dict": _layout_tensors("sd1_vae", seed=3, limit=60), "global_step": 5, "epoch": 1},
               path("sd1_vae_legacy.ckpt"), _use_new_zipfile_serialization=False)
    # 6-8. A1111 embedding, hypernetwork, ESRGAN upscaler (sample helper)
    write_model(path("bad-hands.pt"), "sd1_embedding", fmt="pt")
    write_model(path("anime_hypernet.pt"), "sd1_hypernetwork")
    write_model(path("RRDB_ESRGAN_x4.pth"), "esrgan_x4")
    # 9-10. plain pickles (storages through torch.storage._load_from_bytes), protocols 2 and 5
    with open(path("clip_l_plain_p2.pt"), "wb") as fh:
        pickle.dump(_layout_tensors("clip_l", torch.float16, seed=4, limit=40), fh, protocol=2)
    with open(path("vae_plain_p5.bin"), "wb") as fh:
        pickle.dump(_layout_tensors("sd1_vae", seed=5, limit=30), fh, protocol=5)
    # 11. views of one storage, non-contiguous strides, Parameters, assorted dtypes, 0-d and empty
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {
        "model.diffusion_model.out.2.weight": base, "model.diffusion_model.out.2.weight_t": base.t(),
        "model.diffusion_model.out.2.rows": base[1:3], "model.diffusion_model.out.2.cols": base[:, 2:5],
        "model.diffusion_model.out.2.bias": torch.nn.Parameter(torch.randn(4)),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32), "model_ema.decay": torch.tensor(0.9999),
        "first_stage_model.mask": torch.tensor([True, False, True]), "first_stage_model.u8": torch.arange(5,
                                                                                                         dtype=torch.uint8),
        "first_stage_model.f64": torch.randn(3, dtype=torch.float64), "first_stage_model.empty": torch.zeros(0, 4),
    }
    torch.save({"state_dict": {"state_dict": views}}, path("nested_views.ckpt"))
    # 12. float8 and uint16 (torch writes _rebuild_tensor_v3 over an UntypedStorage)
    torch.save({"model": {"double_blocks.0.img_attn.qkv.weight": torch.randn(6, 4).to(torch.float8_e4m3fn),
                          "double_blocks.0.img_attn.qkv.scale": torch.arange(4).to(torch.uint16)}},
               path("flux_fp8_single_key.pt"))
    # 13. an older zip layout (no byteorder/.format_version/.storage_alignment, root named after the file)
    inner = folder / "_tmp_zip.pt"
    torch.save(_layout_tensors("sd1_vae", torch.float16, seed=6, limit=20), inner)
    import zipfile

    with zipfile.ZipFile(inner) as z:
        members = [Member("v1-5-old/" + n.split("/", 1)[1], z.read(n)) for n in z.namelist()
                   if n.split("/", 1)[1] not in ("byteorder", ".format_version", ".storage_alignment",
                                                  ".data/serialization_id")]
    inner.unlink()
    path("v1-5-old.ckpt").write_bytes(build_zip(members))
    # 14. diffusers-style pytorch .bin (plain state dict in a torch zip)
    torch.save(_layout_tensors("sd1_unet", seed=7, limit=50), path("diffusion_pytorch_model.bin"))
    return files


ORACLE = FAKE_PL + r"""
import json, pickle, sys, torch
def flatten(obj, prefix, out):
    if isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj.detach().clone().contiguous()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}{k}.", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}{i}.", out)
def has_tensor(v):
    return isinstance(v, torch.Tensor) or (isinstance(v, dict) and any(has_tensor(x) for x in v.values())) or (
        isinstance(v, (list, tuple)) and any(has_tensor(x) for x in v))
jobs = json.loads(sys.argv[1])
for src, dst in jobs:
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except RuntimeError as e:  # a plain pickle: torch wants the legacy magic number first
        if "magic number" not in str(e):
            raise
        with open(src, "rb") as fh:
            obj = pickle.load(fh)
    while isinstance(obj, dict):
        if isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif len(obj) == 1 and isinstance(next(iter(obj.values())), dict) and has_tensor(next(iter(obj.values()))):
            obj = next(iter(obj.values()))
        else:
            break
    out = {}
    flatten(obj, "", out)
    torch.save(out, dst)
"""


def oracle_tensors(files: dict[str, Path], out_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Load every benign file in one throwaway subprocess; return name -> flattened tensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), str(out_dir / f"{name}.oracle")) for name, p in files.items()]
    r = subprocess.run([sys.executable, "-c", ORACLE, json.dumps(jobs)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"oracle failed: {r.stderr[-2000:]}")
    return {name: torch.load(out_dir / f"{name}.oracle", weights_only=True) for name in files}

