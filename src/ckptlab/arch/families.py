"""One data entry per model family: how to recognise it, its variants, native resolution, latent channels,
default prediction and the inputs of the VRAM estimate. Facts from ComfyUI's
``model_detection.py``/``supported_models.py``, diffusers' ``loaders/single_file_utils.py``, InvokeAI's model
probe and kohya's ``sai_model_spec.py``.

``FAMILIES`` is ordered: the detector tries them in this order and the first family whose markers all match
wins (transformer families with unique key roots first, then UNets from the most to the least specific).
Adding a family is adding one entry here (docs/families.md): detection markers, and what the transforms
(single-file ``prefixes``, ``text_tokens``, ``vae_group``, ``diffusers``), merges (``merge_blocks``), the VRAM
estimate and the catalog (``civitai``, ``aliases``) read. Modules look a family up with ``get(id)``.
"""

from __future__ import annotations

from ckptlab.arch.family import Diffusers, Family, M, Variant, absent, unet_blocks

IN = "input_blocks.0.0.weight"  # LDM in-channels at axis 1
IN_D = "conv_in.weight"  # diffusers
TOK_SD = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TOK_SD_D = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
LABEL = "label_emb.0.0.weight"
LABEL_D = "add_embedding.linear_1.weight"


def _inch(vid: str, n: int, prediction: str | None = None, *extra) -> Variant:
    """A variant told by the UNet's input channels (inpaint 9, instruct-pix2pix 8, depth 5)."""
    return Variant(vid, ((M(IN, dims=((1, n),)), *extra), (M(IN_D, dims=((1, n),)), *extra)), prediction)


_DM = ("model.diffusion_model.",)
_VAE = ("first_stage_model.",)
_EMA = ("model_ema.",)
_NONE = (None, None)
_SD_INDEX = (("feature_extractor", _NONE), ("image_encoder", _NONE), ("requires_safety_checker", False),
             ("safety_checker", _NONE), ("text_encoder", ("transformers", "CLIPTextModel")),
             ("tokenizer", ("transformers", "CLIPTokenizer")), ("unet", ("diffusers", "UNet2DConditionModel")),
             ("vae", ("diffusers", "AutoencoderKL")))


def _top(vid: str, key: str, prediction: str | None = None) -> Variant:
    return Variant(vid, ((M(key, top=True),),), prediction)


