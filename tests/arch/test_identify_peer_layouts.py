"""Issue 11 §4: layouts where ckptlab disagreed with diffusers' and ComfyUI's detection, rebuilt from the PEER'S OWN
key names, with the peer's decision as the oracle.

Where each layout's key names come from (recorded per test too):

- text encoders wrapped in ``transformer.``: ComfyUI ``comfy/sd1_clip.py`` ``SDClipModel`` keeps the HF model in
  ``self.transformer`` (so ``clip.get_sd()`` gives ``clip_l.transformer.text_model.*``, ``t5xxl.transformer.encoder.
  block.*``); diffusers ``loaders/single_file_utils.py`` names them ``text_encoders.clip_l.transformer.text_model.*``,
  ``text_encoders.clip_g.transformer.text_model.*`` and ``text_encoders.t5xxl.transformer.shared.weight``
  (``CHECKPOINT_KEY_NAMES``, ``is_t5_in_single_file``). The module names below the wrapper are produced by
  ``transformers`` itself (``CLIPTextModel`` / ``CLIPTextModelWithProjection`` / ``T5EncoderModel`` on the meta
  device, real configs; ``CLIPTextModelWithProjection``, whose names keep ``text_model.``). Oracle: ComfyUI ``comfy/sd.py`` ``detect_te_model`` (applied after ``CLIPSave``'s
  ``transformer.`` strip).
- old diffusers LoRA naming: diffusers ``loaders/lora_conversion_utils.py`` ``_convert_unet_lora_key`` itself turns
  kohya module names into ``...attn2.processor.to_k_lora.down.weight`` / ``to_out_lora``; ComfyUI ``comfy/lora.py``
  ``model_lora_keys_unet`` adds the ``unet.``-prefixed form. Oracle: the text-context width of the base UNet
  (``attn2.to_k`` input: 768 SD1, 1024 SD2, 2048 SDXL; diffusers ``cross_attention_dim``).
- LoKr: LyCORIS ``modules/lokr.py`` / ComfyUI ``comfy/weight_adapter/lokr.py`` parameter names ``lokr_w1``,
  ``lokr_w1_a/_b``, ``lokr_w2``, ``lokr_w2_a/_b``; oracle: ComfyUI's reconstruction ``kron(w1, w2_a @ w2_b)`` computed
  with torch, whose input width is the context width.
- ``te.`` / ``te1.`` + ``te2.`` checkpoints: sd-mecha ``model_configs/convert_sd1_kohya_to_original.py`` /
  ``convert_sdxl_kohya_to_original.py`` (``te.text_model.``, ``te1.text_model.``, ``te2.text_model.``,
  ``te2.text_projection``, ``unet.``, ``vae.``); the modules below the prefixes come from diffusers'
  ``UNet2DConditionModel`` / ``AutoencoderKL`` and transformers' CLIP models (meta device).
- IP-Adapter: diffusers ``loaders/ip_adapter.py`` splits safetensors keys on ``image_proj.`` / ``ip_adapter.`` (and
  ``ip_adapter_proj_model.`` / ``double_blocks.`` with ``ip_adapter_double_stream_k_proj`` for XLabs Flux);
  ComfyUI_IPAdapter_plus ``IPAdapterPlus.py`` decides full (``proj.3.weight``), plus (``latents``,
  ``perceiver_resampler.proj_in.weight``), FaceID (``0.to_q_lora.down.weight``) and SDXL (``1.to_k_ip.weight``
  input 2048): that rule is the oracle.
- T2I-Adapter: diffusers ``T2IAdapter`` (``full_adapter``, ``full_adapter_xl``, ``light_adapter``) on the meta device
  gives the diffusers layout; ComfyUI ``comfy/controlnet.py`` ``load_t2i_adapter``'s own prefix map
  (``adapter.body.{i}.resnets.{j}.`` -> ``body.{2i+j}.``) gives the TencentARC layout from it. Oracle: the
  adapter type (``full_adapter_xl`` is SDXL; InvokeAI) and ComfyUI's ``xl = cin in (256, 768)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_identify_rules import real, write_sparse

from ckptlab.arch.components import split_components
from ckptlab.arch.detect import KINDS
from ckptlab.arch.identify import identify

H = "F16"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "inspect.md"
#: the text-context width of each base UNet (diffusers UNet2DConditionModel ``cross_attention_dim``)
CONTEXT_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def t(*shape):
    return (H, tuple(shape))


def _meta_layout(model, prefix: str = "") -> dict:
    return {prefix + k: (H, tuple(v.shape)) for k, v in model.state_dict().items()}


# ---- text encoders (transformers' own module names) ------------------------------------------------------------

def _clip(kind: str):
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    # real configs: CLIP-L (SD1/SDXL/SD3/Flux), OpenCLIP-H in HF naming (SD2), OpenCLIP-bigG (SDXL/SD3)
    cfg = {"clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
           "openclip_h": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
           "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)}[kind]
    config = tr.CLIPTextConfig(projection_dim=cfg["hidden_size"], **cfg)
    with torch.device("meta"):
        # the with-projection class keeps the ``text_model.`` names of the files in use (transformers 5's bare
        # CLIPTextModel saves ``embeddings.*`` / ``encoder.layers.*`` at the top level)
        return _meta_layout(tr.CLIPTextModelWithProjection(config))


def _t5xxl():
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    config = tr.T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        return _meta_layout(tr.T5EncoderModel(config))


def comfy_detect_te_model(layout: dict) -> str | None:
    """ComfyUI ``comfy/sd.py`` ``detect_te_model`` (the CLIP / T5-XXL rows), on the keys as ComfyUI loads them:
    ``CLIPSave`` strips ``transformer.``; answers in ckptlab's component names (``CLIP_H`` = ``openclip_h``)."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in layout.items()}
    if "text_model.encoder.layers.30.mlp.fc1.weight" in sd:
        return "clip_g"
    if "text_model.encoder.layers.22.mlp.fc1.weight" in sd:
        return "openclip_h"
    if "text_model.encoder.layers.0.mlp.fc1.weight" in sd:
        return "clip_l"
    w = sd.get("encoder.block.23.layer.1.DenseReluDense.wi_1.weight")
    if w is not None and w[1][-1] == 4096:
        return "t5xxl"
    return None


