"""Flux (and SD3) through the lora commands, on the small real-layout ``flux_dev`` and the kohya / diffusers (PEFT) /
XLabs Flux LoRA samples.

Oracle of bake: diffusers' own Flux path - a small ``FluxTransformer2DModel`` holding flux_dev converted by
diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, the LoRA read by ``FluxLoraLoaderMixin.lora_state_dict``
(diffusers' kohya / XLabs converters), injected by ``load_lora_adapter`` (peft) and fused by ``fuse_lora`` - compared
with our baked BFL file converted the same way. diffusers' two converters hard-code Flux.1's widths (3072 hidden,
12288 MLP) for the single-block split; the tests run them with that one constant set to the sample's widths.
Extract, resize and merge are checked against the loaders' ΔW formula written in the tests (svd_oracle)."""

from __future__ import annotations

import inspect
import re
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
from fakes.sample_files import make_model, sha256  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from svd_oracle import bake_delta, json_out, load, metadata, module_names  # noqa: E402

SAMPLES = ("flux_kohya_lora", "flux_diffusers_lora", "flux_xlabs_lora")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    return {s: make_model(d / f"{s}.safetensors", s) for s in ("flux_dev", *SAMPLES)}


@pytest.fixture(scope="module")
def widths(files):
    sd = load_file(str(files["flux_dev"]))
    return sd["double_blocks.0.img_attn.proj.weight"].shape[0], sd["double_blocks.0.img_mlp.0.weight"].shape[0]


def _with_constant(module, name: str, old: str, new: str):
    """``module.name`` recompiled from its own source with one hard-coded constant replaced (exactly once)."""
    src = textwrap.dedent(inspect.getsource(getattr(module, name)))
    assert src.count(old) == 1, (name, old)
    ns = dict(vars(module))
    exec(compile(src.replace(old, new), inspect.getsourcefile(module), "exec"), ns)  # noqa: S102
    return ns[name]


@pytest.fixture(scope="module")
def oracle(widths):
    """diffusers' converters at the sample's widths: (BFL → diffusers transformer state dict, kohya LoRA → PEFT)."""
    from diffusers.loaders import lora_conversion_utils, single_file_utils

    h, mlp = widths
    to_diffusers = _with_constant(single_file_utils, "convert_flux_transformer_checkpoint_to_diffusers",
                                  "inner_dim = 3072", f"inner_dim = {h}")
    kohya = _with_constant(lora_conversion_utils, "_convert_kohya_flux_lora_to_diffusers",
                           "dims=[3072, 3072, 3072, 12288]", f"dims=[{h}, {h}, {h}, {mlp}]")
    return to_diffusers, kohya


