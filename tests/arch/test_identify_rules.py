"""Identification rules beyond the spec table: metadata precedence, marker keys, warnings, wrappers, formats.

Files are written here with real key names and shapes (layouts from ``ckptlab.sample.layouts``, edited per
test) as sparse safetensors: the header is written by this test's own few lines of JSON, independent of
ckptlab's writer, and the file is extended with ``truncate()``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from ckptlab.arch.components import split_components
from ckptlab.arch.identify import identify, parse_metadata
from ckptlab.errors import UnsupportedFormatError
from ckptlab.formats.dtypes import itemsize
from ckptlab.sample import layouts
from ckptlab.sample.build import write_model


def write_sparse(path: Path, layout: dict, metadata: dict | None = None) -> Path:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for key, (dtype, shape) in layout.items():
        n = itemsize(dtype)
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + pos)
    return path


def real(spec: str) -> dict:
    return dict(layouts.keys(spec, small=False))


# ---- metadata precedence --------------------------------------------------------------------------------------

def test_modelspec_architecture_wins_over_keys_and_says_so(tmp_path):
    p = write_sparse(tmp_path / "m.safetensors", real("sd1_checkpoint"),
                     {"modelspec.architecture": "stable-diffusion-xl-v1-base", "modelspec.title": "x"})
    info = identify(p)
    assert info.family == "sdxl"
    assert any("metadata modelspec.architecture" in e for e in info.evidence)
    assert any("metadata says family sdxl" in w for w in info.warnings)


def test_kohya_base_model_version_gives_family_and_prediction(tmp_path):
    p = write_sparse(tmp_path / "m.safetensors", real("sd2_checkpoint"), {"ss_base_model_version": "sd_v2_v"})
    info = identify(p)
    assert (info.family, info.prediction) == ("sd2", "v")
    assert any("ss_base_model_version" in e for e in info.evidence)


def test_sd2_without_metadata_has_unknown_prediction_and_says_why(tmp_path):
    info = identify(write_sparse(tmp_path / "m.safetensors", real("sd2_checkpoint")))
    assert info.prediction is None
    assert any(e.startswith("prediction unknown") and "share every key" in e for e in info.evidence)


def test_sd2_heuristic_is_opt_in_and_reads_one_tensor(tmp_path):
    # ComfyUI: std(output_blocks.11.1.transformer_blocks.0.norm1.bias) > 0.09 => v. Real layout, sparse file,
    # then the one [320] tensor's bytes are written in place at the offset this test laid out.
    import numpy as np

    lay = real("sd2_checkpoint")
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    p = write_sparse(tmp_path / "sd2.safetensors", lay)
    with open(p, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        begin = json.loads(fh.read(header_len))[key]["data_offsets"][0]
    dtype, shape = lay[key]
    for std, expected in ((0.5, "v"), (0.01, "eps")):
        vals = np.random.default_rng(0).standard_normal(shape)
        vals = (vals - vals.mean()) / vals.std() * std
        with open(p, "r+b") as fh:
            fh.seek(8 + header_len + begin)
            fh.write(vals.astype("<f2" if dtype == "F16" else "<f4").tobytes())
        assert identify(p).prediction is None
        info = identify(p, heuristics=True)
        assert info.prediction == expected
        assert any("heuristic" in e and f"{std:.4f}"[:4] in e for e in info.evidence)


def test_sdxl_vpred_from_metadata_only(tmp_path):
    p = write_sparse(tmp_path / "m.safetensors", real("sdxl_checkpoint"), {"modelspec.prediction_type": "v"})
    info = identify(p)
    assert (info.family, info.variant, info.prediction) == ("sdxl", "v_pred", "v")
    assert any("modelspec.prediction_type" in e for e in info.evidence)


@pytest.mark.parametrize("markers, variant, prediction, why", [
    ({"v_pred": ("F32", (0,))}, "v_pred", "v", "v_pred"),
    ({"v_pred": ("F32", (0,)), "ztsnr": ("F32", (0,))}, "v_pred", "v", "ztsnr"),
    ({"edm_vpred.sigma_max": ("F32", ()), "edm_vpred.sigma_min": ("F32", ())}, "v_pred_edm", "v", "edm_vpred"),
    ({"edm_mean": ("F32", (1, 4, 1, 1)), "edm_std": ("F32", (1, 4, 1, 1))}, "playground_v25", "edm", "edm_mean"),
])
def test_sdxl_marker_keys(tmp_path, markers, variant, prediction, why):
    lay = real("sdxl_checkpoint")
    lay.update(markers)
    info = identify(write_sparse(tmp_path / "m.safetensors", lay))
    assert (info.family, info.variant, info.prediction) == ("sdxl", variant, prediction)
    assert any(why in e for e in info.evidence if e.startswith("prediction"))
    assert not any("unknown key" in w for w in info.warnings)  # markers are known keys


def test_metadata_json_strings_are_parsed():
    md = parse_metadata({"sd_merge_recipe": '{"type": "webui", "multiplier": 0.3}', "ss_tag_frequency": "[1, 2]",
                         "title": "{not json", "ss_network_dim": "32"})
    assert md["sd_merge_recipe"] == {"type": "webui", "multiplier": 0.3}
    assert md["ss_tag_frequency"] == [1, 2]
    assert md["title"] == "{not json" and md["ss_network_dim"] == "32"


# ---- warnings ---------------------------------------------------------------------------------------------------

def test_float_position_ids_and_stale_ema(tmp_path):
    recipe = '{"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.3}'
    p = write_model(tmp_path / "merged.safetensors", "sd1_checkpoint", small=False, sparse=True, ema=True,
                    metadata={"sd_merge_recipe": recipe})
    info = identify(p)
    assert info.has_ema and "ema" in info.components and not info.pruned
    assert any("EMA weights are probably stale" in w and "sd_merge_recipe" in w for w in info.warnings)
    assert isinstance(info.metadata["sd_merge_recipe"], dict)


def test_float_position_ids_warn(tmp_path):
    info = identify(write_model(tmp_path / "m.safetensors", "sd1_merged", small=False, sparse=True))
    assert any("float position_ids" in w for w in info.warnings)


def test_clean_release_has_no_warnings(tmp_path):
    info = identify(write_model(tmp_path / "ema.safetensors", "sd1_checkpoint", small=False, sparse=True, ema=True))
    assert info.has_ema and info.warnings == []
    assert sum(info.dtypes.values()) == info.params


def test_missing_final_openclip_layer(tmp_path):
    lay = {k: v for k, v in real("sd2_checkpoint").items() if ".resblocks.23." not in k}
    info = identify(write_sparse(tmp_path / "wd.safetensors", lay))
    assert info.family == "sd2"
    assert any("missing its final layer" in w and "0..22" in w for w in info.warnings)


def test_missing_final_clip_l_layer_sd1(tmp_path):
    lay = {k: v for k, v in real("sd1_checkpoint").items() if ".encoder.layers.11." not in k}
    info = identify(write_sparse(tmp_path / "m.safetensors", lay))
    assert any("CLIP-L has layers 0..10" in w for w in info.warnings)


def test_unknown_and_missing_keys(tmp_path):
    lay = real("sd1_checkpoint")
    del lay["model.diffusion_model.output_blocks.11.0.skip_connection.weight"]
    lay["some_extension.scale"] = ("F32", (4,))
    info = identify(write_sparse(tmp_path / "m.safetensors", lay))
    assert info.family == "sd1"
    assert any("missing required keys: diffusion model has 685 of 686" in w for w in info.warnings)
    assert any("unknown key" in w and "some_extension.scale" in w for w in info.warnings)


def test_unrecognised_diffusion_model_is_reported_not_guessed(tmp_path):
    lay = {k: v for k, v in real("sd1_unet").items() if "attn2.to_k" not in k}
    info = identify(write_sparse(tmp_path / "u.safetensors", lay))
    assert info.kind == "unet" and info.family is None and info.prediction is None
    assert any("not recognised" in w for w in info.warnings)


# ---- wrappers and training state --------------------------------------------------------------------------------

def test_lightning_checkpoint_with_training_state(tmp_path):
    p = write_model(tmp_path / "train.ckpt", "sd1_unet", small=True, fmt="ckpt", training_state=True)
    info = identify(p)
    assert info.format == "pickle" and info.kind == "unet" and info.family == "sd1"
    assert info.training_state and not info.pruned
    assert any("training state" in e for e in info.evidence)


def test_pickle_without_safe_reader_is_refused_cleanly(tmp_path, monkeypatch):
    p = write_model(tmp_path / "x.ckpt", "sd1_unet", small=True, fmt="ckpt")
    import ckptlab.formats as formats

    def no_reader(path, *a, **k):
        raise ImportError("No module named 'ckptlab.formats.pickle'")

    monkeypatch.setattr(formats, "open_model", no_reader)
    with pytest.raises(UnsupportedFormatError, match="safe pickle reader"):
        identify(p)


# ---- other formats ----------------------------------------------------------------------------------------------

def test_gguf_family_from_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "sdxl")
    w.add_tensor("some.weight", np.zeros((4, 4), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = identify(tmp_path / "m.gguf")
    assert (info.format, info.kind, info.family, info.prediction) == ("gguf", "unet", "sdxl", "eps")
    assert any("general.architecture" in e for e in info.evidence)


def test_gguf_flux_from_keys(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "flux")
    w.add_tensor("double_blocks.0.img_attn.norm.key_norm.scale", np.zeros(128, np.float32))
    w.add_tensor("img_in.weight", np.zeros((3072, 64), np.float16))
    w.add_tensor("guidance_in.in_layer.weight", np.zeros((3072, 256), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = identify(tmp_path / "f.gguf")
    assert (info.format, info.kind, info.family, info.variant, info.prediction) == ("gguf", "unet", "flux", "dev",
                                                                                     "flow")


def test_diffusers_folder(tmp_path):
    """A tiny SD1-shaped pipeline written by diffusers/transformers themselves (independent naming oracle)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=12, vocab_size=1000, max_position_embeddings=77))
    root = tmp_path / "pipe"
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    te.save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionInpaintPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "PNDMScheduler"]}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    info = identify(root)
    assert (info.format, info.kind, info.family, info.variant) == ("diffusers", "checkpoint", "sd1", "inpaint")
    assert info.components == ["unet", "vae", "clip_l"]
    assert info.prediction == "eps"
    assert any("scheduler_config prediction_type" in e for e in info.evidence)
    assert info.metadata["model_index.json"]["_class_name"] == "StableDiffusionInpaintPipeline"
    # a single-component folder with SD2's structure (linear proj_in) at small widths
    sd2 = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                               block_out_channels=(32, 64), cross_attention_dim=48, attention_head_dim=8,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
                               use_linear_projection=True)
    sd2.save_pretrained(tmp_path / "unet_sd2")
    info = identify(tmp_path / "unet_sd2")
    assert (info.format, info.kind, info.family, info.components) == ("diffusers", "unet", "sd2", ["unet"])