@pytest.fixture(scope="module")
def encoders():
    return {"clip_l": _clip("clip_l"), "openclip_h": _clip("openclip_h"), "clip_g": _clip("clip_g"),
            "t5xxl": _t5xxl()}


@pytest.mark.parametrize("enc, wrapper", [
    (enc, w) for enc in ("clip_l", "openclip_h", "clip_g", "t5xxl")
    for w in ("transformer.", "", "text_encoders.{enc}.transformer.")
    if not (enc == "openclip_h" and w.startswith("text_encoders."))])  # SD3 files hold clip_l, clip_g, t5xxl
def test_text_encoder_with_comfyui_transformer_wrapper(tmp_path, encoders, enc, wrapper):
    """``transformer.text_model.*`` (CLIP-L/H/bigG) and ``transformer.encoder.block.*`` + ``transformer.shared.weight``
    (T5-XXL) were reported ``kind: unet`` (a DiT); the bare and the SD3-style ``text_encoders.<name>.transformer.``
    forms must stay right too."""
    prefix = wrapper.format(enc=enc)
    layout = {prefix + k: v for k, v in encoders[enc].items()}
    if prefix == "transformer.":
        assert comfy_detect_te_model(layout) == enc  # the peer's answer on this very layout
        assert ("transformer.shared.weight" in layout) == (enc == "t5xxl")
    info = identify(write_sparse(tmp_path / "te.safetensors", layout))
    assert (info.kind, info.variant, info.components) == ("text_encoder", enc, [enc]), info.evidence
    assert info.family == ("sd2" if enc == "openclip_h" else None)  # CLIP-L, bigG and T5 serve several families
    assert not info.warnings, info.warnings


def test_comfyui_ldm_text_encoder_and_openclip_names_stay_right(tmp_path, encoders):
    """``cond_stage_model.transformer.text_model.*`` alone (an A1111 CLIP extract) and an OpenCLIP-named
    ``transformer.resblocks.*`` file (ComfyUI ``load_text_encoder_state_dicts`` converts those) are text encoders."""
    ldm = {"cond_stage_model.transformer." + k: v for k, v in encoders["clip_l"].items()}
    info = identify(write_sparse(tmp_path / "a.safetensors", ldm))
    assert (info.kind, info.variant, info.components) == ("text_encoder", "clip_l", ["clip_l"])
    openclip = {f"transformer.resblocks.{i}.ln_1.weight": t(1024) for i in range(24)}
    openclip |= {"token_embedding.weight": t(49408, 1024), "positional_embedding": t(77, 1024),
                 "ln_final.weight": t(1024), "text_projection": t(1024, 1024)}
    info = identify(write_sparse(tmp_path / "b.safetensors", openclip))
    assert (info.kind, info.family, info.variant) == ("text_encoder", "sd2", "openclip_h")


