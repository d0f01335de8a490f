"""``ckptlab lora convert``: bit-exact round trips between the naming styles, exact ΔW through fused ↔ split,
PEFT alphas as diffusers/PEFT read them, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from fakes.sample_files import make_model
from safetensors import safe_open
from safetensors.torch import save_file

from ckptlab.errors import CkptlabError, MismatchError, OutputError, UsageError
from ckptlab.lora.convert import convert
from ckptlab.lora.file import LoraFile
from ckptlab.lora.naming import reference_targets


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].reshape(-1).view(torch.uint8).numpy().tobytes() == b[k].reshape(-1).view(torch.uint8).numpy().tobytes(), k


def _delta(t: dict[str, torch.Tensor], down: str, up: str, alpha: float | None) -> torch.Tensor:
    """ΔW = α/r · up @ down in float64, written here independently of ckptlab."""
    d, u = t[down].double(), t[up].double()
    r = d.shape[0]
    s = 1.0 if alpha is None else alpha / r
    return s * (u.reshape(u.shape[0], -1) @ d.reshape(r, -1))


@pytest.mark.parametrize("spec", ["sd1_kohya_lora", "sd2_kohya_lora", "sdxl_kohya_lora", "flux_kohya_lora"])
@pytest.mark.parametrize("via", ["peft", "diffusers", "comfy"])
def test_kohya_round_trips_are_bit_exact(tmp_path, spec, via):
    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    mid, back = tmp_path / f"mid.{via}.safetensors", tmp_path / "back.safetensors"
    convert(src, mid, to=via)
    res = convert(mid, back, to="kohya")
    _same(_tensors(src), _tensors(back))
    assert res.modules_out == res.modules_in or via in ("peft", "diffusers")
    meta = _meta(back)
    assert meta["ss_base_model_version"] == _meta(src)["ss_base_model_version"]
    assert meta["ckptlab.operation"] == "lora-convert"


def test_peft_round_trip_with_adapter_metadata_is_bit_exact(tmp_path):
    """A diffusers-written PEFT file (alphas only in ``lora_adapter_metadata``, prefixed ``unet.``): peft → kohya →
    peft keeps every tensor and every alpha; kohya gets alpha tensors with the metadata's values."""
    src = make_model(tmp_path / "p.safetensors", "sd1_peft_lora")
    t = _tensors(src)
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in t})
    special = [m for m in mods if m.startswith("unet.")][3].split(".", 1)[1]
    cfg = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {special: 2},
           "unet.rank_pattern": {}, "unet.target_modules": ["to_q", "to_k"]}
    if any(m.startswith("text_encoder.") for m in mods):
        cfg.update({"text_encoder.r": 4, "text_encoder.lora_alpha": 1})
    peft = tmp_path / "peft.safetensors"
    save_file(t, str(peft), metadata={"lora_adapter_metadata": json.dumps(cfg), "format": "pt"})
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    convert(peft, kohya, to="kohya", family="sd1")
    kt = _tensors(kohya)
    table = reference_targets("sd1")
    for m in mods:
        alpha = kt[table.lookup(m).name("kohya") + ".alpha"].item()
        want = 2 if m == "unet." + special else (8 if m.startswith("unet.") else 1)
        assert alpha == want, m
    convert(kohya, back, to="peft")
    _same(t, _tensors(back))
    with LoraFile.open(peft) as a, LoraFile.open(back) as b:
        for m in mods:
            assert a.alpha(a.modules[m]) == b.alpha(b.modules[m]), m


@pytest.mark.parametrize(("spec", "family"), [("sd1_kohya_lora", "sd1"), ("sd2_kohya_lora", "sd2"),
                                              ("sdxl_kohya_lora", "sdxl"), ("flux_kohya_lora", "flux"),
                                              ("flux_diffusers_lora", "flux")])
