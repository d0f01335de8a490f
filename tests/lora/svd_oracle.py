"""Oracles of the SVD command tests (extract / resize / merge), written independently of ckptlab.lora: the
loaders' ΔW formula, kohya's rank rules copied from resize_lora.py, and small LoRA files with real names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SD1_META = {"ss_base_model_version": "sd_v1", "ss_network_module": "networks.lora", "ss_v2": "False"}

#: kohya name -> single-file key of a few SD1 modules (hand-written: adapters.md §1.1 and §2.1)
SD1 = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj":
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0":
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_11_mlp_fc2":
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
}
SD1_CONV = {
    "lora_unet_down_blocks_0_resnets_0_conv1": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "model.diffusion_model.input_blocks.3.0.op.weight",
}


def bake_delta(sd: dict, name: str, strength: float = 1.0) -> torch.Tensor:
    """ΔW of module ``name`` as the loaders compute it: m · (α / r) · (up @ down), conv as
    (up.reshape(out, -1) @ down.reshape(r, -1)).reshape(out, in, kh, kw) (lora.md §3.1); no α ⇒ scale 1."""
    up = sd[f"{name}.lora_up.weight"].to(torch.float64)
    down = sd[f"{name}.lora_down.weight"].to(torch.float64)
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else float(r)
    if f"{name}.lora_mid.weight" in sd:
        mid = sd[f"{name}.lora_mid.weight"].to(torch.float64)
        d = torch.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(r, -1))
    else:
        d = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
        if down.dim() == 4:
            d = d.reshape(up.shape[0], *down.shape[1:])
    return d * (strength * alpha / r)


def module_names(sd: dict) -> set[str]:
    return {k[: -len(".lora_down.weight")] for k in sd if k.endswith(".lora_down.weight")}


def write_lora(path: Path, modules: dict, metadata: dict | None = None, dtype=torch.float32) -> Path:
    """``modules``: name -> (up, down, alpha or None[, mid])."""
    sd = {}
    for name, spec in modules.items():
        up, down, alpha = spec[:3]
        sd[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        sd[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        if len(spec) > 3:
            sd[f"{name}.lora_mid.weight"] = spec[3].to(dtype).contiguous()
    save_file(sd, str(path), metadata=dict(SD1_META if metadata is None else metadata))
    return Path(path)


def random_lora(path: Path, rank: int, alpha: float | None, seed: int, names=None, dim: int = 32,
                metadata: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in names or list(SD1)[:4]:
        mods[name] = (torch.randn(dim, rank, generator=g), torch.randn(rank, dim, generator=g) * 0.1, alpha)
    return write_lora(path, mods, metadata)


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def load(path: Path) -> dict:
    return load_file(str(path))


def json_out(r) -> dict:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- kohya resize_lora.py rank rules, transcribed (networks/resize_lora.py: index_sv_*, rank_resize) -----------

MIN_SV = 1e-6


def kohya_index_sv_cumulative(S, target):
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, target)) + 1
    return max(1, min(index, len(S) - 1))


def kohya_index_sv_fro(S, target):
    S_squared = S.pow(2)
    s_fro_sq = float(torch.sum(S_squared))
    sum_S_squared = torch.cumsum(S_squared, dim=0) / s_fro_sq
    index = int(torch.searchsorted(sum_S_squared, target**2)) + 1
    return max(1, min(index, len(S) - 1))


def kohya_index_sv_ratio(S, target):
    max_sv = S[0]
    min_sv = max_sv / target
    index = int(torch.sum(S > min_sv).item())
    return max(1, min(index, len(S) - 1))


def kohya_new_rank(S, rank, method, param):
    """``rank_resize``: S is the full spectrum of ``up @ down`` (kohya takes ``torch.linalg.svd`` of the
    product, min(out, in) values)."""
    if method == "sv_ratio":
        new_rank = kohya_index_sv_ratio(S, param) + 1
    elif method == "sv_cumulative":
        new_rank = kohya_index_sv_cumulative(S, param) + 1
    elif method == "sv_fro":
        new_rank = kohya_index_sv_fro(S, param) + 1
    else:
        new_rank = rank
    if S[0] <= MIN_SV:
        new_rank = 1
    elif new_rank > rank:
        new_rank = rank
    return new_rank
