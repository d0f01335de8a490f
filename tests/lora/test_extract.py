"""lora extract: extract → bake (ΔW by the loaders' formula, in the test) recovers a known low-rank fine-tune;
the error of a full-rank ΔW is Eckart–Young's; the randomised SVD is within 1 % of the full one."""

from __future__ import annotations

import pytest
import torch
from fakes.sample_files import make_model, sha256
from safetensors.torch import save_file
from svd_oracle import SD1, SD1_CONV, bake_delta, json_out, kohya_new_rank, load, metadata, module_names


def _tuned(tmp_path, updates: dict, seed: int = 11, spec: str = "sd1_checkpoint"):
    """(base, tuned): tuned = base + the given ΔW per single-file key."""
    base = make_model(tmp_path / "base.safetensors", spec)
    sd = load(base)
    for key, d in updates.items():
        sd[key] = (sd[key].double() + d.reshape(sd[key].shape)).to(sd[key].dtype)
    tuned = tmp_path / "tuned.safetensors"
    save_file(sd, str(tuned))
    return base, tuned


def _low_rank(shape, k, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    out = shape[0]
    inner = 1
    for s in shape[1:]:
        inner *= s
    return (torch.randn(out, k, generator=g, dtype=torch.float64) @ torch.randn(k, inner, generator=g,
                                                                                  dtype=torch.float64)) * scale


def test_extract_then_bake_recovers_a_low_rank_fine_tune(tmp_path, cli):
    base = make_model(tmp_path / "base.safetensors", "sd1_checkpoint")
    shapes = {k: tuple(v.shape) for k, v in load(base).items()}
    names = {**SD1, **SD1_CONV}
    updates = {key: _low_rank(shapes[key], 3, i) for i, key in enumerate(names.values())}
    base, tuned = _tuned(tmp_path, updates)
    before = sha256(base), sha256(tuned)
    out = tmp_path / "lora.safetensors"
    rep = json_out(cli("lora", "extract", tuned, base, "--rank", "4", "--conv-rank", "4", "-o", out, "--json"))
    L = load(out)
    T, B = load(tuned), load(base)
    for name, key in names.items():
        baked = B[key].double() + bake_delta(L, name).reshape(B[key].shape)
        assert torch.allclose(baked, T[key].double(), atol=2e-6, rtol=0), name
    # every other module extracted a zero ΔW
    for name in module_names(L) - set(names):
        assert float(bake_delta(L, name).abs().max()) < 1e-6, name
    # kohya's conventions: α = rank, conv layout, dtype of the base
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert L[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert L[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert L["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert all(float(L[f"{n}.alpha"]) == 4.0 for n in module_names(L))
    assert L[f"{conv}.lora_up.weight"].dtype == torch.float32
    meta = metadata(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert '"conv_dim": "4"' in meta["ss_network_args"]
    assert rep["total_rel_error"] < 1e-5 and rep["text_encoders"] is True
    assert (sha256(base), sha256(tuned)) == before


def test_module_set_is_kohyas(tmp_path):
    """SD1 without conv: 192 UNet + 72 TE modules (kohya's counts, adapters.md §1.1); with conv also the
    resnets / samplers, never conv_in, conv_out, time_embed, norms."""
    from ckptlab.lora.extract import extract

    te_key = SD1["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    base, tuned = _tuned(tmp_path, {te_key: torch.full((32, 32), 0.02, dtype=torch.float64)})
    extract(tuned, base, tmp_path / "a.safetensors", rank=2)
    names = module_names(load(tmp_path / "a.safetensors"))
    assert sum(n.startswith("lora_unet_") for n in names) == 192
    assert sum(n.startswith("lora_te_") for n in names) == 72
    extract(tuned, base, tmp_path / "b.safetensors", rank=2, conv_rank=2)
    conv = module_names(load(tmp_path / "b.safetensors")) - names
    assert set(SD1_CONV) <= conv
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in conv
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in conv
    assert not any(s in n for n in conv for s in ("conv_in", "conv_out", "time_embedding", "norm"))


def test_error_is_eckart_young_for_a_full_rank_delta(tmp_path):
    from ckptlab.lora.extract import extract

    key = SD1["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"]
    g = torch.Generator().manual_seed(3)
    d = torch.randn(256, 32, generator=g, dtype=torch.float64) * 0.01
    base, tuned = _tuned(tmp_path, {key: d})
    rep = extract(tuned, base, tmp_path / "l.safetensors", rank=6)
    T, B, L = load(tuned), load(base), load(tmp_path / "l.safetensors")
    delta = T[key].double() - B[key].double()
    s = torch.linalg.svdvals(delta)
    bound = float(torch.linalg.norm(s[6:]) / torch.linalg.norm(s))
    name = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    got = float(torch.linalg.norm(bake_delta(L, name) - delta) / torch.linalg.norm(delta))
    assert got == pytest.approx(bound, rel=1e-4)
    mod = next(m for m in rep.modules if m["name"] == name)
    assert mod["rel_error"] == pytest.approx(bound, rel=1e-4) and mod["svd"] == "full"


def test_randomised_svd_is_within_one_percent_of_the_full_one():
    from ckptlab.lora import svd

    g = torch.Generator().manual_seed(0)
    m, n = 640, 1280
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=g))
    s = torch.arange(1, m + 1, dtype=torch.float32) ** -0.7
    cases = {"decaying": (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=g),
             "flat": torch.randn(m, n, generator=g)}
    for what, a in cases.items():
        sv = torch.linalg.svdvals(a.double())
        for rank in (4, 32, 64):
            assert svd.use_randomised((m, n), rank)
            uu, ss, vh, used = svd.top_svd(a, rank)
            assert used == "randomised" and uu.shape == (m, rank) and vh.shape == (rank, n)
            err = float(torch.linalg.norm(a - (uu * ss) @ vh) / torch.linalg.norm(a))
            best = float(torch.linalg.norm(sv[rank:]) / torch.linalg.norm(sv))
            assert best <= err * (1 + 1e-5) and err <= best * 1.01, (what, rank, err, best)
            again = svd.top_svd(a, rank)
            assert torch.equal(again[1], ss)  # seeded: same input, same output
    assert not svd.use_randomised((32, 32), 4)  # small: full
    assert not svd.use_randomised((320, 320), 64)  # rank near the side: full


def test_text_encoders_skipped_below_min_diff(tmp_path, cli):
    te_key = SD1["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    unet_key = SD1["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    base, tuned = _tuned(tmp_path, {te_key: torch.full((32, 32), 0.004, dtype=torch.float64),
                                    unet_key: _low_rank((32, 32), 2, 1)})
    r = cli("lora", "extract", tuned, base, "--rank", "2", "-o", tmp_path / "a.safetensors")
    assert r.returncode == 0 and "text encoders unchanged" in r.stderr
    assert not any(n.startswith("lora_te_") for n in module_names(load(tmp_path / "a.safetensors")))
    r = cli("lora", "extract", tuned, base, "--rank", "2", "--min-diff", "0.001", "-o", tmp_path / "b.safetensors")
    assert r.returncode == 0, r.stderr
    L = load(tmp_path / "b.safetensors")
    d = bake_delta(L, "lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert torch.allclose(d, torch.full((32, 32), 0.004, dtype=torch.float64), atol=1e-6)


def test_dynamic_rank_and_clamp(tmp_path):
    from ckptlab.lora.extract import extract

    name = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    key = SD1[name]
    g = torch.Generator().manual_seed(4)
    qu, _ = torch.linalg.qr(torch.randn(256, 32, generator=g, dtype=torch.float64))
    qv, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    d = (qu * (0.6 ** torch.arange(32, dtype=torch.float64))) @ qv.T * 0.05
    base, tuned = _tuned(tmp_path, {key: d})
    T, B = load(tuned), load(base)
    delta = (T[key].float() - B[key].float())
    extract(tuned, base, tmp_path / "a.safetensors", rank=16, sv_fro=0.95)
    L = load(tmp_path / "a.safetensors")
    want = kohya_new_rank(torch.linalg.svdvals(delta), 16, "sv_fro", 0.95)
    assert 1 < want < 16 and L[f"{name}.lora_down.weight"].shape[0] == want
    assert float(L[f"{name}.alpha"]) == want
    assert metadata(tmp_path / "a.safetensors")["ss_network_dim"] == "Dynamic"

    extract(tuned, base, tmp_path / "c.safetensors", rank=4, clamp_quantile=0.9)
    C = load(tmp_path / "c.safetensors")
    extract(tuned, base, tmp_path / "n.safetensors", rank=4)
    N = load(tmp_path / "n.safetensors")
    up, down = N[f"{name}.lora_up.weight"], N[f"{name}.lora_down.weight"]
    q = float(torch.quantile(torch.cat([up.flatten(), down.flatten()]).double(), 0.9))
    assert torch.allclose(C[f"{name}.lora_up.weight"], up.clamp(-q, q), atol=1e-7)
    assert torch.allclose(C[f"{name}.lora_down.weight"], down.clamp(-q, q), atol=1e-7)


def test_dtype_of_the_base_unless_asked(tmp_path, cli):
    base = make_model(tmp_path / "base.safetensors", "sd1_checkpoint", dtype="F16")
    sd = load(base)
    key = SD1["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    sd[key] = sd[key] + 0.1
    save_file(sd, str(tmp_path / "t.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert cli("lora", "extract", tmp_path / "t.safetensors", base, "-r", "2", "-o", tmp_path / "a.safetensors").returncode == 0
    assert load(tmp_path / "a.safetensors")[f"{name}.lora_up.weight"].dtype == torch.float16
    assert cli("lora", "extract", tmp_path / "t.safetensors", base, "-r", "2", "--precision", "fp32",
               "-o", tmp_path / "b.safetensors").returncode == 0
    assert load(tmp_path / "b.safetensors")[f"{name}.lora_up.weight"].dtype == torch.float32


def test_refusals(tmp_path, cli):
    import os
    import pickle
    import zipfile

    sd1 = make_model(tmp_path / "sd1.safetensors", "sd1_checkpoint")
    sd2 = make_model(tmp_path / "sd2.safetensors", "sd2_checkpoint")
    lora = make_model(tmp_path / "l.safetensors", "sd1_kohya_lora")
    out = tmp_path / "o.safetensors"

    def one_line(r, code, words):
        assert r.returncode == code, r.stderr
        assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert words in r.stderr, r.stderr
        assert not out.exists()

    one_line(cli("lora", "extract", sd2, sd1, "-r", "4", "-o", out), 1, "one family")
    one_line(cli("lora", "extract", lora, sd1, "-r", "4", "-o", out), 1, "is a LoRA")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "0", "-o", out), 2, "positive")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "4", "--sv-fro", "0", "-o", out), 2, "(0, 1]")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "4", "--sv-fro", "1.01", "-o", out), 2, "(0, 1]")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "4", "--sv-fro", "0.5", "--sv-ratio", "2", "-o", out), 2,
             "one of")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "4", "--clamp-quantile", "2", "-o", out), 2, "quantile")
    one_line(cli("lora", "extract", sd1, sd1, "-r", "4", "--precision", "fp8", "-o", out), 2,
             "--precision 'fp8': use one of fp16, bf16, fp32")
    # identical models: an all-zero LoRA is useless, refused (dry run included) instead of written silently
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(sd1.read_bytes())
    for extra in ([], ["--dry-run"], ["--sv-fro", "0.9"]):
        one_line(cli("lora", "extract", copy, sd1, "-r", "4", *extra, "-o", out), 1,
                 "no adapted weight differs between the two models")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "p": Payload()}, protocol=2))
    one_line(cli("lora", "extract", evil, sd1, "-r", "4", "-o", out), 4, "malicious")
    assert not (tmp_path / "pwned").exists()
    out.write_bytes(b"x")
    r = cli("lora", "extract", sd1, sd1, "-r", "4", "-o", out)
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_bytes() == b"x"


