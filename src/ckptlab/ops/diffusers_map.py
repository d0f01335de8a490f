"""Key names between LDM/SGM single files and diffusers/transformers folders (diffusers'
``loaders/single_file_utils.py`` and ``scripts/convert_original_stable_diffusion_to_diffusers.py``).

Everything is a bijection of *module prefixes* built from a small layout description, applied to a key
by its longest matching module prefix; inner names of attention blocks are identical on both sides.
Tensor reshapes (VAE attention 1x1 conv <-> linear, OpenCLIP fused qkv, bigG ``text_projection``
transpose) are described here as ``Reshape`` records and carried out by ``ops.diffusers_io``.
No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptlab.errors import MismatchError

_RESNET_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


@dataclass(frozen=True)
class UNetLayout:
    """``levels`` resolution levels, ``layers`` resnets per down level, ``attn[i]`` per down level."""

    levels: int
    layers: int
    attn: tuple[bool, ...]
    mid_attn: bool = True
    label_emb: bool = False


@dataclass(frozen=True)
class VAELayout:
    levels: int
    layers: int  # resnets per encoder level (decoder has layers + 1)


class PrefixMap:
    """A bijection of dotted module prefixes; ``forward`` LDM -> diffusers, ``backward`` the other way."""

    def __init__(self) -> None:
        self.fwd: dict[str, str] = {}
        self.bwd: dict[str, str] = {}

    def add(self, ldm: str, diff: str) -> None:
        self.fwd[ldm] = diff
        self.bwd[diff] = ldm

    @staticmethod
    def _apply(table: dict[str, str], key: str) -> str | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return table[head] + "." + ".".join(parts[n:])
        return None

    def forward(self, key: str) -> str | None:
        return self._apply(self.fwd, key)

    def backward(self, key: str) -> str | None:
        return self._apply(self.bwd, key)


def unet_map(lay: UNetLayout) -> PrefixMap:
    L = lay.layers
    m = PrefixMap()
    m.add("time_embed.0", "time_embedding.linear_1")
    m.add("time_embed.2", "time_embedding.linear_2")
    if lay.label_emb:
        m.add("label_emb.0.0", "add_embedding.linear_1")
        m.add("label_emb.0.2", "add_embedding.linear_2")
    m.add("input_blocks.0.0", "conv_in")
    m.add("out.0", "conv_norm_out")
    m.add("out.2", "conv_out")

    def resnet(ldm: str, diff: str) -> None:
        for a, b in _RESNET_UNET.items():
            m.add(f"{ldm}.{a}", f"{diff}.{b}")

    for i in range(lay.levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}")
            if lay.attn[i]:
                m.add(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}")
        if i < lay.levels - 1:
            m.add(f"input_blocks.{(i + 1) * (L + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv")
    resnet("middle_block.0", "mid_block.resnets.0")
    if lay.mid_attn:
        m.add("middle_block.1", "mid_block.attentions.0")
        resnet("middle_block.2", "mid_block.resnets.1")
    else:
        resnet("middle_block.1", "mid_block.resnets.1")
    for i in range(lay.levels):
        has_attn = lay.attn[lay.levels - 1 - i]
        for j in range(L + 1):
            n = i * (L + 1) + j
            resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}")
            if has_attn:
                m.add(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}")
        if i < lay.levels - 1:
            n = i * (L + 1) + L
            m.add(f"output_blocks.{n}.{2 if has_attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv")
    return m


def vae_map(lay: VAELayout) -> PrefixMap:
    m = PrefixMap()
    for side in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            m.add(f"{side}.{name}", f"{side}.{name}")
        m.add(f"{side}.norm_out", f"{side}.conv_norm_out")
        for b, r in (("block_1", 0), ("block_2", 1)):
            for a, c in _RESNET_VAE.items():
                m.add(f"{side}.mid.{b}.{a}", f"{side}.mid_block.resnets.{r}.{c}")
        for a, c in _VAE_ATTN.items():
            m.add(f"{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{c}")
    for i in range(lay.levels):
        for j in range(lay.layers):
            for a, c in _RESNET_VAE.items():
                m.add(f"encoder.down.{i}.block.{j}.{a}", f"encoder.down_blocks.{i}.resnets.{j}.{c}")
        if i < lay.levels - 1:
            m.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        up = lay.levels - 1 - i
        for j in range(lay.layers + 1):
            for a, c in _RESNET_VAE.items():
                m.add(f"decoder.up.{up}.block.{j}.{a}", f"decoder.up_blocks.{i}.resnets.{j}.{c}")
        if i < lay.levels - 1:
            m.add(f"decoder.up.{up}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")
    return m


def is_vae_attn_weight(ldm_key: str) -> bool:
    """LDM VAE attention projections stored as 1x1 convs (diffusers: linear)."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith((".q.weight", ".k.weight", ".v.weight",
                                                         ".proj_out.weight"))


