"""Write sample model files with real key layouts: ``write_model`` and ``build_library``.

``SPECS`` names every sample and carries what the public sources (ComfyUI's ``model_detection.py``,
diffusers' ``single_file_utils``, the peers of docs/sample.md) say a correct identifier must report for
it: kind, family, variant, components, prediction type. Those expectations come from those sources,
never from a ckptlab detector, so identification tests can loop over ``SPECS``.

Values are seeded random (normal, scaled by 1/sqrt(fan_in); norm weights near 1) and depend only on
(seed, key), so the same arguments always give byte-identical files. Real buffers get real values:
the LDM scaled-linear noise schedule, ``position_ids`` 0..76, SD3 flow sigmas.
"""

from __future__ import annotations

import math
import shutil
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ckptlab.atomic import write_atomic
from ckptlab.errors import OutputError
from ckptlab.formats.arrays import import_torch
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.writer import SafetensorsWriter, build_header
from ckptlab.sample import adapters, layouts


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    kind: str                       # checkpoint unet vae text_encoder lora lycoris embedding hypernetwork controlnet upscaler
    family: str                     # sd1 sd2 sdxl sdxl_refiner sd3 flux cascade pixart auraflow hunyuan_dit svd t5 esrgan ...
    variant: str = "normal"         # normal inpaint instruct_pix2pix depth | dev schnell fill | kohya peft loha lokr ...
    components: tuple[str, ...] = ()
    prediction: str | None = None   # epsilon | v | flow | None when the keys cannot tell (SD2 v vs eps)
    fmt: str = "safetensors"        # default container: safetensors | ckpt (Lightning-wrapped pickle) | pt (plain pickle)
    filename: str = ""              # a realistic file name (extension from fmt)
    metadata: Mapping[str, str] = field(default_factory=dict)
    ambiguous_with: tuple[str, ...] = ()  # families the keys alone cannot rule out (only a hash or the name can)
    ema_ok: bool = False            # write_model(ema=True) allowed (LDM checkpoints)
    verified_by: str = ""           # the independent oracle(s) the layout is tested against ("" = none)
    notes: str = ""

    @property
    def suffix(self) -> str:
        return {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}[self.fmt]


_MS = "modelspec."



def _torch():
    """torch, or one line naming the extra: the sample builder writes random weights and pickles with torch."""
    return import_torch("building sample files")

def _modelspec(arch: str, title: str, res: str, pred: str | None = None, impl: str = "https://github.com/Stability-AI/generative-models") -> dict[str, str]:
    md = {_MS + "sai_model_spec": "1.0.1", _MS + "architecture": arch, _MS + "implementation": impl,
          _MS + "title": title, _MS + "resolution": res}
    if pred:
        md[_MS + "prediction_type"] = pred
    return md


_SD1 = ("unet", "vae", "clip_l")
_SD2 = ("unet", "vae", "clip_h")
_VAE4 = ("sd1", "sd2", "sdxl")

