"""Layouts of the less common families: upscalers, MiDaS depth model, and the transformer /
video families of the identification oracle table that are mostly used header-only (sparse).

Where a layout below is a faithful reduction rather than the complete original key set, its
docstring says so; the marker keys and shapes of identification.md §7 are always exact.
"""

from __future__ import annotations

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
    """MiDaS DPT-Hybrid as stored under ``depth_model.model.`` in SD2-depth (ViT-B/16 + ResNet-50 stem).

    Reduction: the ResNet stages are represented by their first bottleneck only, so the key count is
    below the real 368; the ViT blocks, ``act_postprocess1..4`` and ``scratch`` refinenets are real.
    """
    w = 48 if small else 768
    feats = (16, 32, 48, 48) if small else (256, 512, 768, 768)
    f = 16 if small else 256
    lay = Layout()
    p = "pretrained.model."
    lay.add(p + "cls_token", 1, 1, w)
    lay.add(p + "pos_embed", 1, 577, w)
    lay.add(p + "patch_embed.backbone.stem.conv.weight", 64, 3, 7, 7)
    lay.norm(p + "patch_embed.backbone.stem.norm", 64)
    for s, (cin, cout) in enumerate(((64, 256), (256, 512), (512, 1024))):
        b = f"{p}patch_embed.backbone.stages.{s}.blocks.0."
        lay.add(b + "conv1.weight", cout // 4, cin, 1, 1)
        lay.norm(b + "norm1", cout // 4)
        lay.add(b + "conv2.weight", cout // 4, cout // 4, 3, 3)
        lay.norm(b + "norm2", cout // 4)
        lay.add(b + "conv3.weight", cout, cout // 4, 1, 1)
        lay.norm(b + "norm3", cout)
        lay.add(b + "downsample.conv.weight", cout, cin, 1, 1)
        lay.norm(b + "downsample.norm", cout)
    lay.conv(p + "patch_embed.proj", w, 1024, 1)
    for i in range(12):
        b = f"{p}blocks.{i}."
        lay.norm(b + "norm1", w)
        lay.linear(b + "attn.qkv", 3 * w, w)
        lay.linear(b + "attn.proj", w, w)
        lay.norm(b + "norm2", w)
        lay.linear(b + "mlp.fc1", 4 * w, w)
        lay.linear(b + "mlp.fc2", w, 4 * w)
    lay.norm(p + "norm", w)
    for i in (1, 2):
        lay.linear(f"pretrained.act_postprocess{i}.0.project.0", w, 2 * w)
    for i in (3, 4):
        lay.linear(f"pretrained.act_postprocess{i}.0.project.0", w, 2 * w)
        lay.conv(f"pretrained.act_postprocess{i}.3", feats[i - 1], w, 1)
    lay.conv("pretrained.act_postprocess4.4", feats[3], feats[3])
    for i, c in enumerate(feats, 1):
        lay.add(f"scratch.layer{i}_rn.weight", f, c, 3, 3)
    for i in range(1, 5):
        b = f"scratch.refinenet{i}."
        lay.conv(b + "out_conv", f, f, 1)
        for u in (1, 2):
            lay.conv(f"{b}resConfUnit{u}.conv1", f, f)
            lay.conv(f"{b}resConfUnit{u}.conv2", f, f)
    lay.conv("scratch.output_conv.0", f // 2, f)
    lay.conv("scratch.output_conv.2", 32, f // 2)
    lay.conv("scratch.output_conv.4", 1, 32, 1)
    return lay


LAYOUTS: dict[str, Callable[[bool], Layout]] = {}