# ---- components API ---------------------------------------------------------------------------------------------

def test_split_components_sdxl_real_layout():
    comps = split_components(real("sdxl_checkpoint"))
    assert len(comps["unet"]) == 1680  # reference §1.2 SDXL base UNet tensor count
    assert len(comps["vae"]) == 248
    assert all(k.startswith("conditioner.embedders.1.model.") for k in comps["clip_g"])
    assert all(k.startswith("conditioner.embedders.0.transformer.") for k in comps["clip_l"])
    assert set(comps) <= {"unet", "vae", "clip_l", "clip_g", "other"}


def test_split_components_refiner_and_standalone():
    comps = split_components(real("sdxl_refiner"))
    assert len(comps["unet"]) == 1220  # reference §1.2 refiner UNet tensor count
    assert "clip_g" in comps and "clip_l" not in comps
    assert set(split_components(real("t5xxl"))) == {"t5xxl"}
    assert set(split_components(real("clip_g"))) == {"clip_g"}
    assert set(split_components(real("clip_l"))) == {"clip_l"}


# ---- VRAM -------------------------------------------------------------------------------------------------------

def test_vram_terms_match_reference_worked_examples(tmp_path):
    # identification.md §6 (computed there from ComfyUI's formulas): SDXL 1024² with CFG in fp16 => 512 MiB of
    # activations, untiled decode of one 128² latent in fp16 => 4.25 GiB; Flux 1024², batch 1 => ~0.9 GiB.
    sdxl = identify(write_model(tmp_path / "xl.safetensors", "sdxl_checkpoint", small=False, sparse=True)).vram
    assert sdxl.resolution == 1024
    # ComfyUI memory_required: batch 2 x 128² latent x 2 bytes x 0.01 x factor 0.8 MiB = 524 MiB (§6 rounds to 512)
    assert sdxl.activations_gib == pytest.approx(2 * 128 * 128 * 2 * 0.01 * 0.8 / 1024, abs=0.001)
    assert sdxl.activations_gib == pytest.approx(0.5, abs=0.02)
    assert sdxl.vae_decode_gib == pytest.approx(4.25, abs=0.01)
    assert sdxl.weights_gib == pytest.approx(3_468_837_868 * 2 / 2**30, abs=0.01)
    assert sdxl.gib == pytest.approx(sdxl.weights_gib + max(sdxl.activations_gib, sdxl.vae_decode_gib) + 1.2, abs=0.02)
    flux = identify(write_model(tmp_path / "f.safetensors", "flux_dev", small=False, sparse=True)).vram
    assert flux.activations_gib == pytest.approx(0.9, abs=0.05)
    # the DiT alone is in the file: text encoders and VAE are counted at their typical fp16 sizes, and said so
    expected = (11_901_408_320 + 123_060_480 + 4_762_310_656 + 83_653_863) * 2 / 2**30
    assert flux.weights_gib == pytest.approx(expected, abs=0.01)
    assert any("clip_l, t5xxl, vae" in a for a in flux.assumptions)