def test_a_diffusers_transformer_folder_is_still_a_dit(tmp_path):
    """The ``transformer.`` wrapper rule must not take a DiT for a text encoder: a Flux diffusers transformer
    (diffusers ``FluxTransformer2DModel`` names) stays ``dit``."""
    lay = {"transformer.single_transformer_blocks.0.attn.norm_k.weight": t(128),
           "transformer.x_embedder.weight": t(3072, 64), "transformer.context_embedder.weight": t(3072, 4096),
           "transformer.time_text_embed.guidance_embedder.linear_1.weight": t(3072, 256)}
    info = identify(write_sparse(tmp_path / "f.safetensors", lay))
    assert (info.kind, info.family, info.components) == ("unet", "flux", ["dit"])


def test_split_components_puts_the_wrapped_encoder_in_one_component(encoders):
    keys = ["transformer." + k for k in encoders["t5xxl"]]
    assert split_components(keys) == {"t5xxl": keys}


# ---- old diffusers LoRA naming (diffusers' own converter writes the names) -------------------------------------

@pytest.mark.parametrize("spec, family", [("sd1_kohya_lora", "sd1"), ("sdxl_kohya_lora", "sdxl"),
                                          ("sd2_kohya_lora", "sd2")])
@pytest.mark.parametrize("unet_prefix", ["", "unet."])
def test_old_diffusers_processor_lora_gets_its_family(tmp_path, spec, family, unet_prefix):
    lcu = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    layout = {}
    for k, v in real(spec).items():
        if k.startswith("lora_unet_") and not k.endswith(".alpha"):
            layout[unet_prefix + lcu._convert_unet_lora_key(k)] = v
    to_k = [k for k in layout if k.endswith("attn2.processor.to_k_lora.down.weight")]
    assert to_k and any(k.endswith("processor.to_out_lora.down.weight") for k in layout)  # the peer's naming
    assert {layout[k][1][-1] for k in to_k} == {CONTEXT_WIDTH[family]}
    info = identify(write_sparse(tmp_path / "old.safetensors", layout))
    assert (info.kind, info.family, info.variant) == ("lora", family, "diffusers_old"), info.evidence


def test_processor_lora_without_to_k_falls_back_to_the_sdxl_block_depth(tmp_path):
    """Only ``to_out_lora`` / self-attention modules: no context width, but ``transformer_blocks.N`` with N >= 2
    exists only in SDXL (the reference's fallback)."""
    lay = {"down_blocks.2.attentions.0.transformer_blocks.5.attn1.processor.to_out_lora.down.weight": t(4, 1280),
           "down_blocks.2.attentions.0.transformer_blocks.5.attn1.processor.to_out_lora.up.weight": t(1280, 4)}
    info = identify(write_sparse(tmp_path / "o.safetensors", lay))
    assert (info.kind, info.family) == ("lora", "sdxl"), info.evidence


# ---- LoKr with factored w1 / w2 (LyCORIS / ComfyUI parameter names) --------------------------------------------

def _factor(layout: dict, which: tuple[str, ...], rank: int = 4) -> dict:
    out = {}
    for k, (dt, shape) in layout.items():
        name = k.rsplit(".", 1)[-1]
        if name in which and len(shape) == 2:
            base = k[: -len(name)]
            out[base + name + "_a"] = (dt, (shape[0], rank))
            out[base + name + "_b"] = (dt, (rank, shape[1]))
        else:
            out[k] = (dt, shape)
    return out


def _comfy_lokr_shape(layout: dict, base: str) -> tuple[int, ...]:
    """ComfyUI ``weight_adapter/lokr.py``: ``w1 = lokr_w1 or w1_a @ w1_b``, ``w2 = lokr_w2 or w2_a @ w2_b``,
    ``diff = kron(w1, w2)``; computed with torch on zero tensors of the file's shapes."""
    torch = pytest.importorskip("torch")

    def factor(n):
        if base + n in layout:
            return torch.zeros(layout[base + n][1])
        return torch.zeros(layout[base + n + "_a"][1]) @ torch.zeros(layout[base + n + "_b"][1])

    return tuple(torch.kron(factor("lokr_w1"), factor("lokr_w2")).shape)


