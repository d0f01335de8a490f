"""The alias tables of ``ckptlab.lora.naming``: every sample LoRA resolves against its small checkpoint with the
right shapes, and diffusers' own converters (an independent implementation) land on the names our tables give."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from fakes.sample_files import make_model

from ckptlab.formats.base import TensorInfo
from ckptlab.lora.file import LoraFile
from ckptlab.lora.naming import reference_targets, targets_for
from ckptlab.sample.layouts import keys

#: sample LoRA spec -> (family, small checkpoint spec it fits)
SAMPLES = {
    "sd1_kohya_lora": ("sd1", "sd1_checkpoint"), "sd2_kohya_lora": ("sd2", "sd2_checkpoint"),
    "sdxl_kohya_lora": ("sdxl", "sdxl_checkpoint"), "sd1_peft_lora": ("sd1", "sd1_checkpoint"),
    "sd1_locon": ("sd1", "sd1_checkpoint"), "sd1_loha": ("sd1", "sd1_checkpoint"),
    "sd1_lokr": ("sd1", "sd1_checkpoint"), "sd1_dora": ("sd1", "sd1_checkpoint"),
    "flux_kohya_lora": ("flux", "flux_dev"), "flux_diffusers_lora": ("flux", "flux_dev"),
    "flux_xlabs_lora": ("flux", "flux_dev"),
}


def _infos(spec: str, small: bool = True) -> dict[str, TensorInfo]:
    return {k: TensorInfo(dt, tuple(s)) for k, (dt, s) in keys(spec, small=small).items()}


def _out_in(lf: LoraFile, mod) -> tuple[int, int]:
    """(out features, in features · kernel) a module adapts, from its own parameter shapes."""
    sh = {role: tuple(lf.source.info(k).shape) for role, k in mod.params.items()}
    if mod.algo == "lora":
        return sh["up"][0], math.prod(sh["down"][1:])
    if mod.algo == "loha":
        return sh["w1a"][0], sh["w1b"][1]
    if mod.algo == "lokr":
        k1 = sh.get("k1") or (sh["k1a"][0], sh["k1b"][1])
        k2 = sh.get("k2") or (sh["k2a"][0], *sh["k2b"][1:])
        return k1[0] * k2[0], k1[1] * math.prod(k2[1:])
    raise AssertionError(mod.algo)


@pytest.mark.parametrize("spec", sorted(SAMPLES))
def test_every_sample_lora_resolves_against_its_small_checkpoint(tmp_path, spec):
    family, ckpt = SAMPLES[spec]
    table = targets_for(_infos(ckpt), family)
    with LoraFile.open(make_model(tmp_path / f"{spec}.safetensors", spec)) as lf:
        missing = [n for n in lf.modules if table.lookup(n) is None]
        assert not missing, missing[:5]
        for name, mod in lf.modules.items():
            t = table.lookup(name)
            out, inp = _out_in(lf, mod)
            assert (out, inp) == (t.shape[0], math.prod(t.shape[1:])), (name, t)
            if t.rows is not None:
                assert t.rows[1] - t.rows[0] == t.shape[0]


def test_fused_slices_cover_the_fused_weight_exactly():
    """Flux / SD3 fused weights: the row slices of q, k, v (and Flux's mlp) tile the weight without gaps."""
    for family, spec in (("flux", "flux_dev"), ("sd3", "sd3_medium")):
        infos = _infos(spec)
        table = targets_for(infos, family)
        by_key: dict[str, list] = {}
        for t in table.targets:
            if t.rows is not None:
                by_key.setdefault(t.key, []).append(t.rows)
        assert by_key
        for key, rows in by_key.items():
            rows.sort()
            assert rows[0][0] == 0 and rows[-1][1] == infos[key].shape[0], key
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False)), key


