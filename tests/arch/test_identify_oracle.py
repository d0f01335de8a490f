"""The oracle table (identification.md §7 and the family tables of §1-§3), row by row, for the rows the sample
specs do not build: each file holds the reference's proving keys with the reference's shapes (plus nothing
else), and must be identified as the reference says."""

from __future__ import annotations

import pytest
from test_identify_rules import write_sparse

from ckptlab.arch.identify import identify

P = "model.diffusion_model."
H = "F16"


def t(*shape):
    return (H, tuple(shape))


ROWS = {
    # name: (layout, (kind, family, variant))
    "kolors": ({P + "label_emb.0.0.weight": t(1280, 5632), P + "input_blocks.0.0.weight": t(320, 4, 3, 3)},
               ("unet", "kolors", None)),
    "ssd1b": ({P + "label_emb.0.0.weight": t(1280, 2816),
               P + "input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight": t(1280, 2048)},
              ("unet", "sdxl", "ssd1b")),
    "vega": ({P + "label_emb.0.0.weight": t(1280, 2816),
              P + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight": t(1280, 2048)},
             ("unet", "sdxl", "vega")),
    "sdxl_pix2pix": ({P + "label_emb.0.0.weight": t(1280, 2816), P + "input_blocks.0.0.weight": t(320, 8, 3, 3)},
                     ("unet", "sdxl", "instruct_pix2pix")),
    "sd2_unclip_h": ({P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(320, 1024),
                      P + "label_emb.0.0.weight": t(1280, 2048)}, ("unet", "sd2", "unclip_h")),
    "sd_x4_upscaler": ({P + "input_blocks.0.0.weight": t(256, 7, 3, 3),
                        P + "input_blocks.10.0.skip_connection.bias": t(512)}, ("unet", "sd_x4_upscaler", None)),
    "zero123": ({P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(320, 768),
                 P + "input_blocks.0.0.weight": t(320, 8, 3, 3), "cc_projection.weight": t(768, 772)},
                ("unet", "sd1", "zero123")),
    "svd": ({P + "input_blocks.1.1.time_stack.0.attn1.to_q.weight": t(320, 320),
             P + "input_blocks.0.0.weight": t(320, 8, 3, 3), P + "label_emb.0.0.weight": t(1280, 768)},
            ("unet", "svd", None)),
    "chroma": ({"double_blocks.0.img_attn.norm.key_norm.scale": t(128), "img_in.weight": t(3072, 64),
                "distilled_guidance_layer.in_proj.bias": t(5120)}, ("unet", "chroma", None)),
    "flux2": ({"double_stream_modulation_img.lin.weight": t(18432, 3072), "txt_in.weight": t(3072, 15360),
               "img_in.weight": t(3072, 128)}, ("unet", "flux2", "dev")),
    "cascade_c": ({"clf.1.weight": t(64, 2048, 1, 1), "clip_txt_mapper.weight": t(2048, 1280)},
                  ("unet", "cascade", "stage_c")),
    "cascade_c_lite": ({"clf.1.weight": t(64, 1536, 1, 1), "clip_txt_mapper.weight": t(1536, 1280)},
                       ("unet", "cascade", "stage_c_lite")),
    "cascade_b": ({"clf.1.weight": t(64, 320, 1, 1), "clip_mapper.weight": t(5120, 1280),
                   "down_blocks.1.0.channelwise.0.weight": t(2560, 640)}, ("unet", "cascade", "stage_b")),
    "cascade_b_lite": ({"clf.1.weight": t(64, 320, 1, 1), "clip_mapper.weight": t(5120, 1280),
                        "down_blocks.1.0.channelwise.0.weight": t(2304, 576)}, ("unet", "cascade", "stage_b_lite")),
    "pixart_alpha": ({"t_block.1.weight": t(6912, 1152), "ar_embedder.mlp.0.weight": t(1152, 256)},
                     ("unet", "pixart", "alpha")),
    "pixart_sigma": ({"t_block.1.weight": t(6912, 1152), "y_embedder.y_embedding": t(300, 4096)},
                     ("unet", "pixart", "sigma")),
    "auraflow": ({"double_layers.0.attn.w1q.weight": t(3072, 3072), "cond_seq_linear.weight": t(3072, 2048)},
                 ("unet", "auraflow", None)),
    "hunyuan_dit_v1_0": ({"mlp_t5.0.weight": t(2048, 2048), "extra_embedder.0.weight": t(5632, 3968)},
                         ("unet", "hunyuan_dit", "v1_0")),
    "hunyuan_dit_v1_1": ({"mlp_t5.0.weight": t(2048, 2048), "extra_embedder.0.weight": t(5632, 3328)},
                         ("unet", "hunyuan_dit", "v1_1")),
    "lumina2": ({"cap_embedder.0.weight": t(2304)}, ("unet", "lumina2", None)),
    "wan": ({"head.modulation": t(1, 2, 1536), "patch_embedding.weight": t(1536, 16, 1, 2, 2)}, ("unet", "wan", None)),
    "mochi": ({"t5_yproj.weight": t(3072, 4096)}, ("unet", "mochi", None)),
    "ltxv": ({"patchify_proj.weight": t(2048, 128), "adaln_single.linear.weight": t(12288, 2048)},
             ("unet", "ltxv", None)),
    "flux2_klein_4b": ({"double_stream_modulation_img.lin.weight": t(18432, 3072), "txt_in.weight": t(3072, 7680)},
                       ("unet", "flux2", "klein_4b")),
    "flux2_klein_9b": ({"single_stream_modulation.lin.weight": t(9216, 3072), "txt_in.weight": t(3072, 12288)},
                       ("unet", "flux2", "klein_9b")),
    "chroma_radiance": ({"distilled_guidance_layer.in_proj.bias": t(5120), "img_in.weight": t(3072, 64),
                         "nerf_blocks.0.norm.scale": t(64)}, ("unet", "chroma", "radiance")),
    "sv3d_u": ({P + "input_blocks.1.1.time_stack.0.attn1.to_q.weight": t(320, 320),
                P + "label_emb.0.0.weight": t(1280, 256)}, ("unet", "svd", "sv3d_u")),
    "sv3d_p": ({P + "input_blocks.1.1.time_stack.0.attn1.to_q.weight": t(320, 320),
                P + "label_emb.0.0.weight": t(1280, 1280)}, ("unet", "svd", "sv3d_p")),
    "refiner_inpaint": ({P + "label_emb.0.0.weight": t(1536, 2560), P + "input_blocks.0.0.weight": t(384, 9, 3, 3)},
                        ("unet", "sdxl_refiner", "inpaint")),
    "kolors_inpaint": ({P + "label_emb.0.0.weight": t(1280, 5632), P + "input_blocks.0.0.weight": t(320, 9, 3, 3)},
                       ("unet", "kolors", "inpaint")),
    "sd2_unclip_l": ({P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(320, 1024),
                      P + "label_emb.0.0.weight": t(1280, 1536)}, ("unet", "sd2", "unclip_l")),
    "hidream": ({"double_stream_blocks.0.block.adaLN_modulation.1.bias": t(15360)}, ("unet", "hidream", None)),
    "sana": ({"blocks.0.cross_attn.q_linear.weight": t(2240, 2240)}, ("unet", "sana", None)),
    "hunyuan_video": ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": t(3072),
                       "double_blocks.0.img_attn_q_norm.weight": t(128)}, ("unet", "hunyuan_video", None)),
    "flux_in_checkpoint": ({P + "double_blocks.0.img_attn.norm.key_norm.scale": t(128), P + "img_in.weight": t(3072, 64),
                            "vae.decoder.conv_in.weight": t(512, 16, 3, 3),
                            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": t(3072, 768)},
                           ("checkpoint", "flux", "schnell")),
    # standalone components
    "vae16_unnamed": ({"decoder.conv_in.weight": t(512, 16, 3, 3), "encoder.conv_in.weight": t(128, 3, 3, 3)},
                      ("vae", None, None)),
    "taesd": ({"taesd_decoder.1.weight": t(64, 4, 3, 3)}, ("vae", None, "taesd")),
    "taesdxl_standalone": ({"1.weight": t(64, 4, 3, 3), "3.conv.0.weight": t(64, 64, 3, 3)}, ("vae", "sdxl", "taesd")),
    "svd_vae": ({"decoder.conv_in.weight": t(512, 4, 3, 3), "decoder.mid.block_1.mix_factor": t(1)},
                ("vae", "svd", None)),
    "clip_h_hf": ({"text_model.encoder.layers.22.mlp.fc1.weight": t(4096, 1024)}, ("text_encoder", "sd2", "openclip_h")),
    "t5xxl": ({"encoder.block.23.layer.1.DenseReluDense.wi_1.weight": t(10240, 4096)}, ("text_encoder", None, "t5xxl")),
    # adapters
    "controlnet_sd2_unprefixed": ({"zero_convs.0.0.weight": t(320, 320, 1, 1), "input_hint_block.0.weight": t(16, 3, 3, 3),
                                   "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(320, 1024)},
                                  ("controlnet", "sd2", None)),
    "controlnet_sdxl_diffusers": ({"controlnet_cond_embedding.conv_in.weight": t(16, 3, 3, 3),
                                   "add_embedding.linear_1.weight": t(1280, 2816)}, ("controlnet", "sdxl", "diffusers")),
    "control_lora": ({"lora_controlnet": t(0)}, ("controlnet", None, "control_lora")),
    "t2i_adapter_xl": ({"conv_in.weight": t(320, 768, 3, 3), "body.0.block2.weight": t(320, 320, 3, 3)},
                       ("t2i_adapter", "sdxl", None)),
    "ip_adapter_sd15": ({"ip_adapter.1.to_k_ip.weight": t(320, 768), "image_proj.proj.weight": t(3072, 1024)},
                        ("ipadapter", "sd1", None)),
    "realesrgan_x4": ({"conv_first.weight": t(64, 3, 3, 3), "body.0.rdb1.conv1.weight": t(32, 64, 3, 3),
                       "conv_up1.weight": t(64, 64, 3, 3), "conv_up2.weight": t(64, 64, 3, 3)},
                      ("upscaler", "esrgan", "x4")),
    "flux_lora_kohya": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": t(16, 3072),
                         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": t(9216, 16)},
                        ("lora", "flux", "kohya")),
    "flux_lora_peft": ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": t(16, 3072),
                        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": t(3072, 16)},
                       ("lora", "flux", "peft")),
    "flux_lora_xlabs": ({"double_blocks.0.processor.qkv_lora1.down.weight": t(16, 3072),
                         "double_blocks.0.processor.qkv_lora1.up.weight": t(9216, 16)}, ("lora", "flux", "xlabs")),
    "sdxl_lora_te_only": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": t(8, 768),
                           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": t(8, 1280)},
                          ("lora", "sdxl", "kohya")),
    "sd2_lora_kohya": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                        t(8, 1024),
                        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": t(320, 8)},
                       ("lora", "sd2", "kohya")),
    "sdxl_lora_peft": ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": t(8, 2048),
                        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": t(640, 8)},
                       ("lora", "sdxl", "peft")),
    "oft": ({"lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks": t(4, 80, 80)}, ("lycoris", None, "oft")),
    "glora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.a1.weight": t(320, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.b1.weight": t(320, 8)}, ("lycoris", None, "glora")),
    "dora": ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": t(8, 768),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale": t(320, 1)},
             ("lora", "sd1", "dora")),
    "ti_string_to_param_sd2": ({"string_to_param.*": t(4, 1024)}, ("embedding", "sd2", None)),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_oracle_row(tmp_path, name):
    layout, expected = ROWS[name]
    fname = "taesdxl_decoder" if name == "taesdxl_standalone" else name
    info = identify(write_sparse(tmp_path / f"{fname}.safetensors", layout))
    assert (info.kind, info.family, info.variant) == expected, info.evidence
    assert info.evidence