def test_peft_round_trips_are_bit_exact(tmp_path, spec, family):
    """peft → kohya → peft: a PEFT file (made from the kohya samples, or diffusers' Flux sample with independent
    q/k/v downs: fused block-diagonal, then split back by its blocks) comes back bit for bit, same scales."""
    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    peft = src
    if not spec.endswith("diffusers_lora"):
        peft = tmp_path / "peft.safetensors"
        convert(src, peft, to="peft")
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    convert(peft, kohya, to="kohya", family=family)
    convert(kohya, back, to="peft")
    _same(_tensors(peft), _tensors(back))
    with LoraFile.open(peft) as a, LoraFile.open(back) as b:
        assert set(a.modules) == set(b.modules)
        for name, mod in a.modules.items():
            assert a.scale(mod) == b.scale(b.modules[name]), name
            if a.alpha(mod) is not None:
                assert a.alpha(mod) == b.alpha(b.modules[name]), name


def test_peft_metadata_is_what_peft_reads(tmp_path):
    """The ``lora_adapter_metadata`` we write, unpacked per component the way diffusers does and resolved with
    PEFT's own ``get_pattern_key``, gives every module the alpha of the kohya input."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    src = make_model(tmp_path / "k.safetensors", "sd1_kohya_lora")
    t = _tensors(src)
    # give a few modules other alphas and ranks' worth of variety
    alphas = [k for k in t if k.endswith(".alpha")]
    for i, k in enumerate(alphas[:5]):
        t[k] = torch.tensor(float(i + 1))
    mixed = tmp_path / "mixed.safetensors"
    save_file(t, str(mixed), metadata=_meta(src))
    out = tmp_path / "out.safetensors"
    convert(mixed, out, to="peft")
    cfg = json.loads(_meta(out)["lora_adapter_metadata"])
    table = reference_targets("sd1")
    for k in alphas:
        name = k[: -len(".alpha")]
        peft_name = table.lookup(name).name("peft")
        comp, inner = peft_name.split(".", 1)
        sub = {kk[len(comp) + 1:]: v for kk, v in cfg.items() if kk.startswith(comp + ".")}
        conf = LoraConfig(r=sub["r"], lora_alpha=sub["lora_alpha"], alpha_pattern=sub["alpha_pattern"],
                          rank_pattern=sub["rank_pattern"], target_modules=sub["target_modules"])
        key = get_pattern_key(conf.alpha_pattern.keys(), inner) if conf.alpha_pattern else inner
        alpha = conf.alpha_pattern.get(key, conf.lora_alpha)
        assert alpha == t[k].item(), name


def test_flux_fused_to_split_delta_is_exact(tmp_path):
    """kohya fused ``qkv`` / ``linear1`` → diffusers split q/k/v(/mlp): each part's ΔW is exactly the fused ΔW's rows."""
    src = make_model(tmp_path / "f.safetensors", "flux_kohya_lora")
    out = tmp_path / "d.safetensors"
    res = convert(src, out, to="diffusers")
    assert res.split == 76
    a, b = _tensors(src), _tensors(out)
    table = reference_targets("flux")
    n = 0
    for k in a:
        if not k.endswith(".lora_down.weight"):
            continue
        m = k[: -len(".lora_down.weight")]
        whole = _delta(a, k, m + ".lora_up.weight", a[m + ".alpha"].item())
        t = table.lookup(m)
        parts = [p for p in table.targets if p.key == t.key and p.rows is not None] or [t]
        rows_total = whole.shape[0]
        for p in parts:
            name = p.name("diffusers")
            d = _delta(b, name + ".lora.down.weight", name + ".lora.up.weight", b[name + ".alpha"].item())
            r0, r1 = (0, rows_total) if p.rows is None else (p.rows[0] * rows_total // t.shape[0],
                                                             p.rows[1] * rows_total // t.shape[0])
            assert torch.equal(d, whole[r0:r1]), name
            n += 1
    assert n == res.modules_out


def test_flux_split_to_fused_delta_is_exact_and_rank_grows(tmp_path):
    """diffusers split q/k/v (independent downs) → kohya fused: downs concatenated, ups block-diagonal; ΔW of the
    fused module equals the parts' ΔWs stacked (float64, same values)."""
    src = make_model(tmp_path / "f.safetensors", "flux_diffusers_lora")
    out = tmp_path / "k.safetensors"
    res = convert(src, out, to="kohya")
    assert res.fused == 76
    a, b = _tensors(src), _tensors(out)
    table = reference_targets("flux")
    expect: dict[str, torch.Tensor] = {}
    for k in a:
        if not k.endswith(".lora_A.weight"):
            continue
        m = k[: -len(".lora_A.weight")]
        t = table.lookup(m)
        whole = table.lookup(next(p.name("kohya") for p in table.targets if p.key == t.key and p.rows is None))
        d = _delta(a, k, m + ".lora_B.weight", None)
        kname = whole.name("kohya")
        if t.rows is None:
            expect[kname] = d
            continue
        width = b[kname + ".lora_up.weight"].shape[0]
        r0, r1 = t.rows[0] * width // whole.shape[0], t.rows[1] * width // whole.shape[0]
        full = expect.setdefault(kname, torch.zeros(width, d.shape[1], dtype=torch.float64))
        full[r0:r1] = d
    for kname, want in expect.items():
        got = _delta(b, kname + ".lora_down.weight", kname + ".lora_up.weight", b[kname + ".alpha"].item())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        if kname.endswith("_qkv"):
            assert b[kname + ".lora_down.weight"].shape[0] == 3 * a[next(iter(a))].shape[0]  # rank grows 3×


