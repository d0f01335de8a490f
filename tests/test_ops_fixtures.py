"""Shared helpers of the transform tests: real-layout sample files (ckptlab.sample) with random values."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from ckptlab.formats.writer import write_safetensors


def make_model(path: Path, spec: str, *, dtype=torch.float32, seed: int = 0, metadata=None,
               drop_prefixes: tuple[str, ...] = ()) -> Path:
    """Write sample ``spec`` (small real layout) to ``path`` with seeded random values."""
    from ckptlab.formats.dtypes import to_torch
    from ckptlab.sample.layouts import is_fixed_dtype, keys

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, (dt, shape) in keys(spec, small=True).items():
        if k.startswith(drop_prefixes):
            continue
        if dt.startswith("I"):
            n = 1
            for s in shape:
                n *= s
            t = torch.arange(n, dtype=to_torch(dt)).reshape(shape) if shape else torch.tensor(7, dtype=to_torch(dt))
        else:
            t = torch.randn(shape, generator=g) * 0.1
            if k.endswith("position_ids"):
                t = torch.arange(shape[-1], dtype=torch.float32).reshape(shape) + 0.0001
            t = t.to(to_torch(dt) if is_fixed_dtype(k, dt) else dtype)
        tensors[k] = t
    write_safetensors(path, tensors, metadata or {})
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_make_model_uses_real_keys(tmp_path):
    p = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    sd = load(p)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