# -- OpenCLIP text transformer <-> transformers CLIPTextModel -------------------------------------------

_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}


def openclip_to_hf(key: str) -> str | tuple[str, str] | None:
    """HF name of an OpenCLIP text key; ``("qkv", suffix)`` for the fused in_proj; None if no HF home."""
    if key == "token_embedding.weight":
        return "text_model.embeddings.token_embedding.weight"
    if key == "positional_embedding":
        return "text_model.embeddings.position_embedding.weight"
    if key.startswith("ln_final."):
        return "text_model.final_layer_norm." + key[len("ln_final."):]
    if key.startswith("transformer.resblocks."):
        rest = key[len("transformer.resblocks."):]
        n, _, tail = rest.partition(".")
        if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
            return ("qkv", f"{n}.{tail.rsplit('_', 1)[1]}")
        for a, b in _OC_LAYER.items():
            if tail.startswith(a + "."):
                return f"text_model.encoder.layers.{n}.{b}{tail[len(a):]}"
    return None


def hf_to_openclip(key: str) -> str | tuple[str, str, str] | None:
    """Inverse of ``openclip_to_hf``; q/k/v projections give ``("qkv", layer, "q|k|v.weight|bias")``."""
    if key == "text_model.embeddings.token_embedding.weight":
        return "token_embedding.weight"
    if key == "text_model.embeddings.position_embedding.weight":
        return "positional_embedding"
    if key.startswith("text_model.final_layer_norm."):
        return "ln_final." + key[len("text_model.final_layer_norm."):]
    if key.startswith("text_model.encoder.layers."):
        rest = key[len("text_model.encoder.layers."):]
        n, _, tail = rest.partition(".")
        for p in ("q", "k", "v"):
            if tail.startswith(f"self_attn.{p}_proj."):
                return ("qkv", n, p + "." + tail.rsplit(".", 1)[1])
        for a, b in _OC_LAYER.items():
            if tail.startswith(b + "."):
                return f"transformer.resblocks.{n}.{a}{tail[len(b):]}"
    return None


def unet_layout_from_ldm(shapes: dict[str, tuple[int, ...]]) -> UNetLayout:
    """Derive the UNet layout from LDM UNet keys (prefix stripped)."""
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")}
    ops = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.") and ".0.op." in k)
    if not blocks or not ops:
        raise MismatchError("UNet layout not recognised (no input_blocks / downsamplers)")
    L = ops[0] - 1
    levels = (max(blocks) - 1) // (L + 1) + 1
    attn = tuple(f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in shapes for i in range(levels))
    return UNetLayout(levels, L, attn, mid_attn="middle_block.1.proj_in.weight" in shapes,
                      label_emb="label_emb.0.0.weight" in shapes)


def vae_layout_from_ldm(shapes: dict[str, tuple[int, ...]]) -> VAELayout:
    downs = {int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")}
    blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
    if not downs or not blocks:
        raise MismatchError("VAE layout not recognised (no encoder.down.*)")
    return VAELayout(max(downs) + 1, max(blocks) + 1)