def _marked(shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """A ``[rows, 1]`` stand-in whose values say which key and which row they came from."""
    return (torch.arange(shape[0], dtype=torch.float64) + offset).reshape(-1, 1)


@pytest.mark.parametrize(("family", "spec", "prefix", "convert"), [
    ("flux", "flux_dev", "", "convert_flux_transformer_checkpoint_to_diffusers"),
    ("sd3", "sd3_medium", "model.diffusion_model.", "convert_sd3_transformer_checkpoint_to_diffusers"),
])
def test_transformer_names_match_diffusers_single_file_converter(family, spec, prefix, convert):
    """diffusers' BFL/MMDiT → diffusers converter moves rows: every diffusers weight it produces must be exactly the
    rows our table assigns to that diffusers name (checked by value on full-size row counts)."""
    from diffusers.loaders import single_file_utils

    table = reference_targets(family)
    lay = _infos(spec, small=False)
    ckpt, offsets = {}, {}
    for i, (k, info) in enumerate(lay.items()):
        if not k.startswith(prefix) or k.startswith(("text_encoders.", "first_stage_model.", "model.model_sampling")):
            continue
        short = k[len(prefix):]
        if len(info.shape) >= 2:
            ckpt[short] = _marked(info.shape, i * 1e6)
            offsets[k] = i * 1e6
        else:
            ckpt[short] = torch.zeros(info.shape or (1,), dtype=torch.float64)
    if family == "sd3":
        ckpt["pos_embed"] = torch.zeros(1, 1, 1, dtype=torch.float64)
    out = getattr(single_file_utils, convert)(dict(ckpt))
    checked = 0
    for dkey, w in out.items():
        if not dkey.endswith(".weight") or w.ndim != 2 or w.shape[1] != 1:
            continue
        t = table.lookup("transformer." + dkey[: -len(".weight")])
        if t is None:
            continue  # norms / adaLN with swapped halves: no LoRA name (docs)
        assert t.name("diffusers") == "transformer." + dkey[: -len(".weight")]
        r0, r1 = t.rows or (0, lay[t.key].shape[0])
        expect = _marked(lay[t.key].shape, offsets[t.key])[r0:r1]
        assert torch.equal(w, expect), (dkey, t.key, t.rows)
        checked += 1
    named = {t.name("diffusers") for t in table.targets if t.component == "dit" and t.name("diffusers")}
    assert checked == len(named)


def test_flux_kohya_names_match_diffusers_kohya_converter():
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` (kohya fused qkv / linear1 → split modules) on a rank-1
    full-size LoRA: each diffusers module it writes is the slice of the kohya module our table says."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    table = reference_targets("flux")
    sd, src = {}, {}
    for i, t in enumerate(table.targets):
        name = t.name("kohya")
        if t.component != "dit" or name is None or not name.startswith(("lora_unet_double", "lora_unet_single")):
            continue
        up = (torch.arange(t.shape[0], dtype=torch.float32) + (i % 100) * 1e5).reshape(-1, 1)
        sd[f"{name}.lora_down.weight"] = torch.ones(1, t.shape[1])
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.alpha"] = torch.tensor(1.0)
        src[name] = (t, up)
    out = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    assert out
    seen = 0
    for key, w in out.items():
        if not key.endswith(".lora_B.weight"):
            continue
        module = key[: -len(".lora_B.weight")]
        t = table.lookup(module)
        assert t is not None, module
        whole = table.lookup(next(n for n, (tt, _) in src.items() if tt.key == t.key))
        assert whole.rows is None and whole.key == t.key
        r0, r1 = t.rows or (0, t.shape[0])
        assert torch.equal(w, src[whole.name("kohya")][1][r0:r1]), module
        assert t.name("peft") == module
        seen += 1
    assert seen == len([t for t in table.targets if t.component == "dit" and t.name("peft")
                        and (t.key.startswith(("double_blocks", "single_blocks")))])


def test_flux_xlabs_names_match_diffusers_xlabs_converter(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    table = reference_targets("flux")
    with LoraFile.open(make_model(tmp_path / "x.safetensors", "flux_xlabs_lora")) as lf:
        sd = {k: lf.source.get(k).clone() for k in lf.source.infos()}
        ours = {name: table.lookup(name) for name in lf.modules}
    out = _convert_xlabs_flux_lora_to_diffusers(dict(sd))
    for name, t in ours.items():
        up = sd[f"{name}.up.weight"]
        parts = [s for s in table.targets if s.key == t.key and s.rows is not None] or [t]
        for p in parts:
            r0, r1 = 0, up.shape[0]
            if p.rows is not None:  # small sample: the reference slice at the sample's width
                r0, r1 = p.rows[0] * up.shape[0] // t.shape[0], p.rows[1] * up.shape[0] // t.shape[0]
            got = out[p.name("peft") + ".lora_B.weight"]
            assert torch.equal(got, up[r0:r1]), p.name("peft")


@pytest.mark.parametrize(("spec", "family", "sgm"), [("sd1_kohya_lora", "sd1", False),
                                                      ("sd2_kohya_lora", "sd2", False),
                                                      ("sdxl_kohya_lora", "sdxl", True)])
def test_sd_kohya_names_match_diffusers_kohya_converter(tmp_path, spec, family, sgm):
    """diffusers' kohya → diffusers path (``_maybe_map_sgm_blocks_to_diffusers`` for SGM names, then
    ``_convert_non_diffusers_lora_to_diffusers``) puts each kohya module's down weight under the diffusers name our
    table gives that module."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    table = reference_targets(family)
    with LoraFile.open(make_model(tmp_path / f"{spec}.safetensors", spec)) as lf:
        sd = {k: lf.source.get(k).clone() for k in lf.source.infos()}
        mods = dict(lf.modules)
    if sgm:
        sd = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    out, _alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    # old attention-processor names -> PEFT names, as diffusers does when it loads them into the UNet / text encoders
    te = {k: v for k, v in out.items() if k.startswith("text_encoder")}
    out = {**convert_unet_state_dict_to_peft({k: v for k, v in out.items() if k not in te}),
           **convert_state_dict_to_peft(te)}
    by_value = {v.numpy().tobytes(): k[: -len(".lora_A.weight")] for k, v in out.items()
                if k.endswith(".lora_A.weight")}
    assert len(by_value) == len(mods)
    with LoraFile.open(tmp_path / f"{spec}.safetensors") as lf:
        for name, mod in mods.items():
            t = table.lookup(name)
            assert t is not None, name
            theirs = by_value[lf.source.get(mod.params["down"]).numpy().tobytes()]
            assert t.name("diffusers") == theirs, (name, theirs)


def test_unknown_family_is_refused():
    from ckptlab.errors import MismatchError

    with pytest.raises(MismatchError, match="LoRA work supports"):
        reference_targets("cascade")


def test_flux_comfy_single_file_with_text_encoders():
    """A ComfyUI all-in-one Flux file (``model.diffusion_model.`` + BFL keys, ``text_encoders.clip_l`` / ``t5xxl``):
    kohya, ComfyUI, BFL-with-prefix and diffusers names all land on its keys; T5 as ``lora_te3_`` or ``lora_te2_``."""
    infos = {"model.diffusion_model." + k: v for k, v in _infos("flux_dev").items()}
    infos.update({k: v for k, v in _infos("sd3_medium").items()
                  if k.startswith(("text_encoders.clip_l.", "text_encoders.t5xxl."))})
    table = targets_for(infos, "flux")
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    for name in ("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv",
                 "model.diffusion_model.double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.qkv",
                 "double_blocks.0.processor.qkv_lora1"):
        t = table.lookup(name)
        assert t.key == key and t.rows is None, name
    q = table.lookup("transformer.transformer_blocks.0.attn.to_q")
    assert q.key == key and q.rows == (0, infos[key].shape[0] // 3)
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    for name in ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
                 "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q",
                 "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"):
        assert table.lookup(name).key == t5, name
    clip = table.lookup("lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    assert clip.key == "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert clip.name("peft") == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert table.components() == {"dit", "te1", "te3"}