_SPEC_LIST = [
    Spec("sd1_checkpoint", "SD1.5 single-file checkpoint (LDM names, schedule buffers, position_ids)", "checkpoint", "sd1",
         components=_SD1, prediction="epsilon", filename="v1-5-pruned-emaonly", ema_ok=True),
    Spec("sd1_merged", "SD1 merge output: position_ids stored as float and off by a little (76 -> 75.9975)",
         "checkpoint", "sd1", components=_SD1, prediction="epsilon", filename="anything-merge-v3",
         metadata={"sd_merge_recipe": '{"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.3}'},
         notes="float position_ids are a merge fingerprint (A1111 Model Toolkit)"),
    Spec("sd1_inpaint", "SD1.5 inpainting checkpoint (UNet in-channels 9)", "checkpoint", "sd1", "inpaint",
         _SD1, "epsilon", filename="sd-v1-5-inpainting", ema_ok=True),
    Spec("sd1_pix2pix", "InstructPix2Pix checkpoint (UNet in-channels 8)", "checkpoint", "sd1", "instruct_pix2pix",
         _SD1, "epsilon", filename="instruct-pix2pix-00-22000", ema_ok=True),
    Spec("sd1_unet", "SD1 UNet alone (LDM names, no prefix)", "unet", "sd1", components=("unet",),
         prediction="epsilon", filename="sd15_unet"),
    Spec("sd1_vae", "4-channel KL-f8 VAE (LDM names), as shipped for SD1", "vae", "sd1", components=("vae",),
         filename="vae-ft-mse-840000-ema-pruned", ambiguous_with=_VAE4),
    Spec("sdxl_vae", "4-channel KL-f8 VAE (LDM names), as shipped for SDXL", "vae", "sdxl", components=("vae",),
         filename="sdxl_vae", ambiguous_with=_VAE4),
    Spec("sd3_vae", "16-channel VAE (no quant convs); SD3 and Flux share this layout", "vae", "sd3",
         components=("vae",), filename="sd3_vae", ambiguous_with=("sd3", "flux")),
    Spec("clip_l", "CLIP-L text encoder, HF CLIPTextModelWithProjection names", "text_encoder", "clip_l",
         components=("clip_l",), filename="clip_l"),
    Spec("clip_g", "OpenCLIP bigG text encoder, HF names (32 layers)", "text_encoder", "clip_g",
         components=("clip_g",), filename="clip_g"),
    Spec("t5xxl", "T5-XXL v1.1 encoder (24 blocks, gated GELU)", "text_encoder", "t5xxl", components=("t5xxl",),
         filename="t5xxl_fp16"),
    Spec("sd2_checkpoint", "SD2.x checkpoint without metadata: v vs eps is not in the keys", "checkpoint", "sd2",
         components=_SD2, prediction=None, filename="sd2-model", ema_ok=True,
         notes="SD2 v vs eps: tools disagree; metadata decides when present"),
    Spec("sd2_768_v", "SD2.1 768 v-prediction checkpoint (modelspec says v)", "checkpoint", "sd2", components=_SD2,
         prediction="v", filename="v2-1_768-ema-pruned", ema_ok=True,
         metadata=_modelspec("stable-diffusion-v2-768-v", "SD 2.1 768", "768x768", "v"),
         notes="norm1.bias of output_blocks.11.1 has std 0.15 (ComfyUI's > 0.09 heuristic also says v)"),
    Spec("sd2_512_base", "SD2.1 512 base epsilon checkpoint (modelspec says epsilon)", "checkpoint", "sd2",
         components=_SD2, prediction="epsilon", filename="v2-1_512-ema-pruned", ema_ok=True,
         metadata=_modelspec("stable-diffusion-v2-512", "SD 2.1 512 base", "512x512", "epsilon")),
    Spec("sd2_inpaint", "SD2 inpainting checkpoint (in-channels 9)", "checkpoint", "sd2", "inpaint", _SD2,
         "epsilon", filename="512-inpainting-ema", ema_ok=True),
    Spec("sd2_depth", "SD2 depth checkpoint (in-channels 5 + MiDaS under depth_model.model.)", "checkpoint", "sd2",
         "depth", (*_SD2, "depth_model"), "epsilon", filename="512-depth-ema", ema_ok=True),
    Spec("sdxl_checkpoint", "SDXL 1.0 base single file (SGM names)", "checkpoint", "sdxl",
         components=("unet", "vae", "clip_l", "clip_g"), prediction="epsilon", filename="sd_xl_base_1.0"),
    Spec("sdxl_inpaint", "SDXL inpainting (in-channels 9)", "checkpoint", "sdxl", "inpaint",
         ("unet", "vae", "clip_l", "clip_g"), "epsilon", filename="sd_xl_inpaint_0.1"),
    Spec("sdxl_refiner", "SDXL 1.0 refiner single file (OpenCLIP-G only)", "checkpoint", "sdxl_refiner",
         components=("unet", "vae", "clip_g"), prediction="epsilon", filename="sd_xl_refiner_1.0"),
    Spec("sd3_medium", "SD3 medium all-in-one (MMDiT + 16-ch VAE + CLIP-L + CLIP-G + T5-XXL)", "checkpoint", "sd3",
         "sd3_medium", ("unet", "vae", "clip_l", "clip_g", "t5xxl"), "flow",
         filename="sd3_medium_incl_clips_t5xxlfp16"),
    Spec("sd35_medium", "SD3.5 medium all-in-one (MMDiT-X: qk-norm, attn2 in blocks 0-12, pos_embed 384^2)",
         "checkpoint", "sd3", "sd35_medium", ("unet", "vae", "clip_l", "clip_g", "t5xxl"), "flow",
         filename="sd3.5_medium_incl_clips_t5xxlfp8scaled"),
    Spec("sd35_large", "SD3.5 large all-in-one (38 blocks, hidden 2432, qk-norm)", "checkpoint", "sd3",
         "sd35_large", ("unet", "vae", "clip_l", "clip_g", "t5xxl"), "flow", filename="sd3.5_large"),
    Spec("flux_dev", "Flux.1 dev transformer, BFL original file (no prefix)", "unet", "flux", "dev", ("unet",),
         "flow", filename="flux1-dev"),
    Spec("flux_schnell", "Flux.1 schnell transformer (no guidance_in)", "unet", "flux", "schnell", ("unet",),
         "flow", filename="flux1-schnell"),
    Spec("flux_fill", "Flux.1 Fill transformer (img_in 384 = 64 + 320 mask/image channels)", "unet", "flux",
         "fill", ("unet",), "flow", filename="flux1-fill-dev"),
    Spec("flux_depth", "Flux.1 Depth transformer (img_in 128)", "unet", "flux", "depth", ("unet",), "flow",
         filename="flux1-depth-dev"),
    Spec("flux_dev_fp8_scaled", "Flux.1 dev in ComfyUI scaled fp8 (F8_E4M3 weights + scale_weight, scaled_fp8 marker)",
         "unet", "flux", "dev", ("unet",), "flow", filename="flux1-dev-fp8-scaled",
         notes="quantized variant to recognise before family checks (ComfyUI scaled fp8)"),
    Spec("sd1_controlnet", "SD1 ControlNet, LDM names under control_model.", "controlnet", "sd1",
         components=("controlnet",), filename="control_v11p_sd15_canny", fmt="safetensors"),
    Spec("sd1_kohya_lora", "kohya LoRA for SD1 (diffusers-style module names, alpha)", "lora", "sd1", "kohya",
         filename="sd15_style_lora", metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                                               "ss_network_dim": "4", "ss_network_alpha": "2.0"}),
    Spec("sdxl_kohya_lora", "kohya LoRA for SDXL (SGM module names; lora_te1_ + lora_te2_)", "lora", "sdxl",
         "kohya", filename="sdxl_detail_lora",
         metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}),
    Spec("sd1_peft_lora", "diffusers/PEFT LoRA for SD1 (unet./text_encoder. ... lora_A/lora_B)", "lora", "sd1",
         "peft", filename="pytorch_lora_weights"),
    Spec("sd1_loha", "LyCORIS LoHa for SD1 (hada_w1_a/b, hada_w2_a/b)", "lycoris", "sd1", "loha",
         filename="sd15_loha", metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1",
                                         "ss_network_args": '{"algo": "loha"}'}),
    Spec("sd1_lokr", "LyCORIS LoKr for SD1 (lokr_w1, lokr_w2)", "lycoris", "sd1", "lokr", filename="sd15_lokr",
         metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}),
    Spec("sd1_embedding", "SD1 textual inversion (safetensors emb_params; fmt='pt' gives the A1111 pickle)",
         "embedding", "sd1", filename="easynegative"),
    Spec("sdxl_embedding", "SDXL textual inversion (clip_l [n,768] + clip_g [n,1280])", "embedding", "sdxl",
         filename="sdxl_negative"),
    Spec("sd1_hypernetwork", "A1111 hypernetwork (pickle with int width keys 768/320/640/1280)", "hypernetwork",
         "sd1", fmt="pt", filename="anime_hypernet"),
    Spec("esrgan_x4", "ESRGAN x4 upscaler, old architecture names (model.N, RRDB)", "upscaler", "esrgan", "x4",
         fmt="pt", filename="RRDB_ESRGAN_x4"),
    Spec("realesrgan_x4plus", "Real-ESRGAN x4plus, BasicSR RRDBNet names (pickle wraps them in params_ema)",
         "upscaler", "esrgan", "x4", fmt="pt", filename="RealESRGAN_x4plus"),
    Spec("sd2_wd", "SD2 file whose OpenCLIP-H lacks its last block, text_projection and logit_scale (WD 1.4)",
         "checkpoint", "sd2", components=_SD2, filename="wd-1-4-anime_e2", ema_ok=True,
         notes="A1111 Model Toolkit ('CLIP is missing its final layer', CLIP-v2-WD: 280 keys)"),
    Spec("sd1_nai_clip", "SD1 file with old CLIP naming (no text_model.; NovelAI-era), to be normalised",
         "checkpoint", "sd1", components=_SD1, prediction="epsilon", filename="animefull-final-pruned",
         fmt="ckpt", ema_ok=True, notes="A1111 checkpoint_dict_replacements_sd1"),
    Spec("sd2_kohya_lora", "kohya LoRA for SD2 (attn2_to_k down in 1024; ss_v2=True)", "lora", "sd2", "kohya",
         filename="sd21_lora", metadata={"ss_network_module": "networks.lora", "ss_v2": "True",
                                         "ss_base_model_version": "sd_v2"}),
    Spec("sd2_embedding", "SD2 textual inversion (emb_params [n, 1024])", "embedding", "sd2",
         filename="sd2_negative"),
    Spec("sdxl_vpred", "SDXL v-prediction + zero-terminal-SNR (top-level empty v_pred / ztsnr tensors)",
         "checkpoint", "sdxl", "v_pred", ("unet", "vae", "clip_l", "clip_g"), "v", filename="noobai-xl-vpred"),
    Spec("sdxl_cosxl", "CosXL-style SDXL (top-level edm_vpred.sigma_max / sigma_min)", "checkpoint", "sdxl",
         "v_pred_edm", ("unet", "vae", "clip_l", "clip_g"), "v", filename="cosxl"),
    Spec("playground_v25", "Playground v2.5 (SDXL keys + top-level edm_mean / edm_std; EDM schedule)",
         "checkpoint", "playground_v25", components=("unet", "vae", "clip_l", "clip_g"), prediction="edm",
         filename="playground-v2.5-1024px-aesthetic"),
    Spec("kolors_unet", "Kolors UNet (SDXL layout, label_emb in 5632, encoder_hid_proj from ChatGLM3 4096)",
         "unet", "kolors", components=("unet",), prediction="epsilon", filename="kolors_unet"),
    Spec("svd", "Stable Video Diffusion img2vid (UNet + temporal VAE; image-encoder conditioner omitted)",
         "checkpoint", "svd", components=("unet", "vae"), prediction="v", filename="svd_xt"),
    Spec("chroma", "Chroma (Flux blocks without modulation linears + distilled_guidance_layer)", "unet",
         "chroma", components=("unet",), prediction="flow", filename="chroma-unlocked-v37"),
    Spec("cascade_stage_c", "Stable Cascade stage C prior (original names)", "unet", "cascade", "stage_c",
         ("unet",), filename="stage_c"),
    Spec("cascade_stage_b", "Stable Cascade stage B decoder (original names)", "unet", "cascade", "stage_b",
         ("unet",), filename="stage_b"),
    Spec("pixart_alpha", "PixArt-alpha XL/2 1024-MS (ar/csize micro-conditions)", "unet",
         "pixart", "alpha", ("unet",), filename="PixArt-XL-2-1024-MS"),
    Spec("pixart_sigma", "PixArt-Sigma XL/2 (300 T5 tokens, no micro-conditions)", "unet", "pixart", "sigma",
         ("unet",), filename="PixArt-Sigma-XL-2-1024-MS"),
    Spec("auraflow", "AuraFlow v0.3 (4 MMDiT + 32 single DiT layers, original names)", "unet", "auraflow",
         components=("unet",), prediction="flow", filename="aura_flow_0.3"),
    Spec("hunyuan_dit", "HunyuanDiT v1.1/1.2 DiT-g/2 (extra_embedder in 1024)", "unet", "hunyuan_dit", "v1.1",
         ("unet",), filename="hunyuan_dit_1.2"),
    Spec("hunyuan_dit_v10", "HunyuanDiT v1.0 (extra_embedder in 3968, style embedder)", "unet", "hunyuan_dit",
         "v1.0", ("unet",), filename="hunyuan_dit_1.0"),
    Spec("taesd_decoder", "TAESD decoder, bare Sequential keys (1.weight in = 4 latent channels)", "vae", "taesd",
         components=("vae",), filename="taesd_decoder", ambiguous_with=("sd1", "sd2", "sdxl")),
    Spec("clip_h", "OpenCLIP ViT-H text encoder, HF names (24 layers)", "text_encoder", "clip_h",
         components=("clip_h",), filename="clip_h"),
    Spec("sd1_controlnet_diffusers", "SD1 ControlNet, diffusers names (controlnet_cond_embedding...)",
         "controlnet", "sd1", "diffusers", ("controlnet",), filename="diffusion_pytorch_model"),
    Spec("sdxl_controlnet", "SDXL ControlNet, diffusers names (add_embedding ⇒ SDXL; large: attn1 in down 1)",
         "controlnet", "sdxl", "diffusers", ("controlnet",), filename="controlnet-canny-sdxl-1.0"),
    Spec("t2i_adapter", "T2I-Adapter full for SD1 (conv_in + body.N.block1/2)", "t2i_adapter", "sd1",
         filename="t2iadapter_canny_sd15v2"),
    Spec("ip_adapter_sd15", "IP-Adapter SD1.5 (image_proj + ip_adapter.N.to_k_ip/to_v_ip, width 768)",
         "ip_adapter", "sd1", filename="ip-adapter_sd15"),
    Spec("flux_kohya_lora", "kohya Flux LoRA (lora_unet_double_blocks_N_img_attn_qkv ...)", "lora", "flux",
         "kohya", filename="flux_style_lora", metadata={"ss_network_module": "networks.lora_flux",
                                                          "ss_base_model_version": "flux1"}),
    Spec("flux_diffusers_lora", "diffusers/PEFT Flux LoRA (transformer.transformer_blocks.N.attn...lora_A)",
         "lora", "flux", "peft", filename="flux_diffusers_lora"),
    Spec("flux_xlabs_lora", "XLabs Flux LoRA (double_blocks.N.processor.qkv_lora1.down.weight)", "lora", "flux",
         "xlabs", filename="xlabs_flux_lora"),
    Spec("sd1_locon", "kohya LoCon for SD1 (attention LoRA + resnet/down/upsampler conv modules)", "lora", "sd1",
         "locon", filename="sd15_locon", metadata={"ss_network_module": "networks.lora", "ss_base_model_version":
                                                   "sd_v1", "ss_network_args": '{"conv_dim": "4", "conv_alpha": "2"}'}),
    Spec("sd1_oft", "LyCORIS OFT for SD1 (oft_blocks)", "lycoris", "sd1", "oft", filename="sd15_oft"),
    Spec("sd1_glora", "LyCORIS GLoRA for SD1 (a1/a2/b1/b2)", "lycoris", "sd1", "glora", filename="sd15_glora"),
    Spec("sd1_dora", "kohya LoRA with DoRA magnitudes (dora_scale) for SD1", "lora", "sd1", "dora",
         filename="sd15_dora"),
]
_LDM = "diffusers single-file conversion + strict load (small)"
_VERIFIED = {
    **dict.fromkeys(("sd1_checkpoint", "sd1_merged", "sd1_inpaint", "sd1_pix2pix"), "sd-mecha sd1-ldm; " + _LDM),
    **dict.fromkeys(("sd1_unet", "sd1_vae", "sdxl_vae", "sd1_controlnet", "sdxl_refiner", "sd2_checkpoint",
                     "sd2_768_v", "sd2_512_base", "sd2_inpaint"), "published tensor/parameter counts; " + _LDM),
    **dict.fromkeys(("sdxl_checkpoint", "sdxl_inpaint", "sdxl_vpred", "sdxl_cosxl", "playground_v25"),
                    "sd-mecha sdxl-sgm; " + _LDM),
    **dict.fromkeys(("clip_l", "clip_g", "clip_h", "t5xxl"), "published tensor/parameter counts; transformers strict load"),
    "sd3_vae": "sd-mecha sd3-comfyui; " + _LDM,
    "sd3_medium": "sd-mecha sd3-comfyui; diffusers conversion (full, meta) + strict load (small)",
    "sd35_medium": "diffusers conversion (full, meta) + strict load (small); published parameter count",
    "sd35_large": "diffusers conversion (full, meta); published parameter count",
    **dict.fromkeys(("flux_dev", "flux_schnell"), "sd-mecha flux-flux; diffusers conversion (full, meta)"),
    **dict.fromkeys(("flux_fill", "flux_depth"), "flux_dev layout with the released img_in width"),
    "flux_dev_fp8_scaled": "flux_dev layout; ComfyUI's scaled fp8 scheme (no oracle for the scale keys)",
    **dict.fromkeys(("cascade_stage_c", "cascade_stage_b", "auraflow", "chroma"), "diffusers conversion (full, meta)"),
    **dict.fromkeys(("sd1_controlnet_diffusers", "sdxl_controlnet"), "diffusers ControlNetModel state dict (full, meta)"),
    "sd1_kohya_lora": "sd-mecha sd1-kohya module names; diffusers' kohya converter onto small diffusers/HF modules",
    "sdxl_kohya_lora": "sd-mecha sdxl-sgm module names; diffusers' SGM-block + kohya converters onto small modules",
    "flux_xlabs_lora": "diffusers' XLabs converter onto a small diffusers Flux transformer",
    "sd1_peft_lora": "small diffusers UNet module names",
    "sd1_locon": "sd-mecha sd1-kohya module names and shapes",
    "flux_diffusers_lora": "diffusers FluxTransformer2DModel Linear in/out features (full, meta)",
    "ip_adapter_sd15": "diffusers IP-Adapter loader into a small SD1 UNet (shape-checked)",
    "taesd_decoder": "diffusers AutoencoderTiny decoder (index shift for the Clamp)",
    "sd2_depth": "published counts (MiDaS 368 tensors / 123.1 M, UNet 865,913,604); " + _LDM,
    "kolors_unet": "diffusers single-file UNet conversion onto the Kolors UNet2DConditionModel config (full, meta)",
    "svd": "diffusers UNetSpatioTemporalConditionModel / AutoencoderKLTemporalDecoder key and parameter counts",
    "t2i_adapter": "diffusers T2IAdapter (full_adapter) via the original->diffusers key mapping (full, meta)",
    **dict.fromkeys(("hunyuan_dit", "hunyuan_dit_v10"),
                    "diffusers HunyuanDiT2DModel via the original->diffusers key mapping (full, meta)"),
    **dict.fromkeys(("pixart_alpha", "pixart_sigma"),
                    "diffusers PixArtTransformer2DModel via the original<->diffusers key mapping (full, meta)"),
    **dict.fromkeys(("sd1_loha", "sd1_lokr"), "factors reconstruct the sd1_kohya_lora module shapes"),
}
SPECS: dict[str, Spec] = {s.name: replace(s, verified_by=_VERIFIED.get(s.name, "")) for s in _SPEC_LIST}
# aliases (same layout, own name): "cascade" = stage C prior, "pixart" = PixArt-Sigma
SPECS["cascade"] = replace(SPECS["cascade_stage_c"], name="cascade")
SPECS["pixart"] = replace(SPECS["pixart_sigma"], name="pixart")

# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------


def ldm_schedule(n: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict:
    """The LDM ``register_schedule`` buffers for the SD 'scaled linear' beta schedule (float64 math)."""
    torch = _torch()

    betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(), "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(), "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in out.items()}


def _rank_for(key: str, layout: Mapping[str, tuple[str, tuple[int, ...]]]) -> int | None:
    mod = key[: -len(".alpha")]
    for suffix in (".lora_down.weight", ".hada_w1_b"):
        if mod + suffix in layout:
            return layout[mod + suffix][1][0]
    return None


def tensor_value(key: str, dtype: str, shape: tuple[int, ...], *, seed: int, spec: str = "",
                 layout: Mapping | None = None):
    """The deterministic value of one tensor (float32 / its fixed dtype; the caller casts)."""
    torch = _torch()

    from ckptlab.formats.dtypes import to_torch

    base = key.rsplit(".", 1)[-1] if "." in key else key
    n = math.prod(shape)
    if key in _schedule_cache():
        return _schedule_cache()[key].clone()
    if key.endswith("position_ids"):
        ids = torch.arange(shape[-1]).reshape(shape)
        if dtype != "I64":  # merge artefact: float ids that drifted (AnythingV3: 76 -> 75.9975)
            ids = ids.to(torch.float32)
            ids[..., -1] -= 0.0025
        return ids.to(to_torch(dtype))
    if key == "model_ema.decay":
        return torch.tensor(0.9999, dtype=torch.float32)
    if key == "model_ema.num_updates":
        return torch.tensor(100000, dtype=torch.int32)
    if key == "model.model_sampling.sigmas":  # SD3 flow sigmas, shift 3.0
        t = torch.arange(1, shape[0] + 1, dtype=torch.float64) / shape[0]
        return (3.0 * t / (1 + 2.0 * t)).float()
    if key in _CONSTANTS:
        return torch.tensor(_CONSTANTS[key], dtype=torch.float32).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0), dtype=torch.float32)
    if key.endswith(".alpha"):
        r = _rank_for(key, layout or {})
        return torch.tensor(r / 2 if r else 1.0, dtype=torch.float32)
    if key.endswith(".scale_weight"):  # scaled fp8: weight = fp8 value * scale_weight
        w = (layout or {}).get(key[: -len("scale_weight")] + "weight")
        return torch.tensor(2.0 / math.sqrt(w[1][1]) if w else 1.0, dtype=torch.float32)
    if n == 0:
        return torch.zeros(shape, dtype=to_torch(dtype))
    if dtype.startswith("F8"):  # fp8 storage: values in the ~N(0, 0.5) range the scale was chosen for
        return _normal(seed, key, shape, 0.5).to(to_torch(dtype))
    if dtype != "F32":
        return (_normal(seed, key, shape, 30.0).abs()).to(to_torch(dtype))
    if len(shape) == 1:
        if spec == "sd2_768_v" and key.endswith("output_blocks.11.1.transformer_blocks.0.norm1.bias"):
            return _normal(seed, key, shape, 0.15)
        if base in ("weight", "scale") or key.endswith(("ln_q.weight", "ln_k.weight")):
            return _normal(seed, key, shape, 0.02).add_(1.0)  # norm gains
        return _normal(seed, key, shape, 0.02)
    if len(shape) == 0:
        return _normal(seed, key, shape, 1.0)
    if key.endswith(".dora_scale"):
        return _normal(seed, key, shape, 0.02).add_(1.0)
    if key.endswith((".lora_B.weight", ".lora_up.weight")):
        return _normal(seed, key, shape, 0.01)
    return _normal(seed, key, shape, 1.0 / math.sqrt(math.prod(shape[1:])))