FAMILIES: tuple[Family, ...] = (
    # ---- transformer families --------------------------------------------------------------------------------
    Family(
        "sd3", "Stable Diffusion 3 / 3.5", "dit",
        markers=((M("joint_blocks.0.context_block.attn.qkv.weight"),),
                 (M("transformer_blocks.0.attn.add_q_proj.weight"), M("context_embedder.weight"),
                  M("pos_embed.proj.weight"))),
        variants=(
            Variant("sd35_large", ((M("joint_blocks.37.x_block.mlp.fc1.weight"),),
                                   (M("transformer_blocks.37.ff.net.0.proj.weight"),))),
            Variant("sd35_medium", ((M("pos_embed", 1, 147456, None),),
                                    (M("joint_blocks.0.x_block.attn2.qkv.weight"),),
                                    (M("transformer_blocks.0.attn2.to_q.weight"),))),
            Variant("sd3_medium", ((M("pos_embed", 1, 36864, None),),
                                   (M("joint_blocks.23.x_block.mlp.fc1.weight"),
                                    absent("joint_blocks.24.x_block.mlp.fc1.weight"),
                                    absent("joint_blocks.0.context_block.attn.ln_q.weight")),
                                   (M("transformer_blocks.23.ff.net.0.proj.weight"),
                                    absent("transformer_blocks.24.ff.net.0.proj.weight")))),
        ),
        resolution=1024, latent_channels=16, default_prediction="flow", text_encoders=("clip_l", "clip_g", "t5xxl"),
        memory_factor=1.2, modelspec=("stable-diffusion-3",), kohya=("sd3m", "medium", "5-large", "5-medium"),
        short_name="SD3",
        vae_file_names=r"sd3|sd_3|sd35", vae_group="sd3",
        civitai=("SD 3", "SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo", "SD 3.5 Medium"),
        aliases=("sd35",), name_prefixes=("sd3",),
        prefixes=(("dit", _DM), ("vae", _VAE), ("clip_l", ("text_encoders.clip_l.",)),
                  ("clip_g", ("text_encoders.clip_g.",)), ("t5xxl", ("text_encoders.t5xxl.",))),
    ),
    Family(
        "hunyuan_video", "HunyuanVideo", "dit",
        markers=((M("txt_in.individual_token_refiner.blocks.0.norm1.weight"),),),
        resolution=720, latent_channels=16, default_prediction="flow", memory_factor=2.0, cfg_batch=1,
        civitai=("Hunyuan Video",), name_prefixes=("hunyuanvideo",),
    ),
    Family(
        "flux2", "FLUX.2", "dit",
        markers=((M("double_stream_modulation_img.lin.weight"),), (M("single_stream_modulation.lin.weight"),)),
        variants=(Variant("klein_4b", ((M("txt_in.weight", dims=((1, 7680),)),),)),
                  Variant("klein_9b", ((M("txt_in.weight", dims=((1, 12288),)),),)),
                  Variant("dev", ((M("txt_in.weight", dims=((1, 15360),)),),))),
        resolution=1024, latent_channels=32, latent_factor=16, default_prediction="flow", memory_factor=2.8,
        cfg_batch=1,
        civitai=("Flux.2 D",), name_prefixes=("flux2",),
    ),
    Family(
        "chroma", "Chroma", "dit",
        markers=((M("distilled_guidance_layer.in_proj.bias"), M("img_in.weight")),),
        variants=(Variant("radiance", ((M("nerf_blocks.0.norm.scale"),),)),),
        resolution=1024, latent_channels=16, default_prediction="flow", text_encoders=("t5xxl",), memory_factor=2.8,
        cfg_batch=2, modelspec=("chroma",), kohya=("chroma",),
        notes=("Flux-derived (double/single blocks) with a distilled guidance layer instead of per-block modulation",),
        civitai=("Chroma",),
    ),
    Family(
        "flux", "FLUX.1", "dit",
        markers=((M("double_blocks.0.img_attn.norm.key_norm.scale"),),
                 (M("single_transformer_blocks.0.attn.norm_k.weight"), M("x_embedder.weight"))),
        variants=(
            Variant("fill", ((M("img_in.weight", dims=((1, 384),)),), (M("x_embedder.weight", dims=((1, 384),)),))),
            Variant("depth", ((M("img_in.weight", dims=((1, 128),)),), (M("x_embedder.weight", dims=((1, 128),)),))),
            Variant("dev", ((M("guidance_in.in_layer.weight"),),
                            (M("time_text_embed.guidance_embedder.linear_1.weight"),))),
            Variant("schnell", ((absent("guidance_in.in_layer.weight"), M("img_in.weight")),
                                (absent("time_text_embed.guidance_embedder.linear_1.weight"), M("x_embedder.weight")))),
        ),
        resolution=1024, latent_channels=16, default_prediction="flow", text_encoders=("clip_l", "t5xxl"),
        memory_factor=2.8, cfg_batch=1, modelspec=("flux-1",), kohya=("flux1",),
        short_name="Flux",
        vae_file_names=r"flux|(^|[^a-z])ae\.", vae_group="flux",
        civitai=("Flux.1 S", "Flux.1 D", "Flux.1 Krea", "Flux.1 Kontext"),
        aliases=("flux1", "fluxdev", "fluxschnell"), name_prefixes=("flux1",),
        prefixes=(("dit", _DM), ("vae", ("vae.",)), ("clip_l", ("text_encoders.clip_l.",)),
                  ("t5xxl", ("text_encoders.t5xxl.",))),
    ),
    Family(
        "cascade", "Stable Cascade", "dit",
        markers=((M("clf.1.weight"),),),
        variants=(
            Variant("stage_c_lite", ((M("clip_txt_mapper.weight", dims=((0, 1536),)),),)),
            Variant("stage_c", ((M("clip_txt_mapper.weight"),),)),
            Variant("stage_b_lite", ((M("clip_mapper.weight"), M("down_blocks.1.0.channelwise.0.weight",
                                                                  dims=((-1, 576),))),)),
            Variant("stage_b", ((M("clip_mapper.weight"),),)),
        ),
        resolution=1024, latent_channels=16, latent_factor=32, default_prediction=None, text_encoders=("clip_g",),
        memory_factor=2.0, notes=("ComfyUI samples Cascade with its own STABLE_CASCADE model type",),
        civitai=("Stable Cascade",),
    ),
    Family(
        "pixart", "PixArt", "dit",
        markers=((M("t_block.1.weight"),),
                 (M("adaln_single.emb.timestep_embedder.linear_1.bias"), M("pos_embed.proj.bias"))),
        variants=(Variant("alpha", ((M("ar_embedder.mlp.0.weight"),),
                                    (M("adaln_single.emb.resolution_embedder.linear_1.weight"),))),
                  Variant("sigma", ((absent("ar_embedder.mlp.0.weight"), M("t_block.1.weight")),))),
        resolution=1024, latent_channels=4, default_prediction="eps", text_encoders=("t5xxl",), memory_factor=2.0,
        notes=("ComfyUI model_base.PixArt: ModelType.EPS",),
        civitai=("PixArt a", "PixArt E"), name_prefixes=("pixart",),
    ),
    Family(
        "auraflow", "AuraFlow", "dit",
        markers=((M("double_layers.0.attn.w1q.weight"), M("cond_seq_linear.weight")),
                 (M("joint_transformer_blocks.0.attn.add_q_proj.weight"), M("context_embedder.weight"),
                  M("register_tokens"))),
        resolution=1024, latent_channels=4, default_prediction="flow", memory_factor=2.0,
        civitai=("Pony V7", "AuraFlow"), name_prefixes=("ponyv7",),
    ),
    Family(
        "hunyuan_dit", "Hunyuan-DiT", "dit",
        markers=((M("mlp_t5.0.weight"),), (M("text_embedder.linear_1.weight"), M("time_extra_emb.pooler.q_proj.weight"))),
        variants=(Variant("v1_0", ((M("extra_embedder.0.weight", dims=((1, 3968),)),),)),
                  Variant("v1_1", ((M("extra_embedder.0.weight"),),))),
        resolution=1024, latent_channels=4, default_prediction="v", memory_factor=2.0,
        notes=("ComfyUI model_base.HunyuanDiT: ModelType.V_PREDICTION",),
        civitai=("Hunyuan 1",), aliases=("hunyuan",),
    ),
    Family("lumina2", "Lumina Image 2.0", "dit", markers=((M("cap_embedder.0.weight"),),),
           resolution=1024, latent_channels=16, default_prediction="flow", modelspec=("lumina-2",), kohya=("lumina2",),
        civitai=("Lumina",), name_prefixes=("lumina",),
    ),
    Family("hidream", "HiDream-I1", "dit",
           markers=((M("double_stream_blocks.0.block.adaLN_modulation.1.bias"),),),
           resolution=1024, latent_channels=16, default_prediction="flow",
        civitai=("HiDream",),
    ),
    Family("sana", "Sana", "dit", markers=((M("blocks.0.cross_attn.q_linear.weight"),),),
           resolution=1024, latent_channels=32, latent_factor=32, default_prediction="flow"),
    Family("wan", "Wan", "dit", markers=((M("head.modulation"), M("patch_embedding.weight")),),
           resolution=832, latent_channels=16, default_prediction="flow",
        name_prefixes=("wanvideo",),
    ),
    Family("mochi", "Mochi", "dit", markers=((M("t5_yproj.weight"),), (M("blocks.0.attn.qkv_x.weight"),)),
           resolution=848, latent_channels=12, default_prediction="flow",
        civitai=("Mochi",),
    ),
    Family("ltxv", "LTX-Video", "dit", markers=((M("patchify_proj.weight"), M("adaln_single.linear.weight")),),
           resolution=768, latent_channels=128, latent_factor=32, default_prediction="flow",
        civitai=("LTXV",), name_prefixes=("ltxv",),
    ),
    # ---- UNet families -------------------------------------------------------------------------------------
    Family(
        "svd", "Stable Video Diffusion", "unet",
        markers=((M("input_blocks.1.1.time_stack.0.attn1.to_q.weight"),),
                 (M("input_blocks.1.1.time_mix_blocks.0.attn1.to_q.weight"),)),
        variants=(Variant("sv3d_u", ((M(LABEL, dims=((1, 256),)),),)),
                  Variant("sv3d_p", ((M(LABEL, dims=((1, 1280),)),),))),
        resolution=1024, default_prediction="v", memory_factor=2.0, cfg_batch=2,
        notes=("SVD/SV3D use v-prediction with an EDM noise schedule",),
        short_name="SVD", vae_group="svd", civitai=("SVD", "SVD XT"), name_prefixes=("svd",),
        prefixes=(("unet", _DM), ("vae", _VAE)),
    ),
    Family(
        "sd_x4_upscaler", "SD x4 upscaler", "unet",
        markers=((M(IN, 256, 7, 3, 3),), (M(IN_D, 256, 7, 3, 3),)),
        resolution=512, default_prediction="v", text_encoders=("openclip_h",), memory_factor=2.0,
    ),
    Family(
        "sdxl_refiner", "SDXL refiner", "unet",
        markers=((M(LABEL, dims=((1, 2560),)),), (M(LABEL_D, dims=((1, 2560),)),),
                 # structure: label_emb, 4 levels (input_blocks.11), no attention at level 0
                 (M(LABEL), M("input_blocks.11.0.in_layers.0.weight"), M("input_blocks.4.1.proj_in.weight"),
                  absent("input_blocks.1.1.proj_in.weight"))),
        variants=(_inch("inpaint", 9),),
        resolution=1024, default_prediction="eps", text_encoders=("clip_g",), memory_factor=0.8, dm_tensors=1220,
        modelspec=("stable-diffusion-xl-v1-refiner",),
        short_name="SDXL refiner", vae_group="sdxl", aliases=("refiner",), context_width=1280,
        prefixes=(("unet", _DM), ("vae", _VAE), ("clip_g", ("conditioner.embedders.0.model.",)), ("ema", _EMA)),
        text_tokens=("conditioner.embedders.0.model.token_embedding.weight",),
        diffusers=Diffusers(
            "StableDiffusionXLImg2ImgPipeline", (("text_encoder_2", "conditioner.embedders.0.model.", "openclip_g"),),
            "EulerDiscreteScheduler",
            (("feature_extractor", _NONE), ("force_zeros_for_empty_prompt", False), ("image_encoder", _NONE),
             ("requires_aesthetics_score", True), ("text_encoder", _NONE),
             ("text_encoder_2", ("transformers", "CLIPTextModelWithProjection")), ("tokenizer", _NONE),
             ("tokenizer_2", ("transformers", "CLIPTokenizer")), ("unet", ("diffusers", "UNet2DConditionModel")),
             ("vae", ("diffusers", "AutoencoderKL"))),
            sample_size=128, time_ids=5, vae_scaling=0.13025),
    ),
    Family(
        "kolors", "Kolors", "unet",
        markers=((M(LABEL, dims=((1, 5632),)),), (M(LABEL_D, dims=((1, 5632),)),)),
        variants=(_inch("inpaint", 9),),
        resolution=1024, default_prediction="eps", memory_factor=0.8,
        civitai=("Kolors",),
    ),
    Family(
        "sdxl", "Stable Diffusion XL", "unet",
        markers=((M(LABEL, dims=((1, 2816),)),), (M(LABEL_D, dims=((1, 2816),)),),
                 # structure: label_emb, 3 levels (input_blocks 0..8), 10-deep transformers at level 2
                 (M(LABEL), M("input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"),
                  absent("input_blocks.9.0.in_layers.0.weight"), absent("input_blocks.1.1.proj_in.weight"))),
        variants=(
            _inch("inpaint", 9),
            _inch("instruct_pix2pix", 8),
            _top("playground_v25", "edm_mean", "edm"),
            _top("v_pred_edm", "edm_vpred.sigma_max", "v"),  # CosXL
            _top("v_pred", "v_pred", "v"),
            Variant("vega", ((M("input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight"),
                              absent("input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight")),), counted=False),
            Variant("ssd1b", ((M("input_blocks.7.1.transformer_blocks.3.attn2.to_k.weight"),
                               absent("input_blocks.7.1.transformer_blocks.4.attn2.to_k.weight")),), counted=False),
        ),
        resolution=1024, default_prediction="eps", text_encoders=("clip_l", "clip_g"), memory_factor=0.8,
        dm_tensors=1680, modelspec=("stable-diffusion-xl-v1-base", "stable-diffusion-xl"), kohya=("sdxl_base_v1-0",),
        short_name="SDXL",
        vae_file_names=r"xl", a1111_version="SDXL", vae_group="sdxl",
        context_width=2048, merge_blocks=unet_blocks(9),
        civitai=("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Lightning", "SDXL Hyper", "SDXL Turbo", "SDXL Distilled",
                 "Pony", "Illustrious", "NoobAI", "Playground v2"),
        aliases=("xl",), name_prefixes=("sdxl", "pony"),
        prefixes=(("unet", _DM), ("vae", _VAE), ("clip_l", ("conditioner.embedders.0.transformer.",)),
                  ("clip_g", ("conditioner.embedders.1.model.",)), ("ema", _EMA)),
        text_tokens=("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                     "conditioner.embedders.1.model.token_embedding.weight"),
        diffusers=Diffusers(
            "StableDiffusionXLPipeline",
            (("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip_g")),
            "EulerDiscreteScheduler",
            (("feature_extractor", _NONE), ("force_zeros_for_empty_prompt", True), ("image_encoder", _NONE),
             ("text_encoder", ("transformers", "CLIPTextModel")),
             ("text_encoder_2", ("transformers", "CLIPTextModelWithProjection")),
             ("tokenizer", ("transformers", "CLIPTokenizer")), ("tokenizer_2", ("transformers", "CLIPTokenizer")),
             ("unet", ("diffusers", "UNet2DConditionModel")), ("vae", ("diffusers", "AutoencoderKL"))),
            sample_size=128, vae_scaling=0.13025, vae_sample_size=1024),
    ),
    Family(
        "sd2", "Stable Diffusion 2.x", "unet",
        markers=((M(TOK_SD, dims=((1, 1024),)),), (M(TOK_SD_D, dims=((1, 1024),)),),
                 # structure: linear proj_in (use_linear_in_transformer), no label_emb
                 (M(TOK_SD), M("input_blocks.1.1.proj_in.weight", ndim=2), absent(LABEL)),
                 (M(TOK_SD_D), M("down_blocks.0.attentions.0.proj_in.weight", ndim=2), absent(LABEL_D))),
        variants=(
            _inch("inpaint", 9, "eps"),
            _inch("depth", 5, "eps"),
            Variant("unclip_l", ((M(LABEL, dims=((1, 1536),)),),), counted=False),
            Variant("unclip_h", ((M(LABEL, dims=((1, 2048),)),),), counted=False),
        ),
        resolution=768, default_prediction=None, text_encoders=("openclip_h",), memory_factor=1.0, dm_tensors=686,
        prediction_by_step=((875000, "eps", "diffusers/InvokeAI rule: SD2 512-base release"),
                            (220000, "eps", "diffusers/InvokeAI rule: SD2 512-base release"),
                            (110000, "v", "InvokeAI rule: SD2 768-v release")),
        prediction_std=("output_blocks.11.1.transformer_blocks.0.norm1.bias", 0.09),
        prediction_unknown="SD2 512-eps and 768-v share every key and shape, and there is no metadata or "
                           "global_step to decide (heuristics not applied)",
        modelspec=("stable-diffusion-v2-512", "stable-diffusion-v2-768-v"), kohya=("sd_v2", "sd_v2_v"),
        notes=("SD2 512-base (eps) and 768-v (v) share every key and shape",),
        short_name="SD2",
        vae_file_names=r"sd2|sd_2|v2-|768", a1111_version="SD2", vae_group="sd1/sd2",
        context_width=1024, merge_blocks=unet_blocks(12),
        resolution_by_prediction=(("v", 768), ("eps", 512)),
        civitai=("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"), name_prefixes=("sd2",),
        prefixes=(("unet", _DM), ("vae", _VAE), ("openclip_h", ("cond_stage_model.model.",)), ("ema", _EMA)),
        text_tokens=("cond_stage_model.model.token_embedding.weight",),
        diffusers=Diffusers("StableDiffusionPipeline", (("text_encoder", "cond_stage_model.model.", "openclip_h"),),
                            "DDIMScheduler", _SD_INDEX, sample_size=64, sample_size_v=96),
    ),
    Family(
        "sd1", "Stable Diffusion 1.x", "unet",
        markers=((M(TOK_SD, dims=((1, 768),)), absent(LABEL)), (M(TOK_SD_D, dims=((1, 768),)),),
                 # structure: convolutional proj_in, no label_emb
                 (M(TOK_SD), M("input_blocks.1.1.proj_in.weight", ndim=4), absent(LABEL)),
                 (M(TOK_SD_D), M("down_blocks.0.attentions.0.proj_in.weight", ndim=4), absent(LABEL_D))),
        variants=(
            _inch("inpaint", 9),
            Variant("zero123", ((M("cc_projection.weight", top=True),),)),
            _inch("instruct_pix2pix", 8),
        ),
        resolution=512, default_prediction="eps", text_encoders=("clip_l",), memory_factor=1.0, dm_tensors=686,
        modelspec=("stable-diffusion-v1",), kohya=("sd_v1", "sd_v1_v"),
        short_name="SD1",
        vae_file_names=r"sd1|sd_1|v1-5|v1\.5|sd15|840000|560000", a1111_version="SD1", vae_group="sd1/sd2",
        context_width=768, merge_blocks=unet_blocks(12),
        civitai=("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"), aliases=("sd",), name_prefixes=("sd1",),
        prefixes=(("unet", _DM), ("vae", _VAE), ("clip_l", ("cond_stage_model.transformer.",)), ("ema", _EMA)),
        text_tokens=("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",),
        diffusers=Diffusers("StableDiffusionPipeline", (("text_encoder", "cond_stage_model.transformer.", "hf"),),
                            "PNDMScheduler", _SD_INDEX, sample_size=64, fixed_heads=8),
    ),
)

BY_ID: dict[str, Family] = {f.id: f for f in FAMILIES}


def get(family_id: str | None) -> Family | None:
    """The family record of ``family_id`` (``None`` for ``None``, ``"unknown"`` or an id nobody knows)."""
    return BY_ID.get(family_id or "")


def display_name(family_id: str | None) -> str:
    """How messages name a family (``SD1``, ``SDXL``...): the record's short name, else the id itself."""
    fam = get(family_id)
    return fam.display_name if fam else str(family_id)


#: base families by the width of the text context a cross-attention (or adapter) sees
FAMILY_BY_CONTEXT_WIDTH = {f.context_width: f.id for f in FAMILIES if f.context_width}

#: ``modelspec.architecture`` (without ``/lora`` etc.) -> (family, variant, prediction)
MODELSPEC_ARCH: dict[str, tuple[str, str | None, str | None]] = {
    "stable-diffusion-v1": ("sd1", None, None),
    "stable-diffusion-v1-inpainting": ("sd1", "inpaint", None),
    "stable-diffusion-v2-512": ("sd2", None, "eps"),
    "stable-diffusion-v2-768-v": ("sd2", None, "v"),
    "stable-diffusion-v2-512-inpainting": ("sd2", "inpaint", "eps"),
    "stable-diffusion-v2-depth": ("sd2", "depth", "eps"),
    "stable-diffusion-xl-v1-base": ("sdxl", None, None),
    "stable-diffusion-xl-v1-refiner": ("sdxl_refiner", None, None),
    "stable-diffusion-xl-v1-edit": ("sdxl", "instruct_pix2pix", None),
    "stable-diffusion-xl-v1-inpainting": ("sdxl", "inpaint", None),
    "stable-diffusion-3-medium": ("sd3", "sd3_medium", "flow"),
    "stable-diffusion-3.5-medium": ("sd3", "sd35_medium", "flow"),
    "stable-diffusion-3-5-medium": ("sd3", "sd35_medium", "flow"),
    "stable-diffusion-3.5-large": ("sd3", "sd35_large", "flow"),
    "stable-diffusion-3-5-large": ("sd3", "sd35_large", "flow"),
    "stable-diffusion-3": ("sd3", None, "flow"),
    "flux-1-dev": ("flux", "dev", "flow"),
    "flux-1-schnell": ("flux", "schnell", "flow"),
    "flux-1": ("flux", None, "flow"),
    "chroma": ("chroma", None, "flow"),
    "lumina-2": ("lumina2", None, "flow"),
    "stable-cascade-v1-prior": ("cascade", "stage_c", None),
    "stable-video-diffusion-img2vid-v1": ("svd", None, None),
}

#: kohya ``ss_base_model_version`` -> (family, variant, prediction)
KOHYA_BASE: dict[str, tuple[str, str | None, str | None]] = {
    "sd_v1": ("sd1", None, None),
    "sd_v1_v": ("sd1", None, "v"),
    "sd_v2": ("sd2", None, "eps"),
    "sd_v2_v": ("sd2", None, "v"),
    "sdxl_base_v1-0": ("sdxl", None, None),
    "flux1": ("flux", None, "flow"),
    "chroma": ("chroma", None, "flow"),
    "lumina2": ("lumina2", None, "flow"),
    "sd3m": ("sd3", "sd3_medium", "flow"),
    "medium": ("sd3", "sd3_medium", "flow"),
    "5-medium": ("sd3", "sd35_medium", "flow"),
    "5-large": ("sd3", "sd35_large", "flow"),
}

#: GGUF ``general.architecture`` (ComfyUI-GGUF writes these for diffusion models) -> family
GGUF_ARCH: dict[str, str] = {"flux": "flux", "sd1": "sd1", "sdxl": "sdxl", "sd3": "sd3", "aura": "auraflow",
                             "ltxv": "ltxv", "hyvid": "hunyuan_video", "wan": "wan", "lumina2": "lumina2",
                             "hidream": "hidream", "chroma": "chroma"}
