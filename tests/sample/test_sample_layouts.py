"""The sample layouts are real: checked against independent oracles.

- sd-mecha's model configs (every key and shape of SD1 / SDXL / SD3 / Flux files, written from real files),
- the counts and parameter totals in reference/identification.md §4 (hand-copied numbers),
- diffusers' own single-file conversion + model classes (small files load with strict=True; full-size
  layouts convert, on the meta device, to exactly the state-dict shapes of the real diffusers model),
- diffusers' ``infer_diffusers_model_type`` on the full-size key/shape sets.
"""

from __future__ import annotations

import importlib.util
import math
import re
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from ckptlab.sample import build, layouts

MECHA = Path(importlib.util.find_spec("sd_mecha").submodule_search_locations[0]) / "extensions/builtin/model_configs"


@lru_cache
def mecha(name: str) -> dict[str, dict[str, tuple[tuple[int, ...], bool]]]:
    """component -> key -> (shape, optional) from an sd-mecha model config yaml."""
    data = yaml.safe_load((MECHA / f"{name}.yaml").read_text())
    return {comp: {k: (tuple(v["shape"]), bool(v.get("optional"))) for k, v in keys.items()}
            for comp, keys in data["components"].items()}


def shapes(lay) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v[1]) for k, v in lay.items()}


def nparams(lay) -> int:
    return sum(math.prod(s) for _, s in lay.values())


# --------------------------------------------------------------------------------------------
# sd-mecha: complete key sets with shapes
# --------------------------------------------------------------------------------------------

def test_sd1_checkpoint_with_ema_equals_sd_mecha_sd1_ldm():
    ours = shapes(layouts.add_ema(layouts.keys("sd1_checkpoint", small=False)))
    theirs = {k: s for comp in mecha("sd1-ldm").values() for k, (s, _) in comp.items()}
    assert ours == theirs  # 1831 keys: UNet 686 + EMA 688 + VAE 248 + CLIP 197 + schedule 12
    data = yaml.safe_load((MECHA / "sd1-ldm.yaml").read_text())
    names = {"float32": "F32", "int32": "I32", "int64": "I64"}
    their_dtypes = {k: names[v["dtype"]] for comp in data["components"].values() for k, v in comp.items()}
    plan = build.plan("sd1_checkpoint", small=False, dtype="F32", ema=True)
    assert {k: i.dtype for k, i in plan.items()} == their_dtypes


def test_sdxl_checkpoint_matches_sd_mecha_sdxl_sgm():
    ours = shapes(layouts.keys("sdxl_checkpoint", small=False))
    cfg = mecha("sdxl-sgm")
    theirs = {k: s for comp in cfg.values() for k, (s, _) in comp.items()}
    required = {k for comp in cfg.values() for k, (_, opt) in comp.items() if not opt}
    assert required <= set(ours)
    assert {k: theirs[k] for k in ours} == ours  # every key we write is a real key with the real shape
    assert set(ours) - required == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        *(k for k in ours if k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.11.")),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias",
        *(k for k in ours if k.startswith("conditioner.embedders.1.model.transformer.resblocks.31.")),
        "conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.1.model.ln_final.bias",
        "conditioner.embedders.1.model.logit_scale", "conditioner.embedders.1.model.text_projection",
    }


def test_sd3_medium_equals_sd_mecha_sd3_comfyui():
    ours = shapes(layouts.keys("sd3_medium", small=False))
    theirs = {k: s for comp in mecha("sd3-comfyui").values() for k, (s, _) in comp.items()}
    assert ours == theirs


def test_flux_dev_equals_sd_mecha_flux_diffuser_component():
    ours = shapes(layouts.keys("flux_dev", small=False))
    prefix = "model.diffusion_model."
    theirs = {k[len(prefix):]: s for k, (s, _) in mecha("flux-flux")["diffuser"].items()}
    assert ours == theirs


