"""SD3 / SD3.5 single files -> diffusers names and configs (``ops.diffusers_mmdit``, ``generate.pipeline_sd3``).

Oracle: diffusers' own single-file loaders (``StableDiffusion3Pipeline.from_single_file`` /
``SD3Transformer2DModel.from_single_file`` with a config folder written by hand in ``fakes/sd3_oracle``) must hold
exactly the weights of our in-memory pipeline, every tensor of MMDiT, VAE, CLIP-L and CLIP-G; the configs we
derive from the shapes must equal the hand-written ones (small samples) and the official repos' published
configs (real-size layouts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fakes.sample_files import load, make_model
from fakes.sd3_oracle import TRANSFORMER, VAE, config_dir

from ckptlab.errors import MismatchError
from ckptlab.ops.diffusers_mmdit import plan_transformer, transformer_config
from ckptlab.ops.run import open_checked

diffusers = pytest.importorskip("diffusers")
P = "model.diffusion_model."


def _load_ours(path: Path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    return load_sd3(open_checked(path))


@pytest.mark.parametrize("spec", ["sd3_medium", "sd35_medium"])
def test_pipeline_weights_equal_diffusers_single_file(tmp_path, spec):
    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    cfg = config_dir(tmp_path / "cfg", spec)
    theirs = diffusers.StableDiffusion3Pipeline.from_single_file(
        str(src), config=str(cfg), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    ours = _load_ours(src)
    try:
        assert ours.pipe.text_encoder_3 is None and ours.pipe.tokenizer_3 is None
        for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            sa, sb = getattr(ours.pipe, comp).state_dict(), getattr(theirs, comp).state_dict()
            assert set(sa) == set(sb), comp
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (comp, k)
        # configs derived from the shapes = the hand-written ones
        for k, v in TRANSFORMER[spec].items():
            got = ours.pipe.transformer.config[k]
            assert (list(got) if isinstance(got, tuple) else got) == v, k
        for k, v in VAE.items():
            assert ours.pipe.vae.config[k] == v, k
        assert ours.pipe.tokenizer.pad_token == "<|endoftext|>" and ours.pipe.tokenizer_2.pad_token == "!"
        assert type(ours.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert ours.pipe.scheduler.config.shift == 3.0 and ours.prediction == "flow" and ours.family == "sd3"
    finally:
        ours.close()
    # and spot checks straight against the file, by the formulas (independent of both converters)
    sd = load(src)
    tr = ours.pipe.transformer.state_dict()
    qkv = sd[P + "joint_blocks.3.context_block.attn.qkv.weight"]
    n = qkv.shape[0] // 3
    assert torch.equal(tr["transformer_blocks.3.attn.add_k_proj.weight"], qkv[n:2 * n])
    ada = sd[P + "final_layer.adaLN_modulation.1.weight"]
    h = ada.shape[0] // 2
    assert torch.equal(tr["norm_out.linear.weight"], torch.cat([ada[h:], ada[:h]]))
    last = TRANSFORMER[spec]["num_layers"] - 1
    ada = sd[P + f"joint_blocks.{last}.context_block.adaLN_modulation.1.bias"]
    assert torch.equal(tr[f"transformer_blocks.{last}.norm1_context.linear.bias"], torch.cat([ada[h:], ada[:h]]))
    ada = sd[P + "joint_blocks.0.context_block.adaLN_modulation.1.bias"]  # not the last block: not swapped
    assert torch.equal(tr["transformer_blocks.0.norm1_context.linear.bias"], ada)
    te = ours.pipe.text_encoder.state_dict()
    assert torch.equal(te["text_projection.weight"], torch.eye(32))  # CLIP-L's pooled output is not projected
    assert torch.equal(ours.pipe.text_encoder_2.state_dict()["text_projection.weight"],
                       sd["text_encoders.clip_g.transformer.text_projection.weight"])
    if spec == "sd35_medium":
        assert torch.equal(tr["transformer_blocks.12.attn2.norm_q.weight"],
                           sd[P + "joint_blocks.12.x_block.attn2.ln_q.weight"])
        assert "transformer_blocks.13.attn2.to_q.weight" not in tr


def test_sd35_large_transformer_equals_diffusers_single_file(tmp_path):
    src = make_model(tmp_path / "l.safetensors", "sd35_large")
    cfg = config_dir(tmp_path / "cfg", "sd35_large")
    theirs = diffusers.SD3Transformer2DModel.from_single_file(str(src), config=str(cfg), subfolder="transformer",
                                                               local_files_only=True).state_dict()
    from ckptlab.imaging.weights import value_of

    items, cfg_ours, unread = plan_transformer(open_checked(src))
    ours = {it.key: value_of(it) for it in items}
    assert set(ours) == set(theirs) and unread == []
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert {k: cfg_ours[k] for k in TRANSFORMER["sd35_large"]} == TRANSFORMER["sd35_large"]


#: the official repos' transformer/config.json (stabilityai/stable-diffusion-3-medium-diffusers,
#: stable-diffusion-3.5-medium, stable-diffusion-3.5-large)
PUBLISHED = {
    "sd3_medium": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                   "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": None},
    "sd35_medium": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
                    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
                    "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm"},
    "sd35_large": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38,
                   "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                   "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16,
                   "pos_embed_max_size": 192, "dual_attention_layers": [], "qk_norm": "rms_norm"},
}


@pytest.mark.parametrize("spec", sorted(PUBLISHED))
def test_real_size_transformer_config_is_the_published_one(spec):
    from ckptlab.sample import layouts

    shapes = {k[len(P):]: tuple(s) for k, (_, s) in layouts.keys(spec, small=False).items() if k.startswith(P)}
    cfg = transformer_config(shapes)
    assert {k: cfg[k] for k in PUBLISHED[spec]} == PUBLISHED[spec]


def _transformer_only(path: Path, src: Path, extra: dict) -> Path:
    """The MMDiT of ``src`` alone, without the ``model.diffusion_model.`` prefix (ComfyUI's
    ``models/diffusion_models`` layout), plus ``extra`` tensors."""
    from safetensors.torch import save_file

    sd = {k[len(P):]: v for k, v in load(src).items() if k.startswith(P)}
    save_file({**sd, **extra}, str(path))
    return path


def test_transformer_only_file_and_last_block_weights_diffusers_has_no_place_for(tmp_path):
    """A file with the last block's context projection/MLP (some trainers keep them): diffusers' converter leaves
    them unread (``context_pre_only``), so do we; everything else equals the converter's output."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from ckptlab.imaging.weights import value_of

    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    g = torch.Generator().manual_seed(0)
    extra = {"joint_blocks.23.context_block.attn.proj.weight": torch.randn(64, 64, generator=g),
             "joint_blocks.23.context_block.attn.proj.bias": torch.randn(64, generator=g),
             "joint_blocks.23.context_block.mlp.fc1.weight": torch.randn(256, 64, generator=g),
             "joint_blocks.23.context_block.mlp.fc1.bias": torch.randn(256, generator=g),
             "joint_blocks.23.context_block.mlp.fc2.weight": torch.randn(64, 256, generator=g),
             "joint_blocks.23.context_block.mlp.fc2.bias": torch.randn(64, generator=g)}
    path = _transformer_only(tmp_path / "dit.safetensors", full, extra)
    items, _, unread = plan_transformer(open_checked(path))
    assert sorted(unread) == sorted(extra)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(load(path))
    ours = {it.key: value_of(it) for it in items}
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_unknown_mmdit_key_refused(tmp_path):
    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    path = _transformer_only(tmp_path / "dit.safetensors", full,
                             {"joint_blocks.0.x_block.attn.extra.weight": torch.zeros(2)})
    with pytest.raises(MismatchError, match="joint_blocks.0.x_block.attn.extra.weight: not an SD3 MMDiT weight"):
        plan_transformer(open_checked(path))


