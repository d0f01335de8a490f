"""A library of real-layout model files for the remote scan tests, kept on disk and uploaded to the moto bucket,
plus the oracle they are checked against: a local scan of the same files, row by row.

Layout (A1111 names, so folder hints match): a checkpoint, VAE, LoHa and kohya LoRA (with trigger metadata, a
``.civitai.info`` and a preview next to it), an embedding, a torch-zip ``.ckpt``, a legacy (pre-1.6) ``.pt``,
a garbage ``.safetensors``, a diffusers pipeline folder, and the hostile pickle corpus (``tests/hostile``)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import torch
from hostile.corpus import build_hostile, legacy_tensor_file

from fakes.library_files import a1111_library, tensors, write_ckpt, write_st

#: the columns that must be equal between a local and a remote scan of the same bytes
FACT_COLUMNS = ("format", "kind", "family", "variant", "info", "safety", "safety_detail", "n_tensors",
                "tensor_bytes", "ema_bytes", "fp32_bytes", "dtypes", "triggers", "size", "folder", "error")

UNET = ["conv_in.weight", "conv_in.bias", "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
        "down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.0.norm1.weight", "up_blocks.0.resnets.0.conv2.weight", "conv_norm_out.weight",
        "conv_out.weight", "conv_out.bias"]
VAE = ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "quant_conv.weight",
       "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
TE = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
      "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.final_layer_norm.weight"]


def diffusers_pipeline(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    g = torch.Generator().manual_seed(seed)
    for comp, keys, name in (("unet", UNET, "diffusion_pytorch_model"), ("vae", VAE, "diffusion_pytorch_model"),
                             ("text_encoder", TE, "model")):
        write_st(folder / comp / f"{name}.safetensors",
                 {k: torch.randn((4, 4) if k.endswith("weight") else (4,), generator=g) for k in keys})
        (folder / comp / "config.json").write_text(json.dumps({"_class_name": comp}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    return folder


def build_library(root: Path, canary: Path, *, hostile: bool = True) -> Path:
    """Write the library under ``root`` (returned); hostile payloads would create files under ``canary``."""
    a1111_library(root)
    lora = write_st(root / "models" / "Lora" / "detail.safetensors", tensors("sd1_kohya_lora", seed=11),
                    {"ss_network_module": "networks.lora",
                     "ss_tag_frequency": json.dumps({"10_detail": {"detailed": 12, "sharp": 3}})})
    (lora.parent / "detail.civitai.info").write_text(json.dumps({
        "id": 1000, "modelId": 100, "name": "v1.0", "baseModel": "SD 1.5", "trainedWords": ["detailed"],
        "model": {"name": "Detail Tweaker", "type": "LORA"}}))
    (lora.parent / "detail.preview.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    write_ckpt(root / "models" / "Stable-diffusion" / "old.ckpt", tensors("sd1_checkpoint", seed=12))
    (root / "models" / "Stable-diffusion" / "legacy.pt").write_bytes(legacy_tensor_file())
    (root / "models" / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x00garbage" * 10)
    diffusers_pipeline(root / "models" / "diffusers" / "tiny-sd15")
    if hostile:
        build_hostile(root / "models" / "hostile", canary)
    return root


def rows(db: Path, *, strip: str = "") -> dict[str, dict]:
    """``{path relative to strip: {column: value}}`` of the present rows of a catalog, plus their content rows
    (hashes and fingerprints), with plain sqlite3 (not the code under test)."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    out = {}
    for r in con.execute("SELECT * FROM files WHERE status = 'present'"):
        path = bytes(r["path"]).decode("utf-8", "surrogateescape")
        rel = path[len(strip):].lstrip("/") if strip and path.startswith(strip) else path
        d = {c: r[c] for c in FACT_COLUMNS}
        for c in ("info", "safety_detail", "dtypes", "triggers"):
            d[c] = json.loads(d[c]) if d[c] is not None else None
        c = con.execute("SELECT sha256, autov1, autov2, autov3, crc32, blake3, fingerprint, components, "
                        "fingerprint_bf16, components_bf16 FROM content WHERE dev = ? AND ino = ? AND size = ? "
                        "AND mtime_ns = ?", (r["dev"], r["ino"], r["size"], r["mtime_ns"])).fetchone()
        if isinstance(d["info"], dict) and isinstance(d["info"].get("path"), str) and strip:
            d["info"]["path"] = d["info"]["path"].replace(strip, "<root>")
        d["content"] = dict(c) if c is not None else None
        out[rel] = d
    con.close()
    return out
