"""Single-file SD3 / SD3.5 checkpoints -> diffusers' ``SD3Transformer2DModel``, 16-channel ``AutoencoderKL`` and
the two ``CLIPTextModelWithProjection`` text encoders: a per-key plan (``Out`` items read one tensor at a time)
and configs derived from the shapes.

The name facts follow diffusers' own converter (``single_file_utils.convert_sd3_transformer_checkpoint_to_
diffusers``): the fused ``qkv`` of each joint block is cut in three (image stream: ``to_q/to_k/to_v``, context
stream: ``add_q_proj/add_k_proj/add_v_proj``); ``ln_q``/``ln_k`` (SD3.5 qk-norm) become ``norm_q``/``norm_k``
(``norm_added_q``/``norm_added_k`` for the context stream); ``attn2`` (SD3.5 medium's dual attention, MMDiT-X)
keeps its own ``attn2.*``; the last joint block's context stream is ``context_pre_only`` (its attention output
projection and MLP have no place in diffusers and are not read); SD3's ``adaLN_modulation`` of the final layer
and of that last context block is ``(shift, scale)`` where diffusers' ``AdaLayerNormContinuous`` wants
``(scale, shift)``: the halves are swapped. ComfyUI's scaled-fp8 files (``scaled_fp8`` marker, fp8 weights with
a ``scale_weight`` each) are dequantised per key (``weight * scale_weight`` in fp32) before any cut or swap.

The VAE has no ``quant_conv``/``post_quant_conv`` (scaling 1.5305, shift 0.0609, diffusers'
``stable-diffusion-3-medium-diffusers/vae``). CLIP-L and CLIP-G are stored with transformers' names under
``text_encoders.clip_l.transformer.`` / ``text_encoders.clip_g.transformer.``. CLIP-L's pooled output is used
unprojected by SD3 (Stability's reference code: ``return_projected_pooled=False``), so its ``text_projection``
is the identity, as diffusers' single-file loader sets it; CLIP-G's comes from the file. T5-XXL
(``text_encoders.t5xxl.``) is not planned here.
"""

from __future__ import annotations

import math

from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.ops.diffusers_io import VAE_PREFIX, plan_vae, slice_out
from ckptlab.ops.diffusers_map import VAELayout
from ckptlab.ops.stream import Out

MMDIT_PREFIX = "model.diffusion_model."
CLIP_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer."}
T5_PREFIX = "text_encoders.t5xxl."
#: SD3's attention heads are 64 wide (sd3-medium: 1536 / 24; sd3.5-large: 2432 / 38); qk-norm files say it
HEAD_DIM = 64
VAE_SCALING = 1.5305
VAE_SHIFT = 0.0609
#: CLIP-L uses OpenAI's quick_gelu, CLIP-G (OpenCLIP bigG) plain gelu
CLIP_ACT = {"clip_l": "quick_gelu", "clip_g": "gelu"}

#: image/context stream names: SD3 -> diffusers, inside ``joint_blocks.N.`` / ``transformer_blocks.N.``
_X = {"attn.proj": "attn.to_out.0", "adaLN_modulation.1": "norm1.linear", "mlp.fc1": "ff.net.0.proj",
      "mlp.fc2": "ff.net.2", "attn.ln_q": "attn.norm_q", "attn.ln_k": "attn.norm_k",
      "attn2.proj": "attn2.to_out.0", "attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k"}
_CTX = {"attn.proj": "attn.to_add_out", "adaLN_modulation.1": "norm1_context.linear",
        "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2", "attn.ln_q": "attn.norm_added_q",
        "attn.ln_k": "attn.norm_added_k"}
#: the last block's context stream (context_pre_only) in diffusers: no output projection, no MLP
_CTX_LAST_DROPPED = ("attn.proj", "mlp.fc1", "mlp.fc2")
_QKV = {"x_block.attn": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "x_block.attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
        "context_block.attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_TOP = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out"}


def mmdit_prefix(src: TensorSource) -> str:
    """``model.diffusion_model.`` in an all-in-one checkpoint, ``""`` in a transformer-only file."""
    infos = src.infos()
    for p in (MMDIT_PREFIX, ""):
        if f"{p}x_embedder.proj.weight" in infos and f"{p}joint_blocks.0.x_block.attn.qkv.weight" in infos:
            return p
    raise MismatchError("not an SD3 MMDiT (no joint_blocks.0.x_block.attn.qkv.weight / x_embedder.proj.weight)",
                        src.path)


def _shapes(src: TensorSource, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(i.shape) for k, i in src.infos().items() if k.startswith(prefix)}