@pytest.mark.parametrize("factored", [("lokr_w2",), ("lokr_w1",), ("lokr_w1", "lokr_w2")])
def test_lokr_with_factored_weights_gets_its_family(tmp_path, factored):
    layout = _factor(real("sd1_lokr"), factored)
    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k."
    assert all(base + n + "_a" in layout for n in factored)
    assert _comfy_lokr_shape(layout, base) == (320, 768)  # SD1 attn2.to_k is [320, 768]
    info = identify(write_sparse(tmp_path / "lokr.safetensors", layout))
    assert (info.kind, info.family, info.variant) == ("lycoris", "sd1", "lokr"), info.evidence


def test_sdxl_lokr_with_factored_w2_in_sgm_names(tmp_path):
    """kohya SDXL module names (``lora_unet_input_blocks_4_1_...``), to_k [640, 2048] as 20x32 (x) 32x64."""
    base = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k."
    layout = {base + "lokr_w1": t(20, 32), base + "lokr_w2_a": t(32, 4), base + "lokr_w2_b": t(4, 64),
              base + "alpha": ("F32", ())}
    assert _comfy_lokr_shape(layout, base) == (640, 2048)
    info = identify(write_sparse(tmp_path / "lokr.safetensors", layout))
    assert (info.kind, info.family) == ("lycoris", "sdxl"), info.evidence


# ---- kohya text-encoder module prefixes in LoRAs -----------------------------------------------------------------

@pytest.mark.parametrize("keys, family", [
    # kohya networks/lora_flux.py: LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1", ..._T5 = "lora_te3"
    (("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_k"),
     "flux"),
    # early sd-scripts Flux: T5 under lora_te2
    (("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_encoder_block_0_layer_0_SelfAttention_k"),
     "flux"),
    # kohya networks/lora_sd3.py: te1 CLIP-L, te2 CLIP-G, te3 T5
    (("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
      "lora_te3_encoder_block_0_layer_0_SelfAttention_k"), "sd3"),
    # SDXL: te1 CLIP-L, te2 CLIP-G
    (("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"),
     "sdxl"),
])
def test_text_encoder_only_kohya_lora_family(tmp_path, keys, family):
    lay = {}
    for k in keys:
        lay[k + ".lora_down.weight"] = t(8, 4096 if "encoder_block" in k else 768)
        lay[k + ".lora_up.weight"] = t(4096 if "encoder_block" in k else 768, 8)
    info = identify(write_sparse(tmp_path / "te.safetensors", lay))
    assert (info.kind, info.family) == ("lora", family), info.evidence


# ---- te. / te1. + te2. checkpoints (sd-mecha kohya configs) ----------------------------------------------------

def test_sd1_kohya_checkpoint_keeps_its_text_encoder(tmp_path, encoders):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        unet = _meta_layout(diffusers.UNet2DConditionModel(cross_attention_dim=768), "unet.")
        vae = _meta_layout(diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), "vae.")
    te = {"te." + k: v for k, v in encoders["clip_l"].items()}
    info = identify(write_sparse(tmp_path / "kohya.safetensors", unet | vae | te))
    assert (info.kind, info.family) == ("checkpoint", "sd1"), info.evidence
    assert info.components == ["unet", "vae", "clip_l"]


def test_sd2_kohya_checkpoint_te_is_openclip_h(tmp_path, encoders):
    lay = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": t(320, 1024),
           "unet.down_blocks.0.attentions.0.proj_in.weight": t(320, 320)}
    lay |= {"te." + k: v for k, v in encoders["openclip_h"].items()}
    info = identify(write_sparse(tmp_path / "kohya2.safetensors", lay))
    assert (info.kind, info.family, info.components) == ("checkpoint", "sd2", ["unet", "openclip_h"]), info.evidence


def _sdxl_diffusers_unet() -> dict:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # the SDXL base UNet config (diffusers' stable-diffusion-xl-base-1.0 unet/config.json)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                                   "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    return _meta_layout(unet, "unet.")


