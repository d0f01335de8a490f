"""Small model files with real key layouts, as bytes, for the hub tests (the fake server serves
them; tests write them into a library). Built with the ``safetensors`` library itself."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save

_LORA_TARGETS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
)


def lora_bytes(seed: int = 0, rank: int = 4, dim: int = 32, dtype=np.float16, metadata: dict | None = None) -> bytes:
    """A kohya-style SD1 LoRA (``lora_unet_*``/``lora_te_*`` with lora_down/lora_up/alpha)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for t in _LORA_TARGETS:
        tensors[f"{t}.lora_down.weight"] = rng.standard_normal((rank, dim)).astype(dtype)
        tensors[f"{t}.lora_up.weight"] = rng.standard_normal((dim, rank)).astype(dtype)
        tensors[f"{t}.alpha"] = np.array(rank, dtype=dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_base_model_version": "sd_v1"}
    meta.update(metadata or {})
    return save(tensors, metadata=meta)


_SD1_UNET = {
    "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": (32,),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
    "model.diffusion_model.time_embed.0.weight": (64, 32),
    "first_stage_model.decoder.conv_in.weight": (32, 4, 3, 3),
    "first_stage_model.encoder.conv_out.weight": (8, 32, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (64, 32),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (32,),
}


def sd1_checkpoint_bytes(seed: int = 0, dtype=np.float32) -> bytes:
    """An SD1-layout checkpoint (UNet/VAE/CLIP prefixes as in the original LDM files), tiny shapes."""
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(s).astype(np.float32).astype(dtype) for k, s in _SD1_UNET.items()}
    return save(tensors)
