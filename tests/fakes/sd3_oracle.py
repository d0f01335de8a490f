"""A diffusers config folder for the small SD3 sample files, written by hand (the oracle's side of the SD3
tests): diffusers' ``from_single_file(..., config=DIR)`` reads its configs from here and converts the weights
with its own code. The numbers are the sample files' shapes (src/ckptlab/sample: hidden 64, 24 joint blocks,
CLIP-L 32 wide x 12 layers, CLIP-G 64 wide x 32 layers, VAE 32-64-128-128) and the official repos' fixed
values (64-wide heads, VAE scaling/shift, scheduler shift 3.0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "src" / "ckptlab" / "data" / "clip_tokenizer"

TRANSFORMER = {
    "sd3_medium": {"sample_size": 48, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 1, "joint_attention_dim": 32,
                   "caption_projection_dim": 64, "pooled_projection_dim": 96, "out_channels": 16,
                   "pos_embed_max_size": 24, "dual_attention_layers": [], "qk_norm": None},
    # SD3.5 medium: qk-norm (ln_q 16 wide -> 4 heads of 16), attn2 in blocks 0-12, 48x48 position grid
    "sd35_medium": {"sample_size": 96, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                    "caption_projection_dim": 64, "pooled_projection_dim": 96, "out_channels": 16,
                    "pos_embed_max_size": 48, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
    "sd35_large": {"sample_size": 48, "patch_size": 2, "in_channels": 16, "num_layers": 38,
                   "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 32,
                   "caption_projection_dim": 64, "pooled_projection_dim": 96, "out_channels": 16,
                   "pos_embed_max_size": 24, "dual_attention_layers": [], "qk_norm": "rms_norm"},
}
VAE = {"act_fn": "silu", "block_out_channels": [32, 64, 128, 128], "down_block_types": ["DownEncoderBlock2D"] * 4,
       "force_upcast": True, "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
       "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "use_quant_conv": False, "use_post_quant_conv": False,
       "mid_block_add_attention": True}


def clip(width: int, layers: int, act: str) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": 4 * width, "num_hidden_layers": layers, "num_attention_heads": 1,
            "projection_dim": width, "hidden_act": act, "max_position_embeddings": 77, "vocab_size": 49408,
            "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def config_dir(root: Path, spec: str) -> Path:
    """The hand-written diffusers folder (no weights) for sample ``spec``."""
    _json(root / "model_index.json", {
        "_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": [None, None], "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    _json(root / "transformer" / "config.json", {"_class_name": "SD3Transformer2DModel", **TRANSFORMER[spec]})
    _json(root / "vae" / "config.json", {"_class_name": "AutoencoderKL", **VAE})
    _json(root / "text_encoder" / "config.json", clip(32, 12, "quick_gelu"))
    _json(root / "text_encoder_2" / "config.json", clip(64, 32, "gelu"))
    _json(root / "scheduler" / "scheduler_config.json",
          {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    for folder, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(DATA / name, root / folder / name)
        _json(root / folder / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "pad_token": pad})
    return root