@pytest.mark.parametrize("unet_names", ["sgm", "diffusers"])
def test_sdxl_kohya_checkpoint_keeps_both_text_encoders(tmp_path, encoders, unet_names):
    """sd-mecha ``sdxl-kohya``: ``model.diffusion_model.`` -> ``unet.``, ``conditioner.embedders.0.transformer.``
    -> ``te1.text_model.``, bigG in HF naming under ``te2.`` (+ ``te2.text_projection``), VAE under ``vae.``;
    ``sdxl-kohya_but_diffusers`` has the UNet in diffusers names."""
    sgm = real("sdxl_checkpoint")
    if unet_names == "sgm":
        lay = {"unet." + k[len("model.diffusion_model."):]: v for k, v in sgm.items()
               if k.startswith("model.diffusion_model.")}
    else:
        lay = _sdxl_diffusers_unet()
    lay |= {"vae." + k[len("first_stage_model."):]: v for k, v in sgm.items() if k.startswith("first_stage_model.")}
    lay |= {"te1." + k: v for k, v in encoders["clip_l"].items()}
    lay |= {"te2." + k: v for k, v in encoders["clip_g"].items()}
    assert "te2.text_projection.weight" in lay
    info = identify(write_sparse(tmp_path / "kohyaxl.safetensors", lay))
    assert (info.kind, info.family) == ("checkpoint", "sdxl"), info.evidence
    assert info.components == ["unet", "vae", "clip_l", "clip_g"]
    comps = split_components(lay)
    assert len(comps["clip_l"]) == len(encoders["clip_l"]) and len(comps["clip_g"]) == len(encoders["clip_g"])


# ---- IP-Adapter (diffusers / IPAdapter_plus names) ---------------------------------------------------------------

def ipadapter_plus_rule(layout: dict) -> tuple[str | None, str | None]:
    """ComfyUI_IPAdapter_plus ``IPAdapterPlus.py`` on the ``{"image_proj", "ip_adapter"}`` dict diffusers'
    ``ip_adapter.py`` splits a safetensors file into: (base, variant) in ckptlab's words."""
    image_proj = {k[len("image_proj."):]: v for k, v in layout.items() if k.startswith("image_proj.")}
    ip_adapter = {k[len("ip_adapter."):]: v for k, v in layout.items() if k.startswith("ip_adapter.")}
    is_full = "proj.3.weight" in image_proj
    is_portrait = "proj.2.weight" in image_proj and not is_full and "0.to_q_lora.down.weight" not in ip_adapter
    is_faceid = is_portrait or "0.to_q_lora.down.weight" in ip_adapter
    is_plus = is_full or "latents" in image_proj or "perceiver_resampler.proj_in.weight" in image_proj
    out_dim = ip_adapter["1.to_k_ip.weight"][1][1]
    base = {2048: "sdxl", 768: "sd1", 1024: "sd2"}.get(out_dim)  # 1024: InvokeAI's SD2 rule
    if is_portrait:
        variant = "faceid_portrait"
    elif is_faceid:
        variant = "faceid_plus" if is_plus else "faceid"
    else:
        variant = "full" if is_full else ("plus" if is_plus else None)
    return base, variant


def _ip(width: int, cross: list[int], image_proj: dict, faceid: bool = False) -> dict:
    """``ip_adapter.{1,3,..}.to_k_ip/to_v_ip`` for the cross-attentions in diffusers processor order (odd ids),
    FaceID adding ``to_q/k/v/out_lora`` to every processor."""
    lay = {"image_proj." + k: v for k, v in image_proj.items()}
    for n, c in enumerate(cross):
        if faceid:
            for i in (2 * n, 2 * n + 1):
                for m in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
                    lay[f"ip_adapter.{i}.{m}.down.weight"] = t(128, c)
                    lay[f"ip_adapter.{i}.{m}.up.weight"] = t(c, 128)
        lay[f"ip_adapter.{2 * n + 1}.to_k_ip.weight"] = t(c, width)
        lay[f"ip_adapter.{2 * n + 1}.to_v_ip.weight"] = t(c, width)
    return lay


SD1_CROSS = [320] * 4 + [640] * 4 + [1280] * 5 + [640] * 3  # 16 cross-attentions (sizes as the UNet's blocks)
SDXL_CROSS = [640] * 4 + [1280] * 20 + [1280] * 10 + [1280] * 30 + [640] * 6  # 70 cross-attentions
PLUS_PROJ = {"latents": t(1, 16, 768), "proj_in.weight": t(768, 1280), "proj_out.weight": t(768, 768),
             "norm_out.weight": t(768), "layers.0.0.to_q.weight": t(768, 768), "layers.0.0.to_out.weight": t(768, 768)}
