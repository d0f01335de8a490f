"""Shared helpers of the transform tests: real-layout sample files from ``ckptlab.sample`` (small widths)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def make_model(path: Path, spec: str, *, dtype: str = "F32", ema: bool = False, seed: int = 0, metadata=None,
               fmt: str | None = None, training_state: bool = False) -> Path:
    """Write sample ``spec`` (small real layout, deterministic values) to ``path``."""
    from ckptlab.sample.build import write_model

    return write_model(path, spec, small=True, dtype=dtype, ema=ema, seed=seed, metadata=metadata, fmt=fmt,
                       training_state=training_state)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_make_model_uses_real_keys(tmp_path):
    p = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    sd = load(p)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight" in sd
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
