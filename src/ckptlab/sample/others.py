"""Layouts of the less common families: upscalers, MiDaS depth model, and the transformer /
video families of the identification oracle table that are mostly used header-only (sparse).

Where a layout below is a faithful reduction rather than the complete original key set, its
docstring says so; the marker keys and shapes the detectors read (``arch``) are always exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ckptlab.sample.components import Layout


def esrgan(small: bool, *, nf: int | None = None, gc: int | None = None, blocks: int = 23) -> Layout:
    """Old-arch ESRGAN x4 (``RRDB_ESRGAN_x4.pth``): ``model.0`` conv, 23 RRDBs in ``model.1.sub``,
    trunk conv ``model.1.sub.23``, two upsample convs ``model.3``/``model.6``, ``model.8``, ``model.10``."""
    nf = nf or (8 if small else 64)
    gc = gc or (4 if small else 32)
    lay = Layout()
    lay.conv("model.0", nf, 3)
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                out = nf if c == 5 else gc
                lay.conv(f"model.1.sub.{b}.RDB{r}.conv{c}.0", out, nf + (c - 1) * gc)
    lay.conv(f"model.1.sub.{blocks}", nf, nf)
    lay.conv("model.3", nf, nf)
    lay.conv("model.6", nf, nf)
    lay.conv("model.8", nf, nf)
    lay.conv("model.10", 3, nf)
    return lay


def midas_dpt_hybrid(small: bool) -> Layout:
    """MiDaS DPT-Hybrid as stored under ``depth_model.model.`` in SD2-depth: timm ``vit_base_resnet50_384``
    (ResNet-50 stem + stages of 3, 4, 9 bottlenecks, 12 ViT-B blocks, ImageNet head), the readout
    projections ``act_postprocess3/4`` (1 and 2 are parameter-free for the hybrid), and the ``scratch``
    refinement decoder: 368 tensors, 123.1 M parameters. Small: every width / 8 (same keys)."""
    k = 8 if small else 1
    w, f = 768 // k, 256 // k
    lay = Layout()
    p = "pretrained.model."
    lay.add(p + "cls_token", 1, 1, w)
    lay.add(p + "pos_embed", 1, 577, w)
    lay.add(p + "patch_embed.backbone.stem.conv.weight", 64 // k, 3, 7, 7)
    lay.norm(p + "patch_embed.backbone.stem.norm", 64 // k)
    cin = 64 // k
    for s, (n, mid) in enumerate(((3, 64), (4, 128), (9, 256))):
        mid //= k
        out = 4 * mid
        for b in range(n):
            q = f"{p}patch_embed.backbone.stages.{s}.blocks.{b}."
            lay.add(q + "conv1.weight", mid, cin if b == 0 else out, 1, 1)
            lay.norm(q + "norm1", mid)
            lay.add(q + "conv2.weight", mid, mid, 3, 3)
            lay.norm(q + "norm2", mid)
            lay.add(q + "conv3.weight", out, mid, 1, 1)
            lay.norm(q + "norm3", out)
            if b == 0:
                lay.add(q + "downsample.conv.weight", out, cin, 1, 1)
                lay.norm(q + "downsample.norm", out)
        cin = out
    lay.conv(p + "patch_embed.proj", w, cin, 1)
    for i in range(12):
        b = f"{p}blocks.{i}."
        lay.norm(b + "norm1", w)
        lay.linear(b + "attn.qkv", 3 * w, w)
        lay.linear(b + "attn.proj", w, w)
        lay.norm(b + "norm2", w)
        lay.linear(b + "mlp.fc1", 4 * w, w)
        lay.linear(b + "mlp.fc2", w, 4 * w)
    lay.norm(p + "norm", w)
    lay.linear(p + "head", 1000, w)
    for i in (3, 4):
        lay.linear(f"pretrained.act_postprocess{i}.0.project.0", w, 2 * w)
        lay.conv(f"pretrained.act_postprocess{i}.3", w, w, 1)
    lay.conv("pretrained.act_postprocess4.4", w, w)
    for i, c in enumerate((256 // k, 512 // k, w, w), 1):
        lay.add(f"scratch.layer{i}_rn.weight", f, c, 3, 3)
    for i in range(1, 5):
        b = f"scratch.refinenet{i}."
        lay.conv(b + "out_conv", f, f, 1)
        for u in (1, 2):
            lay.conv(f"{b}resConfUnit{u}.conv1", f, f)
            lay.conv(f"{b}resConfUnit{u}.conv2", f, f)
    lay.conv("scratch.output_conv.0", f // 2, f)
    lay.conv("scratch.output_conv.2", 32 // k, f // 2)
    lay.conv("scratch.output_conv.4", 1, 32 // k, 1)
    return lay


# ---------------------------------------------------------------------------------------------
# Stable Cascade (Wuerstchen v3) stage C / stage B, original names
# ---------------------------------------------------------------------------------------------

def _cascade_res(lay: Layout, p: str, c: int, skip: int) -> None:
    lay.add(f"{p}.depthwise.weight", c, 1, 3, 3)
    lay.add(f"{p}.depthwise.bias", c)
    lay.linear(f"{p}.channelwise.0", 4 * c, c + skip)
    lay.add(f"{p}.channelwise.2.gamma", 1, 1, 1, 4 * c)
    lay.add(f"{p}.channelwise.2.beta", 1, 1, 1, 4 * c)
    lay.linear(f"{p}.channelwise.4", c, 4 * c)


def _cascade_block(lay: Layout, p: str, kind: str, c: int, skip: int, cond: int, t_conds: tuple[str, ...]) -> None:
    if kind == "R":
        _cascade_res(lay, p, c, skip)
    elif kind == "T":
        lay.linear(f"{p}.mapper", 2 * c, 64)
        for t in t_conds:
            lay.linear(f"{p}.mapper_{t}", 2 * c, 64)
    else:
        lay.add(f"{p}.attention.attn.in_proj_weight", 3 * c, c)
        lay.add(f"{p}.attention.attn.in_proj_bias", 3 * c)
        lay.linear(f"{p}.attention.attn.out_proj", c, c)
        lay.linear(f"{p}.kv_mapper.1", c, cond)


def cascade(stage: str, small: bool) -> Layout:
    """Stable Cascade stage C (3.6 B prior) or stage B (1.56 B decoder), original (non-diffusers) names."""
    lay = Layout()
    k = 16 if small else 1  # width divisor for small files
    if stage == "c":
        hidden, cond = (2048 // k, 2048 // k), 2048 // k
        down, up, repeat = (8, 24), (24, 8), (1, 1)
        kinds = ("RTA", "RTA")
        t_conds = ("sca", "crp")
        lay.linear("clip_txt_pooled_mapper", cond * 4, 1280 // k)
        lay.linear("clip_txt_mapper", cond, 1280 // k)
        lay.linear("clip_img_mapper", cond * 4, 768 // k)
        lay.conv("embedding.1", hidden[0], 16, 1)
        patch_out = 16
    else:
        hidden, cond = (320 // k, 640 // k, 1280 // k, 1280 // k), 1280 // k
        down, up, repeat = (2, 6, 28, 6), (6, 28, 6, 2), (3, 3, 2, 2)
        kinds = ("RT", "RT", "RTA", "RTA")
        t_conds = ("sca",)
        lay.conv("effnet_mapper.0", cond, 16, 1)
        lay.conv("effnet_mapper.2", hidden[0], cond, 1)
        lay.conv("pixels_mapper.0", cond, 3, 1)
        lay.conv("pixels_mapper.2", hidden[0], cond, 1)
        lay.linear("clip_mapper", cond * 4, 1280 // k)
        lay.conv("embedding.1", hidden[0], 4 * 16, 1)
        patch_out = 4 * 16
    levels = len(hidden)
    for i in range(levels):
        if i > 0:
            if stage == "c":
                lay.conv(f"down_downscalers.{i}.1.blocks.0", hidden[i], hidden[i - 1], 1)
            else:
                lay.conv(f"down_downscalers.{i}.1", hidden[i], hidden[i - 1], 2)
        n = 0
        for _ in range(down[i]):
            for kind in kinds[i]:
                _cascade_block(lay, f"down_blocks.{i}.{n}", kind, hidden[i], 0, cond, t_conds)
                n += 1
    for u in range(levels):  # up_blocks.0 is the deepest level
        i = levels - 1 - u
        n = 0
        for j in range(up[u]):
            for kind in kinds[i]:
                skip = hidden[i] if (kind == "R" and j == 0 and u > 0) else 0
                _cascade_block(lay, f"up_blocks.{u}.{n}", kind, hidden[i], skip, cond, t_conds)
                n += 1
        if u < levels - 1:
            if stage == "c":
                lay.conv(f"up_upscalers.{u}.1.blocks.1", hidden[i - 1], hidden[i], 1)
            else:  # ConvTranspose2d weight is [in, out, k, k]
                lay.add(f"up_upscalers.{u}.1.weight", hidden[i], hidden[i - 1], 2, 2)
                lay.add(f"up_upscalers.{u}.1.bias", hidden[i - 1])
    for u in range(levels):
        i = levels - 1 - u
        for r in range(repeat[u] - 1):
            lay.conv(f"up_repeat_mappers.{u}.{r}", hidden[i], hidden[i], 1)
    lay.conv("clf.1", patch_out, hidden[0], 1)
    return lay


# ---------------------------------------------------------------------------------------------
# AuraFlow (original names, as in aura_flow_0.3.safetensors)
# ---------------------------------------------------------------------------------------------

def auraflow(small: bool) -> Layout:
    h = 64 if small else 3072
    ff = 256 if small else 8192  # find_multiple(int(2 * 4h / 3), 256)
    ctx = 32 if small else 2048
    lay = Layout()
    lay.add("register_tokens", 1, 8, h)
    lay.add("positional_encoding", 1, 1024, h)
    lay.linear("init_x_linear", h, 2 * 2 * 4)
    lay.add("cond_seq_linear.weight", h, ctx)
    lay.linear("t_embedder.mlp.0", h, 256)
    lay.linear("t_embedder.mlp.2", h, h)
    for i in range(4):
        p = f"double_layers.{i}"
        for m in ("mlpX", "mlpC"):
            lay.add(f"{p}.{m}.c_fc1.weight", ff, h)
            lay.add(f"{p}.{m}.c_fc2.weight", ff, h)
            lay.add(f"{p}.{m}.c_proj.weight", h, ff)
        lay.add(f"{p}.modX.1.weight", 6 * h, h)
        lay.add(f"{p}.modC.1.weight", 6 * h, h)
        for w in ("w1q", "w1k", "w1v", "w1o", "w2q", "w2k", "w2v", "w2o"):
            lay.add(f"{p}.attn.{w}.weight", h, h)
    for i in range(32):
        p = f"single_layers.{i}"
        lay.add(f"{p}.mlp.c_fc1.weight", ff, h)
        lay.add(f"{p}.mlp.c_fc2.weight", ff, h)
        lay.add(f"{p}.mlp.c_proj.weight", h, ff)
        lay.add(f"{p}.modCX.1.weight", 6 * h, h)
        for w in ("w1q", "w1k", "w1v", "w1o"):
            lay.add(f"{p}.attn.{w}.weight", h, h)
    lay.add("modF.1.weight", 2 * h, h)
    lay.add("final_linear.weight", 2 * 2 * 4, h)
    return lay


LAYOUTS: dict[str, Callable[[bool], Layout]] = {
    "cascade_stage_c": lambda s: cascade("c", s),
    "cascade_stage_b": lambda s: cascade("b", s),
    "auraflow": auraflow,
}


# ---------------------------------------------------------------------------------------------
# PixArt, HunyuanDiT, Chroma, SVD temporal parts, TAESD, T2I-Adapter, IP-Adapter, Real-ESRGAN
# ---------------------------------------------------------------------------------------------

def pixart(small: bool, *, alpha: bool) -> Layout:
    """PixArt-alpha / Sigma original ``PixArtMS`` 1024 checkpoints (XL/2, 28 blocks, hidden 1152; T5 4096;
    alpha: 120 tokens and ``csize/ar_embedder`` micro-conditions, Sigma: 300 tokens). ``PixArtMS`` computes
    its positional embedding on the fly, so there is no ``pos_embed`` tensor; ``y_embedder.y_embedding`` is the
    learned null caption (diffusers drops it)."""
    h, t5 = (64, 32) if small else (1152, 4096)
    lay = Layout()
    lay.conv("x_embedder.proj", h, 4, 2)
    lay.linear("t_embedder.mlp.0", h, 256)
    lay.linear("t_embedder.mlp.2", h, h)
    lay.linear("t_block.1", 6 * h, h)
    lay.linear("y_embedder.y_proj.fc1", h, t5)
    lay.linear("y_embedder.y_proj.fc2", h, h)
    lay.add("y_embedder.y_embedding", 120 if alpha else 300, t5)
    if alpha:
        for e in ("csize_embedder", "ar_embedder"):
            lay.linear(f"{e}.mlp.0", h // 3, 256)
            lay.linear(f"{e}.mlp.2", h // 3, h // 3)
    for i in range(28):
        p = f"blocks.{i}"
        lay.add(f"{p}.scale_shift_table", 6, h)
        lay.linear(f"{p}.attn.qkv", 3 * h, h)
        lay.linear(f"{p}.attn.proj", h, h)
        lay.linear(f"{p}.cross_attn.q_linear", h, h)
        lay.linear(f"{p}.cross_attn.kv_linear", 2 * h, h)
        lay.linear(f"{p}.cross_attn.proj", h, h)
        lay.linear(f"{p}.mlp.fc1", 4 * h, h)
        lay.linear(f"{p}.mlp.fc2", h, 4 * h)
    lay.add("final_layer.scale_shift_table", 2, h)
    lay.linear("final_layer.linear", 2 * 2 * 8, h)
    return lay


def hunyuan_dit(small: bool, *, v10: bool = False) -> Layout:
    """HunyuanDiT DiT-g/2 original names (40 blocks, hidden 1408, 16 heads of 88, MLP ratio 4.3637; blocks
    21-39 take long skips). ``extra_embedder`` input: v1.1/1.2 the pooled text (1024); v1.0 adds 6 x 256
    image-size features and the 1408-wide style embedding (3968)."""
    h, hd, clip, t5 = (64, 16, 32, 48) if small else (1408, 88, 1024, 2048)
    mlp = int(h * 4.3637)
    lay = Layout()
    lay.add("text_embedding_padding", 77 + 256, clip)
    lay.linear("mlp_t5.0", 4 * t5, t5)
    lay.linear("mlp_t5.2", clip, 4 * t5)
    lay.conv("x_embedder.proj", h, 4, 2)
    lay.linear("t_embedder.mlp.0", h, 256)
    lay.linear("t_embedder.mlp.2", h, h)
    lay.add("pooler.positional_embedding", 257, t5)
    for n in ("k_proj", "q_proj", "v_proj"):
        lay.linear(f"pooler.{n}", t5, t5)
    lay.linear("pooler.c_proj", clip, t5)
    extra = clip + ((6 * (8 if small else 256) + h) if v10 else 0)
    if v10:
        lay.add("style_embedder.weight", 1, h)
    lay.linear("extra_embedder.0", 4 * h, extra)
    lay.linear("extra_embedder.2", h, 4 * h)
    for i in range(40):
        p = f"blocks.{i}"
        lay.norm(f"{p}.norm1", h)
        lay.linear(f"{p}.default_modulation.1", h, h)
        lay.linear(f"{p}.attn1.Wqkv", 3 * h, h)
        lay.norm(f"{p}.attn1.q_norm", hd)
        lay.norm(f"{p}.attn1.k_norm", hd)
        lay.linear(f"{p}.attn1.out_proj", h, h)
        lay.norm(f"{p}.norm2", h)
        lay.linear(f"{p}.mlp.fc1", mlp, h)
        lay.linear(f"{p}.mlp.fc2", h, mlp)
        lay.norm(f"{p}.norm3", h)
        lay.linear(f"{p}.attn2.q_proj", h, h)
        lay.linear(f"{p}.attn2.kv_proj", 2 * h, clip)
        lay.norm(f"{p}.attn2.q_norm", hd)
        lay.norm(f"{p}.attn2.k_norm", hd)
        lay.linear(f"{p}.attn2.out_proj", h, h)
        if i > 20:
            lay.norm(f"{p}.skip_norm", 2 * h)
            lay.linear(f"{p}.skip_linear", h, 2 * h)
    lay.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    lay.linear("final_layer.linear", 2 * 2 * 8, h)
    return lay


def chroma(small: bool) -> Layout:
    """Chroma: Flux-schnell blocks without the per-block modulation linears, ``vector_in`` and the final
    adaLN, plus the ``distilled_guidance_layer`` approximator (in_proj 64 -> 5120, 5 MLP layers with RMS norms,
    out_proj -> 3072)."""
    from ckptlab.sample.components import FluxDims, flux

    d = FluxDims(hidden=64, heads=2, context_in=32, vec_in=32, guidance=False) if small else FluxDims(guidance=False)
    full = flux(d)
    lay = Layout()
    for k, v in full.items():
        if "_mod.lin" in k or ".modulation.lin" in k or k.startswith("vector_in.") or "adaLN_modulation" in k:
            continue
        lay[k] = v
    a = 128 if small else 5120
    lay.linear("distilled_guidance_layer.in_proj", a, 64)
    for i in range(5):
        lay.linear(f"distilled_guidance_layer.layers.{i}.in_layer", a, a)
        lay.linear(f"distilled_guidance_layer.layers.{i}.out_layer", a, a)
        lay.add(f"distilled_guidance_layer.norms.{i}.scale", a)
    lay.linear("distilled_guidance_layer.out_proj", d.hidden, a)
    return lay


def svd_temporal(unet_layout: dict, context: int) -> Layout:
    """SVD's VideoUNet additions to an SD2-style UNet layout: ``time_stack`` / ``time_mixer`` in every
    resblock and transformer (one temporal block per spatial one, as in SVD's depth-1 transformers)."""
    lay = Layout()
    for k, (dt, shape) in unet_layout.items():
        lay[k] = (dt, shape)
    for k, (_, shape) in list(unet_layout.items()):
        m = re.match(r"^(.*\.\d+\.1|middle_block\.1)\.transformer_blocks\.(\d+)\.attn1\.to_q\.weight$", k)
        if m:
            p, d = m.group(1), m.group(2)
            c = shape[0]
            t = f"{p}.time_stack.{d}"
            lay.norm(f"{t}.norm_in", c)
            lay.linear(f"{t}.ff_in.net.0.proj", 8 * c, c)
            lay.linear(f"{t}.ff_in.net.2", c, 4 * c)
            for a, kv in (("attn1", c), ("attn2", context)):
                lay.linear(f"{t}.{a}.to_q", c, c, bias=False)
                lay.linear(f"{t}.{a}.to_k", c, kv, bias=False)
                lay.linear(f"{t}.{a}.to_v", c, kv, bias=False)
                lay.linear(f"{t}.{a}.to_out.0", c, c)
            lay.linear(f"{t}.ff.net.0.proj", 8 * c, c)
            lay.linear(f"{t}.ff.net.2", c, 4 * c)
            for n in ("norm1", "norm2", "norm3"):
                lay.norm(f"{t}.{n}", c)
            if d == "0":
                lay.linear(f"{p}.time_pos_embed.0", 4 * c, c)
                lay.linear(f"{p}.time_pos_embed.2", c, 4 * c)
                lay.add(f"{p}.time_mixer.mix_factor", 1)
        m = re.match(r"^(.*blocks\.\d+\.0|middle_block\.[02])\.in_layers\.2\.weight$", k)
        if m:
            p, c = m.group(1), shape[0]
            emb = unet_layout["time_embed.0.weight"][1][0]
            lay.norm(f"{p}.time_stack.in_layers.0", c)
            lay.add(f"{p}.time_stack.in_layers.2.weight", c, c, 3, 1, 1)
            lay.add(f"{p}.time_stack.in_layers.2.bias", c)
            lay.linear(f"{p}.time_stack.emb_layers.1", c, emb)
            lay.norm(f"{p}.time_stack.out_layers.0", c)
            lay.add(f"{p}.time_stack.out_layers.3.weight", c, c, 3, 1, 1)
            lay.add(f"{p}.time_stack.out_layers.3.bias", c)
            lay.add(f"{p}.time_mixer.mix_factor", 1)
    return lay


def taesd_decoder(latent: int = 4) -> Layout:
    """TAESD decoder as a bare ``nn.Sequential`` (``taesd_decoder.safetensors``); same for small."""
    lay = Layout()
    lay.conv("1", 64, latent)
    idx = 3
    for group in range(4):
        for _ in range(3 if group < 3 else 1):
            for c in (0, 2, 4):
                lay.conv(f"{idx}.conv.{c}", 64, 64)
            idx += 1
        if group < 3:
            idx += 1  # Upsample (no parameters)
            lay.add(f"{idx}.weight", 64, 64, 3, 3)  # conv without bias
            idx += 1
    lay.conv(f"{idx}", 3, 64)
    return lay


def t2i_adapter_full(small: bool, cin: int = 64 * 3) -> Layout:
    """T2I-Adapter full (SD1): pixel-unshuffled input conv, 4 levels x 2 ResnetBlocks (3x3 ``block1``, 1x1
    ``block2``; a 1x1 ``in_conv`` where the width changes)."""
    ch = (32, 64, 128, 128) if small else (320, 640, 1280, 1280)
    lay = Layout()
    lay.conv("conv_in", ch[0], cin)
    n = 0
    for i, c in enumerate(ch):
        for j in range(2):
            if i and j == 0 and ch[i - 1] != c:
                lay.conv(f"body.{n}.in_conv", c, ch[i - 1], 1)
            lay.conv(f"body.{n}.block1", c, c)
            lay.conv(f"body.{n}.block2", c, c, 1)
            n += 1
    return lay


def ip_adapter_sd15(small: bool) -> Layout:
    """IP-Adapter SD1.5 (safetensors form): ``image_proj`` (4 tokens from the 1024-d CLIP-H image embed) and
    ``ip_adapter.{1,3,..,31}.to_k_ip/to_v_ip`` for the 16 cross-attentions in diffusers processor order."""
    ctx, img, widths = (32, 48, (32, 64, 128)) if small else (768, 1024, (320, 640, 1280))
    c0, c1, c2 = widths
    order = [c0, c0, c1, c1, c2, c2, c2, c2, c2, c1, c1, c1, c0, c0, c0, c2]  # down, up, mid
    lay = Layout()
    lay.linear("image_proj.proj", 4 * ctx, img)
    lay.norm("image_proj.norm", ctx)
    for n, c in enumerate(order):
        lay.add(f"ip_adapter.{2 * n + 1}.to_k_ip.weight", c, ctx)
        lay.add(f"ip_adapter.{2 * n + 1}.to_v_ip.weight", c, ctx)
    return lay


def realesrgan(small: bool) -> Layout:
    """Real-ESRGAN / BasicSR ``RRDBNet`` x4 names (``RealESRGAN_x4plus.pth`` holds them under ``params_ema``)."""
    nf, gc = (8, 4) if small else (64, 32)
    lay = Layout()
    lay.conv("conv_first", nf, 3)
    for b in range(23):
        for r in (1, 2, 3):
            for c in range(1, 6):
                lay.conv(f"body.{b}.rdb{r}.conv{c}", nf if c == 5 else gc, nf + (c - 1) * gc)
    for n in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        lay.conv(n, nf, nf)
    lay.conv("conv_last", 3, nf)
    return lay


LAYOUTS.update({
    "pixart_alpha": lambda s: pixart(s, alpha=True),
    "pixart_sigma": lambda s: pixart(s, alpha=False),
    "hunyuan_dit": lambda s: hunyuan_dit(s),
    "hunyuan_dit_v10": lambda s: hunyuan_dit(s, v10=True),
    "chroma": chroma,
    "taesd_decoder": lambda s: taesd_decoder(4),
    "t2i_adapter": t2i_adapter_full,
    "ip_adapter_sd15": ip_adapter_sd15,
    "realesrgan_x4plus": realesrgan,
})
