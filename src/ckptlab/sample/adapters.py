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