def test_sd1_kohya_lora_modules_are_diffusers_unet_and_clip_modules():
    """Every kohya module name, with '_' for '.', is a Linear/1x1 conv of the diffusers-named SD1 model."""
    cfg = mecha("sd1-kohya")
    weights = {k: s for comp in cfg.values() for k, (s, _) in comp.items() if k.endswith(".weight")}
    by_flat = {}
    for k, s in weights.items():
        mod = k[: -len(".weight")]
        head, rest = mod.split(".", 1)
        if head not in ("unet", "te"):
            continue
        flat = {"unet": "lora_unet_", "te": "lora_te_"}[head] + rest.replace(".", "_")
        by_flat[flat] = s
    lay = layouts.keys("sd1_kohya_lora", small=False)
    mods = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lay}
    assert len([m for m in mods if m.startswith("lora_unet_")]) == 192
    assert len([m for m in mods if m.startswith("lora_te_")]) == 72
    for m in mods:
        out, inp, *k = by_flat[m]
        down, up = lay[m + ".lora_down.weight"][1], lay[m + ".lora_up.weight"][1]
        assert down[1] == inp and up[0] == out and down[0] == up[1] == build.adapters.RANK_FULL
        assert len(down) == 2 + len(k)


def test_sd1_locon_modules_are_diffusers_unet_modules():
    cfg = mecha("sd1-kohya")["diffuser"]
    weights = {"lora_unet_" + k[len("unet."):-len(".weight")].replace(".", "_"): s for k, (s, _) in cfg.items()
               if k.endswith(".weight")}
    lay = layouts.keys("sd1_locon", small=False)
    mods = {k[: -len(".lora_down.weight")] for k in lay if k.endswith(".lora_down.weight")}
    conv = {m for m in mods if re.search(r"(resnets|samplers)_\d+_", m)}
    # 22 resnets x (conv1, time_emb_proj, conv2) + 14 conv_shortcut (2 down, all 12 up: skip concat)
    # + 3 downsamplers + 3 upsamplers
    assert len(conv) == 22 * 3 + 14 + 3 + 3 and len(mods) == len(conv) + 192 + 72
    for m in conv:
        out, inp, *k = weights[m]
        assert lay[m + ".lora_down.weight"][1] == (16, inp, *k)
        assert lay[m + ".lora_up.weight"][1] == (out, 16, *[1 for _ in k])


def test_sdxl_kohya_lora_modules_are_sgm_unet_modules():
    cfg = mecha("sdxl-sgm")["diffuser"]
    lay = layouts.keys("sdxl_kohya_lora", small=False)
    sgm = {k[len("model.diffusion_model."):-len(".weight")].replace(".", "_"): s for k, (s, _) in cfg.items()
           if k.endswith(".weight")}
    unet_mods = {k[len("lora_unet_"):].rsplit(".", 2)[0] for k in lay if k.startswith("lora_unet_")
                 and k.endswith("lora_down.weight")}
    assert unet_mods and all(m in sgm for m in unet_mods)
    assert {m for m in unet_mods if "attn2_to_k" in m} and all(
        lay[f"lora_unet_{m}.lora_down.weight"][1][1] == 2048 for m in unet_mods if "attn2_to_k" in m)
    # 70 SDXL transformer blocks (input 2+2+10+10, middle 10, output 3x10 + 3x2) x 10 + 11 transformers x 2
    assert len(unet_mods) == 70 * 10 + 11 * 2
    assert any(k.startswith("lora_te1_") for k in lay) and any(k.startswith("lora_te2_") for k in lay)


# --------------------------------------------------------------------------------------------
# reference/identification.md §4 counts
# --------------------------------------------------------------------------------------------

REFERENCE_COUNTS = {  # spec: (tensors, params) - §4 table, full widths
    "sd1_unet": (686, 859_520_964),
    "sd1_vae": (248, 83_653_863),
    "clip_l": (196 + 1, 123_060_480 + 589_824),  # + text_projection
    "clip_g": (517, 694_659_841 - 1),  # HF naming has no logit_scale
    "t5xxl": (219, 4_762_310_656),
    "sd1_controlnet": (340, 361_279_120),
    "flux_dev": (780, 11_901_408_320),
    "flux_schnell": (776, 11_891_178_560),
    "sd3_vae": (244, 83_819_683),
}


@pytest.mark.parametrize("spec", sorted(REFERENCE_COUNTS))
def test_counts_match_reference(spec):
    lay = layouts.keys(spec, small=False)
    assert (len(lay), nparams(lay)) == REFERENCE_COUNTS[spec]