def test_transformer_only_file_refused_for_generation_naming_what_is_missing(tmp_path):
    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    path = _transformer_only(tmp_path / "dit.safetensors", full, {})
    with pytest.raises(MismatchError, match=r"missing component: VAE, CLIP-L and CLIP-G \(not in this SD3 file\)"):
        _load_ours(path)


def test_checkpoint_without_clip_g_refused(tmp_path):
    from safetensors.torch import save_file

    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    sd = {k: v for k, v in load(full).items() if not k.startswith("text_encoders.clip_g.")}
    save_file(sd, str(tmp_path / "noclipg.safetensors"))
    with pytest.raises(MismatchError, match=r"missing component: CLIP-G \(not in this SD3 file\)"):
        _load_ours(tmp_path / "noclipg.safetensors")


def test_checkpoint_without_text_encoders_refused_naming_both(tmp_path):
    """sd3_medium.safetensors as first released: MMDiT + VAE, no CLIPs."""
    from safetensors.torch import save_file

    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    sd = {k: v for k, v in load(full).items() if not k.startswith("text_encoders.")}
    save_file(sd, str(tmp_path / "bare.safetensors"))
    with pytest.raises(MismatchError, match=r"missing component: CLIP-L and CLIP-G .*all-in-one checkpoint"):
        _load_ours(tmp_path / "bare.safetensors")


