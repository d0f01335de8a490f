"""Sample files: small files load strictly into diffusers/transformers models of matching small
configs (via diffusers' single-file converters); sparse files; determinism; pickle wrappers;
adapters; the demo library."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.sample import build, layouts
from ckptlab.sample.dims import SMALL


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small sample files written once for the module (F32 so strict loads compare exactly)."""
    root = tmp_path_factory.mktemp("samples")
    cache = {}

    def get(spec, **kw):
        key = (spec, tuple(sorted(kw.items())))
        if key not in cache:
            fmt = kw.get("fmt", build.SPECS[spec].fmt)
            suffix = {"safetensors": ".safetensors", "ckpt": ".ckpt", "pt": ".pt"}[fmt]
            cache[key] = build.write_model(root / f"{spec}-{len(cache)}{suffix}", spec, **{"dtype": "F32", **kw})
        return cache[key]

    return get


def strict_load(model, state):
    """``strict=True`` load; shapes are checked too (models are built on the meta device, so assign)."""
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected


def meta(cls, *args, **kwargs):
    """Build an oracle model on the meta device (no random init); ``strict_load`` assigns the tensors."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def sd1_unet_model(d, in_channels=4):
    from diffusers import UNet2DConditionModel

    return meta(UNet2DConditionModel,
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(m * d.channels for m in d.mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=d.context, attention_head_dim=8, use_linear_projection=d.linear_proj)


def vae_model(d):
    from diffusers import AutoencoderKL

    return meta(AutoencoderKL,
        in_channels=3, out_channels=3, latent_channels=d.z, layers_per_block=2,
        block_out_channels=tuple(m * d.channels for m in d.mult),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=d.quant_conv, use_post_quant_conv=d.quant_conv)


def clip_model(d, heads=4):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return meta(CLIPTextModelWithProjection, CLIPTextConfig(
        hidden_size=d.width, intermediate_size=d.mlp, num_hidden_layers=d.layers, num_attention_heads=heads,
        vocab_size=d.vocab, max_position_embeddings=d.positions, projection_dim=d.projection or d.width))


def load_clip_without_projection(d, state):
    """HF CLIP text model strict load of a state dict that has no text_projection (SD1 / SDXL CLIP-L)."""
    model = clip_model(d)
    full = dict(state)
    full["text_projection.weight"] = model.text_projection.weight.detach().clone()
    strict_load(model, full)
    return model


def test_sd1_checkpoint_components_load_strictly(files):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd = load_file(files("sd1_checkpoint"))
    d = SMALL["sd1"]
    unet = sd1_unet_model(d["unet"])
    strict_load(unet, convert_ldm_unet_checkpoint(sd, unet.config))
    vae = vae_model(d["vae"])
    strict_load(vae, convert_ldm_vae_checkpoint(sd, vae.config))
    clip = convert_ldm_clip_checkpoint(sd)
    assert torch.equal(clip.pop("text_model.embeddings.position_ids"), torch.arange(77).unsqueeze(0))
    load_clip_without_projection(d["clip_l"], clip)
    # real LDM schedule buffers: scaled-linear betas, alphas_cumprod = prod(1 - beta)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(sd["betas"].double(), betas, rtol=1e-6)
    assert torch.allclose(sd["alphas_cumprod"].double(), torch.cumprod(1 - betas, 0), rtol=1e-5)


@pytest.mark.parametrize("spec,in_ch", [("sd1_inpaint", 9), ("sd1_pix2pix", 8)])
def test_sd1_variants_load_with_their_in_channels(files, spec, in_ch):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = load_file(files(spec))
    unet = sd1_unet_model(SMALL["sd1"]["unet"], in_channels=in_ch)
    strict_load(unet, convert_ldm_unet_checkpoint(sd, unet.config))


def test_sd2_checkpoint_loads_strictly(files):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint

    sd = load_file(files("sd2_checkpoint"))
    d = SMALL["sd2"]
    unet = sd1_unet_model(d["unet"])
    strict_load(unet, convert_ldm_unet_checkpoint(sd, unet.config))
    te = clip_model(d["clip_h"])
    conv = convert_open_clip_checkpoint(te, sd, prefix="cond_stage_model.model.")
    # diffusers drops the last block and text_projection (SD2 conditions on the penultimate layer)
    assert "text_model.encoder.layers.23.mlp.fc1.weight" not in conv
    assert "cond_stage_model.model.transformer.resblocks.23.ln_1.weight" in sd
    load_clip_without_projection(type(d["clip_h"])(**{**d["clip_h"].__dict__, "layers": 23}), conv)


def sdxl_unet_model(d, refiner=False):
    from diffusers import UNet2DConditionModel

    if refiner:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        tl = 4
    else:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        tl = (1, 2, 10)
    return meta(UNet2DConditionModel,
        sample_size=8, in_channels=d.in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(m * d.channels for m in d.mult), down_block_types=down, up_block_types=up,
        transformer_layers_per_block=tl, cross_attention_dim=d.context, attention_head_dim=4,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SMALL["sdxl"]["size_embed"], projection_class_embeddings_input_dim=d.adm)


def test_sdxl_checkpoint_components_load_strictly(files):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    sd = load_file(files("sdxl_checkpoint"))
    d = SMALL["sdxl"]
    # the relations of the real model hold at small widths
    assert d["unet"].context == d["clip_l"].width + d["clip_g"].width
    assert d["unet"].adm == d["clip_g"].projection + 6 * d["size_embed"]
    unet = sdxl_unet_model(d["unet"])
    strict_load(unet, convert_ldm_unet_checkpoint(sd, unet.config))
    vae = vae_model(d["vae"])
    strict_load(vae, convert_ldm_vae_checkpoint(sd, vae.config))
    clip_l = convert_ldm_clip_checkpoint(sd, remove_prefix="conditioner.embedders.0.transformer.")
    clip_l.pop("text_model.embeddings.position_ids")
    load_clip_without_projection(d["clip_l"], clip_l)
    g = clip_model(d["clip_g"])
    conv = convert_open_clip_checkpoint(g, sd, prefix="conditioner.embedders.1.model.")
    conv.pop("logit_scale", None)
    strict_load(g, conv)


def test_sdxl_refiner_unet_loads_strictly(files):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    sd = load_file(files("sdxl_refiner"))
    d = SMALL["sdxl_refiner"]
    assert d["unet"].adm == d["clip_g"].projection + 5 * d["size_embed"]
    unet = sdxl_unet_model(d["unet"], refiner=True)
    strict_load(unet, convert_ldm_unet_checkpoint(sd, unet.config))


def test_standalone_text_encoders_and_vaes_load_strictly(files):
    from transformers import T5Config, T5EncoderModel

    for spec, part in (("clip_l", SMALL["sd1"]["clip_l"]), ("clip_g", SMALL["sdxl"]["clip_g"])):
        strict_load(clip_model(part), load_file(files(spec)))
    t = SMALL["sd3"]["t5xxl"]
    t5 = meta(T5EncoderModel, T5Config(vocab_size=t.vocab, d_model=t.d_model, d_ff=t.d_ff, num_layers=t.layers,
                                 num_heads=t.heads, d_kv=t.d_kv, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=t.buckets))
    state = load_file(files("t5xxl"))
    strict_load(t5, {**state, "encoder.embed_tokens.weight": state["shared.weight"]}
                if "encoder.embed_tokens.weight" in t5.state_dict() else state)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for spec, d in (("sd1_vae", SMALL["sd1"]["vae"]), ("sd3_vae", SMALL["sd3"]["vae"])):
        vae = vae_model(d)
        strict_load(vae, convert_ldm_vae_checkpoint(load_file(files(spec)), vae.config))


def test_small_sd3_and_sd35_medium_mmdit_load_strictly(files):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    for spec, extra in (("sd3_medium", {}), ("sd35_medium", {"qk_norm": "rms_norm",
                                                              "dual_attention_layers": tuple(range(13))})):
        fam = "sd3" if spec == "sd3_medium" else spec
        m = SMALL[fam]["mmdit"]
        sd = {k: v for k, v in load_file(files(spec)).items() if k.startswith("model.diffusion_model.")}
        model = meta(SD3Transformer2DModel,
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=m.depth,
            attention_head_dim=m.head_dim, num_attention_heads=m.hidden // m.head_dim, joint_attention_dim=m.context_in,
            caption_projection_dim=m.hidden, pooled_projection_dim=m.adm, pos_embed_max_size=int(m.pos_embed ** 0.5),
            **extra)
        strict_load(model, convert_sd3_transformer_checkpoint_to_diffusers(sd))


def test_small_controlnet_loads_strictly(files):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    d = SMALL["sd1"]["unet"]
    model = meta(ControlNetModel,
        in_channels=4, layers_per_block=2, block_out_channels=tuple(m * d.channels for m in d.mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), cross_attention_dim=d.context,
        attention_head_dim=8, conditioning_embedding_out_channels=(16, 32, 96, 256))
    strict_load(model, convert_controlnet_checkpoint(load_file(files("sd1_controlnet")), model.config))


def test_small_kohya_lora_targets_exist_in_the_small_diffusers_unet_and_clip(files):
    """Module names + shapes of the small LoRA fit the small SD1 model (so it can be baked into it)."""
    d = SMALL["sd1"]
    unet = sd1_unet_model(d["unet"])
    mods = {n.replace(".", "_"): m for n, m in unet.named_modules()}
    te = {n.replace(".", "_"): m for n, m in clip_model(d["clip_l"]).named_modules()}
    lora = load_file(files("sd1_kohya_lora"))
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    assert len(downs) == 192 + 72
    for k in downs:
        name = k[: -len(".lora_down.weight")]
        if name.startswith("lora_unet_"):
            m = mods[name[len("lora_unet_"):]]
        else:
            m = te[name[len("lora_te_"):]]
        w = m.weight
        up = lora[name + ".lora_up.weight"]
        assert lora[k].shape[1] == w.shape[1] and up.shape[0] == w.shape[0]
        assert float(lora[name + ".alpha"]) == lora[k].shape[0] / 2
    peft = load_file(files("sd1_peft_lora"))
    names = dict(unet.named_modules())
    for k, v in peft.items():
        if k.startswith("unet.") and k.endswith(".lora_A.weight"):
            assert v.shape[1] == names[k[len("unet."):-len(".lora_A.weight")]].in_features


def test_lycoris_factors_reconstruct_the_module_shape(files):
    loha, lokr, glora = load_file(files("sd1_loha")), load_file(files("sd1_lokr")), load_file(files("sd1_glora"))
    base = layouts.keys("sd1_kohya_lora")
    for k in (k for k in base if k.endswith(".lora_down.weight")):
        mod = k[: -len(".lora_down.weight")]
        out, inp = base[mod + ".lora_up.weight"][1][0], base[k][1][1]
        w = (loha[mod + ".hada_w1_a"] @ loha[mod + ".hada_w1_b"]) * (loha[mod + ".hada_w2_a"] @ loha[mod + ".hada_w2_b"])
        assert tuple(w.shape) == (out, inp)
        w1, w2 = lokr[mod + ".lokr_w1"], lokr[mod + ".lokr_w2"]
        kron = torch.kron(w1, w2.reshape(w2.shape[0], w2.shape[1]))
        assert tuple(kron.shape) == (out, inp)
        if mod + ".a1.weight" in glora:  # ComfyUI "old_glora": b2 @ b1 + W @ a2 @ a1
            a1, a2, b1, b2 = (glora[f"{mod}.{n}.weight"] for n in ("a1", "a2", "b1", "b2"))
            assert b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
            w = torch.zeros(out, inp)
            assert tuple((b2 @ b1 + w @ a2 @ a1).shape) == (out, inp)


def test_sparse_files_have_real_header_and_full_length(tmp_path):
    p = build.write_model(tmp_path / "sdxl.safetensors", "sdxl_checkpoint", sparse=True)
    plan = build.plan("sdxl_checkpoint", small=False)
    with safe_open(p, "pt") as f:  # the safetensors library is the oracle for the header
        assert list(f.keys()) == sorted(plan)
        for k in ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection"):
            assert tuple(f.get_slice(k).get_shape()) == plan[k].shape
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    assert p.stat().st_size == 8 + n + sum(i.nbytes for i in plan.values())
    assert p.stat().st_size > 6.9e9  # fp16 SDXL base is 6.94 GB (reference §4)
    assert p.stat().st_blocks * 512 < 16 * 2 ** 20  # but costs (almost) no disk
    header = json.loads(open(p, "rb").read(8 + n)[8:])
    assert header["model.diffusion_model.input_blocks.0.0.weight"]["dtype"] == "F16"


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = build.write_model(tmp_path / "a.safetensors", "sd1_vae", seed=3)
    b = build.write_model(tmp_path / "b.safetensors", "sd1_vae", seed=3)
    c = build.write_model(tmp_path / "c.safetensors", "sd1_vae", seed=4)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]


def test_dtype_cast_keeps_buffers(files):
    p = files("sd1_checkpoint", dtype="BF16", ema=True)
    with safe_open(p, "pt") as f:
        assert f.get_slice("model.diffusion_model.out.2.weight").get_dtype() == "BF16"
        assert f.get_slice("cond_stage_model.transformer.text_model.embeddings.position_ids").get_dtype() == "I64"
        assert f.get_slice("alphas_cumprod").get_dtype() == "F32"
        assert f.get_slice("model_ema.num_updates").get_dtype() == "I32"
        assert f.get_slice("model_ema.decay").get_dtype() == "F32"
        assert sum(1 for k in f.keys() if k.startswith("model_ema.")) == 688


def test_merged_variant_has_float_position_ids(files):
    ids = load_file(files("sd1_merged"))["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.float32 and ids[0, 76].item() == pytest.approx(75.9975) and ids[0, 10].item() == 10


def test_ckpt_is_a_lightning_wrapped_benign_pickle(files):
    p = files("sd1_checkpoint", fmt="ckpt", ema=True, training_state=True)
    obj = torch.load(p, weights_only=True)  # torch's restricted unpickler accepts it: benign
    assert {"state_dict", "global_step", "epoch", "optimizer_states", "lr_schedulers", "callbacks",
            "pytorch-lightning_version"} <= set(obj)
    assert set(obj["state_dict"]) == set(build.plan("sd1_checkpoint", ema=True))
    plain = torch.load(files("sd1_checkpoint", fmt="ckpt"), weights_only=True)
    assert set(plain) == {"state_dict", "global_step", "epoch"}


def test_a1111_embedding_and_hypernetwork_pickles(files):
    emb = torch.load(files("sd1_embedding", fmt="pt"), weights_only=True)
    assert set(emb["string_to_param"]) == {"*"} and emb["string_to_param"]["*"].shape == (4, 32)
    assert emb["string_to_token"] == {"*": 265}
    hn = torch.load(files("sd1_hypernetwork"), weights_only=True)
    assert {k for k in hn if isinstance(k, int)} == {320, 640, 768, 1280}
    k_sd, v_sd = hn[768]
    assert list(k_sd) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    assert k_sd["linear.0.weight"].shape[1] == 768 and k_sd["linear.1.weight"].shape[0] == 768
    assert hn["layer_structure"][0] == hn["layer_structure"][-1] == 1 and hn["activation_func"] == "linear"


def test_esrgan_is_a_plain_state_dict(files):
    sd = torch.load(files("esrgan_x4"), weights_only=True)
    assert sd["model.0.weight"].shape[1] == 3 and sd["model.10.weight"].shape[0] == 3
    assert len([k for k in sd if k.startswith("model.1.sub.") and ".RDB" in k]) == 23 * 3 * 5 * 2


def test_spec_metadata_and_user_metadata(files, tmp_path):
    p = build.write_model(tmp_path / "v.safetensors", "sd2_768_v", metadata={"title": "x"})
    with safe_open(p, "pt") as f:
        md = f.metadata()
    assert md["modelspec.prediction_type"] == "v" and md["title"] == "x"
    norm = load_file(p)["model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"].float()
    assert norm.std() > 0.09  # ComfyUI's SD2 v-prediction heuristic agrees with the metadata


def test_specs_cover_every_layout_and_are_consistent():
    assert set(build.SPECS) <= set(layouts.LAYOUTS)
    kinds = {"checkpoint", "unet", "vae", "text_encoder", "lora", "lycoris", "embedding", "hypernetwork",
             "controlnet", "upscaler", "t2i_adapter", "ip_adapter"}
    for s in build.SPECS.values():
        assert s.kind in kinds, s.name
        assert s.fmt in ("safetensors", "ckpt", "pt")


def test_bad_requests_raise():
    with pytest.raises(KeyError):
        layouts.keys("no_such_spec")
    with pytest.raises(ValueError):
        build.plan("sdxl_checkpoint", ema=True)
    with pytest.raises(ValueError):
        build.write_model("/tmp/never.ckpt", "sd1_vae", sparse=True, fmt="ckpt")


def test_build_library_cli_both_layouts(tmp_path):
    import os
    import subprocess
    import sys

    from ckptlab.formats import open_model

    env_src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run([sys.executable, "-m", "ckptlab.sample", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": env_src}, timeout=300)
    assert out.returncode == 0, out.stderr
    a = tmp_path / "a1111" / "models" / "Stable-diffusion" / "v1-5-pruned-emaonly.safetensors"
    c = tmp_path / "comfyui" / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    assert a.read_bytes() == c.read_bytes()  # the same model in both tools' folders
    assert (tmp_path / "a1111" / "models" / "Lora").is_dir() and (tmp_path / "comfyui" / "models" / "loras").is_dir()
    with open_model(a) as src:
        assert len(src) == len(layouts.keys("sd1_checkpoint"))


def test_ip_adapter_loads_into_a_small_unet_with_diffusers_loader(files):
    """diffusers maps ip_adapter.{1,3,..} to the UNet's cross-attention processors in order and loads them
    with shape checks, so the width order (down, up, mid) is proven."""
    from diffusers import UNet2DConditionModel

    d = SMALL["sd1"]["unet"]
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(m * d.channels for m in d.mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=d.context,
        attention_head_dim=8)
    flat = load_file(files("ip_adapter_sd15"))
    nested = {"image_proj": {}, "ip_adapter": {}}
    for k, v in flat.items():
        head, rest = k.split(".", 1)
        nested[head][rest] = v
    unet._load_ip_adapter_weights([nested])
    procs = [p for n, p in unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert len(procs) == 16 and all(hasattr(p, "to_k_ip") for p in procs)


def test_library_cli_reports_a_bad_target_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    blocker = tmp_path / "lib"
    blocker.write_text("not a folder")
    env_src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run([sys.executable, "-m", "ckptlab.sample", str(blocker)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": env_src}, timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("ckptlab.sample: error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def _module_of(key: str) -> str:
    """Module path of a converted diffusers LoRA key (new PEFT and older diffusers naming)."""
    m = re.match(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$", key)
    if m:
        return m.group(1) + "." + (m.group(2) + ".0" if m.group(2) == "to_out" else m.group(2))
    m = re.match(r"^(.*\.self_attn)\.to_(q|k|v|out)_lora\.(down|up)\.weight$", key)  # CLIP attention
    if m:
        return f"{m.group(1)}.{m.group(2)}_proj"
    return re.sub(r"\.(lora\.(down|up)|lora_linear_layer\.(down|up)|lora_[AB])\.weight$", "", key)


def _check_converted(conv: dict, models: dict) -> int:
    n = 0
    for k, v in conv.items():
        if not k.endswith(("down.weight", "lora_A.weight")):
            continue
        head, rest = k.split(".", 1)
        mod = models[head][_module_of(rest)]
        weight = mod.weight
        assert v.shape[1] == weight.shape[1], k
        n += 1
    return n


def test_kohya_loras_convert_with_diffusers_onto_real_modules():
    """diffusers' own kohya converters (SGM block mapping for SDXL) turn every module name into a module of
    the diffusers UNet / HF CLIP with the LoRA's input width."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    def ones(spec):
        return {k: torch.ones(s) for k, (_, s) in layouts.keys(spec).items()}

    sd1 = {"unet": dict(sd1_unet_model(SMALL["sd1"]["unet"]).named_modules()),
           "text_encoder": {k[len("text_model."):]: m for k, m in clip_model(SMALL["sd1"]["clip_l"]).named_modules()}}
    sd1["text_encoder"].update({"text_model." + k: m for k, m in sd1["text_encoder"].items()})
    conv, _ = _convert_non_diffusers_lora_to_diffusers(ones("sd1_kohya_lora"))
    assert _check_converted(conv, sd1) == 192 + 72

    d = SMALL["sdxl"]
    unet = sdxl_unet_model(d["unet"])
    te1 = dict(clip_model(d["clip_l"]).named_modules())
    te2 = dict(clip_model(d["clip_g"]).named_modules())
    for t in (te1, te2):
        t.update({k[len("text_model."):]: m for k, m in list(t.items()) if k.startswith("text_model.")})
    mapped = _maybe_map_sgm_blocks_to_diffusers(ones("sdxl_kohya_lora"), unet.config)
    conv, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    models = {"unet": dict(unet.named_modules()), "text_encoder": te1, "text_encoder_2": te2}
    assert _check_converted(conv, models) == 722 + 72 + 192