def test_unet_and_mmdit_counts_match_reference():
    def unet_part(spec):
        lay = layouts.keys(spec, small=False)
        return {k: v for k, v in lay.items() if k.startswith("model.diffusion_model.")}

    assert (len(unet_part("sdxl_checkpoint")), nparams(unet_part("sdxl_checkpoint"))) == (1680, 2_567_463_684)
    assert (len(unet_part("sdxl_refiner")), nparams(unet_part("sdxl_refiner"))) == (1220, 2_259_526_660)
    assert (len(unet_part("sd2_checkpoint")), nparams(unet_part("sd2_checkpoint"))) == (686, 865_910_724)
    assert nparams(unet_part("sd2_inpaint")) == 865_925_124
    assert nparams(unet_part("sd2_depth")) == 865_913_604
    midas = {k: v for k, v in layouts.keys("sd2_depth", small=False).items() if k.startswith("depth_model.")}
    assert len(midas) == 368 and round(nparams(midas) / 1e5) == 1231  # §1.2: 368 tensors / 123.1 M params
    assert nparams(unet_part("sd3_medium")) == 2_084_951_104
    assert nparams(unet_part("sd35_medium")) == 2_469_663_936
    assert nparams(unet_part("sd35_large")) == 8_146_280_768
    sd2 = layouts.keys("sd2_checkpoint", small=False)
    assert len([k for k in sd2 if k.startswith("cond_stage_model.model.")]) == 294
    assert nparams({k: v for k, v in sd2.items() if k.startswith("cond_stage_model.model.")}) == 354_032_641
    # whole SD1.5 file without buffers: 1,066,235,307 (§4)
    sd1 = layouts.keys("sd1_checkpoint", small=False)
    weights = {k: v for k, v in sd1.items() if not layouts.is_fixed_dtype(k, v[0])}
    assert nparams(weights) == 1_066_235_307


def test_ema_key_convention_from_reference():
    lay = layouts.add_ema(layouts.keys("sd1_checkpoint"))
    assert "model_ema.diffusion_modeloutput_blocks91transformer_blocks0norm3weight" in lay
    ema = [k for k in lay if k.startswith("model_ema.")]
    assert len(ema) == 688
    unet = [k for k in lay if k.startswith("model.diffusion_model.")]
    assert {"model_ema." + "".join(k.split(".")[1:]) for k in unet} | {"model_ema.decay", "model_ema.num_updates"} \
        == set(ema)


def test_small_layouts_keep_every_key_of_the_real_layout():
    for spec in layouts.LAYOUTS:
        full, small = layouts.keys(spec, small=False), layouts.keys(spec, small=True)
        assert list(full) == list(small), spec
        assert all(len(full[k][1]) == len(small[k][1]) for k in full), spec
    clip = layouts.keys("clip_l", small=True)
    assert clip["text_model.embeddings.token_embedding.weight"][1] == (49408, 32)
    assert clip["text_model.embeddings.position_embedding.weight"][1] == (77, 32)


# --------------------------------------------------------------------------------------------
# diffusers: what its own identification says about the full-size key/shape sets
# --------------------------------------------------------------------------------------------

DIFFUSERS_TYPES = {
    "sd1_checkpoint": "v1", "sd1_inpaint": "inpainting", "sd2_checkpoint": "v2", "sd2_inpaint": "inpainting_v2",
    "sdxl_checkpoint": "xl_base", "sdxl_inpaint": "xl_inpaint", "sdxl_refiner": "xl_refiner",
    "sd3_medium": "sd3", "sd35_medium": "sd35_medium", "sd35_large": "sd35_large", "flux_dev": "flux-dev",
    "flux_schnell": "flux-schnell", "flux_fill": "flux-fill", "flux_depth": "flux-depth",
    "sd1_controlnet": "controlnet", "sd1_controlnet_diffusers": "controlnet", "sdxl_controlnet": "controlnet_xl_large",
    "sd1_pix2pix": "instruct-pix2pix", "playground_v25": "playground-v2-5", "cascade_stage_c": "stable_cascade_stage_c",
    "cascade_stage_b": "stable_cascade_stage_b", "auraflow": "auraflow", "chroma": "chroma",
    "sdxl_vpred": "xl_base", "sdxl_cosxl": "xl_base", "sd2_wd": "v2", "sd1_nai_clip": "v1",
}


def meta_state(spec: str, small: bool = False) -> dict:
    return {k: torch.empty(s, device="meta") for k, (_, s) in layouts.keys(spec, small=small).items()}


@pytest.mark.parametrize("spec", sorted(DIFFUSERS_TYPES))
def test_diffusers_infers_the_family(spec):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    assert infer_diffusers_model_type(meta_state(spec)) == DIFFUSERS_TYPES[spec]