# real values of marker tensors: CosXL sigmas, Playground v2.5 latent mean/std (diffusers EDM scheduler)
_CONSTANTS = {
    "edm_vpred.sigma_max": 120.0, "edm_vpred.sigma_min": 0.002,
    "edm_mean": [-1.6574, 1.886, -1.383, 2.5155], "edm_std": [8.4927, 5.9022, 6.5498, 5.2299],
}
_SCHED: dict = {}
_POOL_SIZE = 1 << 22


@lru_cache(maxsize=1)
def _pool():
    torch = _torch()

    return torch.randn(_POOL_SIZE, generator=torch.Generator().manual_seed(20240229), dtype=torch.float32)


def _normal(seed: int, key: str, shape: tuple[int, ...], scale: float):
    """Normal values with std ~``scale`` for (seed, key): a window of a fixed random pool at a
    (seed, key)-derived offset, times ``scale`` and a (seed, key)-derived factor in [0.75, 1.25).
    Much faster than a generator per tensor; two tensors practically never share values."""
    torch = _torch()

    pool = _pool()
    n = math.prod(shape)
    h = zlib.crc32(f"{seed}:{key}".encode())
    h2 = zlib.crc32(f"{key}:{seed}".encode())
    off = h % _POOL_SIZE
    factor = scale * (0.75 + 0.5 * (h2 & 0xFFFF) / 65536)
    if n <= _POOL_SIZE - off:
        return torch.mul(pool[off:off + n], factor).reshape(shape)
    else:
        parts, need = [pool[off:]], n - (_POOL_SIZE - off)
        while need > 0:
            parts.append(pool[: min(need, _POOL_SIZE)])
            need -= parts[-1].numel()
        x = torch.cat(parts)
    return x.mul_(factor).reshape(shape)