def _blocks(shapes: dict[str, tuple[int, ...]]) -> int:
    ids = {int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")}
    if not ids or ids != set(range(max(ids) + 1)):
        raise MismatchError(f"SD3 joint blocks are not numbered 0..N-1 (found {sorted(ids)[:5]}...)")
    return max(ids) + 1


def transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """``SD3Transformer2DModel`` config from the MMDiT's shapes (keys without the ``model.diffusion_model.``
    prefix): width, depth, patch size, channels, text widths, pos-embed grid, qk-norm, dual-attention blocks."""
    try:
        hidden, in_ch, patch, _ = shapes["x_embedder.proj.weight"]
        layers = _blocks(shapes)
        grid = math.isqrt(shapes["pos_embed"][1])
        head = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if "joint_blocks.0.x_block.attn.ln_q.weight" \
            in shapes else HEAD_DIM if hidden % HEAD_DIM == 0 else hidden
        cfg = {
            "_class_name": "SD3Transformer2DModel",
            "sample_size": min(128, grid * patch),  # 1024 px / 8: the official configs' value
            "patch_size": patch,
            "in_channels": in_ch,
            "num_layers": layers,
            "attention_head_dim": head,
            "num_attention_heads": hidden // head,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "caption_projection_dim": shapes["context_embedder.weight"][0],
            "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
            "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch),
            "pos_embed_max_size": grid,
            "dual_attention_layers": [i for i in range(layers) if f"joint_blocks.{i}.x_block.attn2.qkv.weight"
                                      in shapes],
            "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else None,
        }
    except KeyError as e:
        raise MismatchError(f"not a complete SD3 MMDiT: no {e.args[0]}") from None
    if grid * grid != shapes["pos_embed"][1]:
        raise MismatchError(f"SD3 pos_embed of {shapes['pos_embed'][1]} positions is not a square grid")
    return cfg


#: ComfyUI scaled fp8: per-weight scales (and the input scales its fp8 matmul uses) and the file's marker
_SCALE_LEAVES = ("scale_weight", "scale_input")
SCALED_FP8_MARKER = "scaled_fp8"


def _read(src: TensorSource, key: str, scale: str | None):
    """The value of ``key``; a scaled-fp8 weight dequantised (``w * scale_weight`` in fp32)."""
    if scale is None:
        return src.array(key)
    import torch

    from ckptlab.formats.arrays import as_array

    return as_array(src.get(key).to(torch.float32) * src.get(scale).to(torch.float32))


def _info(src: TensorSource, key: str, scale: str | None) -> TensorInfo:
    info = src.info(key)
    return info if scale is None else TensorInfo("F32", tuple(info.shape))


def _swapped(src: TensorSource, key: str, scale: str | None):
    """SD3's ``(shift, scale)`` halves as diffusers' ``(scale, shift)``."""
    import numpy as np

    a = _read(src, key, scale)
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def _swap_out(key: str, src: TensorSource, src_key: str, scale: str | None) -> Out:
    return Out(key, _info(src, src_key, scale), source=src, src_key=src_key,
               produce=lambda: _swapped(src, src_key, scale))


def _copy_out(key: str, src: TensorSource, src_key: str, scale: str | None) -> Out:
    if scale is None:
        return Out.copy(key, src, src_key)
    return Out(key, _info(src, src_key, scale), source=src, src_key=src_key,
               produce=lambda: _read(src, src_key, scale))


def _slice_out(key: str, src: TensorSource, src_key: str, part: int, parts: int, scale: str | None) -> Out:
    if scale is None:
        return slice_out(key, src, src_key, part, parts)
    info = src.info(src_key)
    rows = info.shape[0] // parts
    return Out(key, TensorInfo("F32", (rows, *info.shape[1:])), source=src, src_key=src_key,
               produce=lambda: _read(src, src_key, scale)[part * rows:(part + 1) * rows])


def plan_transformer(src: TensorSource, prefix: str | None = None) -> tuple[list[Out], dict, list[str]]:
    """``(items, config, source keys not read)`` of the MMDiT under ``prefix`` (found when None). Unknown keys
    under the prefix are a ``MismatchError``; the ones diffusers has no place for (the last block's context
    output projection and MLP) are returned as not read."""
    if prefix is None:
        prefix = mmdit_prefix(src)
    shapes = _shapes(src, prefix)
    if not prefix:  # a transformer-only file: the MMDiT's own names only
        shapes = {k: s for k, s in shapes.items() if not k.startswith(("text_encoders.", "first_stage_model.",
                                                                       "model."))}
    shapes.pop(SCALED_FP8_MARKER, None)
    cfg = transformer_config(shapes)
    last = cfg["num_layers"] - 1
    items: list[Out] = []
    unread: list[str] = []
    for short in sorted(shapes):
        key = prefix + short
        if short == "pos_embed":
            items.append(Out.copy("pos_embed.pos_embed", src, key))
            continue
        stem, _, leaf = short.rpartition(".")
        if leaf in _SCALE_LEAVES and f"{stem}.weight" in shapes:
            continue  # used with its weight
        scale = f"{key[:-len('weight')]}scale_weight" if leaf == "weight" and \
            f"{stem}.scale_weight" in shapes else None
        if stem in _TOP:
            items.append(_copy_out(f"{_TOP[stem]}.{leaf}", src, key, scale))
            continue
        if stem == "final_layer.adaLN_modulation.1":
            items.append(_swap_out(f"norm_out.linear.{leaf}", src, key, scale))
            continue
        bits = stem.split(".", 3)
        if bits[0] != "joint_blocks" or len(bits) < 4 or bits[2] not in ("x_block", "context_block"):
            raise MismatchError(f"{key}: not an SD3 MMDiT weight", src.path)
        i, stream, rest = int(bits[1]), bits[2], bits[3]
        out = f"transformer_blocks.{i}."
        if rest.endswith(".qkv") and f"{stream}.{rest[:-4]}" in _QKV:
            for part, name in enumerate(_QKV[f"{stream}.{rest[:-4]}"]):
                items.append(_slice_out(f"{out}{name}.{leaf}", src, key, part, 3, scale))
            continue
        table = _X if stream == "x_block" else _CTX
        if rest not in table:
            raise MismatchError(f"{key}: not an SD3 MMDiT weight", src.path)
        if stream == "context_block" and i == last:
            if rest in _CTX_LAST_DROPPED:
                unread.append(key)
                continue
            if rest == "adaLN_modulation.1":
                items.append(_swap_out(f"{out}{table[rest]}.{leaf}", src, key, scale))
                continue
        items.append(_copy_out(f"{out}{table[rest]}.{leaf}", src, key, scale))
    return items, cfg, unread


def vae_config(lay: VAELayout, shapes: dict[str, tuple[int, ...]]) -> dict:
    """diffusers' ``AutoencoderKL`` config of SD3's 16-channel VAE (no quant convs) from its LDM shapes."""
    chans = [shapes[f"encoder.down.{i}.block.{lay.layers - 1}.conv2.weight"][0] for i in range(lay.levels)]
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": chans,
        "down_block_types": ["DownEncoderBlock2D"] * lay.levels,
        "force_upcast": True,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "layers_per_block": lay.layers,
        "norm_num_groups": 32,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": 1024,
        "scaling_factor": VAE_SCALING,
        "shift_factor": VAE_SHIFT,
        "up_block_types": ["UpDecoderBlock2D"] * lay.levels,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": True,
    }