def test_separate_sd3_vae_replaces_the_checkpoints(tmp_path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    src = make_model(tmp_path / "m.safetensors", "sd3_medium")
    vae = make_model(tmp_path / "v.safetensors", "sd3_vae", seed=3)
    cfg = config_dir(tmp_path / "cfg", "sd3_medium")
    theirs = diffusers.AutoencoderKL.from_single_file(str(vae), config=str(cfg), subfolder="vae",
                                                      local_files_only=True).state_dict()
    ours = load_sd3(open_checked(src), vae=open_checked(vae))
    try:
        mine = ours.pipe.vae.state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
        own = _load_ours(src)
        assert not torch.equal(own.pipe.vae.state_dict()["decoder.conv_out.weight"], mine["decoder.conv_out.weight"])
        own.close()
    finally:
        ours.close()


def test_four_channel_vae_refused(tmp_path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    src = make_model(tmp_path / "m.safetensors", "sd3_medium")
    vae = make_model(tmp_path / "v.safetensors", "sd1_vae")
    with pytest.raises(MismatchError, match="4 latent channels; SD3 takes a 16-channel VAE"):
        load_sd3(open_checked(src), vae=open_checked(vae))


class _Shapes:
    """A ``TensorSource`` stand-in with shapes only (the real-size layouts; nothing is read)."""

    path = Path("real-size")

    def __init__(self, spec: str):
        from ckptlab.formats.base import TensorInfo
        from ckptlab.sample import layouts

        self._infos = {k: TensorInfo(d, tuple(s)) for k, (d, s) in layouts.keys(spec, small=False).items()}

    def infos(self):
        return self._infos

    def info(self, key):
        return self._infos[key]


@pytest.mark.parametrize("spec", sorted(PUBLISHED))
def test_real_size_plan_fills_the_real_size_models_exactly(spec):
    """Every planned key and shape of the full-size files = the state dict of the diffusers/transformers models
    built (on the meta device) from the configs we derive: nothing missing, nothing extra, nothing misshaped."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ckptlab.ops.diffusers_mmdit import plan_clip, plan_sd3_vae

    src = _Shapes(spec)
    items, cfg, _ = plan_transformer(src)
    with torch.device("meta"):
        model = diffusers.SD3Transformer2DModel.from_config({k: v for k, v in cfg.items() if k[0] != "_"})
    assert {it.key: tuple(it.info.shape) for it in items} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    vitems, vcfg = plan_sd3_vae(src)
    # stabilityai/stable-diffusion-3-medium-diffusers/vae/config.json
    assert (vcfg["block_out_channels"], vcfg["latent_channels"], vcfg["layers_per_block"], vcfg["scaling_factor"],
            vcfg["shift_factor"], vcfg["use_quant_conv"], vcfg["use_post_quant_conv"]) == (
        [128, 256, 512, 512], 16, 2, 1.5305, 0.0609, False, False)
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config({k: v for k, v in vcfg.items() if k[0] != "_"})
    assert {it.key: tuple(it.info.shape) for it in vitems} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    # text_encoder / text_encoder_2 config.json of the same repo: CLIP ViT-L/14 and OpenCLIP bigG/14
    for which, (width, layers, heads, act) in {"clip_l": (768, 12, 12, "quick_gelu"),
                                               "clip_g": (1280, 32, 20, "gelu")}.items():
        citems, ccfg = plan_clip(src, which)
        assert (ccfg["hidden_size"], ccfg["num_hidden_layers"], ccfg["num_attention_heads"], ccfg["hidden_act"],
                ccfg["projection_dim"], ccfg["intermediate_size"]) == (width, layers, heads, act, width, 4 * width)
        with torch.device("meta"):
            te = CLIPTextModelWithProjection(CLIPTextConfig(**{k: v for k, v in ccfg.items()
                                                               if k != "architectures"}))
        want = {k: tuple(v.shape) for k, v in te.state_dict().items() if not k.endswith("position_ids")}
        got = {it.key: tuple(it.info.shape) for it in citems}
        if not hasattr(te, "text_model"):
            got = {k.removeprefix("text_model."): s for k, s in got.items()}
        assert got == want


def test_comfyui_scaled_fp8_mmdit_is_dequantised_per_key(tmp_path):
    """ComfyUI's scaled fp8 (``scaled_fp8`` marker, fp8 weights with a ``scale_weight``): our weights = diffusers'
    conversion of the same file dequantised in the test (``w.float() * scale_weight``) - through the qkv cut, the
    adaLN swap and plain copies alike."""
    from safetensors.torch import save_file

    from ckptlab.imaging.weights import value_of

    sd = load(make_model(tmp_path / "m.safetensors", "sd3_medium"))
    fp8, plain = {}, {}
    for k, v in sd.items():
        if not k.startswith(P):
            continue
        if v.dim() == 2 and (".joint_blocks." in k or "final_layer." in k or "context_embedder" in k):
            s = (v.abs().max() / 448).to(torch.float32)
            q = (v / s).to(torch.float8_e4m3fn)
            fp8[k], fp8[k[:-len("weight")] + "scale_weight"] = q, s.reshape(())
            plain[k] = q.to(torch.float32) * s
        else:
            fp8[k] = plain[k] = v
    fp8[P + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    save_file(plain, str(tmp_path / "plain.safetensors"))
    items, _, _ = plan_transformer(open_checked(tmp_path / "fp8.safetensors"))
    ours = {it.key: value_of(it) for it in items}
    cfg = config_dir(tmp_path / "cfg", "sd3_medium")
    theirs = diffusers.SD3Transformer2DModel.from_single_file(str(tmp_path / "plain.safetensors"), config=str(cfg),
                                                               subfolder="transformer",
                                                               local_files_only=True).state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k].to(torch.float32), theirs[k]), k
    assert ours["transformer_blocks.0.attn.to_q.weight"].dtype == torch.float32
