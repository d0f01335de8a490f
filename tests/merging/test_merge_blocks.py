"""Block names, key -> block rules on real SD1 / SDXL layouts, and block-weight strings."""

from __future__ import annotations

import re

import pytest

from ckptlab.merging.blocks import (
    SD1_BLOCKS,
    SDXL_BLOCKS,
    BlockSpecError,
    BlockValues,
    block_of,
    parse_value,
    resolve,
)
from ckptlab.sample.build import plan


def _expected(key: str, n_out: int) -> str:
    """The supermerger rules, written out independently: checked in supermerger's order."""
    dm = "model.diffusion_model."
    if not key.startswith(dm):
        return "BASE"  # text encoders, VAE, schedule buffers
    rest = key[len(dm):]
    if rest.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if rest.startswith("out."):
        return f"OUT{n_out - 1:02}"
    m = re.match(r"input_blocks\.(\d+)\.", rest)
    if m:
        return f"IN{int(m.group(1)):02}"
    if rest.startswith("middle_block."):
        return "M00"
    m = re.match(r"output_blocks\.(\d+)\.", rest)
    if m:
        return f"OUT{int(m.group(1)):02}"
    return "BASE"


@pytest.mark.parametrize("spec,family,names", [("sd1_checkpoint", "sd1", SD1_BLOCKS),
                                               ("sdxl_checkpoint", "sdxl", SDXL_BLOCKS),
                                               ("sd2_768_v", "sd2", SD1_BLOCKS)])
def test_every_real_key_maps_to_its_block(spec, family, names):
    keys = list(plan(spec, small=False))
    n_out = 12 if names is SD1_BLOCKS else 9
    got = {k: block_of(k, family) for k in keys}
    assert got == {k: _expected(k, n_out) for k in keys}
    # every block of the layout is used by at least one key and nothing outside it appears
    assert set(got.values()) == set(names)


def test_hand_picked_keys():
    assert block_of("model.diffusion_model.time_embed.0.weight", "sd1") == "IN00"
    assert block_of("model.diffusion_model.input_blocks.11.0.in_layers.0.weight", "sd1") == "IN11"
    assert block_of("model.diffusion_model.out.2.weight", "sd1") == "OUT11"
    assert block_of("model.diffusion_model.out.2.weight", "sdxl") == "OUT08"
    assert block_of("model.diffusion_model.label_emb.0.0.weight", "sdxl") == "IN00"
    assert block_of("first_stage_model.decoder.conv_in.weight", "sdxl") == "BASE"
    assert block_of("conditioner.embedders.1.model.ln_final.weight", "sdxl") == "BASE"
    # attention output projections are not the UNet `out.` block
    assert block_of("model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight",
                    "sd1") == "OUT03"
    # diffusers UNet names: 2 layers + downsampler per down level, 3 layers per up level
    assert block_of("unet.down_blocks.1.attentions.0.proj_in.weight", "sd1") == "IN04"
    assert block_of("unet.down_blocks.2.downsamplers.0.conv.weight", "sd1") == "IN09"
    assert block_of("unet.up_blocks.3.resnets.2.conv1.weight", "sd1") == "OUT11"
    assert block_of("unet.up_blocks.0.upsamplers.0.conv.weight", "sd1") == "OUT02"
    assert block_of("unet.mid_block.resnets.0.conv1.weight", "sdxl") == "M00"
    # families without a block layout: everything is BASE
    assert block_of("model.diffusion_model.input_blocks.1.0.weight", None) == "BASE"


def test_mecha_block_conversion_agrees_except_documented_keys():
    """sd-mecha's own sd1 block converter, key by key: equal except time_embed (mecha: BASE, ours: IN00)."""
    sd_mecha = pytest.importorskip("sd_mecha")
    blocks = {n: float(i) for i, n in enumerate(SD1_BLOCKS)}
    res = sd_mecha.merge(sd_mecha.convert(sd_mecha.literal(blocks, "sd1-supermerger_blocks"), "sd1-ldm"))
    res.pop("__metadata__", None)
    compared = 0
    for key, val in res.items():
        if key.startswith("model_ema.") or "." not in key:
            continue
        mecha_block = SD1_BLOCKS[int(float(val))]
        ours = block_of(key, "sd1")
        if key.startswith("model.diffusion_model.time_embed."):
            assert (mecha_block, ours) == ("BASE", "IN00")
        else:
            assert ours == mecha_block, key
        compared += 1
    assert compared >= 1100


def test_parse_values():
    assert parse_value("0.3", "sd1") == 0.3
    assert parse_value(0.7, "sdxl") == 0.7
    v = parse_value(",".join(str(i / 100) for i in range(26)), "sd1")
    assert isinstance(v, BlockValues) and v.get("BASE") == 0.0 and v.get("M00") == 0.13 and v.get("OUT11") == 0.25
    # named pairs, groups and a leading default
    v = parse_value("0.1,IN=0.2,M00=0.5,OUT03=0.9", "sdxl")
    d = v.as_dict()
    assert d["BASE"] == 0.1 and d["IN00"] == d["IN08"] == 0.2 and d["M00"] == 0.5 and d["OUT03"] == 0.9
    assert d["OUT00"] == 0.1 and set(d) == set(SDXL_BLOCKS)
    # an SD1 list on SDXL keeps the blocks SDXL has (supermerger's weighttoxl)
    sd1 = [float(i) for i in range(26)]
    v = parse_value(sd1, "sdxl").as_dict()
    assert v["BASE"] == 0 and v["IN08"] == 9 and v["M00"] == 13 and v["OUT00"] == 14 and v["OUT08"] == 22
    # presets: GRAD_V is 1 at the ends, 0 at M00; base from the suffix
    g = parse_value("GRAD_V:0.25", "sd1").as_dict()
    assert g["BASE"] == 0.25 and g["IN00"] == 1.0 and g["M00"] == 0.0 and g["OUT11"] == 1.0
    assert g["IN06"] == pytest.approx(0.5)
    assert resolve(parse_value("M00=1", "sd1"), "model.diffusion_model.middle_block.1.norm.weight", "sd1") == 1.0


@pytest.mark.parametrize("bad", ["1,2,3", "IN99=1", "FOO=1", "0.1,x", "IN=1,0.5"])
def test_bad_block_strings(bad):
    with pytest.raises(BlockSpecError):
        parse_value(bad, "sd1")


def test_block_weights_need_a_block_family():
    with pytest.raises(BlockSpecError, match="SD1/SD2/SDXL"):
        parse_value(",".join(["0.5"] * 26), None)
