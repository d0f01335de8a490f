"""``lora bake`` end to end on small real-layout files: every adapted weight against the formula written here
(key names mapped by hand, not through ckptlab's naming tables), every other tensor byte-identical, the special
cases (OpenCLIP q/k/v rows, inpaint conv_in, fp8 base, --precision), provenance, refusals and the streaming plan."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile

import pytest

torch = pytest.importorskip("torch")
from fakes.sample_files import make_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ckptlab.errors import MismatchError, OutputError, UsageError  # noqa: E402
from ckptlab.lora.bake import bake, plan_bake, strengths_for  # noqa: E402
from ckptlab.lora.file import LoraFile, split_key  # noqa: E402

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
#: kohya module -> single-file key, written by hand (SD1: diffusers UNet names, HF CLIP names)
HAND = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_up_blocks_1_attentions_2_proj_out": U + "output_blocks.5.1.proj_out.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": U + "middle_block.1.transformer_blocks.0.ff.net.2.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": TE + "encoder.layers.0.self_attn.k_proj.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": TE + "encoder.layers.0.mlp.fc1.weight",
}


def sha256(p):
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake")
    return {s: make_model(d / s, s) for s in ("sd1_checkpoint", "sd1_kohya_lora", "sd1_peft_lora", "sdxl_kohya_lora",
                                              "sd1_locon", "sd1_glora")}


def kohya_delta(lora: dict, name: str, shape):
    up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
    r = down.shape[0]
    alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else r
    return ((up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * (alpha / r)).reshape(shape)


def test_sd1_kohya_bake_matches_the_formula_and_copies_the_rest(files, tmp_path):
    base, lp = files["sd1_checkpoint"], files["sd1_kohya_lora"]
    out = tmp_path / "o.safetensors"
    r = bake(base, [lp], out, strengths=[0.8], te_strengths=[0.5])
    b, o, lo = load_file(base), load_file(out), load_file(lp)
    assert list(o) == list(b)  # same keys, same order
    for name, key in HAND.items():
        m = 0.5 if name.startswith("lora_te_") else 0.8
        want = b[key].float() + m * kohya_delta(lo, name, b[key].shape)
        assert torch.allclose(o[key], want, atol=1e-6), key
    changed = {k for k in b if not torch.equal(b[k], o[k])}
    modules = {k.split(".")[0] for k in lo}
    assert len(changed) == r.changed == len(modules) == 264
    assert r.loras[0].matched == 264 and not r.warnings
    # unchanged tensors are raw copies: identical bytes in the file
    with safe_open(base, "pt") as fb, safe_open(out, "pt") as fo:
        for k in b:
            if k not in changed:
                assert fb.get_tensor(k).dtype == fo.get_tensor(k).dtype and torch.equal(fb.get_tensor(k),
                                                                                        fo.get_tensor(k))


def test_peft_lora_and_two_loras_in_order(files, tmp_path):
    base, kohya, peft = files["sd1_checkpoint"], files["sd1_kohya_lora"], files["sd1_peft_lora"]
    out = tmp_path / "o.safetensors"
    bake(base, [kohya, peft], out, strengths=[1.0, -0.5])
    b, o, lk, lp = load_file(base), load_file(out), load_file(kohya), load_file(peft)
    key = HAND["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    pname = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    dp = lp[f"{pname}.lora_B.weight"].float() @ lp[f"{pname}.lora_A.weight"].float()  # no alpha in the header: 1
    want = b[key] + kohya_delta(lk, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                                b[key].shape) - 0.5 * dp
    assert torch.allclose(o[key], want, atol=1e-6)


def test_sd2_openclip_qkv_rows_of_in_proj(tmp_path):
    base = make_model(tmp_path / "sd2", "sd2_checkpoint")
    b = load_file(base)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    d = b[key].shape[0] // 3
    gen = torch.Generator().manual_seed(0)
    t, deltas = {}, {}
    for p in "qkv":
        name = f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj"
        up, down = torch.randn(d, 2, generator=gen), torch.randn(2, b[key].shape[1], generator=gen)
        t |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)}
        deltas[p] = (up @ down) * 0.5
    lp = tmp_path / "qkv.safetensors"
    save_file(t, str(lp))
    out = tmp_path / "o.safetensors"
    bake(base, [lp], out)
    o = load_file(out)
    assert torch.allclose(o[key], b[key] + torch.cat([deltas["q"], deltas["k"], deltas["v"]]), atol=1e-6)


def test_inpaint_conv_in_padded(tmp_path):
    base = make_model(tmp_path / "inp", "sd1_inpaint")
    b = load_file(base)
    key = U + "input_blocks.0.0.weight"
    out_ch = b[key].shape[0]
    up, down = torch.randn(out_ch, 2, 1, 1), torch.randn(2, 4, 3, 3)
    lp = tmp_path / "conv_in.safetensors"
    save_file({"lora_unet_conv_in.lora_up.weight": up, "lora_unet_conv_in.lora_down.weight": down}, str(lp))
    out = tmp_path / "o.safetensors"
    bake(base, [lp], out)
    o = load_file(out)
    dw = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    assert torch.allclose(o[key][:, :4], b[key][:, :4] + dw, atol=1e-6)
    assert torch.equal(o[key][:, 4:], b[key][:, 4:])


def test_fp8_base_upcast_add_cast_back_and_dtype_option(files, tmp_path):
    unet = make_model(tmp_path / "unet", "sd1_unet")
    sd = load_file(unet)
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    fp8 = tmp_path / "unet_fp8.safetensors"
    save_file({k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v) for k, v in sd.items()}, str(fp8))
    lo = load_file(files["sd1_kohya_lora"])
    dw = kohya_delta(lo, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", sd[key].shape)
    out = tmp_path / "o.safetensors"
    r = bake(fp8, [files["sd1_kohya_lora"]], out)
    assert r.loras[0].matched < r.loras[0].modules  # a UNet alone: the TE modules are left out, with a warning
    assert any("match no weight" in w for w in r.warnings)
    o, b8 = load_file(out), load_file(fp8)
    assert o[key].dtype == torch.float8_e4m3fn
    want = (b8[key].float() + dw).to(torch.float8_e4m3fn)
    assert torch.equal(o[key].view(torch.uint8), want.view(torch.uint8))
    out16 = tmp_path / "o16.safetensors"
    bake(unet, [files["sd1_kohya_lora"]], out16, dtype="fp16")
    o16 = load_file(out16)
    assert o16[key].dtype == torch.float16
    assert torch.equal(o16[key], (sd[key].float() + dw).to(torch.float16))
    assert all(v.dtype == torch.float16 for k, v in o16.items() if sd[k].is_floating_point())


def test_provenance_and_base_metadata(files, tmp_path):
    base = tmp_path / "meta.safetensors"
    sd = load_file(files["sd1_checkpoint"])
    save_file(sd, str(base), metadata={"modelspec.title": "x", "sshs_model_hash": "stale", "ckptlab.options": "{}"})
    lp = files["sd1_kohya_lora"]
    out = tmp_path / "o.safetensors"
    bake(base, [lp], out, strengths=[0.7])
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "x" and "sshs_model_hash" not in meta
    inputs = json.loads(meta["ckptlab.inputs"])
    assert [i["sha256"] for i in inputs] == [sha256(base), sha256(lp)]
    opts = json.loads(meta["ckptlab.options"])
    assert opts["strengths"] == [0.7] and opts["te_strengths"] == [0.7]
    assert meta["ckptlab.operation"] == "lora-bake"


def test_strengths():
    assert strengths_for(2, None, None) == [(1.0, 1.0), (1.0, 1.0)]
    assert strengths_for(2, [0.5], None) == [(0.5, 0.5), (0.5, 0.5)]
    assert strengths_for(2, [0.5, 0.2], [0.0]) == [(0.5, 0.0), (0.2, 0.0)]
    with pytest.raises(UsageError):
        strengths_for(2, [1, 2, 3], None)


def test_refusals(files, tmp_path):
    base = files["sd1_checkpoint"]
    with pytest.raises(MismatchError, match="SDXL"):
        bake(base, [files["sdxl_kohya_lora"]], tmp_path / "a.safetensors")
    with pytest.raises(MismatchError, match="GLoRA"):
        bake(base, [files["sd1_glora"]], tmp_path / "a.safetensors")
    nomatch = tmp_path / "nomatch.safetensors"
    save_file({"lora_unet_nowhere_block.lora_up.weight": torch.ones(4, 2),
               "lora_unet_nowhere_block.lora_down.weight": torch.ones(2, 4)}, str(nomatch))
    with pytest.raises(MismatchError, match="none of this LoRA"):
        bake(base, [nomatch], tmp_path / "a.safetensors")
    with pytest.raises(MismatchError, match="give the model first"):
        bake(files["sd1_kohya_lora"], [files["sd1_kohya_lora"]], tmp_path / "a.safetensors")
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"x")
    with pytest.raises(OutputError, match="exists"):
        bake(base, [files["sd1_kohya_lora"]], exists)
    assert exists.read_bytes() == b"x"
    assert not (tmp_path / "a.safetensors").exists()


def test_partial_match_warns_with_count_and_names(files, tmp_path):
    lo = load_file(files["sd1_kohya_lora"])
    lo |= {"lora_unet_bogus_a.lora_up.weight": torch.ones(4, 2), "lora_unet_bogus_a.lora_down.weight": torch.ones(2, 4)}
    lp = tmp_path / "partial.safetensors"
    save_file(lo, str(lp))
    r = bake(files["sd1_checkpoint"], [lp], tmp_path / "o.safetensors")
    assert r.loras[0].matched == 264 and r.loras[0].unmatched == ["lora_unet_bogus_a"]
    assert r.warnings == [f"{lp.name}: 1 of 265 modules match no weight of the model and are left out "
                          "(first: lora_unet_bogus_a)"]


def counting(src):
    """``src`` with the keys of its tensor reads recorded (``src.reads``)."""
    src.reads = set()
    get, array = src.get, src.array

    def g(key):
        src.reads.add(key)
        return get(key)

    def a(key):
        src.reads.add(key)
        return array(key)

    src.get, src.array = g, a
    return src


def test_plan_reads_headers_only_and_produces_one_weight_at_a_time(files):
    from ckptlab.formats import open_model

    src = counting(open_model(files["sd1_checkpoint"]))
    lora = LoraFile.open(files["sd1_locon"])
    lsrc = counting(lora.source)
    try:
        plan = plan_bake(src, [lora], [(1.0, 1.0)], family="sd1")
        # no weight read to plan; of the LoRA only its 0-d alphas (a module storing alpha 0 changes nothing)
        assert not src.reads and all(k.endswith(".alpha") for k in lsrc.reads)
        lsrc.reads.clear()
        produced = [it for it in plan.items if it.produce is not None]
        assert len(produced) == plan.result.changed == 350
        assert all(it.source is not None for it in plan.items if it.produce is None)  # raw copies
        produced[0].produce()
        assert src.reads == {produced[0].key}  # one base weight read for one output weight
        assert len({split_key(k)[0] for k in lsrc.reads}) == 1  # and the parameters of one LoRA module
    finally:
        lora.close()
        src.close()


def test_dry_run_writes_nothing(files, tmp_path):
    out = tmp_path / "o.safetensors"
    r = bake(files["sd1_checkpoint"], [files["sd1_kohya_lora"]], out, dry_run=True)
    assert r.dry_run and r.changed == 264 and not out.exists()


# -- CLI -----------------------------------------------------------------------------------------------------

def test_cli_bake_and_errors(files, tmp_path, cli):
    base, lp = files["sd1_checkpoint"], files["sd1_kohya_lora"]
    out = tmp_path / "o.safetensors"
    r = cli("lora", "bake", base, lp, lp, "--strength", "0.5,0.25", "--te-strength", "0", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    # --te-strength 0: only the 192 UNet weights change (the 72 text-encoder modules are left out)
    assert [x["strength"] for x in rec["loras"]] == [0.5, 0.25] and rec["changed"] == 192
    o, b, lo = load_file(out), load_file(base), load_file(lp)
    name, key = next(iter(HAND.items()))
    assert torch.allclose(o[key], b[key] + 0.75 * kohya_delta(lo, name, b[key].shape), atol=1e-6)
    te = HAND["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]
    assert torch.equal(o[te], b[te])  # --te-strength 0
    # strength count mismatch: usage error, exit 2
    r = cli("lora", "bake", base, lp, "-s", "1", "-s", "2", "-s", "3", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.startswith("ckptlab: error:") and "--strength" in r.stderr
    # output exists
    r = cli("lora", "bake", base, lp, "-o", out)
    assert r.returncode != 0 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # other family
    r = cli("lora", "bake", base, files["sdxl_kohya_lora"], "-o", tmp_path / "y.safetensors")
    assert r.returncode not in (0, 70) and "SDXL" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_cli_hostile_pickle_lora_refused(files, tmp_path, cli):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    evil = tmp_path / "evil_lora.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"p": Payload()}, protocol=2))
    out = tmp_path / "o.safetensors"
    r = cli("lora", "bake", files["sd1_checkpoint"], evil, "-o", out)
    assert r.returncode == 4, r.stderr
    assert "malicious" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_patch_weight_row_slices_of_a_fused_weight(tmp_path):
    """Fused weights (Flux ``qkv``, OpenCLIP ``in_proj_weight``): each target's patches go to its rows only, in
    the order given; the other rows stay bit-identical."""
    from ckptlab.lora.bake import Patch, patch_weight
    from ckptlab.lora.naming import Target

    key = "double_blocks.0.img_attn.qkv.weight"
    w = torch.randn(12, 5)
    t = {}
    for p in ("q", "v"):
        n = f"lora_unet_double_blocks_0_img_attn_{p}"
        t |= {f"{n}.lora_up.weight": torch.randn(4, 2), f"{n}.lora_down.weight": torch.randn(2, 5)}
    lp = tmp_path / "fused.safetensors"
    save_file(t, str(lp))
    with LoraFile.open(lp) as lf:
        mods = {m.name[-1]: m for m in lf.modules.values()}
        patches = [Patch(Target(key, (4, 5), "dit", rows=(0, 4)), lf, mods["q"], 0.5),
                   Patch(Target(key, (4, 5), "dit", rows=(8, 12)), lf, mods["v"], 2.0)]
        out = patch_weight(w, patches)
    dq = t["lora_unet_double_blocks_0_img_attn_q.lora_up.weight"] @ t["lora_unet_double_blocks_0_img_attn_q.lora_down.weight"]
    dv = t["lora_unet_double_blocks_0_img_attn_v.lora_up.weight"] @ t["lora_unet_double_blocks_0_img_attn_v.lora_down.weight"]
    assert torch.allclose(out[0:4], w[0:4] + 0.5 * dq, atol=1e-6)
    assert torch.equal(out[4:8], w[4:8])
    assert torch.allclose(out[8:12], w[8:12] + 2.0 * dv, atol=1e-6)


def test_standalone_clip_l_text_encoder(files, tmp_path):
    """A CLIP-L file in transformers layout (what `ckptlab extract -c clip_l` writes) takes the LoRA's
    text-encoder modules; the UNet modules are left out with a warning."""
    b = load_file(files["sd1_checkpoint"])
    pre = "cond_stage_model.transformer."
    te = tmp_path / "clip_l.safetensors"
    save_file({k[len(pre):]: v for k, v in b.items() if k.startswith(pre)}, str(te))
    out = tmp_path / "o.safetensors"
    r = bake(te, [files["sd1_kohya_lora"]], out, te_strengths=[0.5])
    o, lo = load_file(out), load_file(files["sd1_kohya_lora"])
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    key = HAND[name][len(pre):]
    assert torch.allclose(o[key], b[HAND[name]] + 0.5 * kohya_delta(lo, name, o[key].shape), atol=1e-6)
    n_te = len({k.split(".")[0] for k in lo if k.startswith("lora_te_")})
    assert r.changed == n_te and r.family == "sd1"
    assert "match no weight" in r.warnings[0]


def test_zero_strength_and_zero_alpha_leave_weights_byte_identical(files, tmp_path):
    """``--te-strength 0`` changes no text-encoder weight and counts none as changed; a LoRA storing alpha 0
    (A1111/ComfyUI: scale 0) changes nothing and says so."""
    base, lp = files["sd1_checkpoint"], files["sd1_kohya_lora"]
    out = tmp_path / "o.safetensors"
    r = bake(base, [lp], out, te_strengths=[0.0])
    b, o = load_file(base), load_file(out)
    lora = load_file(lp)
    te_keys = [k for k in b if k.startswith("cond_stage_model.")]
    assert all(torch.equal(o[k], b[k]) for k in te_keys)
    unet_modules = sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in lora)
    assert r.changed == unet_modules == sum(not torch.equal(o[k], b[k]) for k in b)
    zero = {k: (torch.zeros_like(v) if k.endswith(".alpha") else v) for k, v in lora.items()}
    zp = tmp_path / "zero_alpha.safetensors"
    save_file(zero, zp)
    out2 = tmp_path / "o2.safetensors"
    r2 = bake(base, [zp], out2)
    assert r2.changed == 0 and any("alpha 0" in w for w in r2.warnings)
    o2 = load_file(out2)
    assert all(torch.equal(o2[k], b[k]) for k in b)


def test_non_finite_strength_and_swapped_arguments_are_refused_up_front(files, tmp_path, cli):
    base, lp = files["sd1_checkpoint"], files["sd1_kohya_lora"]
    for bad in ("nan", "inf"):
        r = cli("lora", "bake", base, lp, "-s", bad, "-o", tmp_path / "x.safetensors")
        assert r.returncode == 2 and "finite" in r.stderr and "Traceback" not in r.stderr
    r = cli("lora", "bake", lp, base, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 1 and "give the model first, then the LoRAs" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()
