"""Recognising files that are not diffusion models: LoRA / LyCORIS, textual-inversion embeddings,
hypernetworks, ControlNets, IP-Adapters (kind ``ipadapter``), T2I-Adapters (kind ``t2i_adapter``) and upscalers. Each rule names the key(s) that decided it
(the key names of kohya sd-scripts, LyCORIS, A1111's Lora/hypernetwork/textual-inversion loaders, ComfyUI's
``lora.py`` and the ControlNet/IP-Adapter/T2I-Adapter releases; docs/inspect.md).

``detect_adapter(infos, extra) -> AdapterGuess | None`` looks at key names and shapes only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckptlab.arch.families import FAMILY_BY_CONTEXT_WIDTH
from ckptlab.formats.base import TensorInfo


@dataclass
class AdapterGuess:
    kind: str
    family: str | None = None
    variant: str | None = None
    evidence: list[str] = field(default_factory=list)


_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora.down.weight",
                  ".lora.up.weight", "_lora.down.weight", "_lora.up.weight", ".lora_linear_layer.down.weight",
                  ".lora_A.default.weight", ".lora_B.default.weight")
_XLABS_RE = re.compile(r"processor\.(?:qkv|proj)_lora\d\.(?:down|up)\.weight$")
#: LyCORIS algorithm by parameter suffix (checked in order; DoRA is reported on top of the base algorithm)
_LYCORIS = (("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("oft_blocks", "oft"),
            ("a1.weight", "glora"), ("on_input", "ia3"), ("w_norm", "norm"), ("diff", "full"))
_LYCORIS_ENDINGS = tuple("." + suffix for suffix, _ in _LYCORIS)
_LYCORIS_GENERIC = ("a1.weight", "on_input", "w_norm", "diff")  # names a full model could contain
#: the down (input-side) matrix of an ``attn2.to_k`` adapter: its last axis is the text context width. Old diffusers
#: attention-processor LoRAs put ``processor.`` in front (``attn2.processor.to_k_lora.down.weight``: diffusers
#: ``lora_conversion_utils._convert_unet_lora_key``, ComfyUI ``lora.model_lora_keys_unet``)
_TOKEN_DOWN_RE = re.compile(r"attn2(?:\.processor)?[._]to_k(?:\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight|"
                            r"_lora\.down\.weight|\.hada_w1_b|\.lora_A\.default\.weight)$")
_LOKR_RE = re.compile(r"attn2(?:\.processor)?[._]to_k\.lokr_w[12](?:_[ab])?$")
_EMB_WIDTH = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def _dim(shape: tuple[int, ...], axis: int) -> int | None:
    """``shape[axis]``, or ``None`` when the tensor has too few dimensions (malformed or packed files)."""
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def _lora_family(infos: Mapping[str, TensorInfo], keys: list[str]) -> tuple[str | None, str | None]:
    """(family, evidence) of a LoRA/LyCORIS from module names and widths."""
    for k in keys:
        if (k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_transformer_single_"))
                or ".single_transformer_blocks." in k or "double_blocks." in k and "lora" in k
                or "processor." in k and _XLABS_RE.search(k)):  # (the regex needs "processor.")
            return "flux", k
    for k in keys:
        if k.startswith("lora_unet_joint_blocks_") or "joint_blocks." in k:
            return "sd3", k
    for k in keys:
        if "attn2" in k and _TOKEN_DOWN_RE.search(k):  # (the regex needs "attn2")
            width = infos[k].shape[-1] if len(infos[k].shape) >= 2 else None
            fam = FAMILY_BY_CONTEXT_WIDTH.get(width) if width else None
            if fam:
                return fam, f"{k} {list(infos[k].shape)} (text context width {width})"
        if "lokr_w" in k and _LOKR_RE.search(k):
            base = k[: k.rindex(".lokr_w") + 1]
            width = _lokr_in_width(infos, base)
            fam = FAMILY_BY_CONTEXT_WIDTH.get(width) if width else None
            if fam:
                return fam, f"{base}lokr_w1*/lokr_w2* (context width {width} = input factors multiplied)"
    # kohya text-encoder modules: SDXL lora_te1_ (CLIP-L) + lora_te2_ (CLIP-G); SD3 adds lora_te3_ (T5); Flux
    # lora_te1_ (CLIP-L) + lora_te3_ (T5; lora_te2_ in early sd-scripts). T5 modules are named encoder_block_N.
    te1 = next((k for k in keys if k.startswith("lora_te1_")), None)
    clip_g = next((k for k in keys if k.startswith("lora_te2_text_model_")), None)
    t5 = next((k for k in keys if k.startswith(("lora_te2_encoder_block_", "lora_te3_encoder_block_"))), None)
    if clip_g and t5:
        return "sd3", f"{clip_g} and {t5} (CLIP-G and T5 text encoder modules)"
    if t5 and not clip_g:
        return "flux", f"{t5} (T5 text encoder module without a CLIP-G one)"
    if te1 and clip_g:
        return "sdxl", "lora_te1_* and lora_te2_* (two text encoders)"
    if any(k.startswith("text_encoder_2.") for k in keys):
        return "sdxl", "text_encoder_2.* modules"
    for k in keys:
        # diffusers' joint-attention names (context stream: attn.add_*_proj, ff_context, norm1_context) exist only
        # in MMDiT/Flux double blocks; a UNet's transformer blocks have attn1/attn2. Flux is 3072 wide.
        if ".transformer_blocks." in k and any(t in k for t in (".attn.add_", ".ff_context.", ".norm1_context.")):
            shape = infos[k].shape
            width = shape[-1] if k.endswith("lora_A.weight") or k.endswith("lora_down.weight") else None
            fam = "flux" if width == 3072 else "sd3"
            return fam, f"{k} (a joint-attention context-stream module{f', width {width}' if width else ''})"
    for k in keys:
        if "transformer_blocks_" in k or ".transformer_blocks." in k:
            m = re.search(r"transformer_blocks[._](\d+)", k)
            if m and int(m.group(1)) >= 2:
                return "sdxl", f"{k} (transformer block {m.group(1)}: only SDXL has more than 2)"
    for k in keys:
        if k.startswith("lora_te_") and "self_attn_k_proj." in k and not k.endswith(".alpha"):
            shape = infos[k].shape
            if k.endswith(".oft_blocks") and len(shape) == 3:
                width = shape[0] * shape[1]  # blocks x block size = output width
            elif k.endswith((".lora_down.weight", ".hada_w1_b", ".lora_A.weight")) and shape:
                width = shape[-1]
            elif len(shape) == 2:
                width = max(shape)  # rank < hidden width
            else:
                continue
            fam = FAMILY_BY_CONTEXT_WIDTH.get(width)
            if fam in ("sd1", "sd2"):
                return fam, f"{k} {list(shape)} (text encoder width {width})"
    return None, None


def _lokr_in_width(infos: Mapping[str, TensorInfo], base: str) -> int | None:
    """Input width of a LoKr linear module: ``c*d`` where W1 is ``[a, c]`` (``lokr_w1``, or ``lokr_w1_a @ lokr_w1_b``)
    and W2 is ``[b, d]`` (``lokr_w2``, or ``lokr_w2_a @ lokr_w2_b``; with a Tucker ``lokr_t2`` the product still
    ends in ``w2_b``'s last axis). Names: LyCORIS ``modules/lokr.py``, ComfyUI ``weight_adapter/lokr.py``."""
    def last(*names: str) -> int | None:
        for n in names:
            i = infos.get(base + n)
            if i is not None and len(i.shape) == 2:
                return i.shape[1]
        return None

    c, d = last("lokr_w1", "lokr_w1_b"), last("lokr_w2", "lokr_w2_b")
    return c * d if c and d else None


def _lora_format(key: str) -> str:
    """kohya (``lora_unet_*.lora_down``), peft (``lora_A/lora_B``), xlabs, or diffusers_old (attn processors)."""
    if _XLABS_RE.search(key):
        return "xlabs"
    if ".lora_A." in key or ".lora_B." in key:
        return "peft"
    if key.endswith((".lora_down.weight", ".lora_up.weight")):
        return "kohya"
    return "diffusers_old"


_ADAPTER_WORDS = re.compile(r"lora|hada_|lokr_|oft_blocks|\.a1\.weight|on_input|w_norm|\.diff$|dora_scale")


def _detect_lora(infos: Mapping[str, TensorInfo]) -> AdapterGuess | None:
    keys = list(infos)
    # at least half the keys must be adapter parameters, else it is a model (maybe with a few stray LoRA
    # keys); the count stops as soon as the answer is known
    need, seen, left = (len(keys) + 1) // 2, 0, len(keys)
    for k in keys:
        left -= 1
        if k.endswith(".alpha") or _ADAPTER_WORDS.search(k):
            seen += 1
            if seen >= need:
                break
        elif seen + left < need:
            return None
    if seen < need:
        return None
    lyco = None
    # the first key (in file order) of the first algorithm (in _LYCORIS order) with a parameter: one pass
    first: dict[int, str] = {}
    for k in keys:
        if k.endswith(_LYCORIS_ENDINGS):
            for n, (suffix, _) in enumerate(_LYCORIS):
                if n not in first and k.endswith("." + suffix) \
                        and (suffix not in _LYCORIS_GENERIC or k.startswith(("lora_", "lycoris_", "lora_te", "lora_unet"))):
                    first[n] = k
    if first:
        n = min(first)
        (suffix, algo), hit = _LYCORIS[n], first[n]
        if suffix == "oft_blocks" and len(infos[hit].shape) == 4:
            algo = "boft"
        lyco = (algo, hit)
    lora_hit = next((k for k in keys if k.endswith(_LORA_SUFFIXES) or _XLABS_RE.search(k)), None)
    dora = next((k for k in keys if k.endswith(".dora_scale")), None)
    if not lyco and not lora_hit:
        return None
    fam, fam_ev = _lora_family(infos, keys)
    if lyco:
        g = AdapterGuess("lycoris", fam, lyco[0], [f"LyCORIS {lyco[0]} parameters: {lyco[1]}"])
        if dora:
            g.evidence.append(f"with DoRA magnitudes: {dora}")
    elif dora:
        g = AdapterGuess("lora", fam, "dora", [f"LoRA with DoRA magnitudes: {dora}"])
    else:
        fmt = _lora_format(lora_hit)
        conv = next((k for k in keys if k.endswith(".lora_down.weight") and len(infos[k].shape) == 4
                     and infos[k].shape[2] > 1), None)
        g = AdapterGuess("lora", fam, "locon" if conv else fmt, [f"LoRA parameters ({fmt} format): {lora_hit}"])
        if conv:  # kohya conv_dim: 3x3 convolutions adapted too (LoCon)
            g.evidence.append(f"LoCon: 3x3 convolution modules adapted ({conv} {list(infos[conv].shape)})")
    if fam_ev:
        g.evidence.append(f"base {fam}: {fam_ev}")
    return g


def _detect_embedding(infos: Mapping[str, TensorInfo], extra: Mapping[str, Any]) -> AdapterGuess | None:
    keys = list(infos)
    if set(keys) == {"clip_l", "clip_g"}:
        n = infos["clip_g"].shape[0] if infos["clip_g"].shape else 1
        return AdapterGuess("embedding", "sdxl", None,
                            [f"clip_l {list(infos['clip_l'].shape)} + clip_g {list(infos['clip_g'].shape)} "
                             f"(SDXL embedding, {n} vectors)"])
    stp = [k for k in keys if k.startswith("string_to_param.")]
    lone = len(keys) == 1 and "." not in keys[0] and 1 <= len(infos[keys[0]].shape) <= 2  # diffusers {"<tok>": t}
    if stp or keys == ["emb_params"] or (lone and infos[keys[0]].shape[-1] in _EMB_WIDTH):
        k = stp[0] if stp else keys[0]
        shape = infos[k].shape
        width = shape[-1] if shape else None
        fam = _EMB_WIDTH.get(width)
        if fam == "sdxl":  # a lone 1280-wide vector is half an SDXL embedding at best
            fam = None
        what = "A1111 string_to_param" if stp else ("kohya emb_params" if k == "emb_params" else "single tensor")
        ev = [f"{what}: {k} {list(shape)}" + (f" (width {width} = {fam})" if fam else "")]
        return AdapterGuess("embedding", fam, None, ev)
    return None


_HN_RE = re.compile(r"^(\d+)\.(?:\d+\.)?(?:linear\.\d+|linear[12])\.(?:weight|bias)$")


def _detect_hypernetwork(infos: Mapping[str, TensorInfo], extra: Mapping[str, Any]) -> AdapterGuess | None:
    keys = list(infos)
    if not keys or not all(_HN_RE.match(k) for k in keys):
        return None
    widths = sorted({int(_HN_RE.match(k).group(1)) for k in keys})
    fam = "sd2" if 1024 in widths else ("sd1" if 768 in widths else None)
    ev = [f"integer context-width keys {widths}"]
    for meta in ("layer_structure", "activation_func"):
        if meta in extra:
            ev.append(f"{meta} = {extra[meta]!r}")
    return AdapterGuess("hypernetwork", fam, None, ev)


def _strip_wrapper(infos: Mapping[str, TensorInfo]) -> Mapping[str, TensorInfo]:
    for p in ("params_ema.", "params.", "module.", "netG."):
        if infos and all(k.startswith(p) for k in infos):
            return {k[len(p):]: v for k, v in infos.items()}
    return infos


# (naming, architecture family, proving keys); spandrel's ESRGAN arch covers the three RRDB namings
_UPSCALERS = (
    ("esrgan", "esrgan", ("model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight")),
    ("realesrgan", "esrgan", ("conv_first.weight", "body.0.rdb1.conv1.weight")),
    ("bsrgan", "esrgan", ("RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight")),
    ("swinir", "swinir", ("layers.0.residual_group.blocks.0.norm1.weight",)),
    ("compact", "compact", ("body.0.weight", "body.1.weight")),
)


def _upscale_factor(arch: str, keys: Mapping[str, TensorInfo]) -> int | None:
    if arch == "esrgan":  # model.0 conv, model.1 RRDB trunk, then one conv per x2 upsample, HR conv, last conv
        convs = {int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.weight$", k)) and int(m.group(1)) >= 3}
        return 2 ** (len(convs) - 2) if len(convs) >= 2 else None
    if arch == "realesrgan":
        return 4 if "conv_up2.weight" in keys else (2 if "conv_up1.weight" in keys else None)
    if arch == "bsrgan":
        return 4 if "upconv2.weight" in keys else (2 if "upconv1.weight" in keys else None)
    return None


def _detect_upscaler(infos: Mapping[str, TensorInfo]) -> AdapterGuess | None:
    plain = _strip_wrapper(infos)
    for naming, arch, need in _UPSCALERS:
        if all(k in plain for k in need):
            if naming == "compact" and any(k.startswith(("input_blocks", "down_blocks", "blocks.")) for k in plain):
                continue
            scale = _upscale_factor(naming, plain)
            return AdapterGuess("upscaler", arch, f"x{scale}" if scale else None,
                                [f"{arch} architecture ({naming} key names): {', '.join(need)}"]
                                + ([f"scale x{scale} from the upsampling layers"] if scale else []))
    return None


_CN_TOKEN_RE = re.compile(r"(?:input_blocks\.\d+\.1|down_blocks\.\d+\.attentions\.0)\.transformer_blocks\.0\."
                          r"attn2\.to_k\.weight$")


def _detect_control(infos: Mapping[str, TensorInfo]) -> AdapterGuess | None:
    keys = list(infos)
    ks = set(keys)
    if "lora_controlnet" in ks:
        return AdapterGuess("controlnet", None, "control_lora", ["lora_controlnet key (Control-LoRA)"])
    if any(k.startswith("controlnet_blocks.0.") for k in keys) and (
            any(k.startswith(("input_hint_block.", "controlnet_x_embedder.", "pos_embed_input.")) for k in keys)):
        return AdapterGuess("controlnet", "flux", None, ["controlnet_blocks.0.* with a hint/x embedder (Flux ControlNet)"])
    ldm = next((p for p in ("control_model.", "") if p + "zero_convs.0.0.weight" in ks
                and p + "input_hint_block.0.weight" in ks), None)
    diff = "controlnet_cond_embedding.conv_in.weight" in ks
    if ldm is not None or diff:
        ev = ["LDM ControlNet: zero_convs.0.0.weight + input_hint_block.0.weight" if ldm is not None
              else "diffusers ControlNet: controlnet_cond_embedding.conv_in.weight"]
        fam = None
        if any(k.endswith(("add_embedding.linear_1.weight", "label_emb.0.0.weight")) for k in keys):
            fam = "sdxl"
            ev.append("SDXL: add_embedding/label_emb present")
        else:
            tok = next((k for k in keys if _CN_TOKEN_RE.search(k)), None)
            if tok:
                width = _dim(infos[tok].shape, -1)
                fam = FAMILY_BY_CONTEXT_WIDTH.get(width)
                ev.append(f"{tok} {list(infos[tok].shape)} (context width {width})")
            proj = next((k for k in keys if k.endswith("input_blocks.1.1.proj_in.weight")), None)
            if fam is None and proj:  # structure: SD1 projects with 1x1 convs, SD2 with linears
                fam = "sd1" if len(infos[proj].shape) == 4 else "sd2"
                ev.append(f"{proj} is {len(infos[proj].shape)}-D ({'conv' if fam == 'sd1' else 'linear'} proj_in: {fam})")
        variant = "diff" if "difference" in ks else (None if ldm is not None else "diffusers")
        return AdapterGuess("controlnet", fam, variant, ev)
    return None


#: IP-Adapter base by the width of ``ip_adapter.1.to_k_ip.weight``'s input (the text context width)
_IP_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _detect_ip_adapter(infos: Mapping[str, TensorInfo]) -> AdapterGuess | None:
    """IP-Adapter, in the flattened safetensors layout (``image_proj.*`` + ``ip_adapter.N.to_k_ip.weight``, as
    diffusers ``loaders/ip_adapter.py`` and IPAdapter_plus split it) or the ``.bin`` dict layout
    (``{"image_proj": {...}, "ip_adapter": {...}}``, which the pickle reader flattens to the same names), and the
    XLabs Flux IP-Adapter (``ip_adapter_proj_model.*`` + ``double_blocks.N.processor.ip_adapter_double_stream_k_proj``).
    Variant and base as ComfyUI_IPAdapter_plus decides them (``IPAdapterPlus.py``): ``image_proj.proj.3.weight`` full,
    ``image_proj.latents`` / ``perceiver_resampler.proj_in.weight`` plus, ``ip_adapter.0.to_q_lora.down.weight``
    FaceID, ``proj.2.weight`` without ``proj.3`` and without the FaceID LoRA portrait; to_k_ip input 2048 SDXL (and
    Kolors when ``image_proj.layers.0.0.to_out.weight`` has 2048 rows), 768 SD1; 1024 SD2 (InvokeAI)."""
    xlabs = first = None
    for k in infos:  # one pass; most files have neither prefix
        if k.startswith(("ip_adapter.", "double_blocks.")):
            if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight"):
                first = first or k
            elif "ip_adapter_double_stream_k_proj" in k:
                xlabs = k
                break
    if xlabs is not None:
        ev = [f"XLabs Flux IP-Adapter: {xlabs}"]
        proj = next((k for k in infos if k.startswith("ip_adapter_proj_model.")), None)
        if proj:
            ev.append(f"image projection {proj}")
        return AdapterGuess("ipadapter", "flux", "xlabs", ev)
    if first is None:
        return None
    tok = "ip_adapter.1.to_k_ip.weight" if "ip_adapter.1.to_k_ip.weight" in infos else first
    width = _dim(infos[tok].shape, -1)
    fam = _IP_WIDTH.get(width) if width else None
    ev = [f"IP-Adapter: {tok} {list(infos[tok].shape)}" + (f" (context width {width}: {fam})" if fam else "")]
    has = infos.__contains__
    full = has("image_proj.proj.3.weight")
    plus = full or has("image_proj.latents") or has("image_proj.perceiver_resampler.proj_in.weight")
    faceid = has("ip_adapter.0.to_q_lora.down.weight")
    portrait = has("image_proj.proj.2.weight") and not full and not faceid
    if portrait:
        variant = "faceid_portrait"
    elif faceid:
        variant = "faceid_plus" if plus else "faceid"
    else:
        variant = "full" if full else ("plus" if plus else None)
    if variant:
        why = {"faceid_portrait": "image_proj.proj.2.weight without proj.3 or a FaceID LoRA",
               "faceid_plus": "ip_adapter.0.to_q_lora.down.weight (FaceID LoRA) with a plus image projection",
               "faceid": "ip_adapter.0.to_q_lora.down.weight (FaceID LoRA)",
               "full": "image_proj.proj.3.weight (full face)",
               "plus": "image_proj.latents / perceiver_resampler (plus)"}[variant]
        ev.append(f"variant {variant}: {why}")
    kolors = infos.get("image_proj.layers.0.0.to_out.weight") or infos.get(
        "image_proj.perceiver_resampler.layers.0.0.to_out.weight")
    if fam == "sdxl" and kolors is not None and _dim(kolors.shape, 0) in (2048, 4096):
        fam = "kolors"
        ev.append(f"Kolors: image projection to_out {list(kolors.shape)}")
    if not any(k.startswith("image_proj.") for k in infos):
        ev.append("no image_proj.* keys (image projection missing)")
    return AdapterGuess("ipadapter", fam, variant, ev)


#: T2I-Adapter input channels (image channels x pixel-unshuffle factor squared): SDXL adapters unshuffle by 16
#: (3 or 1 channels: 768 / 256, ComfyUI ``load_t2i_adapter``), SD1 ones by 8 (192 / 64)
_T2I_CIN = {768: "sdxl", 256: "sdxl", 192: "sd1", 64: "sd1"}


def _detect_t2i_adapter(infos: Mapping[str, TensorInfo]) -> AdapterGuess | None:
    """T2I-Adapter, as ComfyUI ``controlnet.load_t2i_adapter`` reads it: the TencentARC layout (full
    ``conv_in.weight`` + ``body.0.block2.weight``, light ``body.0.in_conv.weight``), the same under an ``adapter``
    wrapper, the diffusers ``T2IAdapter`` layout (``adapter.conv_in.weight``, ``adapter.body.N.resnets.M.block1``;
    light: ``adapter.body.0.in_conv.weight``), and the style adapter (``style_embedding``)."""
    if "style_embedding" in infos:
        return AdapterGuess("t2i_adapter", "sd1", "style",
                            ["T2I style adapter: style_embedding (ComfyUI StyleAdapter, context width 768)"])
    ks = infos.keys()
    for wrap in ("", "adapter."):
        diffusers = wrap + "body.0.resnets.0.block1.weight" in ks
        conv_in = wrap + "conv_in.weight"
        light = wrap + "body.0.in_conv.weight"
        if conv_in in ks and (wrap + "body.0.block2.weight" in ks or diffusers):
            key, variant = conv_in, None
        elif light in ks:
            key, variant = light, "light"
        else:
            continue
        layout = "diffusers T2IAdapter" if diffusers else ("TencentARC, under 'adapter'" if wrap else "TencentARC")
        cin = _dim(infos[key].shape, 1) if len(infos[key].shape) == 4 else None
        fam = _T2I_CIN.get(cin) if cin else None
        ev = [f"T2I-Adapter ({layout} layout{', light' if variant else ''}): {key}"]
        if cin:
            ev.append(f"input channels {cin}: " + (f"{fam} (pixel-unshuffle {'16' if fam == 'sdxl' else '8'})"
                                                   if fam else "not a known SD1/SDXL adapter input"))
        return AdapterGuess("t2i_adapter", fam, variant, ev)
    return None


_TAESD_NAMES = ((re.compile(r"taesdxl", re.I), "sdxl"), (re.compile(r"taesd3", re.I), "sd3"),
                (re.compile(r"taef1|taeflux", re.I), "flux"), (re.compile(r"taesd", re.I), "sd1"))


def detect_taesd(infos: Mapping[str, TensorInfo], name: str = "") -> AdapterGuess | None:
    """Standalone TAESD encoder/decoder: bare ``nn.Sequential`` keys (ComfyUI prefixes them with
    ``taesd_decoder.``); latent channels from the first decoder conv or the last encoder conv."""
    dec, enc = infos.get("1.weight"), infos.get("0.weight")
    if not infos or not all(k[:1].isdigit() for k in infos):
        return None
    if dec is not None and len(dec.shape) == 4 and "3.conv.0.weight" in infos:
        role, ch = "decoder", dec.shape[1]
    elif enc is not None and len(enc.shape) == 4 and enc.shape[1] == 3 and "1.conv.0.weight" in infos:
        last = max((k for k in infos if k.endswith(".weight") and len(infos[k].shape) == 4),
                   key=lambda k: int(k.split(".")[0]))
        role, ch = "encoder", infos[last].shape[0]
    else:
        return None
    g = AdapterGuess("vae", None, "taesd", [f"TAESD {role} (bare Sequential keys), {ch} latent channels"])
    for rx, fam in _TAESD_NAMES:
        if rx.search(name):
            g.family = fam
            g.evidence.append(f"family {fam} from the file name {name!r}")
            break
    return g


def detect_adapter(infos: Mapping[str, TensorInfo], extra: Mapping[str, Any] | None = None) -> AdapterGuess | None:
    """The adapter/auxiliary kind of a file, or ``None`` when it looks like (part of) a diffusion model."""
    extra = extra or {}
    for rule in (_detect_hypernetwork, _detect_embedding):
        g = rule(infos, extra)
        if g:
            return g
    # IP-Adapters first: a FaceID IP-Adapter is mostly LoRA keys (ip_adapter.N.to_q_lora.down.weight)
    return (_detect_ip_adapter(infos) or _detect_lora(infos) or _detect_control(infos) or _detect_t2i_adapter(infos)
            or _detect_upscaler(infos))
