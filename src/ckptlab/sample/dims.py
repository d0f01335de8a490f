"""Real and small dimensions per family.

``FULL[family]`` holds the real architecture widths; ``SMALL[family]`` the scaled-down widths used
for ``small=True`` sample files. Small layouts keep every key (same number of blocks, layers,
resblocks, transformer depths, CLIP vocab 49408 and 77 positions, T5 vocab 32128) and keep every
internal relation of the real model (e.g. SDXL context = CLIP-L width + CLIP-G width, label_emb
input = pooled CLIP-G width + 6 x size-embedding width), so diffusers / transformers models built
from the matching small config load them with ``strict=True``.
"""

from __future__ import annotations

from ckptlab.sample.components import FluxDims, MMDiTDims, T5Dims, TextDims, UNetDims, VAEDims

SD1_MULT = (1, 2, 4, 4)

FULL: dict[str, dict[str, object]] = {
    "sd1": {
        "unet": UNetDims(320, 4, SD1_MULT, (1, 1, 1, 0), 1, 768, False),
        "vae": VAEDims(128),
        "clip_l": TextDims(768, 12, 3072, 768),
    },
    "sd2": {
        "unet": UNetDims(320, 4, SD1_MULT, (1, 1, 1, 0), 1, 1024, True),
        "vae": VAEDims(128),
        "clip_h": TextDims(1024, 24, 4096, 1024),
    },
    "sdxl": {
        # adm 2816 = pooled CLIP-G 1280 + 6 size conditions x 256
        "unet": UNetDims(320, 4, (1, 2, 4), (0, 2, 10), 10, 2048, True, adm=2816),
        "vae": VAEDims(128),
        "clip_l": TextDims(768, 12, 3072, 768),
        "clip_g": TextDims(1280, 32, 5120, 1280),
        "size_embed": 256,
    },
    "sdxl_refiner": {
        # adm 2560 = pooled CLIP-G 1280 + 5 conditions x 256 (aesthetic score replaces target size)
        "unet": UNetDims(384, 4, SD1_MULT, (0, 4, 4, 0), 4, 1280, True, adm=2560),
        "vae": VAEDims(128),
        "clip_g": TextDims(1280, 32, 5120, 1280),
        "size_embed": 256,
    },
    "sd3": {
        "mmdit": MMDiTDims(depth=24, pos_embed=192 * 192),
        "vae": VAEDims(128, z=16, quant_conv=False),
        "clip_l": TextDims(768, 12, 3072, 768),
        "clip_g": TextDims(1280, 32, 5120, 1280),
        "t5xxl": T5Dims(),
    },
    "sd35_medium": {"mmdit": MMDiTDims(depth=24, pos_embed=384 * 384, qk_norm=True, attn2_blocks=13)},
    "sd35_large": {"mmdit": MMDiTDims(depth=38, pos_embed=192 * 192, qk_norm=True)},
    "flux": {
        "flux": FluxDims(),
        "vae": VAEDims(128, z=16, quant_conv=False),
        "clip_l": TextDims(768, 12, 3072, 768),
        "t5xxl": T5Dims(),
    },
}

_clip_l_small = TextDims(32, 12, 128, 32)
_clip_g_small = TextDims(64, 32, 256, 64)
_t5_small = T5Dims(d_model=32, d_ff=80, layers=24, heads=4, d_kv=8)

SMALL: dict[str, dict[str, object]] = {
    "sd1": {
        "unet": UNetDims(32, 4, SD1_MULT, (1, 1, 1, 0), 1, 32, False),
        "vae": VAEDims(32),
        "clip_l": _clip_l_small,
    },
    "sd2": {
        "unet": UNetDims(32, 4, SD1_MULT, (1, 1, 1, 0), 1, 48, True),
        "vae": VAEDims(32),
        "clip_h": TextDims(48, 24, 192, 48),
    },
    "sdxl": {
        # context 96 = 32 + 64; adm 112 = 64 + 6 x 8
        "unet": UNetDims(32, 4, (1, 2, 4), (0, 2, 10), 10, 96, True, adm=112),
        "vae": VAEDims(32),
        "clip_l": _clip_l_small,
        "clip_g": _clip_g_small,
        "size_embed": 8,
    },
    "sdxl_refiner": {
        # GroupNorm(32) needs channels divisible by 32, so 384 -> 32 like the base; adm 104 = 64 + 5 x 8
        "unet": UNetDims(32, 4, SD1_MULT, (0, 4, 4, 0), 4, 64, True, adm=104),
        "vae": VAEDims(32),
        "clip_g": _clip_g_small,
        "size_embed": 8,
    },
    "sd3": {
        # hidden 64 (4 heads x 16); context_in = T5 width; adm = pooled CLIP-L + CLIP-G = 96
        "mmdit": MMDiTDims(depth=24, pos_embed=24 * 24, hidden=64, head_dim=16, context_in=32, adm=96),
        "vae": VAEDims(32, z=16, quant_conv=False),
        "clip_l": _clip_l_small,
        "clip_g": _clip_g_small,
        "t5xxl": _t5_small,
    },
    "sd35_medium": {"mmdit": MMDiTDims(depth=24, pos_embed=48 * 48, qk_norm=True, attn2_blocks=13, hidden=64,
                                       head_dim=16, context_in=32, adm=96)},
    "sd35_large": {"mmdit": MMDiTDims(depth=38, pos_embed=24 * 24, qk_norm=True, hidden=64, head_dim=16,
                                      context_in=32, adm=96)},
    "flux": {
        # hidden 64 = 2 heads x 32; txt_in = T5 width, vector_in = CLIP-L width
        "flux": FluxDims(hidden=64, heads=2, context_in=32, vec_in=32),
        "vae": VAEDims(32, z=16, quant_conv=False),
        "clip_l": _clip_l_small,
        "t5xxl": _t5_small,
    },
}


def dims(family: str, part: str, small: bool):
    table = SMALL if small else FULL
    if part in table.get(family, {}):
        return table[family][part]
    # components shared with a base family (e.g. SD3.5 text encoders come from SD3)
    return table["sd3" if family.startswith("sd35") else family][part]
