"""lora resize: kohya resize_lora semantics checked against the loaders' ΔW formula and kohya's rank rules
(transcribed in svd_oracle, computed from the spectrum of up @ down in the test)."""

from __future__ import annotations

import pytest
import torch
from fakes.sample_files import make_model, sha256
from svd_oracle import (
    SD1,
    SD1_META,
    bake_delta,
    json_out,
    kohya_new_rank,
    load,
    metadata,
    random_lora,
    write_lora,
)

NAMES = list(SD1)[:4]


def _unscaled(sd, name):
    up = sd[f"{name}.lora_up.weight"].double()
    down = sd[f"{name}.lora_down.weight"].double()
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def test_resize_8_to_8_reproduces_delta_and_keeps_alpha_over_rank(tmp_path, cli):
    src = random_lora(tmp_path / "in.safetensors", rank=8, alpha=4.0, seed=1)
    before = sha256(src)
    r = cli("lora", "resize", src, "--rank", "8", "-o", tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    a, b = load(src), load(tmp_path / "out.safetensors")
    for name in NAMES:
        ref = bake_delta(a, name)
        got = bake_delta(b, name)
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-5
        assert b[f"{name}.lora_down.weight"].shape[0] == 8
        assert float(b[f"{name}.alpha"]) == 4.0
    assert sha256(src) == before


def test_resize_down_error_is_the_discarded_singular_values(tmp_path, cli):
    src = random_lora(tmp_path / "in.safetensors", rank=8, alpha=4.0, seed=2)
    r = cli("lora", "resize", src, "--rank", "3", "-o", tmp_path / "out.safetensors", "--json")
    rep = json_out(r)
    a, b = load(src), load(tmp_path / "out.safetensors")
    for name in NAMES:
        s = torch.linalg.svdvals(_unscaled(a, name))
        want = float(torch.linalg.norm(s[3:]) / torch.linalg.norm(s))
        ref = bake_delta(a, name)
        err = float(torch.linalg.norm(bake_delta(b, name) - ref) / torch.linalg.norm(ref))
        assert err == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert float(b[f"{name}.alpha"]) == pytest.approx(0.5 * 3)  # α/r = 4/8 kept
        mod = next(m for m in rep["modules"] if m["name"] == name)
        assert mod["new_rank"] == 3 and mod["old_rank"] == 8
        assert mod["fro_retained"] == pytest.approx(float(torch.linalg.norm(s[:3]) / torch.linalg.norm(s)), rel=1e-5)
        assert mod["sum_retained"] == pytest.approx(float(s[:3].sum() / s.sum()), rel=1e-5)
    meta = metadata(tmp_path / "out.safetensors")
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 3"
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "1.5"


def _decaying_lora(path, seed, rank=8, dim=48):
    """Modules with different, well separated spectra (so each rule has a clear answer)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, name in enumerate(NAMES):
        qu, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
        qd, _ = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))
        s = torch.tensor([0.55 ** (j * (i + 1) / 2) for j in range(rank)], dtype=torch.float64) * 3
        mods[name] = ((qu * s).float(), qd.T.float(), 2.0)
    return write_lora(path, mods)


@pytest.mark.parametrize("method,param,cap", [("sv_fro", 0.9, 8), ("sv_fro", 0.99, 5), ("sv_ratio", 4.0, 8),
                                              ("sv_cumulative", 0.8, 8), ("sv_cumulative", 0.95, 3)])
def test_dynamic_rank_is_kohyas_rule(tmp_path, cli, method, param, cap):
    src = _decaying_lora(tmp_path / "in.safetensors", seed=3)
    r = cli("lora", "resize", src, f"--{method.replace('_', '-')}", str(param), "--rank", str(cap),
            "-o", tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    a, b = load(src), load(tmp_path / "out.safetensors")
    picked = set()
    for name in NAMES:
        s_full = torch.linalg.svdvals(_unscaled(a, name).float())  # kohya: full SVD of the product
        want = kohya_new_rank(s_full, cap, method, param)
        got = b[f"{name}.lora_down.weight"].shape[0]
        assert got == want, (name, got, want)
        assert float(b[f"{name}.alpha"]) == pytest.approx(2.0 / 8 * want)
        picked.add(got)
    assert len(picked) > 1 or cap <= 3  # the spectra differ, so do the ranks (unless all hit the cap)
    meta = metadata(tmp_path / "out.safetensors")
    if len(picked) > 1:
        assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    else:  # every module kept the same rank: the real values (kohya's rule: Dynamic only when modules differ)
        (k,) = picked
        assert meta["ss_network_dim"] == str(k) and float(meta["ss_network_alpha"]) == 2.0 / 8 * k
    assert meta["ss_training_comment"] == (f"Dynamically resized linear dims with {method}: {param:g} from 8"
                                           f"(Dynamically resized conv dims with {method}: {param:g})")


def test_dynamic_resize_where_all_modules_agree_writes_the_common_rank(tmp_path, cli):
    """--sv-fro 1 keeps the full spectrum, capped at 2 for every module: dim 2 and α 1/4·2, not "Dynamic", and
    ``lora info`` sees no disagreement; an existing comment is kept after "; "."""
    src = random_lora(tmp_path / "in.safetensors", rank=4, alpha=1.0, seed=0,
                      metadata={**SD1_META, "ss_training_comment": "trained on cats"})
    r = cli("lora", "resize", src, "--sv-fro", "1", "--rank", "2", "-o", tmp_path / "out.safetensors")
    assert r.returncode == 0, r.stderr
    meta = metadata(tmp_path / "out.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "0.5")
    assert meta["ss_training_comment"] == ("Dynamically resized linear dims with sv_fro: 1 from 4(Dynamically "
                                           "resized conv dims with sv_fro: 1); trained on cats")
    info = cli("lora", "info", tmp_path / "out.safetensors")
    said = info.stdout + info.stderr
    assert info.returncode == 0 and "ss_network_dim says" not in said and "ss_network_alpha says" not in said, said


def test_fixed_resize_comment_has_no_dangling_separator(tmp_path):
    from ckptlab.lora.resize import resize

    src = random_lora(tmp_path / "in.safetensors", rank=4, alpha=4.0, seed=0)
    rep = resize(src, tmp_path / "out.safetensors", rank=2)
    meta = metadata(tmp_path / "out.safetensors")
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 2"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "2")
    assert meta["ckptlab.operation"] == rep.operation == "lora-resize"


def test_dry_run_json_names_the_planned_output(tmp_path, cli):
    src = random_lora(tmp_path / "in.safetensors", rank=4, alpha=1.0, seed=0)
    out = tmp_path / "out.safetensors"
    rep = json_out(cli("lora", "resize", src, "--rank", "2", "-o", out, "--dry-run", "--json"))
    assert rep["operation"] == "lora-resize" and rep["output"] == str(out) and not out.exists()


def test_glora_is_refused_in_resize_words(tmp_path, cli):
    glora = make_model(tmp_path / "glora.safetensors", "sd1_glora")
    r = cli("lora", "resize", glora, "--rank", "2", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "GLoRA modules cannot be re-factored" in r.stderr and "baked" not in r.stderr, r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_zero_module_gets_rank_one(tmp_path):
    from ckptlab.lora.resize import resize

    name = NAMES[0]
    src = write_lora(tmp_path / "in.safetensors", {name: (torch.zeros(32, 4), torch.zeros(4, 32), 4.0),
                                                  NAMES[1]: (torch.randn(32, 4), torch.randn(4, 32), 4.0)})
    resize(src, tmp_path / "out.safetensors", sv_fro=0.9, rank=4)
    b = load(tmp_path / "out.safetensors")
    assert b[f"{name}.lora_down.weight"].shape[0] == 1
    assert float(bake_delta(b, name).abs().max()) == 0.0


def test_conv_locon_and_cp_modules(tmp_path):
    """A 3×3 LoCon keeps kohya's conv layout; a CP (lora_mid) module is re-factored to plain LoRA with the same
    ΔW (einsum oracle) and reported."""
    from ckptlab.lora.resize import resize

    g = torch.Generator().manual_seed(5)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    cp = "lora_unet_down_blocks_0_resnets_0_conv2"
    mods = {conv: (torch.randn(32, 4, 1, 1, generator=g), torch.randn(4, 32, 3, 3, generator=g), 2.0),
            cp: (torch.randn(32, 4, 1, 1, generator=g), torch.randn(4, 32, 1, 1, generator=g), 4.0,
                 torch.randn(4, 4, 3, 3, generator=g))}
    src = write_lora(tmp_path / "in.safetensors", mods)
    rep = resize(src, tmp_path / "out.safetensors", rank=4)
    a, b = load(src), load(tmp_path / "out.safetensors")
    for name in (conv, cp):
        ref = bake_delta(a, name)
        got = bake_delta(b, name)
        assert got.shape == ref.shape == (32, 32, 3, 3)
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 1e-5
        assert b[f"{name}.lora_up.weight"].shape == (32, 4, 1, 1)
        assert b[f"{name}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert f"{cp}.lora_mid.weight" not in b
    assert float(b[f"{cp}.alpha"]) == 4.0  # re-factored: scale folded in, α = new rank
    assert [m["name"] for m in rep.modules if m.get("refactored")] == [cp]
    assert any("re-factored" in w for w in rep.warnings)


def test_dtype_follows_input_unless_asked(tmp_path, cli):
    src = write_lora(tmp_path / "in.safetensors", {n: (torch.randn(32, 4), torch.randn(4, 32), 2.0) for n in NAMES},
                     dtype=torch.float16)
    assert cli("lora", "resize", src, "--rank", "2", "-o", tmp_path / "a.safetensors").returncode == 0
    assert load(tmp_path / "a.safetensors")[f"{NAMES[0]}.lora_up.weight"].dtype == torch.float16
    assert cli("lora", "resize", src, "--rank", "2", "--precision", "bf16", "-o", tmp_path / "b.safetensors").returncode == 0
    assert load(tmp_path / "b.safetensors")[f"{NAMES[0]}.lora_up.weight"].dtype == torch.bfloat16


def test_peft_input_comes_out_in_kohya_naming(tmp_path):
    from ckptlab.lora.resize import resize

    src = make_model(tmp_path / "peft.safetensors", "sd1_peft_lora")
    rep = resize(src, tmp_path / "out.safetensors", rank=64)
    out = load(tmp_path / "out.safetensors")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in out
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in out)
    assert all(m["fro_retained"] == pytest.approx(1.0) for m in rep.modules)


@pytest.mark.parametrize("args,code,words", [
    ([], 2, "give --rank"),
    (["--rank", "0"], 2, "positive"),
    (["--sv-fro", "0"], 2, "(0, 1]"),
    (["--sv-fro", "1.5"], 2, "(0, 1]"),
    (["--sv-cumulative", "-1"], 2, "(0, 1]"),
    (["--sv-ratio", "0.5"], 2, "≥ 1"),
    (["--sv-fro", "0.5", "--sv-ratio", "2"], 2, "one of"),
    (["--rank", "2", "--precision", "int8"], 2, "--precision 'int8': use one of fp16, bf16, fp32"),
])
def test_bad_options_are_usage_errors(tmp_path, cli, args, code, words):
    src = random_lora(tmp_path / "in.safetensors", rank=4, alpha=1.0, seed=0)
    r = cli("lora", "resize", src, *args, "-o", tmp_path / "out.safetensors")
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("ckptlab: error:") and words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_refusals(tmp_path, cli):
    import os
    import pickle
    import zipfile

    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    r = cli("lora", "resize", ckpt, "--rank", "2", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "not a LoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "p": Payload()}, protocol=2))
    r = cli("lora", "resize", evil, "--rank", "2", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 4 and "malicious" in r.stderr and not (tmp_path / "pwned").exists()

    src = random_lora(tmp_path / "in.safetensors", rank=4, alpha=1.0, seed=0)
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    r = cli("lora", "resize", src, "--rank", "2", "-o", tmp_path / "exists.safetensors")
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (tmp_path / "exists.safetensors").read_bytes() == b"x"

    dora = make_model(tmp_path / "dora.safetensors", "sd1_dora")
    r = cli("lora", "resize", dora, "--rank", "2", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 1 and "DoRA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_a_lora_b_bias_is_refused_not_dropped(tmp_path):
    from safetensors.torch import save_file

    from ckptlab.errors import MismatchError
    from ckptlab.lora.resize import resize

    name = NAMES[0]
    sd = {f"{name}.lora_down.weight": torch.randn(4, 32), f"{name}.lora_up.weight": torch.randn(32, 4),
          f"{name}.lora_B.bias": torch.randn(32)}
    save_file(sd, str(tmp_path / "b.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(MismatchError, match="bias"):
        resize(tmp_path / "b.safetensors", tmp_path / "o.safetensors", rank=2)
    assert not (tmp_path / "o.safetensors").exists()
