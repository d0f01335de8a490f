"""Real key layouts of every sample spec: ``keys(spec, small=...)`` -> ordered ``key -> (dtype, shape)``.

Float weights are planned as ``F32``; ``write_model`` casts them to the requested dtype. Entries
whose dtype is fixed in real files (``position_ids`` int64, ``model_ema.num_updates`` int32, the
LDM schedule buffers and ``model_ema.decay`` float32) are listed by ``is_fixed_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptlab.sample import adapters, others
from ckptlab.sample.components import (
    SCHEDULE_KEYS,
    Layout,
    clip_hf,
    ema,
    flux,
    mmdit,
    openclip_text,
    schedule,
    t5_encoder,
    unet,
    vae,
)
from ckptlab.sample.dims import FULL, SMALL, dims

__all__ = ["FULL", "SMALL", "LAYOUTS", "keys", "add_ema", "is_fixed_dtype", "UNET_PREFIX"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _with_in(d, in_channels):
    from dataclasses import replace

    return replace(d, in_channels=in_channels)


# -- full checkpoints -------------------------------------------------------------------------

def _sd1(small: bool, *, in_channels: int = 4, float_position_ids: bool = False) -> Layout:
    u = unet(_with_in(dims("sd1", "unet", small), in_channels))
    lay = Layout().merge(schedule())
    lay.merge(u, UNET_PREFIX)
    lay.merge(vae(dims("sd1", "vae", small)), VAE_PREFIX)
    clip = clip_hf(dims("sd1", "clip_l", small))
    if float_position_ids:
        clip["text_model.embeddings.position_ids"] = ("F32", clip["text_model.embeddings.position_ids"][1])
    lay.merge(clip, "cond_stage_model.transformer.")
    return lay


def _sd2(small: bool, *, in_channels: int = 4) -> Layout:
    u = unet(_with_in(dims("sd2", "unet", small), in_channels))
    lay = Layout().merge(schedule())
    lay.merge(u, UNET_PREFIX)
    lay.merge(vae(dims("sd2", "vae", small)), VAE_PREFIX)
    lay.merge(openclip_text(dims("sd2", "clip_h", small)), "cond_stage_model.model.")
    return lay


def _sd2_wd(small: bool) -> Layout:
    """SD2 'WD'-style file: OpenCLIP-H without its last block (``resblocks.23``), ``text_projection`` and
    ``logit_scale`` (the A1111 Model Toolkit's CLIP-v2-WD list, 280 keys)."""
    lay = _sd2(small)
    drop = ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")
    return Layout({k: v for k, v in lay.items() if ".transformer.resblocks.23." not in k and k not in drop})


def _sd1_nai_clip(small: bool) -> Layout:
    """SD1 file with the old CLIP naming (no ``text_model.``: ``cond_stage_model.transformer.embeddings.*``)."""
    old = "cond_stage_model.transformer.text_model."
    return Layout({("cond_stage_model.transformer." + k[len(old):] if k.startswith(old) else k): v
                   for k, v in _sd1(small).items()})


def _sdxl(small: bool, *, in_channels: int = 4) -> Layout:
    lay = Layout().merge(unet(_with_in(dims("sdxl", "unet", small), in_channels)), UNET_PREFIX)
    lay.merge(vae(dims("sdxl", "vae", small)), VAE_PREFIX)
    lay.merge(clip_hf(dims("sdxl", "clip_l", small)), "conditioner.embedders.0.transformer.")
    lay.merge(openclip_text(dims("sdxl", "clip_g", small)), "conditioner.embedders.1.model.")
    return lay


def _sdxl_refiner(small: bool) -> Layout:
    lay = Layout().merge(unet(dims("sdxl_refiner", "unet", small)), UNET_PREFIX)
    lay.merge(vae(dims("sdxl_refiner", "vae", small)), VAE_PREFIX)
    lay.merge(openclip_text(dims("sdxl_refiner", "clip_g", small)), "conditioner.embedders.0.model.")
    return lay


def _sd3_family(family: str, small: bool) -> Layout:
    """ComfyUI/SAI all-in-one SD3 file: MMDiT + 16-ch VAE + CLIP-L + CLIP-G + T5-XXL."""
    lay = Layout().merge(mmdit(dims(family, "mmdit", small)), UNET_PREFIX)
    lay.add("model.model_sampling.sigmas", 1000)
    lay.merge(vae(dims(family, "vae", small)), VAE_PREFIX)
    for name in ("clip_l", "clip_g"):
        te = f"text_encoders.{name}."
        lay.add(te + "logit_scale")
        lay.merge(clip_hf(dims(family, name, small), position_ids=False, projection=True), te + "transformer.")
    lay.add("text_encoders.t5xxl.logit_scale")
    lay.merge(t5_encoder(dims(family, "t5xxl", small)), "text_encoders.t5xxl.transformer.")
    return lay


def _flux(small: bool, *, guidance: bool = True, in_channels: int | None = None) -> Layout:
    """BFL original Flux.1 transformer file (``flux1-dev.safetensors``: no prefix, no VAE / text encoders)."""
    from dataclasses import replace

    d = replace(dims("flux", "flux", small), guidance=guidance)
    if in_channels:
        d = replace(d, in_channels=in_channels)
    return flux(d)


def _sdxl_with(small: bool, extra: dict[str, tuple[int, ...]]) -> Layout:
    """SDXL base plus top-level marker tensors (v_pred / ztsnr / edm_* keys have no prefix)."""
    lay = _sdxl(small)
    for k, shape in extra.items():
        lay.add(k, *shape)
    return lay


def _kolors_unet(small: bool) -> Layout:
    """Kolors UNet (SDXL layout, LDM names, no prefix): label_emb in 5632 = ChatGLM3 pooled 4096 + 6 x 256,
    and ``encoder_hid_proj`` mapping ChatGLM3's 4096 to the 2048 context."""
    from dataclasses import replace

    d = dims("sdxl", "unet", small)
    glm = 128 if small else 4096
    d = replace(d, adm=glm + 6 * dims("sdxl", "size_embed", small))
    lay = unet(d)
    lay.linear("encoder_hid_proj", d.context, glm)
    return lay


def _svd(small: bool) -> Layout:
    """SVD img2vid: SD2-style UNet with in-channels 8, label_emb in 768 (3 x 256: fps, motion
    bucket, cond aug), temporal ``time_stack``/``time_mixer`` keys in every resblock and transformer, and a
    VAE whose decoder resblocks carry ``mix_factor`` + a 3-D conv ``time_stack`` (+ ``conv_out.time_mix_conv``).
    Reduction: the conditioner (CLIP-H image encoder, VAE encoder for the conditioning frame) is omitted."""
    from dataclasses import replace

    d = replace(dims("sd2", "unet", small), in_channels=8, adm=3 * (8 if small else 256))
    lay = Layout().merge(others.svd_temporal(unet(d), d.context), UNET_PREFIX)
    v = vae(dims("sd2", "vae", small))
    for k, (_, shape) in list(v.items()):
        if k.startswith("decoder.") and k.endswith(".conv2.weight") and ".block" in k:
            p, c = k[: -len(".conv2.weight")], shape[0]
            v.add(f"{p}.mix_factor", 1)
            v.norm(f"{p}.time_stack.in_layers.0", c)
            v.add(f"{p}.time_stack.in_layers.2.weight", c, c, 3, 1, 1)
            v.add(f"{p}.time_stack.in_layers.2.bias", c)
            v.norm(f"{p}.time_stack.out_layers.0", c)
            v.add(f"{p}.time_stack.out_layers.3.weight", c, c, 3, 1, 1)
            v.add(f"{p}.time_stack.out_layers.3.bias", c)
    v.add("decoder.conv_out.time_mix_conv.weight", 3, 3, 3, 1, 1)
    v.add("decoder.conv_out.time_mix_conv.bias", 3)
    del v["post_quant_conv.weight"], v["post_quant_conv.bias"]  # the temporal decoder has none
    return lay.merge(v, VAE_PREFIX)


def _controlnet_diffusers(family: str, small: bool) -> Layout:
    from ckptlab.sample.components import diffusers_controlnet

    return diffusers_controlnet(dims(family, "unet", small))


def _flux_fp8_scaled(small: bool) -> Layout:
    """ComfyUI "scaled fp8" Flux-dev file: block Linear weights stored as float8_e4m3fn with a float32
    ``scale_weight`` scalar each, plus the empty ``scaled_fp8`` marker whose dtype names the fp8 type
    (ComfyUI's ``ops.scaled_fp8_ops``); other tensors stay in the file dtype."""
    lay = Layout()
    for k, (dt, shape) in _flux(small).items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and len(shape) == 2:
            lay[k] = ("F8_E4M3", shape)
            lay.add(k[: -len("weight")] + "scale_weight")
        else:
            lay[k] = (dt, shape)
    lay.add("scaled_fp8", 0, dtype="F8_E4M3")
    return lay


# -- standalone components ----------------------------------------------------------------------

def _clip(family: str, part: str) -> Callable[[bool], Layout]:
    return lambda small: clip_hf(dims(family, part, small), position_ids=False, projection=True)


LAYOUTS: dict[str, Callable[[bool], Layout]] = {
    "sd1_checkpoint": lambda s: _sd1(s),
    "sd1_merged": lambda s: _sd1(s, float_position_ids=True),
    "sd1_inpaint": lambda s: _sd1(s, in_channels=9),
    "sd1_pix2pix": lambda s: _sd1(s, in_channels=8),
    "sd1_unet": lambda s: unet(dims("sd1", "unet", s)),
    "sd1_vae": lambda s: vae(dims("sd1", "vae", s)),
    "sdxl_vae": lambda s: vae(dims("sdxl", "vae", s)),
    "clip_l": _clip("sd1", "clip_l"),
    "clip_g": _clip("sdxl", "clip_g"),
    "t5xxl": lambda s: t5_encoder(dims("sd3", "t5xxl", s)),
    "sd2_checkpoint": lambda s: _sd2(s),
    "sd2_768_v": lambda s: _sd2(s),
    "sd2_512_base": lambda s: _sd2(s),
    "sd2_inpaint": lambda s: _sd2(s, in_channels=9),
    "sd2_depth": lambda s: _sd2(s, in_channels=5).merge(others.midas_dpt_hybrid(s), "depth_model.model."),
    "sdxl_checkpoint": lambda s: _sdxl(s),
    "sdxl_inpaint": lambda s: _sdxl(s, in_channels=9),
    "sdxl_refiner": _sdxl_refiner,
    "sd3_medium": lambda s: _sd3_family("sd3", s),
    "sd35_medium": lambda s: _sd3_family("sd35_medium", s),
    "sd35_large": lambda s: _sd3_family("sd35_large", s),
    "sd3_vae": lambda s: vae(dims("sd3", "vae", s)),
    "flux_dev": lambda s: _flux(s),
    "flux_schnell": lambda s: _flux(s, guidance=False),
    "flux_fill": lambda s: _flux(s, in_channels=384),
    "flux_depth": lambda s: _flux(s, in_channels=128),
    "flux_dev_fp8_scaled": _flux_fp8_scaled,
    "sd1_controlnet": lambda s: Layout().merge(
        unet(dims("sd1", "unet", s), controlnet=True), "control_model."),
    "sd1_kohya_lora": lambda s: adapters.kohya_lora_sd1(s),
    "sdxl_kohya_lora": lambda s: adapters.kohya_lora_sdxl(s),
    "sd1_peft_lora": lambda s: adapters.peft_lora_sd1(s),
    "sd1_loha": lambda s: adapters.loha_sd1(s),
    "sd1_lokr": lambda s: adapters.lokr_sd1(s),
    "sd1_embedding": lambda s: adapters.embedding_sd1(s),
    "sdxl_embedding": lambda s: adapters.embedding_sdxl(s),
    "sd1_hypernetwork": lambda s: adapters.hypernetwork_sd1(s),
    "esrgan_x4": lambda s: others.esrgan(s),
    "sd2_wd": _sd2_wd,
    "sd1_nai_clip": _sd1_nai_clip,
    "sd2_kohya_lora": lambda s: adapters.kohya_lora_sd2(s),
    "sd2_embedding": lambda s: adapters.embedding_sd2(s),
    "sdxl_vpred": lambda s: _sdxl_with(s, {"v_pred": (0,), "ztsnr": (0,)}),
    "sdxl_cosxl": lambda s: _sdxl_with(s, {"edm_vpred.sigma_max": (), "edm_vpred.sigma_min": ()}),
    "playground_v25": lambda s: _sdxl_with(s, {"edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)}),
    "kolors_unet": _kolors_unet,
    "svd": _svd,
    "clip_h": _clip("sd2", "clip_h"),
    "sd1_controlnet_diffusers": lambda s: _controlnet_diffusers("sd1", s),
    "sdxl_controlnet": lambda s: _controlnet_diffusers("sdxl", s),
    "flux_kohya_lora": lambda s: adapters.kohya_lora_flux(s),
    "flux_diffusers_lora": lambda s: adapters.diffusers_lora_flux(s),
    "flux_xlabs_lora": lambda s: adapters.xlabs_lora_flux(s),
    "sd1_locon": lambda s: adapters.locon_sd1(s),
    "sd1_oft": lambda s: adapters.oft_sd1(s),
    "sd1_glora": lambda s: adapters.glora_sd1(s),
    "sd1_dora": lambda s: adapters.dora_sd1(s),
}
LAYOUTS.update(others.LAYOUTS)
# short names used by the task list: "cascade" is the stage C prior, "pixart" the current PixArt-Sigma
LAYOUTS["cascade"] = LAYOUTS["cascade_stage_c"]
LAYOUTS["pixart"] = LAYOUTS["pixart_sigma"]


def add_ema(layout: dict, prefix: str = UNET_PREFIX) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``layout`` with the LDM EMA copy of its UNet (``model_ema.*``, dots removed) after the UNet keys."""
    unet_part = {k[len(prefix):]: v for k, v in layout.items() if k.startswith(prefix)}
    if not unet_part:
        raise ValueError("layout has no UNet keys to make an EMA copy of")
    last = [k for k in layout if k.startswith(prefix)][-1]
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for k, v in layout.items():
        out[k] = v
        if k == last:
            out.update(ema(unet_part))
    return out


def keys(spec: str, *, small: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Ordered ``key -> (dtype, shape)`` of ``spec`` (real widths with ``small=False``)."""
    try:
        fn = LAYOUTS[spec]
    except KeyError:
        raise KeyError(f"unknown sample spec {spec!r}; known: {', '.join(sorted(LAYOUTS))}") from None
    return dict(fn(small))


_FIXED = frozenset(SCHEDULE_KEYS) | {"model_ema.decay", "model_ema.num_updates", "model.model_sampling.sigmas",
                                     "v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
                                     "edm_mean", "edm_std"}


def is_fixed_dtype(key: str, dtype: str) -> bool:
    """True when ``key`` keeps its planned dtype whatever dtype the file is written in."""
    return dtype != "F32" or key in _FIXED or key.endswith(("position_ids", ".scale_weight"))
