"""lora merge: the merged LoRA loads (ΔW by the loaders' formula, computed here) as the exact weighted sum of the
inputs' ΔW, negative strengths included; --rank re-factors with the Eckart–Young error."""

from __future__ import annotations

import pytest
import torch
from fakes.sample_files import make_model, sha256
from svd_oracle import SD1, bake_delta, json_out, load, metadata, module_names, random_lora, write_lora

NAMES = list(SD1)


def _two(tmp_path):
    """Different ranks and alphas, one module only in the first, one only in the second."""
    a = random_lora(tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1, names=NAMES[:3])
    b = random_lora(tmp_path / "b.safetensors", rank=8, alpha=1.0, seed=2, names=NAMES[1:4])
    return a, b


def test_merge_is_the_exact_weighted_sum_with_negative_strengths(tmp_path, cli):
    a, b = _two(tmp_path)
    before = sha256(a), sha256(b)
    out = tmp_path / "m.safetensors"
    rep = json_out(cli("lora", "merge", a, b, "--strength", "0.7", "--strength", "-0.4", "-o", out, "--json"))
    A, B, M = load(a), load(b), load(out)
    assert module_names(M) == set(NAMES[:4])
    for name in NAMES[:4]:
        want = torch.zeros(32, 32, dtype=torch.float64)
        if name in module_names(A):
            want += bake_delta(A, name, 0.7)
        if name in module_names(B):
            want += bake_delta(B, name, -0.4)
        got = bake_delta(M, name)
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-6
    both = NAMES[1]
    assert M[f"{both}.lora_down.weight"].shape[0] == 12 and float(M[f"{both}.alpha"]) == 12.0
    assert rep["total_rel_error"] < 1e-6
    assert {m["how"] for m in rep["modules"]} == {"concat"}
    assert (sha256(a), sha256(b)) == before


def test_one_strength_applies_to_every_lora(tmp_path, cli):
    """``-s 0.5`` with two LoRAs weights both by 0.5 (as bake and recipes read one value)."""
    a, b = _two(tmp_path)
    out = tmp_path / "m.safetensors"
    r = cli("lora", "merge", a, b, "-s", "0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "2 LoRAs -> wrote" in r.stdout and "4 modules" in r.stdout, r.stdout
    A, B, M = load(a), load(b), load(out)
    for name in NAMES[:4]:
        want = torch.zeros(32, 32, dtype=torch.float64)
        if name in module_names(A):
            want += bake_delta(A, name, 0.5)
        if name in module_names(B):
            want += bake_delta(B, name, 0.5)
        got = bake_delta(M, name)
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-6


def test_one_lora_summary_is_singular(tmp_path, cli):
    a = random_lora(tmp_path / "a.safetensors", rank=4, alpha=3.0, seed=3, names=NAMES[:1])
    r = cli("lora", "merge", a, "-o", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 LoRA -> wrote") and ": 1 module (exact)" in r.stdout, r.stdout


def test_single_negative_strength_is_linear_not_kohyas_r_abs_r(tmp_path):
    from ckptlab.lora.combine import merge

    a = random_lora(tmp_path / "a.safetensors", rank=4, alpha=3.0, seed=3)
    merge([a], tmp_path / "m.safetensors", strengths=[-0.5])
    A, M = load(a), load(tmp_path / "m.safetensors")
    for name in module_names(A):
        ref = bake_delta(A, name)
        assert torch.allclose(bake_delta(M, name), -0.5 * ref, rtol=1e-5, atol=1e-7)  # kohya: -0.25


def test_rank_merge_error_is_the_discarded_singular_values(tmp_path, cli):
    a, b = _two(tmp_path)
    out = tmp_path / "m.safetensors"
    rep = json_out(cli("lora", "merge", a, b, "-s", "1,0.5", "--rank", "5", "-o", out, "--json"))
    A, B, M = load(a), load(b), load(out)
    num = den = 0.0
    for name in NAMES[:4]:
        want = torch.zeros(32, 32, dtype=torch.float64)
        if name in module_names(A):
            want += bake_delta(A, name, 1.0)
        if name in module_names(B):
            want += bake_delta(B, name, 0.5)
        s = torch.linalg.svdvals(want)
        expect = float(torch.linalg.norm(s[5:]) / torch.linalg.norm(s))
        got = bake_delta(M, name)
        err = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
        assert err == pytest.approx(expect, rel=1e-4, abs=1e-6)
        assert M[f"{name}.lora_down.weight"].shape[0] == min(5, 4 if name == NAMES[0] else 12)
        assert float(M[f"{name}.alpha"]) == M[f"{name}.lora_down.weight"].shape[0]
        num += float(torch.linalg.norm(got - want)) ** 2
        den += float(torch.linalg.norm(want)) ** 2
    assert rep["total_rel_error"] == pytest.approx((num / den) ** 0.5, rel=1e-4)
    assert metadata(out)["ss_network_module"] == "networks.lora"


def test_conv_layouts_and_cp_modules(tmp_path):
    from ckptlab.lora.combine import merge

    g = torch.Generator().manual_seed(7)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    a = write_lora(tmp_path / "a.safetensors", {
        conv: (torch.randn(32, 4, 1, 1, generator=g), torch.randn(4, 32, 3, 3, generator=g), 2.0),
        proj: (torch.randn(32, 4, 1, 1, generator=g), torch.randn(4, 32, 1, 1, generator=g), 4.0)})
    b = write_lora(tmp_path / "b.safetensors", {
        conv: (torch.randn(32, 2, 1, 1, generator=g), torch.randn(2, 32, 1, 1, generator=g), 2.0,
               torch.randn(2, 2, 3, 3, generator=g)),                        # CP (lora_mid)
        proj: (torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g), None)})  # 2-D, no α
    rep = merge([a, b], tmp_path / "m.safetensors", strengths=[0.5, 2.0])
    A, B, M = load(a), load(b), load(tmp_path / "m.safetensors")
    for name in (conv, proj):
        want = bake_delta(A, name, 0.5) + bake_delta(B, name, 2.0).reshape(bake_delta(A, name).shape)
        got = bake_delta(M, name)
        assert got.shape == want.shape
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    assert M[f"{conv}.lora_up.weight"].dim() == 4 and M[f"{conv}.lora_down.weight"].shape[1:] == (32, 3, 3)
    hows = {m["name"]: m["how"] for m in rep.modules}
    assert hows == {conv: "svd-exact", proj: "concat"}


def test_names_of_different_styles_meet(tmp_path):
    """A PEFT-named LoRA and a kohya one adapt the same layers: their modules merge into one kohya module."""
    from ckptlab.lora.combine import merge

    peft = make_model(tmp_path / "peft.safetensors", "sd1_peft_lora")
    kohya = make_model(tmp_path / "kohya.safetensors", "sd1_kohya_lora")
    rep = merge([peft, kohya], tmp_path / "m.safetensors")
    M = load(tmp_path / "m.safetensors")
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{q}.lora_down.weight" in M
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in M)
    assert next(m for m in rep.modules if m["name"] == q)["inputs"] == 2