def test_split_to_fused_with_different_alphas_folds_the_scales(tmp_path):
    """Parts with different α/r: each up is multiplied by its scale and α = R (ΔW equal to fp32 rounding)."""
    i, o, r = 16, 16, 2
    g = torch.Generator().manual_seed(1)
    t, alphas = {}, {"to_q": 1.0, "to_k": 2.0, "to_v": 4.0}
    for p in alphas:
        m = f"transformer.transformer_blocks.0.attn.{p}"
        t[m + ".lora_A.weight"] = torch.randn(r, i, generator=g)
        t[m + ".lora_B.weight"] = torch.randn(o, r, generator=g)
    cfg = {"transformer.r": r, "transformer.lora_alpha": 1.0,
           "transformer.alpha_pattern": {f"transformer_blocks.0.attn.{p}": a for p, a in alphas.items()}}
    src = tmp_path / "s.safetensors"
    save_file(t, str(src), metadata={"lora_adapter_metadata": json.dumps(cfg)})
    out = tmp_path / "k.safetensors"
    convert(src, out, to="kohya", family="flux")
    b = _tensors(out)
    k = "lora_unet_double_blocks_0_img_attn_qkv"
    got = _delta(b, k + ".lora_down.weight", k + ".lora_up.weight", b[k + ".alpha"].item())
    want = torch.cat([_delta(t, f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight",
                             f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight", a)
                      for p, a in alphas.items()])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert b[k + ".lora_down.weight"].shape == (3 * r, i)


def test_dora_magnitude_shapes_between_styles(tmp_path):
    src = make_model(tmp_path / "d.safetensors", "sd1_dora")
    peft, back = tmp_path / "p.safetensors", tmp_path / "b.safetensors"
    convert(src, peft, to="peft", family="sd1")
    a, p = _tensors(src), _tensors(peft)
    table = reference_targets("sd1")
    mags = [k for k in a if k.endswith(".dora_scale")]
    assert mags
    for k in mags:
        m = table.lookup(k[: -len(".dora_scale")]).name("peft")
        v = p[m + ".lora_magnitude_vector"]
        assert v.ndim == 1 and torch.equal(v, a[k].reshape(-1))
    assert json.loads(_meta(peft)["lora_adapter_metadata"])["unet.use_dora"] is True
    convert(peft, back, to="kohya", family="sd1")
    _same(a, _tensors(back))


def test_lycoris_converts_between_kohya_and_comfy_only(tmp_path):
    src = make_model(tmp_path / "h.safetensors", "sd1_loha")
    comfy, back = tmp_path / "c.safetensors", tmp_path / "b.safetensors"
    convert(src, comfy, to="comfy")
    assert any(k.startswith("diffusion_model.") and k.endswith(".hada_w1_a") for k in _tensors(comfy))
    convert(comfy, back, to="kohya")
    _same(_tensors(src), _tensors(back))
    with pytest.raises(MismatchError, match="LyCORIS"):
        convert(src, tmp_path / "p.safetensors", to="peft")
    assert not (tmp_path / "p.safetensors").exists()


def test_refusals(tmp_path):
    src = make_model(tmp_path / "k.safetensors", "sd1_kohya_lora")
    with pytest.raises(OutputError, match="input"):
        convert(src, src, to="peft")
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match="exists"):
        convert(src, tmp_path / "exists.safetensors", to="peft")
    assert (tmp_path / "exists.safetensors").read_bytes() == b"x"
    with pytest.raises(UsageError, match="naming style"):
        convert(src, tmp_path / "o.safetensors", to="onnx")
    with pytest.raises(MismatchError, match="match no flux weight: lora_"):
        convert(src, tmp_path / "o.safetensors", to="peft", family="flux")
    with pytest.raises(MismatchError, match="LoRA work supports"):
        convert(src, tmp_path / "o.safetensors", to="peft", family="cascade")
    with pytest.raises(UsageError, match="unknown model family"):
        convert(src, tmp_path / "o.safetensors", to="peft", family="sd9")
    assert not (tmp_path / "o.safetensors").exists()
    res = convert(src, tmp_path / "o.safetensors", to="peft", dry_run=True)
    assert res.dry_run and res.bytes_out > 0 and not (tmp_path / "o.safetensors").exists()


