"""A diffusers folder is catalogued as one model (format ``diffusers``, size = the sum of its files),
with incremental re-scans, changes inside and renames handled like a file's."""

from __future__ import annotations

import json
import os

import torch
from fakes.library_files import write_st
from safetensors import safe_open
from test_scan import audit, cat  # noqa: F401 - fixtures

from ckptlab.library.scanner import scan

UNET = ["conv_in.weight", "conv_in.bias", "time_embedding.linear_1.weight", "time_embedding.linear_1.bias",
        "down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.resnets.0.norm1.weight", "up_blocks.0.resnets.0.conv2.weight", "conv_norm_out.weight",
        "conv_out.weight", "conv_out.bias"]
VAE = ["encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.mid_block.attentions.0.to_q.weight",
       "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
       "decoder.conv_out.weight"]
TE = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
      "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.0.mlp.fc1.weight",
      "text_model.final_layer_norm.weight"]


def _weights(keys, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn((4, 4) if k.endswith("weight") else (4,), generator=g) for k in keys}


def pipeline(folder, seed=0):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    for comp, keys, name in (("unet", UNET, "diffusion_pytorch_model"), ("vae", VAE, "diffusion_pytorch_model"),
                             ("text_encoder", TE, "model")):
        write_st(folder / comp / f"{name}.safetensors", _weights(keys, seed + len(comp)))
        (folder / comp / "config.json").write_text(json.dumps({"_class_name": comp}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    return folder


def disk_size(folder) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def n_tensors(folder) -> int:
    n = 0
    for d, _, fs in os.walk(folder):
        for f in fs:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(d, f), "pt") as st:
                    n += len(list(st.keys()))
    return n


def test_pipeline_folder_is_one_row(tmp_path, cat):  # noqa: F811
    lib = tmp_path / "ComfyUI" / "models"
    sd = pipeline(lib / "diffusers" / "tiny-sd15")
    single = write_st(lib / "vae" / "vae.safetensors", _weights(VAE, 9))
    s = scan([lib], cat, hash=True, fingerprint=True)
    assert (s.new, s.errors) == (2, 0), s.error_list
    rows = {r.path: r for r in cat.files()}
    assert set(rows) == {str(sd), str(single)}  # no row for the files inside the folder
    rec = rows[str(sd)]
    assert rec.format == "diffusers" and rec.error is None and rec.kind == "checkpoint"
    assert set(rec.components) == {"unet", "vae", "clip_l"}
    assert rec.size == disk_size(sd) and rec.n_tensors == n_tensors(sd) == len(UNET) + len(VAE) + len(TE)
    assert rec.fingerprint and rec.sha256 is None  # CivitAI hashes are per file; fingerprints work
    assert s.hashed == 1 and s.fingerprinted == 2


def test_rescans_changes_and_renames(tmp_path, cat, audit):  # noqa: F811
    lib = tmp_path / "lib"
    sd = pipeline(lib / "tiny-sd15")
    scan([lib], cat, fingerprint=True)
    first = cat.get_by_path(sd)

    audit["opens"].clear()
    s = scan([lib], cat, fingerprint=True)
    assert (s.new, s.changed, s.unchanged, s.fingerprinted) == (0, 0, 1, 0)
    assert audit["opens"] == []  # nothing inside was opened

    unet = sd / "unet" / "diffusion_pytorch_model.safetensors"
    write_st(unet, _weights(UNET, 99))
    os.utime(unet, ns=(first.mtime_ns + 10**9, first.mtime_ns + 10**9))
    s = scan([lib], cat, fingerprint=True)
    assert (s.new, s.changed, s.fingerprinted) == (0, 1, 1)
    changed = cat.get_by_path(sd)
    assert changed.id == first.id and changed.fingerprint != first.fingerprint
    assert changed.components["vae"] == first.components["vae"]  # only the UNet changed
    assert changed.components["unet"] != first.components["unet"]

    dst = lib / "renamed-sd15"
    os.rename(sd, dst)
    audit["opens"].clear()
    s = scan([lib], cat, fingerprint=True)
    assert (s.moved, s.new, s.missing, s.fingerprinted) == (1, 0, 0, 0)
    assert audit["opens"] == []
    moved = cat.get_by_path(dst)
    assert moved.id == first.id and moved.fingerprint == changed.fingerprint


def test_component_folder_given_as_root(tmp_path, cat):  # noqa: F811
    vae = tmp_path / "sdxl-vae"
    write_st(vae / "diffusion_pytorch_model.safetensors", _weights(VAE, 3))
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    s = scan([vae], cat)
    assert (s.new, s.errors) == (1, 0), s.error_list
    (rec,) = cat.files()
    assert rec.path == str(vae) and rec.format == "diffusers" and rec.size == disk_size(vae)
    assert rec.n_tensors == len(VAE)


def test_plan_space_proposes_no_file_steps_for_a_folder(tmp_path, cat):  # noqa: F811
    from ckptlab.library.dupes import plan_space

    pipeline(tmp_path / "lib" / "tiny-sd15")  # all fp32: a file would get a to_fp16 step
    # big enough that fp16 frees more than the provenance metadata the rewrite adds to the header
    write_st(tmp_path / "lib" / "unet32.safetensors", {k: torch.randn(64, 64) for k in UNET})
    scan([tmp_path / "lib"], cat)
    steps = plan_space(cat).steps
    assert [(s.label, os.path.basename(s.path)) for s in steps] == [("to_fp16", "unet32.safetensors")]