def _meta_shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_flux_converts_to_diffusers_flux_transformer_shapes():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    for spec, guidance in (("flux_dev", True), ("flux_schnell", False)):
        with torch.device("meta"):
            model = FluxTransformer2DModel(guidance_embeds=guidance)
        conv = convert_flux_transformer_checkpoint_to_diffusers(meta_state(spec))
        assert {k: tuple(v.shape) for k, v in conv.items()} == _meta_shapes(model)


@pytest.mark.parametrize("spec,cfg", [
    ("sd3_medium", {}),
    ("sd35_large", {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "qk_norm": "rms_norm"}),
    ("sd35_medium", {"pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}),
])
def test_full_mmdit_converts_to_diffusers_sd3_transformer_shapes(spec, cfg):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = SD3Transformer2DModel(**{
            "sample_size": 128, "pos_embed_max_size": 192, "num_layers": 24, "attention_head_dim": 64,
            "num_attention_heads": 24, "caption_projection_dim": 1536, "joint_attention_dim": 4096,
            "pooled_projection_dim": 2048, "out_channels": 16, **cfg})
    state = {k: v for k, v in meta_state(spec).items() if k.startswith("model.diffusion_model.")}
    conv = convert_sd3_transformer_checkpoint_to_diffusers(state)
    assert {k: tuple(v.shape) for k, v in conv.items()} == _meta_shapes(model)


def test_marker_keys_of_the_oracle_table():
    """Spot checks of identification.md §7 proof keys/shapes on the full layouts."""
    P = "model.diffusion_model."
    sd1 = shapes(layouts.keys("sd1_checkpoint", small=False))
    assert sd1[P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert sd1[P + "input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert shapes(layouts.keys("sd1_inpaint", small=False))[P + "input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert shapes(layouts.keys("sd1_pix2pix", small=False))[P + "input_blocks.0.0.weight"] == (320, 8, 3, 3)
    sd2 = shapes(layouts.keys("sd2_checkpoint", small=False))
    assert sd2[P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert sd2["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3072, 1024)
    depth = shapes(layouts.keys("sd2_depth", small=False))
    assert depth[P + "input_blocks.0.0.weight"] == (320, 5, 3, 3)
    assert "depth_model.model.pretrained.act_postprocess3.0.project.0.bias" in depth
    xl = shapes(layouts.keys("sdxl_checkpoint", small=False))
    assert xl[P + "label_emb.0.0.weight"] == (1280, 2816)
    assert xl[P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 2048)
    assert "conditioner.embedders.1.model.ln_final.weight" in xl
    ref = shapes(layouts.keys("sdxl_refiner", small=False))
    assert ref[P + "label_emb.0.0.weight"] == (1536, 2560) and ref[P + "input_blocks.0.0.weight"][0] == 384
    assert "conditioner.embedders.0.model.ln_final.weight" in ref
    sd3 = shapes(layouts.keys("sd3_medium", small=False))
    assert sd3[P + "pos_embed"] == (1, 36864, 1536) and not any("ln_q" in k for k in sd3)
    assert shapes(layouts.keys("sd35_medium", small=False))[P + "pos_embed"] == (1, 147456, 1536)
    assert P + "joint_blocks.0.x_block.attn2.qkv.weight" in layouts.keys("sd35_medium", small=False)
    l35 = layouts.keys("sd35_large", small=False)
    assert P + "joint_blocks.37.x_block.mlp.fc1.weight" in l35 and P + "joint_blocks.0.context_block.attn.ln_q.weight" in l35
    fl = shapes(layouts.keys("flux_dev", small=False))
    assert fl["img_in.weight"] == (3072, 64) and "guidance_in.in_layer.weight" in fl
    assert "guidance_in.in_layer.weight" not in layouts.keys("flux_schnell", small=False)
    assert shapes(layouts.keys("flux_fill", small=False))["img_in.weight"] == (3072, 384)
    vae = shapes(layouts.keys("sd1_vae", small=False))
    assert vae["decoder.conv_in.weight"] == (512, 4, 3, 3) and vae["quant_conv.weight"] == (8, 8, 1, 1)
    v16 = shapes(layouts.keys("sd3_vae", small=False))
    assert v16["decoder.conv_in.weight"] == (512, 16, 3, 3) and "quant_conv.weight" not in v16
    assert "text_model.encoder.layers.30.mlp.fc1.weight" in layouts.keys("clip_g", small=False)
    assert shapes(layouts.keys("t5xxl", small=False))["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] == (10240, 4096)
    cn = layouts.keys("sd1_controlnet", small=False)
    assert "control_model.zero_convs.0.0.weight" in cn and "control_model.input_hint_block.0.weight" in cn
    es = layouts.keys("esrgan_x4", small=False)
    assert "model.0.weight" in es and "model.1.sub.0.RDB1.conv1.0.weight" in es
    lora = layouts.keys("sdxl_kohya_lora", small=False)
    assert any(re.match(r"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k\.lora_down", k) for k in lora)
    assert shapes(layouts.keys("sdxl_embedding", small=False)) == {"clip_g": (4, 1280), "clip_l": (4, 768)}
    assert shapes(layouts.keys("sd1_embedding", small=False)) == {"emb_params": (4, 768)}
    assert any(k.endswith(".hada_w1_a") for k in layouts.keys("sd1_loha"))
    assert any(k.endswith(".lokr_w1") for k in layouts.keys("sd1_lokr"))
    assert any(k.endswith(".lora_A.weight") and k.startswith("unet.") for k in layouts.keys("sd1_peft_lora"))


CASCADE_C = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1, conditioning_dim=2048,
                 block_out_channels=[2048, 2048], num_attention_heads=[32, 32], down_num_layers_per_block=[8, 24],
                 up_num_layers_per_block=[24, 8], down_blocks_repeat_mappers=[1, 1], up_blocks_repeat_mappers=[1, 1],
                 block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
                 clip_text_in_channels=1280, clip_text_pooled_in_channels=1280, clip_image_in_channels=768,
                 clip_seq=4, effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=3,
                 dropout=[0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca", "crp"], switch_level=[False])
CASCADE_B = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=4, conditioning_dim=1280,
                 block_out_channels=[320, 640, 1280, 1280], num_attention_heads=[0, 0, 20, 20],
                 down_num_layers_per_block=[2, 6, 28, 6], up_num_layers_per_block=[6, 28, 6, 2],
                 down_blocks_repeat_mappers=[1, 1, 1, 1], up_blocks_repeat_mappers=[3, 3, 2, 2],
                 block_types_per_layer=[["SDCascadeResBlock", "SDCascadeTimestepBlock"]] * 2
                 + [["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"]] * 2,
                 clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16, pixel_mapper_in_channels=3,
                 kernel_size=3, dropout=[0, 0, 0.1, 0.1], self_attn=True, timestep_conditioning_type=["sca"],
                 switch_level=None)


@pytest.mark.parametrize("spec,cfg", [("cascade_stage_c", CASCADE_C), ("cascade_stage_b", CASCADE_B)])
def test_full_stable_cascade_converts_to_diffusers_shapes(spec, cfg):
    """Configs are the stabilityai/stable-cascade prior / decoder configs."""
    from diffusers import StableCascadeUNet
    from diffusers.loaders.single_file_utils import convert_stable_cascade_unet_single_file_to_diffusers

    with torch.device("meta"):
        model = StableCascadeUNet(**cfg)
    conv = convert_stable_cascade_unet_single_file_to_diffusers(meta_state(spec))
    assert {k: tuple(v.shape) for k, v in conv.items()} == _meta_shapes(model)


def test_full_auraflow_converts_to_diffusers_shapes():
    from diffusers import AuraFlowTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_auraflow_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = AuraFlowTransformer2DModel()  # defaults are AuraFlow's real config
    conv = convert_auraflow_transformer_checkpoint_to_diffusers(meta_state("auraflow"))
    assert {k: tuple(v.shape) for k, v in conv.items()} == _meta_shapes(model)


def test_diffusers_named_controlnets_equal_diffusers_controlnet_state_dicts():
    from diffusers import ControlNetModel

    with torch.device("meta"):
        sd1 = ControlNetModel(cross_attention_dim=768)
        sdxl = ControlNetModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    assert shapes(layouts.keys("sd1_controlnet_diffusers", small=False)) == _meta_shapes(sd1)
    assert shapes(layouts.keys("sdxl_controlnet", small=False)) == _meta_shapes(sdxl)


def test_marker_keys_of_the_other_oracle_rows():
    P = "model.diffusion_model."
    vp = layouts.keys("sdxl_vpred", small=False)
    assert vp["v_pred"][1] == (0,) and vp["ztsnr"][1] == (0,)
    assert "edm_vpred.sigma_max" in layouts.keys("sdxl_cosxl") and "edm_mean" in layouts.keys("playground_v25")
    assert shapes(layouts.keys("kolors_unet", small=False))["label_emb.0.0.weight"] == (1280, 5632)
    svd = shapes(layouts.keys("svd", small=False))
    assert P + "input_blocks.1.1.time_stack.0.attn1.to_q.weight" in svd
    assert svd[P + "input_blocks.0.0.weight"][1] == 8 and svd[P + "label_emb.0.0.weight"][1] == 768
    assert "first_stage_model.decoder.mid.block_1.mix_factor" in svd
    assert "distilled_guidance_layer.in_proj.bias" in layouts.keys("chroma")
    c = shapes(layouts.keys("cascade_stage_c", small=False))
    assert "clf.1.weight" in c and c["clip_txt_mapper.weight"][0] == 2048
    b = shapes(layouts.keys("cascade_stage_b", small=False))
    assert "clip_mapper.weight" in b and b["down_blocks.1.0.channelwise.0.weight"][-1] == 640
    assert "ar_embedder.mlp.0.weight" in layouts.keys("pixart_alpha")
    sig = layouts.keys("pixart_sigma")
    assert "t_block.1.weight" in sig and "ar_embedder.mlp.0.weight" not in sig
    af = layouts.keys("auraflow")
    assert "double_layers.0.attn.w1q.weight" in af and "cond_seq_linear.weight" in af
    assert shapes(layouts.keys("hunyuan_dit_v10", small=False))["extra_embedder.0.weight"][1] == 3968
    assert shapes(layouts.keys("hunyuan_dit", small=False))["extra_embedder.0.weight"][1] != 3968
    assert "mlp_t5.0.weight" in layouts.keys("hunyuan_dit")
    assert shapes(layouts.keys("taesd_decoder"))["1.weight"][1] == 4
    assert "text_model.encoder.layers.22.mlp.fc1.weight" in layouts.keys("clip_h")
    assert "text_model.encoder.layers.24.mlp.fc1.weight" not in layouts.keys("clip_h")
    assert "add_embedding.linear_1.weight" in layouts.keys("sdxl_controlnet")
    assert "controlnet_cond_embedding.conv_in.weight" in layouts.keys("sd1_controlnet_diffusers")
    t2i = layouts.keys("t2i_adapter")
    assert "conv_in.weight" in t2i and "body.0.block2.weight" in t2i
    ip = shapes(layouts.keys("ip_adapter_sd15", small=False))
    assert ip["ip_adapter.1.to_k_ip.weight"] == (320, 768) and "image_proj.proj.weight" in ip
    rs = layouts.keys("realesrgan_x4plus")
    assert "conv_first.weight" in rs and "body.0.rdb1.conv1.weight" in rs
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in layouts.keys("flux_kohya_lora")
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in layouts.keys("flux_diffusers_lora")
    assert "double_blocks.0.processor.qkv_lora1.down.weight" in layouts.keys("flux_xlabs_lora")
    assert any(k.endswith(".oft_blocks") and len(v[1]) == 3 for k, v in layouts.keys("sd1_oft").items())
    assert any(k.endswith(".a1.weight") for k in layouts.keys("sd1_glora"))
    assert any(k.endswith(".dora_scale") for k in layouts.keys("sd1_dora"))
    wd = layouts.keys("sd2_wd", small=False)
    assert "cond_stage_model.model.transformer.resblocks.22.ln_1.weight" in wd
    assert not any(".resblocks.23." in k for k in wd)
    assert len([k for k in wd if k.startswith("cond_stage_model.model.")]) == 280  # Toolkit CLIP-v2-WD
    nai = layouts.keys("sd1_nai_clip")
    assert "cond_stage_model.transformer.embeddings.token_embedding.weight" in nai
    assert not any("text_model" in k for k in nai)
    sd2l = shapes(layouts.keys("sd2_kohya_lora", small=False))
    assert sd2l["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] == (16, 1024)
    assert shapes(layouts.keys("sd2_embedding", small=False)) == {"emb_params": (4, 1024)}


def test_flux_diffusers_lora_targets_are_diffusers_flux_linears():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    mods = dict(model.named_modules())
    lay = layouts.keys("flux_diffusers_lora", small=False)
    for k, (_, shape) in lay.items():
        if k.endswith(".lora_A.weight"):
            m = mods[k[len("transformer."):-len(".lora_A.weight")]]
            assert shape[1] == m.in_features
            assert lay[k.replace("lora_A", "lora_B")][1][0] == m.out_features


def _pixart_to_diffusers(lay: dict) -> dict:
    """Shape-level inverse of diffusers' PixArt original<->diffusers key mapping (scripts/convert_pixart_*)."""
    out = {}
    ren = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
           "y_embedder.y_proj.fc2": "caption_projection.linear_2",
           "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
           "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
           "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
           "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
           "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
           "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out"}
    for k, (_, s) in lay.items():
        if k == "y_embedder.y_embedding":
            continue
        if k == "final_layer.scale_shift_table":
            out["scale_shift_table"] = s
            continue
        m = re.match(r"blocks\.(\d+)\.(.*)$", k)
        if m:
            i, rest = m.groups()
            b = f"transformer_blocks.{i}."
            if rest.startswith("attn.qkv."):
                for n in ("to_q", "to_k", "to_v"):
                    out[b + f"attn1.{n}." + rest.split(".")[-1]] = (s[0] // 3, *s[1:])
            elif rest.startswith("cross_attn.kv_linear."):
                for n in ("to_k", "to_v"):
                    out[b + f"attn2.{n}." + rest.split(".")[-1]] = (s[0] // 2, *s[1:])
            else:
                rest = (rest.replace("cross_attn.proj", "attn2.to_out.0").replace("cross_attn.q_linear", "attn2.to_q")
                        .replace("attn.proj", "attn1.to_out.0").replace("mlp.fc1", "ff.net.0.proj")
                        .replace("mlp.fc2", "ff.net.2"))
                out[b + rest] = s
            continue
        mod, param = k.rsplit(".", 1)
        out[f"{ren[mod]}.{param}"] = s
    return out


@pytest.mark.parametrize("spec,extra", [("pixart_alpha", True), ("pixart_sigma", False)])
def test_full_pixart_maps_onto_diffusers_pixart_transformer(spec, extra):
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        model = PixArtTransformer2DModel(
            num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
            cross_attention_dim=1152, sample_size=128, caption_channels=4096, use_additional_conditions=extra)
    lay = layouts.keys(spec, small=False)
    assert _pixart_to_diffusers(lay) == _meta_shapes(model)
    assert lay["y_embedder.y_embedding"][1] == ((120 if extra else 300), 4096)


def _hunyuan_to_diffusers(lay: dict) -> dict:
    """Shape-level HunyuanDiT original -> diffusers key mapping (as diffusers' conversion script does it)."""
    top = {"t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
           "mlp_t5.0": "text_embedder.linear_1", "mlp_t5.2": "text_embedder.linear_2",
           "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
           "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
           "final_layer.adaLN_modulation.1": "norm_out.linear", "final_layer.linear": "proj_out",
           "style_embedder": "time_extra_emb.style_embedder"}
    blk = {"attn1.q_norm": "attn1.norm_q", "attn1.k_norm": "attn1.norm_k", "attn1.out_proj": "attn1.to_out.0",
           "attn2.q_proj": "attn2.to_q", "attn2.q_norm": "attn2.norm_q", "attn2.k_norm": "attn2.norm_k",
           "attn2.out_proj": "attn2.to_out.0", "norm1": "norm1.norm", "default_modulation.1": "norm1.linear",
           "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
    out = {}
    for k, (_, s) in lay.items():
        if k.startswith("pooler."):
            out["time_extra_emb." + k] = s
            continue
        m = re.match(r"(blocks\.\d+)\.(.*)\.(weight|bias)$", k)
        if m:
            b, mod, param = m.groups()
            if mod in ("attn1.Wqkv", "attn2.kv_proj"):
                a = mod.split(".")[0]
                names = ("to_q", "to_k", "to_v") if a == "attn1" else ("to_k", "to_v")
                for n in names:
                    out[f"{b}.{a}.{n}.{param}"] = (s[0] // len(names), *s[1:])
            else:
                out[f"{b}.{blk.get(mod, mod)}.{param}"] = s
            continue
        mod, _, param = k.rpartition(".")
        out[f"{top[mod]}.{param}" if mod in top else k] = s
    return out


@pytest.mark.parametrize("spec,v10", [("hunyuan_dit", False), ("hunyuan_dit_v10", True)])
def test_full_hunyuan_dit_maps_onto_diffusers_hunyuan_transformer(spec, v10):
    from diffusers import HunyuanDiT2DModel

    with torch.device("meta"):
        model = HunyuanDiT2DModel(
            activation_fn="gelu-approximate", attention_head_dim=88, cross_attention_dim=1024,
            cross_attention_dim_t5=2048, hidden_size=1408, in_channels=4, learn_sigma=True, mlp_ratio=4.3637,
            norm_type="layer_norm", num_attention_heads=16, num_layers=40, patch_size=2, pooled_projection_dim=1024,
            sample_size=128, text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=v10)
    assert _hunyuan_to_diffusers(layouts.keys(spec, small=False)) == _meta_shapes(model)


def test_full_t2i_adapter_maps_onto_diffusers_t2i_adapter():
    """Original ``body.{2i+j}`` -> diffusers ``adapter.body.{i}.resnets.{j}`` (``in_conv`` -> ``adapter.body.{i}``)."""
    from diffusers import T2IAdapter

    with torch.device("meta"):
        model = T2IAdapter(in_channels=3, channels=[320, 640, 1280, 1280], num_res_blocks=2, downscale_factor=8,
                           adapter_type="full_adapter")
    out = {}
    for k, (_, s) in layouts.keys("t2i_adapter", small=False).items():
        m = re.match(r"body\.(\d+)\.(.*)$", k)
        if m:
            n, rest = int(m.group(1)), m.group(2)
            i, j = divmod(n, 2)
            k = f"body.{i}.{rest}" if rest.startswith("in_conv") else f"body.{i}.resnets.{j}.{rest}"
        out["adapter." + k] = s
    assert out == _meta_shapes(model)


def test_taesd_decoder_matches_diffusers_autoencoder_tiny_decoder():
    """Original TAESD ``Decoder`` = Sequential(Clamp, conv, ReLU, Blocks...); diffusers' ``decoder.layers`` is
    the same stack without the parameter-free Clamp, so indices are shifted by one."""
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        model = AutoencoderTiny()
    ref = {re.sub(r"^(\d+)", lambda m: str(int(m.group(1)) + 1), k[len("decoder.layers."):]): tuple(v.shape)
           for k, v in model.state_dict().items() if k.startswith("decoder.layers.")}
    assert shapes(layouts.keys("taesd_decoder")) == ref


def test_full_chroma_converts_to_diffusers_chroma_transformer():
    from diffusers import ChromaTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = ChromaTransformer2DModel()  # defaults are Chroma's real config
    conv = convert_chroma_transformer_checkpoint_to_diffusers(meta_state("chroma"))
    assert {k: tuple(v.shape) for k, v in conv.items()} == _meta_shapes(model)


def test_svd_unet_and_temporal_vae_counts_equal_diffusers():
    """diffusers names differ (spatial_res_block/temporal_res_block...), so compare key and parameter counts."""
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel()  # defaults are SVD's config
        vae = AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                           down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4)
    lay = layouts.keys("svd", small=False)
    for prefix, model in (("model.diffusion_model.", unet), ("first_stage_model.", vae)):
        ours = {k: v for k, v in lay.items() if k.startswith(prefix)}
        ref = _meta_shapes(model)
        assert (len(ours), nparams(ours)) == (len(ref), sum(math.prod(s) for s in ref.values()))


def test_full_kolors_unet_converts_to_diffusers_kolors_unet():
    """Kolors' diffusers UNet config: SDXL widths, addition input 5632, ``encoder_hid_proj`` 4096 -> 2048."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        model = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=5632, encoder_hid_dim=4096,
            encoder_hid_dim_type="text_proj", layers_per_block=2)
    lay = layouts.keys("kolors_unet", small=False)
    state = {"model.diffusion_model." + k: torch.empty(s, device="meta") for k, (_, s) in lay.items()
             if not k.startswith("encoder_hid_proj.")}
    conv = {k: tuple(v.shape) for k, v in convert_ldm_unet_checkpoint(state, dict(model.config)).items()}
    conv.update({k: s for k, (_, s) in lay.items() if k.startswith("encoder_hid_proj.")})
    assert conv == _meta_shapes(model)
