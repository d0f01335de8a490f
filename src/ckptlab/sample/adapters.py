"""Adapter layouts: kohya LoRA (SD1 diffusers-style names, SDXL SGM-style names), diffusers/PEFT
LoRA, LyCORIS LoHa / LoKr, textual-inversion embeddings and A1111 hypernetworks.

Small adapters match the small checkpoints' widths (so a small LoRA can be baked into a small
checkpoint); full ones match the real models. Module sets follow kohya ``networks/lora.py``:
every Linear / 1x1 Conv inside the UNet's cross-attention transformers (12 per transformer:
proj_in, proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2) and in the CLIP
encoder layers (q/k/v/out_proj, fc1, fc2). A complete SD1 kohya LoRA has 192 UNet + 72 TE modules.
"""

from __future__ import annotations

import re

from ckptlab.sample.components import Layout, clip_hf, unet
from ckptlab.sample.dims import dims

RANK_SMALL = 4
RANK_FULL = 16
EMBED_VECTORS = 4
HYPERNET_WIDTHS = (768, 320, 640, 1280)  # A1111 enable_sizes for SD1

_UNET_MODULE = re.compile(
    r"^((?:input_blocks|output_blocks)\.\d+\.1|middle_block\.1)\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"\.weight$")
_TE_MODULE = re.compile(r"^(text_model\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]))\.weight$")


def ldm_to_diffusers_block(block: str, res_blocks: int = 2) -> str:
    """``input_blocks.4.1`` -> ``down_blocks.1.attentions.0`` (SD1/SD2/SDXL block numbering)."""
    if block.startswith("middle_block"):
        return "mid_block.attentions.0"
    kind, n, _ = block.split(".")
    n = int(n)
    if kind == "input_blocks":
        level, j = divmod(n - 1, res_blocks + 1)
        return f"down_blocks.{level}.attentions.{j}"
    level, j = divmod(n, res_blocks + 1)
    return f"up_blocks.{level}.attentions.{j}"


def unet_lora_modules(unet_layout: dict, diffusers_names: bool) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, weight shape)`` for every LoRA target of an LDM UNet layout."""
    out = []
    for key, (_, shape) in unet_layout.items():
        m = _UNET_MODULE.match(key)
        if not m:
            continue
        block, rest = m.groups()
        name = f"{ldm_to_diffusers_block(block)}.{rest}" if diffusers_names else f"{block}.{rest}"
        out.append((name, shape))
    return out


def te_lora_modules(te_layout: dict) -> list[tuple[str, tuple[int, ...]]]:
    return [(m.group(1), shape) for key, (_, shape) in te_layout.items() if (m := _TE_MODULE.match(key))]


def _kohya_pairs(lay: Layout, prefix: str, modules, rank: int) -> None:
    for name, shape in modules:
        mod = prefix + name.replace(".", "_")
        out, inp, *k = shape
        lay.add(f"{mod}.alpha")
        lay.add(f"{mod}.lora_down.weight", rank, inp, *k)
        lay.add(f"{mod}.lora_up.weight", out, rank, *[1 for _ in k])


def kohya_lora_sd1(small: bool) -> Layout:
    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    _kohya_pairs(lay, "lora_te_", te_lora_modules(clip_hf(dims("sd1", "clip_l", small))), r)
    _kohya_pairs(lay, "lora_unet_", unet_lora_modules(unet(dims("sd1", "unet", small)), True), r)
    return lay


def kohya_lora_sd2(small: bool) -> Layout:
    """kohya LoRA for SD2: SD1 module names; OpenCLIP-H text encoder in HF names (``lora_te_``, 23 used layers)."""
    from dataclasses import replace

    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    te = replace(dims("sd2", "clip_h", small), layers=23)  # SD2 conditions on the penultimate layer
    _kohya_pairs(lay, "lora_te_", te_lora_modules(clip_hf(te)), r)
    _kohya_pairs(lay, "lora_unet_", unet_lora_modules(unet(dims("sd2", "unet", small)), True), r)
    return lay


def kohya_lora_sdxl(small: bool) -> Layout:
    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    _kohya_pairs(lay, "lora_te1_", te_lora_modules(clip_hf(dims("sdxl", "clip_l", small))), r)
    _kohya_pairs(lay, "lora_te2_", te_lora_modules(clip_hf(dims("sdxl", "clip_g", small))), r)
    _kohya_pairs(lay, "lora_unet_", unet_lora_modules(unet(dims("sdxl", "unet", small)), False), r)
    return lay


def peft_lora_sd1(small: bool) -> Layout:
    """diffusers ``pytorch_lora_weights.safetensors`` (PEFT naming, attention projections only, no alphas)."""
    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    for name, shape in unet_lora_modules(unet(dims("sd1", "unet", small)), True):
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            lay.add(f"unet.{name}.lora_A.weight", r, shape[1])
            lay.add(f"unet.{name}.lora_B.weight", shape[0], r)
    for name, shape in te_lora_modules(clip_hf(dims("sd1", "clip_l", small))):
        if "self_attn" in name:
            lay.add(f"text_encoder.{name}.lora_A.weight", r, shape[1])
            lay.add(f"text_encoder.{name}.lora_B.weight", shape[0], r)
    return lay


def _sd1_modules(small: bool):
    te = [("lora_te_" + n.replace(".", "_"), s) for n, s in te_lora_modules(clip_hf(dims("sd1", "clip_l", small)))]
    un = [("lora_unet_" + n.replace(".", "_"), s)
          for n, s in unet_lora_modules(unet(dims("sd1", "unet", small)), True)]
    return te + un


def loha_sd1(small: bool) -> Layout:
    """LyCORIS LoHa (``lycoris.kohya``, no Tucker): w = (w1_a @ w1_b) * (w2_a @ w2_b)."""
    r = RANK_SMALL if small else 8
    lay = Layout()
    for mod, (out, inp, *k) in _sd1_modules(small):
        lay.add(f"{mod}.alpha")
        flat_in = inp
        for kk in k:
            flat_in *= kk
        lay.add(f"{mod}.hada_w1_a", out, r)
        lay.add(f"{mod}.hada_w1_b", r, flat_in)
        lay.add(f"{mod}.hada_w2_a", out, r)
        lay.add(f"{mod}.hada_w2_b", r, flat_in)
    return lay


def factorization(dim: int) -> tuple[int, int]:
    """LyCORIS ``factorization(dim, -1)``: the divisor pair (m, n), m <= n, closest to sqrt(dim)."""
    best = (1, dim)
    m = 1
    while m * m <= dim:
        if dim % m == 0:
            best = (m, dim // m)
        m += 1
    return best


def lokr_sd1(small: bool) -> Layout:
    """LyCORIS LoKr with full factors: w = kron(lokr_w1, lokr_w2)."""
    lay = Layout()
    for mod, (out, inp, *k) in _sd1_modules(small):
        om, on = factorization(out)
        im, in_ = factorization(inp)
        lay.add(f"{mod}.alpha")
        lay.add(f"{mod}.lokr_w1", om, im)
        lay.add(f"{mod}.lokr_w2", on, in_, *k)
    return lay


def embedding_sd1(small: bool) -> Layout:
    """kohya/A1111 safetensors embedding (``emb_params`` [n, 768]); ``fmt='pt'`` writes the A1111 pickle."""
    lay = Layout()
    lay.add("emb_params", EMBED_VECTORS, dims("sd1", "clip_l", small).width)
    return lay


def embedding_sd2(small: bool) -> Layout:
    lay = Layout()
    lay.add("emb_params", EMBED_VECTORS, dims("sd2", "clip_h", small).width)
    return lay


def embedding_sdxl(small: bool) -> Layout:
    lay = Layout()
    lay.add("clip_g", EMBED_VECTORS, dims("sdxl", "clip_g", small).width)
    lay.add("clip_l", EMBED_VECTORS, dims("sdxl", "clip_l", small).width)
    return lay


def hypernetwork_layer_structure(small: bool) -> tuple[float, ...]:
    return (1, 0.05, 1) if small else (1, 2, 1)


def hypernetwork_sd1(small: bool) -> Layout:
    """A1111 hypernetwork, flattened as ``{width}.{0=k|1=v}.linear.{n}.{weight|bias}``.

    The real file is a pickle whose int keys (context widths 768/320/640/1280, real even when
    small) map to a (k, v) tuple of ``nn.Sequential`` state dicts; ``write_model`` builds that.
    """
    lay = Layout()
    ls = hypernetwork_layer_structure(small)
    for w in HYPERNET_WIDTHS:
        for kv in (0, 1):
            for n in range(len(ls) - 1):
                a, b = int(w * ls[n]), int(w * ls[n + 1])
                lay.linear(f"{w}.{kv}.linear.{n}", b, a)
    return lay


def _flux_dims(small: bool):
    from ckptlab.sample.components import FluxDims

    return FluxDims(hidden=64, heads=2, context_in=32, vec_in=32) if small else FluxDims()


def kohya_lora_flux(small: bool) -> Layout:
    """kohya/sd-scripts Flux LoRA: ``lora_unet_double_blocks_N_{img,txt}_{attn_qkv,attn_proj,mlp_0,mlp_2,mod_lin}``
    and ``lora_unet_single_blocks_N_{linear1,linear2,modulation_lin}`` (BFL module names)."""
    from ckptlab.sample.components import flux

    r = RANK_SMALL if small else RANK_FULL
    mods = [(k[: -len(".weight")], s) for k, (_, s) in flux(_flux_dims(small)).items()
            if k.endswith(".weight") and k.startswith(("double_blocks.", "single_blocks.")) and len(s) == 2]
    lay = Layout()
    _kohya_pairs(lay, "lora_unet_", mods, r)
    return lay


def diffusers_lora_flux(small: bool) -> Layout:
    """diffusers/PEFT Flux LoRA (``transformer.transformer_blocks.N.attn.to_q.lora_A.weight`` ...)."""
    d = _flux_dims(small)
    h, mlp = d.hidden, d.hidden * d.mlp_ratio
    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    for i in range(d.double):
        for n in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            lay.add(f"transformer.transformer_blocks.{i}.attn.{n}.lora_A.weight", r, h)
            lay.add(f"transformer.transformer_blocks.{i}.attn.{n}.lora_B.weight", h, r)
    for i in range(d.single):
        for n, o, inp in (("attn.to_q", h, h), ("attn.to_k", h, h), ("attn.to_v", h, h), ("proj_mlp", mlp, h),
                          ("proj_out", h, h + mlp)):
            lay.add(f"transformer.single_transformer_blocks.{i}.{n}.lora_A.weight", r, inp)
            lay.add(f"transformer.single_transformer_blocks.{i}.{n}.lora_B.weight", o, r)
    return lay


def xlabs_lora_flux(small: bool) -> Layout:
    """XLabs Flux LoRA: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (double blocks only)."""
    d = _flux_dims(small)
    h = d.hidden
    r = RANK_SMALL if small else RANK_FULL
    lay = Layout()
    for i in range(d.double):
        for s in ("1", "2"):
            lay.add(f"double_blocks.{i}.processor.qkv_lora{s}.down.weight", r, h)
            lay.add(f"double_blocks.{i}.processor.qkv_lora{s}.up.weight", 3 * h, r)
            lay.add(f"double_blocks.{i}.processor.proj_lora{s}.down.weight", r, h)
            lay.add(f"double_blocks.{i}.processor.proj_lora{s}.up.weight", h, r)
    return lay


def oft_sd1(small: bool) -> Layout:
    """LyCORIS OFT: ``oft_blocks`` [out / block_size, block_size, block_size] per module (+ alpha)."""
    size = 8 if small else 16
    lay = Layout()
    for mod, (out, *_rest) in _sd1_modules(small):
        lay.add(f"{mod}.alpha")
        lay.add(f"{mod}.oft_blocks", out // size, size, size)
    return lay


def glora_sd1(small: bool) -> Layout:
    """LyCORIS GLoRA (original layout; ComfyUI's "old_glora" branch): ``a1`` [r, in], ``a2`` [in, r], ``b1``
    [r, in], ``b2`` [out, r]; the update is ``b2 @ b1 + W @ a2 @ a1``."""
    r = RANK_SMALL if small else 8
    lay = Layout()
    for mod, (out, inp, *k) in _sd1_modules(small):
        if k:
            continue  # GLoRA targets Linear layers
        lay.add(f"{mod}.alpha")
        lay.add(f"{mod}.a1.weight", r, inp)
        lay.add(f"{mod}.a2.weight", inp, r)
        lay.add(f"{mod}.b1.weight", r, inp)
        lay.add(f"{mod}.b2.weight", out, r)
    return lay


def dora_sd1(small: bool) -> Layout:
    """kohya-style LoRA with DoRA magnitude vectors (``dora_scale`` [out, 1])."""
    lay = kohya_lora_sd1(small)
    out = Layout()
    for k, v in lay.items():
        out[k] = v
        if k.endswith(".lora_up.weight"):
            out[k[: -len(".lora_up.weight")] + ".dora_scale"] = ("F32", (v[1][0], 1))
    return out


_RES = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut"}


def unet_conv_modules(unet_layout: dict, res_blocks: int = 2) -> list[tuple[str, tuple[int, ...]]]:
    """LoCon targets of an LDM UNet in diffusers names: resnets (conv1, time_emb_proj, conv2, conv_shortcut),
    downsamplers and upsamplers (kohya ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3``)."""
    out = []
    for key, (_, shape) in unet_layout.items():
        m = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)\.weight$", key) or \
            re.match(r"^(middle_block)\.(\d+)\.()(.+)\.weight$", key)
        if not m:
            continue
        kind, n, sub, rest = m.groups()
        n = int(n)
        if kind == "middle_block":
            if rest in _RES and n in (0, 2):
                out.append((f"mid_block.resnets.{n // 2}.{_RES[rest]}", shape))
            continue
        if kind == "input_blocks":
            if n == 0:
                continue
            level, j = divmod(n - 1, res_blocks + 1)
            if rest == "op":
                out.append((f"down_blocks.{level}.downsamplers.0.conv", shape))
            elif sub == "0" and rest in _RES:
                out.append((f"down_blocks.{level}.resnets.{j}.{_RES[rest]}", shape))
        else:
            level, j = divmod(n, res_blocks + 1)
            if rest == "conv":
                out.append((f"up_blocks.{level}.upsamplers.0.conv", shape))
            elif sub == "0" and rest in _RES:
                out.append((f"up_blocks.{level}.resnets.{j}.{_RES[rest]}", shape))
    return out


def locon_sd1(small: bool) -> Layout:
    """kohya LoCon for SD1 (``networks.lora`` with ``conv_dim``): the attention LoRA plus 3x3/1x1 conv and
    ``time_emb_proj`` modules of every resnet, downsampler and upsampler (diffusers-style names)."""
    r = RANK_SMALL if small else RANK_FULL
    lay = kohya_lora_sd1(small)
    _kohya_pairs(lay, "lora_unet_", unet_conv_modules(unet(dims("sd1", "unet", small))), r)
    return lay