def _schedule_cache() -> dict:
    if not _SCHED:
        _SCHED.update(ldm_schedule())
    return _SCHED


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------


def plan(spec: str, *, small: bool = True, dtype: str = "F16", ema: bool = False) -> dict[str, TensorInfo]:
    """The final ``key -> TensorInfo`` a ``write_model`` call with these arguments produces."""
    from ckptlab.formats.dtypes import parse_dtype

    dtype = parse_dtype(dtype)
    lay = layouts.keys(spec, small=small)
    if ema:
        if not SPECS[spec].ema_ok:
            raise ValueError(f"spec {spec!r} has no LDM UNet EMA; ema=True is not realistic for it")
        lay = layouts.add_ema(lay)
    return {k: TensorInfo(dt if layouts.is_fixed_dtype(k, dt) else dtype, shape) for k, (dt, shape) in lay.items()}


def _tensors(spec: str, the_plan: Mapping[str, TensorInfo], raw_layout: Mapping, seed: int):
    from ckptlab.formats.dtypes import to_torch

    for key, info in the_plan.items():
        planned = raw_layout.get(key, (info.dtype, info.shape))[0]
        t = tensor_value(key, planned, info.shape, seed=seed, spec=spec, layout=raw_layout)
        yield key, t.to(to_torch(info.dtype))