IP_CASES = {
    "sd15": (_ip(768, SD1_CROSS, {"proj.weight": t(3072, 1024), "norm.weight": t(768)}), "sd1", None),
    "sd15_plus": (_ip(768, SD1_CROSS, PLUS_PROJ), "sd1", "plus"),
    "sd15_full_face": (_ip(768, SD1_CROSS, {"proj.0.weight": t(1024, 1024), "proj.2.weight": t(768, 1024),
                                            "proj.3.weight": t(768)}), "sd1", "full"),
    "sd15_faceid": (_ip(768, SD1_CROSS, {"proj.0.weight": t(1024, 512), "proj.2.weight": t(3072, 1024),
                                         "norm.weight": t(768)}, faceid=True), "sd1", "faceid"),
    "sd15_faceid_plus": (_ip(768, SD1_CROSS, {"perceiver_resampler.proj_in.weight": t(768, 1280),
                                              "proj.0.weight": t(1024, 512), "proj.2.weight": t(3072, 1024)},
                             faceid=True), "sd1", "faceid_plus"),
    "sdxl": (_ip(2048, SDXL_CROSS, {"proj.weight": t(8192, 1280), "norm.weight": t(2048)}), "sdxl", None),
    "sdxl_plus": (_ip(2048, SDXL_CROSS, {**PLUS_PROJ, "latents": t(1, 16, 1280)}), "sdxl", "plus"),
}


@pytest.mark.parametrize("name", sorted(IP_CASES))
def test_ip_adapter_safetensors_layout(tmp_path, name):
    layout, base, variant = IP_CASES[name]
    assert ipadapter_plus_rule(layout) == (base, variant)  # the peer's own answer
    info = identify(write_sparse(tmp_path / f"ip-adapter_{name}.safetensors", layout))
    assert (info.kind, info.family, info.variant) == ("ipadapter", base, variant), info.evidence
    assert info.components == [] and info.vram is not None


def test_faceid_ip_adapter_is_not_taken_for_a_lora(tmp_path):
    """A FaceID IP-Adapter is mostly LoRA keys (``ip_adapter.N.to_q_lora.down.weight``)."""
    layout, _, _ = IP_CASES["sd15_faceid"]
    assert sum("_lora." in k for k in layout) > len(layout) / 2
    assert identify(write_sparse(tmp_path / "faceid.safetensors", layout)).kind == "ipadapter"


def test_ip_adapter_bin_dict_layout(tmp_path):
    """The ``.bin`` layout: ``torch.save({"image_proj": {...}, "ip_adapter": {...}})`` (what the IP-Adapter repo
    ships); small tensors with the real widths."""
    torch = pytest.importorskip("torch")
    sd = {"image_proj": {"proj.weight": torch.zeros(16, 8), "norm.weight": torch.zeros(768)},
          "ip_adapter": {f"{2 * n + 1}.to_{kv}_ip.weight": torch.zeros(c, 768, dtype=torch.float16)
                         for n, c in enumerate(SD1_CROSS) for kv in "kv"}}
    path = tmp_path / "ip-adapter_sd15.bin"
    torch.save(sd, path)
    info = identify(path)
    assert (info.format, info.kind, info.family, info.variant) == ("pickle", "ipadapter", "sd1", None), info.evidence