def test_xlabs_flux_lora_converts_with_diffusers_onto_flux_modules():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    f = SMALL["flux"]["flux"]
    model = meta(FluxTransformer2DModel, guidance_embeds=True, num_attention_heads=f.heads,
                 attention_head_dim=f.hidden // f.heads, joint_attention_dim=f.context_in,
                 pooled_projection_dim=f.vec_in, axes_dims_rope=(8, 12, 12))
    conv = _convert_xlabs_flux_lora_to_diffusers(
        {k: torch.ones(s) for k, (_, s) in layouts.keys("flux_xlabs_lora").items()})
    assert _check_converted(conv, {"transformer": dict(model.named_modules())}) == 19 * 8


def test_scaled_fp8_flux_has_fp8_weights_scales_and_marker(tmp_path):
    p = build.write_model(tmp_path / "f.safetensors", "flux_dev_fp8_scaled", dtype="BF16")
    with safe_open(p, "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("scaled_fp8").get_dtype() == "F8_E4M3" and f.get_slice("scaled_fp8").get_shape() == [0]
        assert f.get_slice("double_blocks.0.img_attn.qkv.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("img_in.weight").get_dtype() == "BF16"
        scale = f.get_tensor("double_blocks.0.img_attn.qkv.scale_weight")
        assert scale.dtype == torch.float32 and scale.ndim == 0
    n_fp8 = len([k for k in keys if k.endswith(".scale_weight")])
    assert n_fp8 == 19 * 2 * 5 + 38 * 3  # qkv, proj, mlp.0, mlp.2, mod.lin per stream; linear1/2, modulation
    sparse = build.write_model(tmp_path / "s.safetensors", "flux_dev_fp8_scaled", sparse=True)
    assert 11.9e9 < sparse.stat().st_size < 12.0e9  # reference §4: Flux-dev fp8 11.90 GB (+ bf16 non-block parts)