def test_vram_fp32_counted_as_fp16(tmp_path):
    a = identify(write_model(tmp_path / "a.safetensors", "sd1_checkpoint", small=False, sparse=True, dtype="F32"))
    b = identify(write_model(tmp_path / "b.safetensors", "sd1_checkpoint", small=False, sparse=True, dtype="F16"))
    assert a.dtypes == {"fp32": b.params} and a.vram.gib == b.vram.gib
    assert any("fp32 weights counted as fp16" in x for x in a.vram.assumptions)


def test_old_clip_naming_and_quantization_notes(tmp_path):
    lay = {}
    for k, v in real("sd1_checkpoint").items():
        lay[k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = v
    lay["model.diffusion_model.scaled_fp8"] = ("F8_E4M3", (0,))
    info = identify(write_sparse(tmp_path / "nai.safetensors", lay))
    assert info.family == "sd1" and "clip_l" in info.components
    assert any("old-style CLIP-L key names" in w for w in info.warnings)
    assert any("scaled fp8" in e and "fp8_e4m3fn" in e for e in info.evidence)
    assert not any("unknown key" in w for w in info.warnings)


def test_bnb_nf4_flux_is_recognised(tmp_path):
    lay = {"double_blocks.0.img_attn.norm.key_norm.scale": ("F32", (128,)),
           "double_blocks.0.img_attn.proj.weight": ("U8", (4718592, 1)),
           "double_blocks.0.img_attn.proj.weight.quant_state.bitsandbytes__nf4": ("U8", (88,)),
           "img_in.weight": ("U8", (98304, 1)), "guidance_in.in_layer.weight": ("U8", (393216, 1))}
    info = identify(write_sparse(tmp_path / "flux-nf4.safetensors", lay))
    assert (info.family, info.variant) == ("flux", "dev")
    assert any("NF4" in e for e in info.evidence)


def test_lycoris_locon_told_by_kohya_metadata(tmp_path):
    lay = real("sd1_kohya_lora")
    md = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon", "conv_dim": "8"}'}
    info = identify(write_sparse(tmp_path / "locon.safetensors", lay, md))
    assert (info.kind, info.family, info.variant) == ("lycoris", "sd1", "locon")
    assert any("ss_network_module" in e for e in info.evidence)
    plain = identify(write_sparse(tmp_path / "lora.safetensors", lay, {"ss_network_module": "networks.lora"}))
    assert (plain.kind, plain.variant) == ("lora", "kohya")


def test_gguf_quantized_params_and_packed_bytes(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from ckptlab.arch.identify import _inference_bytes
    from ckptlab.formats import open_model

    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "flux")
    w.add_tensor("double_blocks.0.img_attn.norm.key_norm.scale", np.zeros(128, np.float32))
    data = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = identify(tmp_path / "q.gguf")
    assert info.family == "flux" and info.dtypes == {"q8_0": 96 * 64, "fp32": 128}
    src = open_model(tmp_path / "q.gguf")
    # Q8_0: blocks of 32 elements in 34 bytes (ggml); the fp32 norm counts as fp16 at inference
    notes: list[str] = []
    expected = (96 * 64 * 34 / 32 + 128 * 2) / (96 * 64 + 128)
    assert _inference_bytes(src.infos(), list(src.infos()), notes) == pytest.approx(expected)
    assert notes


def test_metadata_variant_applies_to_models_not_to_adapter_formats(tmp_path):
    md = {"modelspec.architecture": "stable-diffusion-v1-inpainting/lora"}
    lora = identify(write_sparse(tmp_path / "l.safetensors", real("sd1_kohya_lora"), md))
    assert (lora.kind, lora.family, lora.variant) == ("lora", "sd1", "kohya")
    ckpt = identify(write_sparse(tmp_path / "c.safetensors", real("sd1_checkpoint"),
                                 {"modelspec.architecture": "stable-diffusion-v1-inpainting"}))
    assert (ckpt.family, ckpt.variant) == ("sd1", "inpaint")
    assert any("variant inpaint from metadata" in e for e in ckpt.evidence)