def test_kolors_and_xlabs_flux_ip_adapters(tmp_path):
    kolors = _ip(2048, SDXL_CROSS, {**PLUS_PROJ, "latents": t(1, 16, 2048), "layers.0.0.to_out.weight": t(2048, 2048)})
    info = identify(write_sparse(tmp_path / "kolors_ip.safetensors", kolors))
    assert (info.kind, info.family, info.variant) == ("ipadapter", "kolors", "plus"), info.evidence
    xlabs = {"ip_adapter_proj_model.proj.weight": t(16384, 768), "ip_adapter_proj_model.norm.weight": t(4096)}
    for i in range(19):
        for kv in "kv":
            xlabs[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.weight"] = t(3072, 4096)
    info = identify(write_sparse(tmp_path / "flux-ip.safetensors", xlabs))
    assert (info.kind, info.family, info.variant) == ("ipadapter", "flux", "xlabs"), info.evidence


# ---- T2I-Adapter (diffusers T2IAdapter names, ComfyUI's conversion to the TencentARC names) ---------------------

def _diffusers_t2i(adapter_type: str, in_channels: int) -> dict:
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    kw = dict(in_channels=in_channels, adapter_type=adapter_type)
    if adapter_type == "full_adapter_xl":
        kw |= dict(channels=[320, 640, 1280, 1280], downscale_factor=16)
    with torch.device("meta"):
        return _meta_layout(diffusers.T2IAdapter(**kw))


def comfy_diffusers_to_tencent(layout: dict) -> dict:
    """ComfyUI ``load_t2i_adapter``'s prefix map for the diffusers format (first matching prefix wins)."""
    prefixes = {}
    for i in range(4):
        for j in range(2):
            prefixes[f"adapter.body.{i}.resnets.{j}."] = f"body.{i * 2 + j}."
        prefixes[f"adapter.body.{i}."] = f"body.{i * 2}."
    prefixes["adapter."] = ""
    out = {}
    for k, v in layout.items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        out[(prefixes[p] + k[len(p):]) if p is not None else k] = v
    return out


@pytest.mark.parametrize("adapter_type, in_channels, family", [
    ("full_adapter", 3, "sd1"), ("full_adapter", 1, "sd1"), ("full_adapter_xl", 3, "sdxl"),
    ("full_adapter_xl", 1, "sdxl"), ("light_adapter", 3, "sd1")])
def test_t2i_adapter_layouts(tmp_path, adapter_type, in_channels, family):
    diff = _diffusers_t2i(adapter_type, in_channels)
    light = adapter_type == "light_adapter"
    assert ("adapter.body.0.in_conv.weight" in diff) == light
    assert light or "adapter.body.0.resnets.0.block1.weight" in diff  # ComfyUI's "diffusers format" test key
    layouts = {"diffusers": diff}
    if not light:
        tencent = comfy_diffusers_to_tencent(diff)
        cin = tencent["conv_in.weight"][1][1]
        assert (cin in (256, 768)) == (family == "sdxl")  # ComfyUI: xl = cin == 256 or cin == 768
        layouts |= {"tencentarc": tencent, "wrapped": {"adapter." + k: v for k, v in tencent.items()}}
    for name, lay in layouts.items():
        info = identify(write_sparse(tmp_path / f"t2i_{name}.safetensors", lay))
        assert (info.kind, info.family, info.variant) == ("t2i_adapter", family, "light" if light else None), \
            (name, info.evidence)
        assert info.components == []


def test_t2i_style_adapter(tmp_path):
    """ComfyUI ``load_style_model``: ``style_embedding`` => StyleAdapter(context_dim=768)."""
    lay = {"style_embedding": t(1, 8, 1024), "ln_post.weight": t(1024), "proj": t(1024, 768),
           "transformer_layes.0.attn.in_proj_weight": t(3072, 1024)}
    info = identify(write_sparse(tmp_path / "t2iadapter_style_sd14v1.safetensors", lay))
    assert (info.kind, info.family, info.variant) == ("t2i_adapter", "sd1", "style"), info.evidence


# ---- the kind vocabulary -------------------------------------------------------------------------------------------

def test_every_kind_is_documented():
    """docs/inspect.md's kind row names every kind the detector answers."""
    row = next(line for line in DOCS.read_text(encoding="utf-8").splitlines() if line.startswith("| `kind` |"))
    for kind in KINDS:
        assert f"`{kind}`" in row, kind


def test_new_kinds_have_ui_folders(tmp_path):
    """ComfyUI keeps IP-Adapters in ``models/ipadapter`` (ComfyUI_IPAdapter_plus), A1111 in ``models/ControlNet``;
    T2I-Adapters live in the controlnet folders of both UIs (ComfyUI also reads ``models/t2i_adapter``)."""
    from ckptlab.hub.destination import folder_for_kind
    from ckptlab.library.ui_folders import folder_hint

    assert folder_for_kind(tmp_path, "comfyui", "ipadapter") == tmp_path / "models/ipadapter"
    assert folder_for_kind(tmp_path, "a1111", "ipadapter") == tmp_path / "models/ControlNet"
    assert folder_for_kind(tmp_path, "comfyui", "t2i_adapter") == tmp_path / "models/controlnet"
    assert folder_for_kind(tmp_path, "a1111", "t2i_adapter") == tmp_path / "models/ControlNet"
    assert folder_hint("/c/models/ipadapter/ip-adapter_sd15.safetensors")[2] == "ipadapter"
    assert folder_hint("/c/models/t2i_adapter/t2i.safetensors")[2] == "t2i_adapter"