def test_flux_checkpoint_components(tmp_path):
    layout, _ = ROWS["flux_in_checkpoint"]
    info = identify(write_sparse(tmp_path / "f.safetensors", layout))
    assert info.components == ["dit", "vae", "clip_l"]
    assert info.prediction == "flow"


@pytest.mark.parametrize("layout", [
    {"conv_in.weight": t(320), "body.0.block2.weight": t(320, 320, 3, 3)},  # T2I conv_in without in-channels
    {"lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": ("F16", ())},
    {"ip_adapter.1.to_k_ip.weight": ("F16", ()), "image_proj.proj.weight": t(4)},
    {P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": t(320)},
    {"1.weight": t(64), "3.conv.0.weight": t(64, 64, 3, 3)},
    {},
])
def test_odd_shapes_never_crash(tmp_path, layout):
    """Packed (NF4), truncated or hand-edited headers give an answer, never an exception."""
    info = identify(write_sparse(tmp_path / "odd.safetensors", layout))
    assert info.kind in ("unknown", "unet", "controlnet", "lora", "vae", "checkpoint", "upscaler", "t2i_adapter",
                         "ipadapter")


def test_checkpoint_with_a_few_stray_lora_keys_is_still_a_checkpoint(tmp_path):
    from test_identify_rules import real

    lay = real("sd1_checkpoint")
    lay["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = t(4, 320)
    info = identify(write_sparse(tmp_path / "c.safetensors", lay))
    assert (info.kind, info.family) == ("checkpoint", "sd1")


def test_every_family_and_variant_of_the_table_is_exercised():
    """Each family and variant in ``arch.families`` is proved by a row here or by a sample spec."""
    from test_identify_specs import _expected

    from ckptlab.arch.families import FAMILIES
    from ckptlab.sample.build import SPECS

    seen = {(exp[1], exp[2]) for _, exp in ROWS.values()}
    seen |= {(e[1], e[2]) for e in map(_expected, SPECS.values())}
    seen |= {("sdxl", v) for v in ("v_pred", "v_pred_edm", "playground_v25")}  # test_identify_rules marker tests
    families = {f for f, _ in seen}
    for fam in FAMILIES:
        assert fam.id in families, fam.id
        for var in fam.variants:
            assert (fam.id, var.id) in seen, (fam.id, var.id)