def _transformer(widths):
    from diffusers import FluxTransformer2DModel

    h, _ = widths
    return FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=32, num_attention_heads=h // 32, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def diffusers_fused(base, lora, strength, widths, oracle, monkeypatch) -> dict:
    """The diffusers transformer's weights after loading ``lora`` into flux_dev and fusing it at ``strength``."""
    from diffusers.loaders import lora_pipeline

    to_diffusers, kohya = oracle
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", kohya)
    model = _transformer(widths)
    missing = model.load_state_dict(to_diffusers(load_file(str(base))), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    sd, alphas = lora_pipeline.FluxLoraLoaderMixin.lora_state_dict(str(lora), return_alphas=True)
    model.load_lora_adapter(sd, network_alphas=alphas, prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=strength)
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


@pytest.mark.parametrize("spec", SAMPLES)
def test_bake_equals_diffusers_fuse_lora(files, widths, oracle, spec, tmp_path, monkeypatch):
    from ckptlab.lora.bake import bake

    base, lora = files["flux_dev"], files[spec]
    before = sha256(base), sha256(lora)
    out = tmp_path / "baked.safetensors"
    r = bake(base, [lora], out, strengths=[0.7])
    assert r.family == "flux" and not r.warnings
    want = diffusers_fused(base, lora, 0.7, widths, oracle, monkeypatch)
    ours = oracle[0](load_file(str(out)))
    plain = oracle[0](load_file(str(base)))
    assert set(ours) == set(want)
    changed = set()
    for k, w in want.items():
        assert torch.allclose(ours[k], w, atol=2e-6, rtol=1e-5), k
        if not torch.equal(w, plain[k]):
            changed.add(k)
    # what diffusers changed is what the sample adapts (not vacuous), in diffusers weights: kohya every block
    # Linear (double: 2 x (q, k, v, out, ff 2, norm1); single: q, k, v, proj_mlp, proj_out, norm), PEFT the
    # attention and single-block MLP, XLabs the double-block attention only
    per = {"flux_kohya_lora": 19 * 14 + 38 * 6, "flux_diffusers_lora": 19 * 8 + 38 * 5, "flux_xlabs_lora": 19 * 8}
    assert len(changed) == per[spec], sorted(changed)[:5]
    assert (sha256(base), sha256(lora)) == before


@pytest.mark.parametrize(("spec", "rank"), [("flux_kohya_lora", 4), ("flux_diffusers_lora", 16),
                                            ("flux_xlabs_lora", 4)])
def test_extract_from_baked_then_rebake_recovers_it(files, spec, rank, tmp_path):
    """extract(baked, flux_dev) at a rank ≥ the ΔW's (PEFT q/k/v/mlp pieces of rank 4 fuse to rank ≤ 16 in
    ``linear1``) re-bakes to the baked weights; kohya's Flux module set, α = rank."""
    from ckptlab.lora.bake import bake
    from ckptlab.lora.extract import extract

    base = files["flux_dev"]
    baked = tmp_path / "baked.safetensors"
    bake(base, [files[spec]], baked, strengths=[0.7])
    ex = tmp_path / "ex.safetensors"
    res = extract(baked, base, ex, rank=rank)
    assert res.family == "flux" and res.total_rel_error < 1e-5
    L = load(ex)
    names = module_names(L)
    # kohya lora_flux.py: DoubleStreamBlock and SingleStreamBlock Linear children = 19 x 10 + 38 x 3
    assert len(names) == 304
    assert {n for n in names if n.startswith("lora_unet_single_blocks_0_")} == {
        f"lora_unet_single_blocks_0_{m}" for m in ("linear1", "linear2", "modulation_lin")}
    assert {n for n in names if n.startswith("lora_unet_double_blocks_0_")} == {
        f"lora_unet_double_blocks_0_{s}_{m}" for s in ("img", "txt")
        for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")}
    assert all(float(L[f"{n}.alpha"]) == L[f"{n}.lora_down.weight"].shape[0] for n in names)
    B, T = load(base), load(baked)
    # the test's own formula, BFL keys by hand
    for name in ("lora_unet_double_blocks_3_img_attn_qkv", "lora_unet_single_blocks_7_linear1",
                 "lora_unet_double_blocks_18_txt_attn_proj"):
        key = name[len("lora_unet_"):]
        key = re.sub(r"_(\d+)_", r".\1.", key).replace("_attn_", "_attn.").replace("img_mlp_", "img_mlp.")
        key += ".weight"
        assert torch.allclose(B[key].double() + bake_delta(L, name), T[key].double(), atol=2e-6, rtol=0), name
    rebaked = tmp_path / "rebaked.safetensors"
    bake(base, [ex], rebaked)
    R = load(rebaked)
    assert list(R) == list(T)
    for k in T:
        assert torch.allclose(R[k], T[k], atol=2e-6, rtol=0), k


def test_extract_nearly_unchanged_flux_is_zero_modules_and_json(files, tmp_path, cli):
    """One DiT weight moved: every module is written (304), all but that one zero; identical models are refused."""
    base = files["flux_dev"]
    out = tmp_path / "zero.safetensors"
    r = cli("lora", "extract", base, base, "-r", "2", "-o", out)
    assert r.returncode == 1 and "no adapted weight differs" in r.stderr and not out.exists(), r.stderr
    sd = load_file(str(base))
    sd["double_blocks.0.img_attn.proj.weight"] = sd["double_blocks.0.img_attn.proj.weight"] + 0.01
    tuned = tmp_path / "tuned.safetensors"
    save_file(sd, str(tuned))
    rep = json_out(cli("lora", "extract", tuned, base, "-r", "2", "-o", out, "--json"))
    assert rep["family"] == "flux" and rep["planned"] == 304
    L = load(out)
    moved = "lora_unet_double_blocks_0_img_attn_proj"
    assert all(float(bake_delta(L, n).abs().max()) == 0 for n in module_names(L) if n != moved)
    assert float(bake_delta(L, moved).abs().max()) > 0
    info = json_out(cli("lora", "info", out, "--json"))
    assert info["family"] == "flux" and info["components"] == {"dit": 304}
    assert info["blocks"] == {f"double {i}": 10 for i in range(19)} | {f"single {i}": 3 for i in range(38)}
    meta = metadata(out)
    # kohya flux_extract_lora.py's metadata
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == "2" and meta["modelspec.architecture"] == "flux-1/lora"


def _all_in_one(path, files, seed_updates: dict | None = None):
    """A ComfyUI-style Flux all-in-one file: ``model.diffusion_model.`` + BFL keys, CLIP-L and T5 in
    ``text_encoders.clip_l`` / ``text_encoders.t5xxl`` (taken from the small SD3 sample)."""
    sd = {"model.diffusion_model." + k: v for k, v in load_file(str(files["flux_dev"])).items()}
    sd3 = make_model(path.parent / "sd3_for_te.safetensors", "sd3_medium")
    te = {k: v for k, v in load_file(str(sd3)).items()
          if k.startswith(("text_encoders.clip_l.", "text_encoders.t5xxl.")) and "embed" not in k and "shared" not in k}
    sd3.unlink()
    sd.update(te)
    for key, d in (seed_updates or {}).items():
        sd[key] = (sd[key].double() + d).to(sd[key].dtype)
    save_file(sd, str(path))
    return path


def test_flux_text_encoders_each_kept_only_when_moved(files, tmp_path):
    """CLIP-L (``lora_te1_``) and T5 (``lora_te3_``, kohya's ``T5Attention`` / ``T5DenseGatedActDense`` Linears) are
    extracted per text encoder when max|ΔW| > --min-diff: a fine-tune that moved CLIP-L only gets no T5 modules."""
    from ckptlab.arch.identify import identify
    from ckptlab.lora.extract import extract

    q = "text_encoders.clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight"
    wi = "text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wi_0.weight"
    base = _all_in_one(tmp_path / "base.safetensors", files)
    shapes = {k: v.shape for k, v in load(base).items()}
    if identify(base).family != "flux":
        pytest.skip("the all-in-one layout is not identified as Flux")
    g = torch.Generator().manual_seed(5)
    dq = torch.randn(shapes[q][0], 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, shapes[q][1], generator=g, dtype=torch.float64) * 0.05
    dwi = torch.randn(shapes[wi][0], 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, shapes[wi][1], generator=g, dtype=torch.float64) * 0.05
    clip_only = _all_in_one(tmp_path / "a.safetensors", files, {q: dq})
    res = extract(clip_only, base, tmp_path / "a_l.safetensors", rank=2)
    names = module_names(load(tmp_path / "a_l.safetensors"))
    te1 = {n for n in names if n.startswith("lora_te1_")}
    assert len(te1) == 12 * 6 and not any(n.startswith(("lora_te2_", "lora_te3_")) for n in names)
    assert res.text_encoders and any("te3" in w for w in res.warnings)
    name = "lora_te1_text_model_encoder_layers_2_self_attn_q_proj"
    assert torch.allclose(bake_delta(load(tmp_path / "a_l.safetensors"), name), dq, atol=2e-6)

    both = _all_in_one(tmp_path / "b.safetensors", files, {q: dq, wi: dwi})
    extract(both, base, tmp_path / "b_l.safetensors", rank=2)
    L = load(tmp_path / "b_l.safetensors")
    te3 = {n for n in module_names(L) if n.startswith("lora_te3_")}
    # 24 T5 blocks x (q, k, v, o, wi_0, wi_1, wo); never relative_attention_bias
    assert len(te3) == 24 * 7
    assert torch.allclose(bake_delta(L, "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0"), dwi, atol=2e-6)

    dit = "model.diffusion_model.double_blocks.0.img_attn.proj.weight"
    dit_only = _all_in_one(tmp_path / "c.safetensors", files, {dit: torch.full(shapes[dit], 0.01, dtype=torch.float64)})
    unet_only = extract(dit_only, base, tmp_path / "c_l.safetensors", rank=2)
    assert unet_only.text_encoders is False
    assert all(n.startswith("lora_unet_") for n in module_names(load(tmp_path / "c_l.safetensors")))


def test_sd3_extract_module_set_and_recovery(tmp_path):
    """SD3: kohya ``lora_sd3.py`` targets (the Linear children of each joint block's x_block / context_block; the
    last context block has only qkv and adaLN), fused qkv as one module; a low-rank ΔW is recovered."""
    from ckptlab.lora.extract import extract

    base = make_model(tmp_path / "base.safetensors", "sd3_medium")
    sd = load(base)
    key = "model.diffusion_model.joint_blocks.5.context_block.attn.qkv.weight"
    g = torch.Generator().manual_seed(2)
    d = torch.randn(sd[key].shape[0], 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, sd[key].shape[1], generator=g, dtype=torch.float64) * 0.05
    sd[key] = (sd[key].double() + d).float()
    tuned = tmp_path / "tuned.safetensors"
    save_file(sd, str(tuned))
    del sd
    out = tmp_path / "l.safetensors"
    res = extract(tuned, base, out, rank=3)
    L = load(out)
    names = module_names(L)
    # 24 joint blocks x (x_block 5 + context_block 5) - the last context block's proj, fc1, fc2
    assert len(names) == 24 * 10 - 3
    assert "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1" in names
    assert "lora_unet_joint_blocks_23_context_block_mlp_fc1" not in names
    assert not any("embedder" in n or "final_layer" in n for n in names)
    assert torch.allclose(bake_delta(L, "lora_unet_joint_blocks_5_context_block_attn_qkv"), d, atol=2e-6)
    assert res.family == "sd3" and res.text_encoders is False


def test_sd2_extract_leaves_out_the_unused_24th_text_encoder_layer(tmp_path):
    """kohya's (and diffusers') SD2 text encoder is the 23-layer penultimate model: resblocks.23 never reaches the
    UNet, so no module is extracted for it even when it changed."""
    from ckptlab.lora.extract import extract

    base = make_model(tmp_path / "base.safetensors", "sd2_checkpoint")
    sd = load(base)
    pre = "cond_stage_model.model.transformer.resblocks."
    sd[pre + "23.mlp.c_fc.weight"] = sd[pre + "23.mlp.c_fc.weight"] + 0.5
    sd[pre + "22.mlp.c_fc.weight"] = sd[pre + "22.mlp.c_fc.weight"] + 0.5
    tuned = tmp_path / "tuned.safetensors"
    save_file(sd, str(tuned))
    extract(tuned, base, tmp_path / "l.safetensors", rank=2)
    names = module_names(load(tmp_path / "l.safetensors"))
    assert "lora_te_text_model_encoder_layers_22_mlp_fc1" in names
    assert not any("_layers_23_" in n for n in names)
    # 23 layers x (q, k, v, out, fc1, fc2)
    assert sum(n.startswith("lora_te_") for n in names) == 23 * 6


def test_resize_flux_kohya_lora_error_is_the_discarded_singular_values(files, tmp_path):
    from ckptlab.lora.resize import resize

    src = files["flux_kohya_lora"]
    out = tmp_path / "r.safetensors"
    res = resize(src, out, rank=2)
    a, b = load(src), load(out)
    assert module_names(b) == module_names(a)
    for name in module_names(a):
        ref = bake_delta(a, name)
        s = torch.linalg.svdvals(ref)
        got = bake_delta(b, name)
        bound = float(torch.linalg.norm(s[2:]) / torch.linalg.norm(s))
        assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) == pytest.approx(bound, rel=1e-3, abs=1e-6)
        r_old = a[f"{name}.lora_down.weight"].shape[0]
        alpha_old = float(a[f"{name}.alpha"])
        assert float(b[f"{name}.alpha"]) == pytest.approx(alpha_old / r_old * 2)
    assert res.family == "flux"


def _xlabs_to_kohya(name: str) -> str:
    m = re.match(r"double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])$", name)
    side = "img" if m.group(3) == "1" else "txt"
    return f"lora_unet_double_blocks_{m.group(1)}_{side}_attn_{m.group(2)}"


def test_merge_flux_kohya_and_xlabs_is_the_weighted_sum(files, tmp_path):
    """kohya + XLabs (no α: scale 1) at 0.7 / −0.4: the XLabs modules meet kohya's fused ``qkv`` / ``proj`` modules
    and the merged ΔW is 0.7·ΔW_kohya − 0.4·ΔW_xlabs (XLabs names mapped by hand)."""
    from ckptlab.lora.combine import merge

    k, x = load(files["flux_kohya_lora"]), load(files["flux_xlabs_lora"])
    out = tmp_path / "m.safetensors"
    merge([files["flux_kohya_lora"], files["flux_xlabs_lora"]], out, strengths=[0.7, -0.4])
    M = load(out)
    assert module_names(M) == module_names(k)
    xl = {}
    for key in x:
        if key.endswith(".down.weight"):
            n = key[: -len(".down.weight")]
            xl[_xlabs_to_kohya(n)] = x[f"{n}.up.weight"].double() @ x[key].double()
    assert len(xl) == 19 * 4
    for name in module_names(k):
        want = 0.7 * bake_delta(k, name) - 0.4 * xl.get(name, 0)
        assert torch.allclose(bake_delta(M, name), want, atol=2e-6, rtol=0), name


def test_merge_flux_kohya_and_diffusers_bakes_like_both(files, tmp_path):
    """kohya (fused) + PEFT (split q/k/v) Flux LoRAs: the merged file bakes into flux_dev exactly like baking both
    inputs (bake itself is checked against diffusers above), and the merged module ΔW of a fused weight is the sum
    of the kohya module and the PEFT pieces at their rows (by hand: img q, k, v = rows 0:h, h:2h, 2h:3h)."""
    from ckptlab.lora.bake import bake
    from ckptlab.lora.combine import merge

    base = files["flux_dev"]
    out = tmp_path / "m.safetensors"
    merge([files["flux_kohya_lora"], files["flux_diffusers_lora"]], out, strengths=[0.7, -0.4])
    bake(base, [out], tmp_path / "a.safetensors")
    bake(base, [files["flux_kohya_lora"], files["flux_diffusers_lora"]], tmp_path / "b.safetensors",
         strengths=[0.7, -0.4])
    A, B = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    for key in B:
        assert torch.allclose(A[key], B[key], atol=2e-6, rtol=0), key
    base_sd = load(base)
    p = load(files["flux_diffusers_lora"])
    h = base_sd["double_blocks.0.img_attn.proj.weight"].shape[0]
    want = 0.7 * bake_delta(load(files["flux_kohya_lora"]), "lora_unet_double_blocks_4_img_attn_qkv")
    for j, m in enumerate(("to_q", "to_k", "to_v")):
        n = f"transformer.transformer_blocks.4.attn.{m}"
        want[j * h:(j + 1) * h] -= 0.4 * (p[f"{n}.lora_B.weight"].double() @ p[f"{n}.lora_A.weight"].double())
    key = "double_blocks.4.img_attn.qkv.weight"
    assert torch.allclose(A[key].double() - base_sd[key].double(), want, atol=2e-6, rtol=0)
    # the PEFT q/k/v/proj_mlp pieces keep their own names in the merged file (no kohya name of their own); converted
    # to kohya first (fused there), the merge is all kohya's 304 modules and bakes the same
    from ckptlab.lora.convert import convert

    pk = tmp_path / "pk.safetensors"
    convert(files["flux_diffusers_lora"], pk, to="kohya")
    out2 = tmp_path / "m2.safetensors"
    merge([files["flux_kohya_lora"], pk], out2, strengths=[0.7, -0.4])
    assert len(module_names(load(out2))) == 304 and all(n.startswith("lora_unet_") for n in module_names(load(out2)))
    bake(base, [out2], tmp_path / "c.safetensors")
    C = load(tmp_path / "c.safetensors")
    for key in B:
        assert torch.allclose(C[key], B[key], atol=2e-6, rtol=0), key


def test_scaled_fp8_flux_bake_and_extract_work_on_the_dequantised_weights(files, tmp_path):
    """ComfyUI scaled fp8 (``flux1-dev-fp8-scaled``): the model uses ``w_fp8 · scale_weight``. bake adds m·ΔW to that
    and stores it divided by the scale again (fp8 rounding: within one e4m3 step of the test's own quantisation);
    extract dequantises both models before the SVD."""
    from ckptlab.lora.bake import bake
    from ckptlab.lora.extract import extract

    base = make_model(tmp_path / "f8.safetensors", "flux_dev_fp8_scaled")
    lora = files["flux_kohya_lora"]
    out = tmp_path / "baked.safetensors"
    bake(base, [lora], out, strengths=[40.0])
    B, Out_, L = load(base), load(out), load(lora)
    for name in ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_5_linear1"):
        p = name[len("lora_unet_"):].replace("_img_attn_proj", ".img_attn.proj").replace("_linear1", ".linear1")
        p = re.sub(r"_(\d+)", r".\1", p, count=1)
        s = float(B[f"{p}.scale_weight"])
        assert Out_[f"{p}.weight"].dtype == torch.float8_e4m3fn and float(Out_[f"{p}.scale_weight"]) == s
        want = (B[f"{p}.weight"].double() * s + bake_delta(L, name, 40.0)) / s
        got = Out_[f"{p}.weight"].double()
        # e4m3 keeps 3 mantissa bits: one step is at most 2^-3 of the value (subnormals: 2^-9)
        assert bool(((got - want).abs() <= want.abs() * 2 ** -3 + 2 ** -9).all()), name
        err = float(torch.linalg.norm((got - B[f"{p}.weight"].double()) * s - bake_delta(L, name, 40.0))
                    / torch.linalg.norm(bake_delta(L, name, 40.0)))
        assert err < 0.1, (name, err)  # without the scale the baked ΔW would be off by 1 - scale
    ex = tmp_path / "ex.safetensors"
    extract(out, base, ex, rank=4)
    E = load(ex)
    name = "lora_unet_double_blocks_0_img_attn_proj"
    ref = bake_delta(L, name, 40.0)
    assert float(torch.linalg.norm(bake_delta(E, name) - ref) / torch.linalg.norm(ref)) < 0.1


def test_recipe_lora_step_bakes_scaled_fp8_like_the_command(files, tmp_path, cli):
    """A review found the recipe's lora step adding ΔW to the stored ``w / scale_weight`` (the LoRA landing at
    scale × its strength); the step and the command now share one per-key function."""
    base = make_model(tmp_path / "f8.safetensors", "flux_dev_fp8_scaled")
    lora = files["flux_kohya_lora"]
    cmd = tmp_path / "cmd.safetensors"
    r = cli("lora", "bake", base, lora, "-s", "40", "-o", cmd)
    assert r.returncode == 0, r.stderr
    rf = tmp_path / "r.toml"
    rf.write_text(f'version = 1\n[inputs.A]\npath = "{base}"\n[inputs.L]\npath = "{lora}"\n\n'
                  '[[steps]]\nname = "baked"\nmethod = "lora"\ninputs = ["A", "L"]\nstrengths = [40.0]\n')
    rec = tmp_path / "rec.safetensors"
    r = cli("merge", "--recipe", rf, "-o", rec)
    assert r.returncode == 0, r.stderr
    a, b = load(cmd), load(rec)
    changed = [k for k in a if not torch.equal(a[k], load(base)[k])]
    assert changed and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) if a[k].dtype ==
                           torch.float8_e4m3fn else torch.equal(a[k], b[k]) for k in a)
