"""Key/shape generators for the building blocks of SD-family model files.

Each function appends ``key -> (dtype, shape)`` entries to a ``Layout`` in the order the
original PyTorch modules register them (LDM/SGM ``openaimodel``, LDM ``AutoencoderKL``,
HF ``CLIPTextModel``, OpenCLIP text tower, HF ``T5EncoderModel``, SAI MMDiT, BFL Flux). Widths
are parameters, so the same loops give the real layout (full widths) and the small test layout
(scaled widths, same block/layer structure). Float weights are planned as ``F32`` and cast by
the writer to the requested dtype; buffers with a fixed dtype are listed in ``FIXED_DTYPE``.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


class Layout(dict):
    """Ordered ``key -> (dtype, shape)``."""

    def add(self, key: str, *shape: int, dtype: str = "F32") -> None:
        if key in self:
            raise ValueError(f"duplicate key {key!r} in layout")
        self[key] = (dtype, tuple(shape))

    def linear(self, key: str, out: int, inp: int, bias: bool = True) -> None:
        self.add(f"{key}.weight", out, inp)
        if bias:
            self.add(f"{key}.bias", out)

    def conv(self, key: str, out: int, inp: int, k: int = 3, bias: bool = True) -> None:
        self.add(f"{key}.weight", out, inp, k, k)
        if bias:
            self.add(f"{key}.bias", out)

    def norm(self, key: str, n: int, bias: bool = True) -> None:
        self.add(f"{key}.weight", n)
        if bias:
            self.add(f"{key}.bias", n)

    def merge(self, other: dict, prefix: str = "") -> Layout:
        for k, v in other.items():
            if prefix + k in self:
                raise ValueError(f"duplicate key {prefix + k!r} in layout")
            self[prefix + k] = v
        return self


# ---------------------------------------------------------------------------------------------
# LDM / SGM UNet (openaimodel.UNetModel)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetDims:
    channels: int                 # model_channels
    in_channels: int              # 4, or 9 inpaint, 8 pix2pix, 5 depth
    mult: tuple[int, ...]         # channel_mult
    depth: tuple[int, ...]        # transformer depth per level (0 = no attention at that level)
    mid_depth: int                # transformer depth of the middle block
    context: int                  # cross-attention context width
    linear_proj: bool             # use_linear_in_transformer (SD2, SDXL) vs 1x1 conv (SD1)
    adm: int | None = None        # label_emb input width (SDXL vector conditioning)
    out_channels: int = 4
    res_blocks: int = 2


def _resblock(lay: Layout, p: str, cin: int, cout: int, emb: int) -> None:
    lay.norm(f"{p}.in_layers.0", cin)
    lay.conv(f"{p}.in_layers.2", cout, cin)
    lay.linear(f"{p}.emb_layers.1", cout, emb)
    lay.norm(f"{p}.out_layers.0", cout)
    lay.conv(f"{p}.out_layers.3", cout, cout)
    if cin != cout:
        lay.conv(f"{p}.skip_connection", cout, cin, 1)


def _spatial_transformer(lay: Layout, p: str, c: int, depth: int, ctx: int, linear: bool) -> None:
    lay.norm(f"{p}.norm", c)
    if linear:
        lay.linear(f"{p}.proj_in", c, c)
    else:
        lay.conv(f"{p}.proj_in", c, c, 1)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("ff", None), ("attn2", ctx)):
            if attn == "ff":
                lay.linear(f"{b}.ff.net.0.proj", 8 * c, c)  # GEGLU: two halves of 4c
                lay.linear(f"{b}.ff.net.2", c, 4 * c)
                continue
            lay.linear(f"{b}.{attn}.to_q", c, c, bias=False)
            lay.linear(f"{b}.{attn}.to_k", c, kv, bias=False)
            lay.linear(f"{b}.{attn}.to_v", c, kv, bias=False)
            lay.linear(f"{b}.{attn}.to_out.0", c, c)
        for n in ("norm1", "norm2", "norm3"):
            lay.norm(f"{b}.{n}", c)
    if linear:
        lay.linear(f"{p}.proj_out", c, c)
    else:
        lay.conv(f"{p}.proj_out", c, c, 1)


def unet(d: UNetDims, *, controlnet: bool = False, hint_channels: int = 3) -> Layout:
    """UNet keys without prefix; ``controlnet=True`` gives the LDM ControlNet (encoder half)."""
    lay = Layout()
    c = d.channels
    emb = 4 * c
    lay.linear("time_embed.0", emb, c)
    lay.linear("time_embed.2", emb, emb)
    if d.adm:
        lay.linear("label_emb.0.0", emb, d.adm)
        lay.linear("label_emb.0.2", emb, emb)
    if controlnet:
        hint = [(16, hint_channels), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (c, 256)]
        for i, (o, n) in enumerate(hint):
            lay.conv(f"input_hint_block.{2 * i}", o, n)
    lay.conv("input_blocks.0.0", c, d.in_channels)
    chans = [c]
    ch = c
    idx = 1
    levels = len(d.mult)
    for level, m in enumerate(d.mult):
        for _ in range(d.res_blocks):
            _resblock(lay, f"input_blocks.{idx}.0", ch, m * c, emb)
            ch = m * c
            if d.depth[level]:
                _spatial_transformer(lay, f"input_blocks.{idx}.1", ch, d.depth[level], d.context, d.linear_proj)
            chans.append(ch)
            idx += 1
        if level != levels - 1:
            lay.conv(f"input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            idx += 1
    if controlnet:
        for i, zc in enumerate(chans):
            lay.conv(f"zero_convs.{i}.0", zc, zc, 1)
    _resblock(lay, "middle_block.0", ch, ch, emb)
    _spatial_transformer(lay, "middle_block.1", ch, d.mid_depth, d.context, d.linear_proj)
    _resblock(lay, "middle_block.2", ch, ch, emb)
    if controlnet:
        lay.conv("middle_block_out.0", ch, ch, 1)
        return lay
    idx = 0
    for level in reversed(range(levels)):
        m = d.mult[level]
        for i in range(d.res_blocks + 1):
            skip = chans.pop()
            _resblock(lay, f"output_blocks.{idx}.0", ch + skip, m * c, emb)
            ch = m * c
            sub = 1
            if d.depth[level]:
                _spatial_transformer(lay, f"output_blocks.{idx}.1", ch, d.depth[level], d.context, d.linear_proj)
                sub = 2
            if level and i == d.res_blocks:
                lay.conv(f"output_blocks.{idx}.{sub}.conv", ch, ch)
            idx += 1
    lay.norm("out.0", ch)
    lay.conv("out.2", d.out_channels, ch)
    return lay


# ---------------------------------------------------------------------------------------------
# LDM AutoencoderKL
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEDims:
    channels: int = 128
    mult: tuple[int, ...] = (1, 2, 4, 4)
    z: int = 4
    quant_conv: bool = True
    res_blocks: int = 2


def _vae_res(lay: Layout, p: str, cin: int, cout: int) -> None:
    lay.norm(f"{p}.norm1", cin)
    lay.conv(f"{p}.conv1", cout, cin)
    lay.norm(f"{p}.norm2", cout)
    lay.conv(f"{p}.conv2", cout, cout)
    if cin != cout:
        lay.conv(f"{p}.nin_shortcut", cout, cin, 1)


def _vae_mid(lay: Layout, p: str, c: int) -> None:
    _vae_res(lay, f"{p}.block_1", c, c)
    lay.norm(f"{p}.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        lay.conv(f"{p}.attn_1.{n}", c, c, 1)
    _vae_res(lay, f"{p}.block_2", c, c)


def vae(d: VAEDims) -> Layout:
    lay = Layout()
    c = d.channels
    lay.conv("encoder.conv_in", c, 3)
    ch = c
    for i, m in enumerate(d.mult):
        for j in range(d.res_blocks):
            _vae_res(lay, f"encoder.down.{i}.block.{j}", ch, m * c)
            ch = m * c
        if i != len(d.mult) - 1:
            lay.conv(f"encoder.down.{i}.downsample.conv", ch, ch)
    _vae_mid(lay, "encoder.mid", ch)
    lay.norm("encoder.norm_out", ch)
    lay.conv("encoder.conv_out", 2 * d.z, ch)
    top = ch
    lay.conv("decoder.conv_in", top, d.z)
    _vae_mid(lay, "decoder.mid", top)
    ups = {}
    ch = top
    for i in reversed(range(len(d.mult))):
        up = Layout()
        for j in range(d.res_blocks + 1):
            _vae_res(up, f"decoder.up.{i}.block.{j}", ch, d.mult[i] * c)
            ch = d.mult[i] * c
        if i != 0:
            up.conv(f"decoder.up.{i}.upsample.conv", ch, ch)
        ups[i] = up
    for i in range(len(d.mult)):  # ModuleList order: up.0 first
        lay.merge(ups[i])
    lay.norm("decoder.norm_out", ch)
    lay.conv("decoder.conv_out", 3, ch)
    if d.quant_conv:
        lay.conv("quant_conv", 2 * d.z, 2 * d.z, 1)
        lay.conv("post_quant_conv", d.z, d.z, 1)
    return lay


# ---------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextDims:
    width: int
    layers: int
    mlp: int
    projection: int | None = None   # text_projection output width (OpenCLIP / CLIPTextModelWithProjection)
    vocab: int = 49408
    positions: int = 77


def clip_hf(d: TextDims, *, position_ids: bool = True, projection: bool = False) -> Layout:
    """HF ``CLIPTextModel`` keys (``text_model.`` ...); ``projection`` adds ``text_projection.weight``."""
    lay = Layout()
    w = d.width
    if position_ids:
        lay.add("text_model.embeddings.position_ids", 1, d.positions, dtype="I64")
    lay.add("text_model.embeddings.token_embedding.weight", d.vocab, w)
    lay.add("text_model.embeddings.position_embedding.weight", d.positions, w)
    for i in range(d.layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            lay.linear(f"{p}.self_attn.{n}", w, w)
        lay.norm(f"{p}.layer_norm1", w)
        lay.linear(f"{p}.mlp.fc1", d.mlp, w)
        lay.linear(f"{p}.mlp.fc2", w, d.mlp)
        lay.norm(f"{p}.layer_norm2", w)
    lay.norm("text_model.final_layer_norm", w)
    if projection:
        lay.add("text_projection.weight", d.projection or w, w)
    return lay


def openclip_text(d: TextDims, *, drop_last: bool = False) -> Layout:
    """OpenCLIP text tower as LDM/SGM store it (``FrozenOpenCLIPEmbedder.model``, visual removed)."""
    lay = Layout()
    w = d.width
    lay.add("positional_embedding", d.positions, w)
    lay.add("text_projection", w, d.projection or w)
    lay.add("logit_scale")
    lay.add("token_embedding.weight", d.vocab, w)
    for i in range(d.layers - (1 if drop_last else 0)):
        p = f"transformer.resblocks.{i}"
        lay.norm(f"{p}.ln_1", w)
        lay.add(f"{p}.attn.in_proj_weight", 3 * w, w)
        lay.add(f"{p}.attn.in_proj_bias", 3 * w)
        lay.linear(f"{p}.attn.out_proj", w, w)
        lay.norm(f"{p}.ln_2", w)
        lay.linear(f"{p}.mlp.c_fc", d.mlp, w)
        lay.linear(f"{p}.mlp.c_proj", w, d.mlp)
    lay.norm("ln_final", w)
    return lay


@dataclass(frozen=True)
class T5Dims:
    d_model: int = 4096
    d_ff: int = 10240
    layers: int = 24
    heads: int = 64
    d_kv: int = 64
    vocab: int = 32128
    buckets: int = 32


def t5_encoder(d: T5Dims) -> Layout:
    """HF ``T5EncoderModel`` (v1.1 gated-GELU) keys."""
    lay = Layout()
    inner = d.heads * d.d_kv
    lay.add("shared.weight", d.vocab, d.d_model)
    for i in range(d.layers):
        p = f"encoder.block.{i}.layer"
        for n in ("q", "k", "v"):
            lay.add(f"{p}.0.SelfAttention.{n}.weight", inner, d.d_model)
        lay.add(f"{p}.0.SelfAttention.o.weight", d.d_model, inner)
        if i == 0:
            lay.add(f"{p}.0.SelfAttention.relative_attention_bias.weight", d.buckets, d.heads)
        lay.add(f"{p}.0.layer_norm.weight", d.d_model)
        lay.add(f"{p}.1.DenseReluDense.wi_0.weight", d.d_ff, d.d_model)
        lay.add(f"{p}.1.DenseReluDense.wi_1.weight", d.d_ff, d.d_model)
        lay.add(f"{p}.1.DenseReluDense.wo.weight", d.d_model, d.d_ff)
        lay.add(f"{p}.1.layer_norm.weight", d.d_model)
    lay.add("encoder.final_layer_norm.weight", d.d_model)
    return lay


# ---------------------------------------------------------------------------------------------
# Transformer diffusion models
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MMDiTDims:
    depth: int                      # number of joint blocks; hidden = 64 * depth
    pos_embed: int                  # pos_embed_max_size ** 2
    qk_norm: bool = False           # SD3.5: RMS ln_q / ln_k
    attn2_blocks: int = 0           # SD3.5 medium (MMDiT-X): x_block.attn2 in blocks [0, n)
    head_dim: int = 64
    hidden: int | None = None       # override (small layouts)
    context_in: int = 4096
    adm: int = 2048
    in_channels: int = 16


def mmdit(d: MMDiTDims) -> Layout:
    """SAI SD3 / SD3.5 MMDiT keys (as in ``sd3_medium.safetensors`` without prefix)."""
    lay = Layout()
    h = d.hidden or 64 * d.depth
    lay.add("pos_embed", 1, d.pos_embed, h)
    lay.conv("x_embedder.proj", h, d.in_channels, 2)
    lay.linear("t_embedder.mlp.0", h, 256)
    lay.linear("t_embedder.mlp.2", h, h)
    lay.linear("y_embedder.mlp.0", h, d.adm)
    lay.linear("y_embedder.mlp.2", h, h)
    lay.linear("context_embedder", h, d.context_in)
    for i in range(d.depth):
        last = i == d.depth - 1
        for part in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{part}"
            pre_only = last and part == "context_block"
            attn2 = part == "x_block" and i < d.attn2_blocks
            lay.linear(f"{p}.attn.qkv", 3 * h, h)
            if d.qk_norm:
                lay.add(f"{p}.attn.ln_q.weight", d.head_dim)
                lay.add(f"{p}.attn.ln_k.weight", d.head_dim)
            if not pre_only:
                lay.linear(f"{p}.attn.proj", h, h)
            if attn2:
                lay.linear(f"{p}.attn2.qkv", 3 * h, h)
                if d.qk_norm:
                    lay.add(f"{p}.attn2.ln_q.weight", d.head_dim)
                    lay.add(f"{p}.attn2.ln_k.weight", d.head_dim)
                lay.linear(f"{p}.attn2.proj", h, h)
            if not pre_only:
                lay.linear(f"{p}.mlp.fc1", 4 * h, h)
                lay.linear(f"{p}.mlp.fc2", h, 4 * h)
            lay.linear(f"{p}.adaLN_modulation.1", (2 if pre_only else 9 if attn2 else 6) * h, h)
    lay.linear("final_layer.linear", 2 * 2 * d.in_channels, h)
    lay.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return lay


@dataclass(frozen=True)
class FluxDims:
    hidden: int = 3072
    heads: int = 24
    double: int = 19
    single: int = 38
    in_channels: int = 64          # img_in input: 64 (16 latent ch x 2x2), Fill 384, Depth/Canny 128
    out_channels: int = 64
    context_in: int = 4096
    vec_in: int = 768
    guidance: bool = True
    mlp_ratio: int = 4


def flux(d: FluxDims) -> Layout:
    """BFL Flux.1 keys (``flux1-dev.safetensors`` naming, no prefix)."""
    lay = Layout()
    h, hd, mlp = d.hidden, d.hidden // d.heads, d.hidden * d.mlp_ratio
    lay.linear("img_in", h, d.in_channels)
    lay.linear("time_in.in_layer", h, 256)
    lay.linear("time_in.out_layer", h, h)
    lay.linear("vector_in.in_layer", h, d.vec_in)
    lay.linear("vector_in.out_layer", h, h)
    if d.guidance:
        lay.linear("guidance_in.in_layer", h, 256)
        lay.linear("guidance_in.out_layer", h, h)
    lay.linear("txt_in", h, d.context_in)
    for i in range(d.double):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            lay.linear(f"{p}_mod.lin", 6 * h, h)
            lay.linear(f"{p}_attn.qkv", 3 * h, h)
            lay.add(f"{p}_attn.norm.query_norm.scale", hd)
            lay.add(f"{p}_attn.norm.key_norm.scale", hd)
            lay.linear(f"{p}_attn.proj", h, h)
            lay.linear(f"{p}_mlp.0", mlp, h)
            lay.linear(f"{p}_mlp.2", h, mlp)
    for i in range(d.single):
        p = f"single_blocks.{i}"
        lay.linear(f"{p}.linear1", 3 * h + mlp, h)
        lay.linear(f"{p}.linear2", h, h + mlp)
        lay.add(f"{p}.norm.query_norm.scale", hd)
        lay.add(f"{p}.norm.key_norm.scale", hd)
        lay.linear(f"{p}.modulation.lin", 3 * h, h)
    lay.linear("final_layer.linear", d.out_channels, h)
    lay.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return lay


# ---------------------------------------------------------------------------------------------
# LDM extras
# ---------------------------------------------------------------------------------------------

SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule() -> Layout:
    lay = Layout()
    for k in SCHEDULE_KEYS:
        lay.add(k, 1000)
    return lay


def ema_key(unet_key: str) -> str:
    """LDM EMA naming: ``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab``."""
    return "model_ema." + "".join(unet_key.split(".")[1:])


def ema(unet_layout: dict, prefix: str = "model.diffusion_model.") -> Layout:
    lay = Layout()
    lay.add("model_ema.decay", dtype="F32")
    lay.add("model_ema.num_updates", dtype="I32")
    for k, v in unet_layout.items():
        lay[ema_key(prefix + k)] = v
    return lay


# ---------------------------------------------------------------------------------------------
# diffusers-named UNet encoder (ControlNetModel)
# ---------------------------------------------------------------------------------------------

def _d_resnet(lay: Layout, p: str, cin: int, cout: int, emb: int) -> None:
    lay.norm(f"{p}.norm1", cin)
    lay.conv(f"{p}.conv1", cout, cin)
    lay.linear(f"{p}.time_emb_proj", cout, emb)
    lay.norm(f"{p}.norm2", cout)
    lay.conv(f"{p}.conv2", cout, cout)
    if cin != cout:
        lay.conv(f"{p}.conv_shortcut", cout, cin, 1)


def _d_transformer(lay: Layout, p: str, c: int, depth: int, ctx: int, linear: bool) -> None:
    lay.norm(f"{p}.norm", c)
    (lay.linear if linear else (lambda k, o, i: lay.conv(k, o, i, 1)))(f"{p}.proj_in", c, c)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for n, kv in (("1", c), ("2", ctx)):
            lay.norm(f"{b}.norm{n}", c)
            lay.linear(f"{b}.attn{n}.to_q", c, c, bias=False)
            lay.linear(f"{b}.attn{n}.to_k", c, kv, bias=False)
            lay.linear(f"{b}.attn{n}.to_v", c, kv, bias=False)
            lay.linear(f"{b}.attn{n}.to_out.0", c, c)
        lay.norm(f"{b}.norm3", c)
        lay.linear(f"{b}.ff.net.0.proj", 8 * c, c)
        lay.linear(f"{b}.ff.net.2", c, 4 * c)
    (lay.linear if linear else (lambda k, o, i: lay.conv(k, o, i, 1)))(f"{p}.proj_out", c, c)


def diffusers_controlnet(d: UNetDims, hint_channels: int = 3) -> Layout:
    """diffusers ``ControlNetModel`` state-dict keys for an LDM UNet of dims ``d``."""
    lay = Layout()
    c, emb = d.channels, 4 * d.channels
    lay.conv("conv_in", c, d.in_channels)
    lay.linear("time_embedding.linear_1", emb, c)
    lay.linear("time_embedding.linear_2", emb, emb)
    if d.adm:
        lay.linear("add_embedding.linear_1", emb, d.adm)
        lay.linear("add_embedding.linear_2", emb, emb)
    lay.conv("controlnet_cond_embedding.conv_in", 16, hint_channels)
    for i, (o, n) in enumerate(((16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96))):
        lay.conv(f"controlnet_cond_embedding.blocks.{i}", o, n)
    lay.conv("controlnet_cond_embedding.conv_out", c, 256)
    chans = [c]
    ch = c
    for level, m in enumerate(d.mult):
        for j in range(d.res_blocks):
            _d_resnet(lay, f"down_blocks.{level}.resnets.{j}", ch, m * c, emb)
            ch = m * c
            if d.depth[level]:
                _d_transformer(lay, f"down_blocks.{level}.attentions.{j}", ch, d.depth[level], d.context, d.linear_proj)
            chans.append(ch)
        if level != len(d.mult) - 1:
            lay.conv(f"down_blocks.{level}.downsamplers.0.conv", ch, ch)
            chans.append(ch)
    for i, zc in enumerate(chans):
        lay.conv(f"controlnet_down_blocks.{i}", zc, zc, 1)
    _d_transformer(lay, "mid_block.attentions.0", ch, d.mid_depth, d.context, d.linear_proj)
    _d_resnet(lay, "mid_block.resnets.0", ch, ch, emb)
    _d_resnet(lay, "mid_block.resnets.1", ch, ch, emb)
    lay.conv("controlnet_mid_block", ch, ch, 1)
    return lay
