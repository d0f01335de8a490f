"""The transform tests' sample files use the real key names."""

from __future__ import annotations

import torch
from fakes.sample_files import load, make_model


def test_make_model_uses_real_keys(tmp_path):
    p = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    sd = load(p)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in sd
    assert "model_ema.diffusion_modelinput_blocks11transformer_blocks0attn2to_kweight" in sd
    assert sd["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