def plan_sd3_vae(src: TensorSource, prefix: str | None = None) -> tuple[list[Out], dict]:
    """``(items, config)`` of the VAE in an SD3 checkpoint (``first_stage_model.``) or a standalone SD3 VAE
    file (``prefix`` found when None)."""
    if prefix is None:
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in src.infos()) else ""
    items, lay, shapes, _ = plan_vae(src, prefix)
    cfg = vae_config(lay, shapes)
    if cfg["latent_channels"] != 16:
        raise MismatchError(f"this VAE has {cfg['latent_channels']} latent channels; SD3 takes a 16-channel VAE",
                            src.path)
    return items, cfg


def _eye(n: int):
    import numpy as np

    return np.eye(n, dtype=np.float32)


def plan_clip(src: TensorSource, which: str) -> tuple[list[Out], dict]:
    """``(items, CLIPTextConfig dict)`` of SD3's ``clip_l`` or ``clip_g`` (both ``CLIPTextModelWithProjection``,
    transformers' names); CLIP-L's ``text_projection`` is the identity (see the module doc)."""
    from ckptlab.ops.diffusers_config import clip_config

    prefix = CLIP_PREFIXES[which]
    infos = src.infos()
    items = [Out.copy(k[len(prefix):], src, k) for k in infos
             if k.startswith(prefix + "text_model.") and not k.endswith(".position_ids")]
    if not items:
        raise MismatchError(f"missing component: {which.replace('_', '-').upper()} (no {prefix}text_model.* keys)",
                            src.path)
    shapes = {it.key: tuple(it.info.shape) for it in items}
    width = shapes["text_model.embeddings.token_embedding.weight"][1]
    if which == "clip_l":
        items.append(Out("text_projection.weight", TensorInfo("F32", (width, width)), source=src,
                         produce=lambda: _eye(width)))
    else:
        key = prefix + "text_projection.weight"
        if key not in infos:
            raise MismatchError(f"missing tensor: {key} (CLIP-G's projection of the pooled output)", src.path)
        items.append(Out.copy("text_projection.weight", src, key))
    shapes["text_projection.weight"] = tuple(items[-1].info.shape)
    cfg = clip_config(shapes, act=CLIP_ACT[which], with_projection=True)
    return items, cfg


def has_t5(src: TensorSource) -> bool:
    return any(k.startswith(T5_PREFIX) for k in src.infos())