def test_json_names_operation_and_planned_output(tmp_path, cli):
    key = SD1["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    base, tuned = _tuned(tmp_path, {key: _low_rank((32, 32), 2, seed=5)})
    out = tmp_path / "o.safetensors"
    rep = json_out(cli("lora", "extract", tuned, base, "-r", "2", "-o", out, "--dry-run", "--json"))
    assert rep["operation"] == "lora-extract" and rep["output"] == str(out) and not out.exists()
    rep = json_out(cli("lora", "extract", tuned, base, "-r", "2", "-o", out, "--json"))
    assert rep["operation"] == metadata(out)["ckptlab.operation"] == "lora-extract"


def test_sd2_fused_qkv_rows_become_separate_modules(tmp_path):
    """OpenCLIP's in_proj_weight holds q, k, v: each row block is its own kohya module (adapters.md §2.2)."""
    from ckptlab.lora.extract import extract

    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    base = make_model(tmp_path / "base.safetensors", "sd2_checkpoint")
    d_model = load(base)[key].shape[1]
    upd = torch.zeros(3 * d_model, d_model, dtype=torch.float64)
    upd[d_model:2 * d_model] = _low_rank((d_model, d_model), 2, 9, scale=0.1)  # k rows only
    base, tuned = _tuned(tmp_path, {key: upd}, spec="sd2_checkpoint")
    extract(tuned, base, tmp_path / "l.safetensors", rank=2)
    L = load(tmp_path / "l.safetensors")
    pre = "lora_te_text_model_encoder_layers_0_self_attn_"
    got = {p: bake_delta(L, pre + p + "_proj") for p in "qkv"}
    assert torch.allclose(got["k"], upd[d_model:2 * d_model], atol=1e-6)
    assert float(got["q"].abs().max()) < 1e-6 and float(got["v"].abs().max()) < 1e-6