def write_model(path: str | Path, spec: str, *, small: bool = True, sparse: bool = False, dtype: str = "F16",
                ema: bool = False, training_state: bool = False, fmt: str | None = None, seed: int = 0,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write sample ``spec`` to ``path`` and return the path.

    ``sparse=True`` writes the real-size header and extends the file to its full length without
    writing data (safetensors only). ``fmt`` defaults to the spec's container; ``'ckpt'`` writes a
    benign torch zip pickle wrapped like a Lightning checkpoint, ``'pt'`` the plain (or A1111) dict.
    """
    s = SPECS[spec] if spec in SPECS else None
    if s is None:
        raise KeyError(f"unknown sample spec {spec!r}; known: {', '.join(sorted(SPECS))}")
    fmt = fmt or s.fmt
    if fmt not in ("safetensors", "ckpt", "pt"):
        raise ValueError(f"fmt must be safetensors, ckpt or pt, not {fmt!r}")
    path = Path(path)
    the_plan = plan(spec, small=small and not sparse, dtype=dtype, ema=ema)
    raw = layouts.keys(spec, small=small and not sparse)
    if ema:
        raw = layouts.add_ema(raw)
    md = {**s.metadata, **(metadata or {})}
    if sparse:
        if fmt != "safetensors":
            raise ValueError("sparse=True needs fmt='safetensors' (a pickle cannot be sparse)")
        return _write_sparse(path, the_plan, md, overwrite)
    if fmt == "safetensors":
        with SafetensorsWriter(path, the_plan, md, overwrite=overwrite) as w:
            for key, t in _tensors(spec, the_plan, raw, seed):
                w.write(key, t)
        return path
    return _write_pickle(path, s, fmt, the_plan, raw, seed, training_state, overwrite, small)


def _write_sparse(path: Path, the_plan: Mapping[str, TensorInfo], md: Mapping[str, str], overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise OutputError("output already exists", path)
    header = build_header(the_plan, md)
    total = len(header) + sum(i.nbytes for i in the_plan.values())
    def fill(fh) -> None:
        fh.write(header)
        fh.truncate(total)  # sparse: the data is a hole

    write_atomic(path, fill)
    return path


def _write_pickle(path: Path, s: Spec, fmt: str, the_plan, raw, seed: int, training_state: bool,
                  overwrite: bool, small: bool) -> Path:
    torch = _torch()

    if path.exists() and not overwrite:
        raise OutputError("output already exists", path)
    sd = dict(_tensors(s.name, the_plan, raw, seed))
    obj: object
    if s.kind == "embedding":
        if s.name != "sd1_embedding":
            raise ValueError("only the SD1 embedding has a pickle (A1111 .pt) form")
        obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": sd["emb_params"]},
               "name": path.stem, "step": 3000, "sd_checkpoint": "cc6cb27103",
               "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    elif s.name == "realesrgan_x4plus":
        obj = {"params_ema": sd}
    elif s.kind == "hypernetwork":
        obj = _hypernetwork_dict(sd, path.stem, small)
    elif fmt == "ckpt" or s.kind in ("checkpoint",):
        obj = {"epoch": 6, "global_step": 840000 if not training_state else 1200, "state_dict": sd}
        if training_state:
            obj.update(_training_state(sd))
    else:
        obj = sd
    write_atomic(path, lambda fh: torch.save(obj, fh))
    return path


def _hypernetwork_dict(flat: dict, name: str, small: bool) -> dict:
    from collections import OrderedDict

    obj: dict = {}
    for w in adapters.HYPERNET_WIDTHS:
        pair = []
        for kv in (0, 1):
            pre = f"{w}.{kv}."
            pair.append(OrderedDict((k[len(pre):], v) for k, v in flat.items() if k.startswith(pre)))
        obj[w] = tuple(pair)
    obj.update({"step": 4000, "name": name, "layer_structure": list(adapters.hypernetwork_layer_structure(small)),
                "activation_func": "linear", "is_layer_norm": False, "weight_initialization": "Normal",
                "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly", "activate_output": False,
                "use_dropout": False, "dropout_structure": [0, 0, 0], "last_layer_dropout": False,
                "optional_info": None})
    return obj


def _training_state(sd: dict) -> dict:
    """Lightning training extras: a real-looking AdamW state for the first few parameters."""
    torch = _torch()

    params = [k for k, v in sd.items() if v.is_floating_point() and v.ndim >= 1][:4]
    state = {i: {"step": torch.tensor(1200.0), "exp_avg": torch.zeros_like(sd[k], dtype=torch.float32),
                 "exp_avg_sq": torch.zeros_like(sd[k], dtype=torch.float32)} for i, k in enumerate(params)}
    return {
        "pytorch-lightning_version": "1.6.0",
        "optimizer_states": [{"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8,
                                                                 "weight_decay": 0.01, "amsgrad": False,
                                                                 "params": list(range(len(params)))}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 1200, "_step_count": 1201, "lr_lambdas": [None]}],
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 500}":
                      {"best_model_score": None, "best_model_path": "", "current_score": None}},
        "hparams_name": "kwargs",
    }


# ---------------------------------------------------------------------------------------------
# sample library
# ---------------------------------------------------------------------------------------------

# (spec, a1111 folder, comfyui folder, extra write_model kwargs)
_LIBRARY = [
    ("sd1_checkpoint", "models/Stable-diffusion", "models/checkpoints", {}),
    ("sd1_checkpoint", "models/Stable-diffusion", "models/checkpoints", {"ema": True, "fmt": "ckpt",
                                                                        "name": "v1-5-pruned"}),
    ("sd1_merged", "models/Stable-diffusion", "models/checkpoints", {}),
    ("sd1_inpaint", "models/Stable-diffusion", "models/checkpoints", {}),
    ("sd2_768_v", "models/Stable-diffusion", "models/checkpoints", {}),
    ("sdxl_checkpoint", "models/Stable-diffusion", "models/checkpoints", {}),
    ("sd1_vae", "models/VAE", "models/vae", {}),
    ("sdxl_vae", "models/VAE", "models/vae", {}),
    ("sd1_kohya_lora", "models/Lora", "models/loras", {}),
    ("sdxl_kohya_lora", "models/Lora", "models/loras", {}),
    ("sd1_loha", "models/Lora", "models/loras", {}),
    ("sd1_peft_lora", "models/Lora", "models/loras", {}),
    ("sd1_locon", "models/Lora", "models/loras", {}),
    ("sd1_lokr", "models/Lora", "models/loras", {}),
    ("flux_kohya_lora", "models/Lora", "models/loras", {"dtype": "BF16"}),
    ("sd1_embedding", "embeddings", "models/embeddings", {}),
    ("sdxl_embedding", "embeddings", "models/embeddings", {}),
    ("taesd_decoder", "models/VAE-approx", "models/vae_approx", {}),
    ("t2i_adapter", "models/ControlNet", "models/controlnet", {}),
    ("ip_adapter_sd15", "models/ControlNet", "models/ipadapter", {}),
    ("sd1_embedding", "embeddings", "models/embeddings", {"fmt": "pt", "name": "bad-hands"}),
    ("sd1_hypernetwork", "models/hypernetworks", "models/hypernetworks", {}),
    ("sd1_controlnet", "models/ControlNet", "models/controlnet", {}),
    ("esrgan_x4", "models/ESRGAN", "models/upscale_models", {}),
    ("clip_l", None, "models/clip", {}),
    ("flux_schnell", None, "models/unet", {"dtype": "BF16"}),
]


def build_library(root: str | Path, layout: str = "a1111", *, small: bool = True, overwrite: bool = False,
                  reuse: dict | None = None) -> list[Path]:
    """Build a demo model library under ``root`` in A1111 or ComfyUI folder layout; return the files.

    ``reuse`` (a dict shared between calls) lets a second layout copy the files the first one wrote
    instead of generating them again; the bytes are the same either way.
    """
    if layout not in ("a1111", "comfyui"):
        raise ValueError(f"layout must be 'a1111' or 'comfyui', not {layout!r}")
    root = Path(root)
    out = []
    for i, (spec, a_dir, c_dir, kw) in enumerate(_LIBRARY):
        folder = a_dir if layout == "a1111" else c_dir
        if folder is None:
            continue
        kw = dict(kw)
        s = SPECS[spec]
        name = kw.pop("name", s.filename or spec)
        fmt = kw.get("fmt", s.fmt)
        suffix = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pth" if s.kind == "upscaler" else ".pt"}[fmt]
        target = root / folder / f"{name}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not overwrite:
            out.append(target)
            continue
        # the same spec+seed in both layouts gives byte-identical files (duplicates across tools)
        sig = (i, small)
        if reuse is not None and sig in reuse and reuse[sig].is_file():
            with open(reuse[sig], "rb") as src:
                write_atomic(target, lambda fh, src=src: shutil.copyfileobj(src, fh, 1 << 20))
        else:
            write_model(target, spec, small=small, seed=i, overwrite=overwrite, **kw)
        if reuse is not None:
            reuse[sig] = target
        out.append(target)
    return out