def test_refusals(tmp_path, cli):
    import os
    import pickle
    import zipfile

    a = random_lora(tmp_path / "a.safetensors", rank=4, alpha=1.0, seed=0)
    xl = make_model(tmp_path / "xl.safetensors", "sdxl_kohya_lora")
    out = tmp_path / "o.safetensors"

    def one_line(r, code, words):
        assert r.returncode == code, r.stderr
        assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert words in r.stderr, r.stderr
        assert not out.exists()

    one_line(cli("lora", "merge", a, xl, "-o", out), 1, "different model families")
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    one_line(cli("lora", "merge", a, ckpt, "-o", out), 1, "not a LoRA")
    one_line(cli("lora", "merge", a, a, a, "-s", "1,2", "-o", out), 2,
             "2 strengths for 3 LoRAs: give one strength per LoRA, or one for all")
    for bad in ("nan", "inf", "1,-inf"):
        one_line(cli("lora", "merge", a, a, "-s", bad, "-o", out), 2, "strengths must be finite numbers")
    one_line(cli("lora", "merge", a, a, a, "-s", "nan,1", "-o", out), 2, "strengths must be finite numbers")
    one_line(cli("lora", "merge", a, a, "-s", "x", "-o", out), 2, "--strength")
    one_line(cli("lora", "merge", a, a, "--rank", "0", "-o", out), 2, "positive")
    one_line(cli("lora", "merge", a, a, "--precision", "fp8", "-o", out), 2,
             "--precision 'fp8': use one of fp16, bf16, fp32")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "p": Payload()}, protocol=2))
    one_line(cli("lora", "merge", a, evil, "-o", out), 4, "malicious")
    assert not (tmp_path / "pwned").exists()
    out.write_bytes(b"x")
    r = cli("lora", "merge", a, a, "-o", out)
    assert r.returncode == 1 and "already exists" in r.stderr and out.read_bytes() == b"x"
    out.unlink()
    one_line(cli("lora", "merge", a, tmp_path / "missing.safetensors", "-o", out), 1, "no such file")


def test_dry_run_writes_nothing(tmp_path, cli):
    a, b = _two(tmp_path)
    out = tmp_path / "m.safetensors"
    rep = json_out(cli("lora", "merge", a, b, "-o", out, "--dry-run", "--json"))
    assert not out.exists() and rep["dry_run"] is True and rep["planned"] == 4 and rep["output"] == str(out)
    assert rep["operation"] == "lora-merge"