def test_cli_convert_and_errors(tmp_path, cli):
    src = make_model(tmp_path / "k.safetensors", "sdxl_kohya_lora")
    out = tmp_path / "o.safetensors"
    r = cli("lora", "convert", src, "--to", "diffusers", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["family"] == "sdxl" and rec["style"] == "diffusers" and rec["modules_out"] == rec["modules_in"]
    assert any(k.startswith("unet.") and k.endswith(".lora.down.weight") for k in _tensors(out))
    r = cli("lora", "convert", src, "--to", "diffusers", "-o", out)
    assert r.returncode not in (0, 70) and r.stderr.strip().startswith("ckptlab: error:")
    assert len(r.stderr.strip().splitlines()) == 1 and "overwrite" in r.stderr
    r = cli("lora", "convert", src, "--to", "diffusers", "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    r = cli("lora", "convert", make_model(tmp_path / "h.safetensors", "sd1_loha"), "--to", "peft", "-o",
            tmp_path / "x.safetensors")
    assert r.returncode not in (0, 70) and "LyCORIS" in r.stderr and "Traceback" not in r.stderr


def test_cli_fused_summary_says_rank_grows_only_when_it_did(tmp_path, cli):
    """kohya fused → diffusers split (one shared down) → kohya: the parts are stacked back, rank unchanged; split
    diffusers parts with their own downs fuse with the rank growing. One pair of parentheses either way."""
    src = make_model(tmp_path / "k.safetensors", "flux_kohya_lora")
    split = tmp_path / "d.safetensors"
    assert cli("lora", "convert", src, "--to", "diffusers", "-o", split).returncode == 0
    r = cli("lora", "convert", split, "--to", "KOHYA", "-o", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("(flux) (76 fused from parts)"), r.stdout
    rec = json.loads(cli("lora", "convert", split, "--to", "kohya", "-o", tmp_path / "b2.safetensors",
                         "--json").stdout)
    assert rec["fused"] == 76 and rec["rank_grown"] == 0
    grown = make_model(tmp_path / "g.safetensors", "flux_diffusers_lora")
    r = cli("lora", "convert", grown, "--to", "kohya", "-o", tmp_path / "g2.safetensors")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("(flux) (76 fused from parts, rank grows)"), r.stdout


def test_cli_json_record_and_options(tmp_path, cli):
    src = make_model(tmp_path / "k.safetensors", "sd1_kohya_lora")
    out = tmp_path / "o.safetensors"
    plan = rec = json.loads(cli("lora", "convert", src, "--to", "peft", "-o", out, "--dry-run", "--json").stdout)
    assert rec["operation"] == "lora-convert" and rec["output"] == str(out) and rec["dry_run"] is True
    assert rec["bytes_out"] > 0 and "bytes_written" not in rec and not out.exists()
    db = tmp_path / "lib.db"
    rec = json.loads(cli("lora", "convert", src, "--to", "peft", "-o", out, "--json", "--db", db).stdout)
    assert rec["bytes_out"] == plan["bytes_out"] and out.exists()  # tensor bytes, as the other lora commands
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ckptlab.operation"] == "lora-convert"
    r = cli("lora", "convert", src, "--to", "a1111", "-o", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "a1111" in r.stderr and not (tmp_path / "x.safetensors").exists()
    h = cli("lora", "convert", "-h", env={"COLUMNS": "200"})
    assert h.returncode == 0 and "kohya|peft|diffusers|comfy" in h.stdout and "--db" in h.stdout, h.stdout
    assert "Naming style to write." in h.stdout and "Replace the output if it exists." in h.stdout, h.stdout


def test_ambiguous_family_asks_for_it(tmp_path):
    src = make_model(tmp_path / "p.safetensors", "sd1_peft_lora")
    with pytest.raises(CkptlabError, match="--family"):
        convert(src, tmp_path / "o.safetensors", to="kohya")


def test_diffusers_loads_our_peft_and_diffusers_files_with_the_kohya_scales(tmp_path):
    """End to end with the peers: a kohya SD1 LoRA with mixed alphas converted to peft and to diffusers style is
    loaded by diffusers (``load_lora_adapter`` with the file's ``lora_adapter_metadata``) into a small real UNet;
    PEFT's ΔW of every module must equal α/r · up @ down of the kohya input."""
    import logging

    from diffusers import UNet2DConditionModel
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata

    from ckptlab.sample.dims import SMALL

    d = SMALL["sd1"]["unet"]
    src = make_model(tmp_path / "k.safetensors", "sd1_kohya_lora")
    t = _tensors(src)
    for i, k in enumerate([k for k in t if k.startswith("lora_unet_") and k.endswith(".alpha")][:7]):
        t[k] = torch.tensor(float(i + 11))
    mixed = tmp_path / "mixed.safetensors"
    save_file(t, str(mixed), metadata=_meta(src))
    table = reference_targets("sd1")
    for style in ("peft", "diffusers"):
        out = tmp_path / f"{style}.safetensors"
        convert(mixed, out, to=style)
        assert len(json.loads(_meta(out)["lora_adapter_metadata"])["unet.alpha_pattern"]) == 7
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=tuple(m * d.channels for m in d.mult),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=d.context,
            attention_head_dim=8, use_linear_projection=d.linear_proj)
        sd = {k: v for k, v in _tensors(out).items() if k.startswith("unet.") and not k.endswith(".alpha")}
        meta = _load_sft_state_dict_metadata(str(out))  # load_lora_adapter picks the "unet." entries itself
        logging.getLogger("diffusers").setLevel(logging.ERROR)
        unet.load_lora_adapter(sd, prefix="unet", metadata=meta, adapter_name="x")
        modules = dict(unet.named_modules())
        checked = 0
        for k in t:
            if not k.startswith("lora_unet_") or not k.endswith(".lora_down.weight"):
                continue
            name = k[: -len(".lora_down.weight")]
            layer = modules[table.lookup(name).name("peft").removeprefix("unet.")]
            got = layer.get_delta_weight("x").double()
            want = _delta(t, k, name + ".lora_up.weight", t[name + ".alpha"].item()).reshape(got.shape)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            checked += 1
        assert checked > 50


def test_sd3_kohya_round_trip_and_split_delta(tmp_path):
    """A kohya SD3 LoRA (full-size names and widths, rank 2): to diffusers the fused qkv become to_q/k/v and
    add_{q,k,v}_proj with exact ΔW rows; back to kohya it is bit-exact; ss_* / trigger metadata survive."""
    table = reference_targets("sd3")
    g = torch.Generator().manual_seed(3)
    t = {}
    names = ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
             "lora_unet_joint_blocks_1_x_block_mlp_fc1", "lora_unet_joint_blocks_2_context_block_attn_proj",
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    for i, n in enumerate(names):
        tg = table.lookup(n)
        t[n + ".lora_down.weight"] = torch.randn(2, tg.shape[1], generator=g)
        t[n + ".lora_up.weight"] = torch.randn(tg.shape[0], 2, generator=g)
        t[n + ".alpha"] = torch.tensor(float(i + 1))
    meta = {"ss_base_model_version": "sd3m", "ss_tag_frequency": '{"a": {"cat": 3}}', "ss_network_dim": "99"}
    src = tmp_path / "sd3.safetensors"
    save_file(t, str(src), metadata=meta)
    out, back = tmp_path / "d.safetensors", tmp_path / "b.safetensors"
    res = convert(src, out, to="diffusers", family="sd3")
    assert res.split == 2 and res.modules_out == 3 + 3 + 3
    b = _tensors(out)
    for n in names[:2]:
        whole = _delta(t, n + ".lora_down.weight", n + ".lora_up.weight", t[n + ".alpha"].item())
        tg = table.lookup(n)
        parts = [p for p in table.targets if p.key == tg.key and p.rows is not None]
        assert len(parts) == 3
        for p in parts:
            m = p.name("diffusers")
            d = _delta(b, m + ".lora.down.weight", m + ".lora.up.weight", b[m + ".alpha"].item())
            assert torch.equal(d, whole[p.rows[0]:p.rows[1]]), m
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora.down.weight" in b
    assert "transformer.transformer_blocks.2.attn.to_add_out.lora.up.weight" in b
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight" in b
    convert(out, back, to="kohya")
    _same(t, _tensors(back))
    m = _meta(back)
    assert m["ss_tag_frequency"] == meta["ss_tag_frequency"]
    assert m["ss_network_dim"] == "2" and m["ss_network_alpha"] == "Dynamic"


def test_missing_parts_fuse_with_zero_rows_and_split_back_without_them(tmp_path):
    """Only to_q and proj_mlp of a Flux single block trained: the fused linear1 has zero rows for k and v (ΔW 0
    there), and splitting it again writes just the two trained parts, bit for bit."""
    g = torch.Generator().manual_seed(5)
    h, r = 16, 2
    b = "transformer.single_transformer_blocks.0."
    t = {b + "attn.to_q.lora_A.weight": torch.randn(r, h, generator=g),
         b + "attn.to_q.lora_B.weight": torch.randn(h, r, generator=g),
         b + "proj_mlp.lora_A.weight": torch.randn(r, h, generator=g),
         b + "proj_mlp.lora_B.weight": torch.randn(4 * h, r, generator=g)}
    src = tmp_path / "s.safetensors"
    save_file(t, str(src))
    k, back = tmp_path / "k.safetensors", tmp_path / "b.safetensors"
    convert(src, k, to="kohya", family="flux")
    kt = _tensors(k)
    n = "lora_unet_single_blocks_0_linear1"
    full = _delta(kt, n + ".lora_down.weight", n + ".lora_up.weight", kt[n + ".alpha"].item())
    assert full.shape == (7 * h, h)
    torch.testing.assert_close(full[:h], _delta(t, b + "attn.to_q.lora_A.weight", b + "attn.to_q.lora_B.weight",
                                                None), rtol=0, atol=1e-12)
    assert torch.count_nonzero(full[h:3 * h]) == 0
    torch.testing.assert_close(full[3 * h:], _delta(t, b + "proj_mlp.lora_A.weight", b + "proj_mlp.lora_B.weight",
                                                    None), rtol=0, atol=1e-12)
    convert(k, back, to="peft")
    _same(t, _tensors(back))


def test_peft_to_kohya_agrees_with_diffusers_except_its_documented_gaps(tmp_path):
    """diffusers' ``convert_state_dict_to_kohya`` on the same PEFT file: every module it writes resolves to the
    same model weight as ours and carries the same tensors; its alphas are the ranks (it ignores
    ``lora_alpha``) and it names SD1's text encoder ``lora_te1_`` where kohya (and ckptlab) write ``lora_te_``."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    src = make_model(tmp_path / "k.safetensors", "sd1_kohya_lora")
    peft, ours = tmp_path / "p.safetensors", tmp_path / "o.safetensors"
    convert(src, peft, to="peft")
    convert(peft, ours, to="kohya")
    theirs = convert_state_dict_to_kohya(_tensors(peft))
    mine = _tensors(ours)
    table = reference_targets("sd1")
    downs = [k for k in theirs if k.endswith(".lora_down.weight")]
    assert len(downs) == len([k for k in mine if k.endswith(".lora_down.weight")])
    te1 = 0
    for k in downs:
        name = k[: -len(".lora_down.weight")]
        t = table.lookup(name)
        assert t is not None, name
        assert torch.equal(theirs[k], mine[t.name("kohya") + ".lora_down.weight"])
        assert theirs[name + ".alpha"].item() == theirs[k].shape[0]  # alpha = rank, whatever lora_alpha said
        te1 += name.startswith("lora_te1_")
    assert te1 and not any(k.startswith("lora_te1_") for k in mine)
    src_t = _tensors(src)
    alphas = {k: v for k, v in src_t.items() if k.endswith(".alpha")}
    assert all(torch.equal(mine[k], v) for k, v in alphas.items())  # ours: the real alphas
    assert any(v.item() != src_t[k[: -len(".alpha")] + ".lora_down.weight"].shape[0] for k, v in alphas.items())


def test_two_modules_on_one_weight_are_refused(tmp_path):
    """The same SDXL weight under its SGM and its diffusers kohya name: one output name, a clear refusal."""
    t = {}
    for n in ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in"):
        t[n + ".lora_down.weight"] = torch.zeros(2, 640)
        t[n + ".lora_up.weight"] = torch.zeros(640, 2)
    src = tmp_path / "dup.safetensors"
    save_file(t, str(src))
    with pytest.raises(MismatchError, match="same weight"):
        convert(src, tmp_path / "o.safetensors", to="peft", family="sdxl")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_precision_round_trips_through_split_and_fuse(tmp_path, dtype):
    src = make_model(tmp_path / "f.safetensors", "flux_kohya_lora", dtype=dtype)
    mid, back = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    convert(src, mid, to="diffusers")
    assert {v.dtype for v in _tensors(mid).values()} == {getattr(torch, {"BF16": "bfloat16", "F16": "float16"}[dtype])}
    convert(mid, back, to="kohya")
    _same(_tensors(src), _tensors(back))
    d = tmp_path / "d.safetensors"
    convert(make_model(tmp_path / "p.safetensors", "flux_diffusers_lora", dtype=dtype), d, to="kohya")
    assert all(v.dtype == getattr(torch, {"BF16": "bfloat16", "F16": "float16"}[dtype]) for v in _tensors(d).values())
