"""extract / replace, and the bad-input contract shared by every transform: one-line error, no output,
inputs untouched (sha256 before/after)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import unwritable_folder
from fakes.sample_files import load, make_model, sha256

from ckptlab.arch.components import ema_key
from ckptlab.errors import MismatchError, OutputError
from ckptlab.ops.components import extract, replace

SRC = Path(__file__).resolve().parents[2] / "src"


def test_extract_vae_strips_prefix_bit_identical(tmp_path):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    [r] = extract([ckpt], "vae")
    assert r.output == tmp_path / "m-vae.safetensors"
    src, out = load(ckpt), load(r.output)
    vae = {k[len("first_stage_model."):]: v for k, v in src.items() if k.startswith("first_stage_model.")}
    assert set(out) == set(vae) and len(out) == 248
    assert all(torch.equal(out[k], vae[k]) and out[k].dtype == vae[k].dtype for k in out)
    # the field's own layout for standalone VAE files: same key set as the sample's sd1_vae file
    assert set(out) == set(load(make_model(tmp_path / "ref-vae.safetensors", "sd1_vae")))


def test_extract_unet_clip_l_and_ema(tmp_path):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    src = load(ckpt)
    [u] = extract([ckpt], "unet")
    unet = load(u.output)
    assert set(unet) == set(load(make_model(tmp_path / "ref-unet.safetensors", "sd1_unet")))
    assert torch.equal(unet["input_blocks.0.0.weight"], src["model.diffusion_model.input_blocks.0.0.weight"])
    [c] = extract([ckpt], "clip_l", out=tmp_path / "clip.safetensors")
    clip = load(c.output)
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in clip
    assert not any(k.endswith("position_ids") for k in clip)
    [e] = extract([ckpt], "ema")
    ema = load(e.output)
    assert set(ema) == set(unet)
    for k in ema:
        assert torch.equal(ema[k], src[ema_key("model.diffusion_model." + k)]), k


def test_extract_clip_g_loads_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = make_model(tmp_path / "xl.safetensors", "sdxl_checkpoint")
    [r] = extract([ckpt], "clip_g")
    out = load(r.output)
    src = load(ckpt)
    p = "conditioner.embedders.1.model."
    w = src[p + "transformer.resblocks.3.attn.in_proj_weight"]
    d = w.shape[1]
    assert torch.equal(out["text_model.encoder.layers.3.self_attn.k_proj.weight"], w[d:2 * d])
    assert torch.equal(out["text_projection.weight"], src[p + "text_projection"].T)
    # oracle: transformers builds a CLIPTextModelWithProjection from these keys with nothing missing
    cfg = transformers.CLIPTextConfig(hidden_size=d, intermediate_size=out[
        "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=32, num_attention_heads=1,
        projection_dim=out["text_projection.weight"].shape[0], vocab_size=49408, max_position_embeddings=77)
    model = transformers.CLIPTextModelWithProjection(cfg)
    missing, unexpected = model.load_state_dict(out, strict=False)
    assert not [m for m in missing if not m.endswith("position_ids")] and not unexpected


def test_extract_missing_component(tmp_path):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    with pytest.raises(MismatchError, match="SD1 checkpoint has no clip_g"):
        extract([ckpt], "clip_g")
    with pytest.raises(MismatchError, match="no EMA"):
        extract([ckpt], "ema")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_replace_vae_bakes_bit_identical(tmp_path):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    vae = make_model(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", "sd1_vae", seed=7)
    before = (sha256(ckpt), sha256(vae))
    [r] = replace([ckpt], vae=vae, out=tmp_path / "baked.safetensors")
    out, src, v = load(r.output), load(ckpt), load(vae)
    assert set(out) == set(src)
    for k, t in out.items():
        if k.startswith("first_stage_model."):
            assert torch.equal(t, v[k[len("first_stage_model."):]]), k
        else:
            assert torch.equal(t, src[k]), k
    assert not torch.equal(out["first_stage_model.decoder.conv_in.weight"],
                           src["first_stage_model.decoder.conv_in.weight"])
    assert (sha256(ckpt), sha256(vae)) == before
    import json

    from safetensors import safe_open

    inputs = json.loads(safe_open(str(r.output), "pt").metadata()["ckptlab.inputs"])
    assert inputs == [{"name": "m.safetensors", "sha256": before[0]},
                      {"name": vae.name, "sha256": before[1]}]


@pytest.mark.parametrize("alias", ["same", "hardlink", "symlink"])
def test_replace_refuses_output_onto_baked_component(tmp_path, alias):
    """-o naming the --vae file (directly, through a hard link or a symlink) is refused before any work,
    even with --overwrite; the VAE keeps its bytes."""
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    vae = make_model(tmp_path / "vae.safetensors", "sd1_vae", seed=7)
    before = sha256(vae)
    out = tmp_path / "alias.safetensors"
    if alias == "same":
        out = vae
    elif alias == "hardlink":
        os.link(vae, out)
    else:
        out.symlink_to(vae)
    with pytest.raises(OutputError, match="would replace the input vae.safetensors"):
        replace([ckpt], vae=vae, out=out, overwrite=True)
    assert sha256(vae) == before and os.stat(vae).st_nlink == (2 if alias == "hardlink" else 1)


def test_replace_accepts_diffusers_vae(tmp_path):
    from ckptlab.ops.diffusers_io import to_diffusers

    donor = make_model(tmp_path / "donor.safetensors", "sd1_checkpoint", seed=3)
    to_diffusers(donor, tmp_path / "pipe")
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    [r] = replace([ckpt], vae=tmp_path / "pipe/vae/diffusion_pytorch_model.safetensors",
                  out=tmp_path / "baked.safetensors")
    out, d = load(r.output), load(donor)
    for k in d:
        if k.startswith("first_stage_model."):
            assert torch.equal(out[k], d[k]), k


def test_replace_sd1_vae_into_sdxl_refused(tmp_path):
    ckpt = make_model(tmp_path / "sd_xl_base_1.0.safetensors", "sdxl_checkpoint")
    vae = make_model(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", "sd1_vae")
    before = (sha256(ckpt), sha256(vae))
    with pytest.raises(MismatchError, match="is a SD1 VAE; it does not fit a SDXL checkpoint"):
        replace([ckpt], vae=vae, out=tmp_path / "baked.safetensors")
    assert not (tmp_path / "baked.safetensors").exists()
    assert (sha256(ckpt), sha256(vae)) == before


def test_replace_shape_mismatch_refused(tmp_path):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    vae16 = make_model(tmp_path / "ae.safetensors", "sd3_vae")
    with pytest.raises(MismatchError, match="does not fit this checkpoint's vae"):
        replace([ckpt], vae=vae16, out=tmp_path / "baked.safetensors")
    unet_xl = make_model(tmp_path / "unet.safetensors", "sd1_unet")
    xl = make_model(tmp_path / "xl.safetensors", "sdxl_checkpoint")
    with pytest.raises(MismatchError, match="does not fit this checkpoint's unet"):
        replace([xl], unet=unet_xl, out=tmp_path / "baked.safetensors")
    assert not (tmp_path / "baked.safetensors").exists()


# -- bad targets: read-only folder, full disk -------------------------------------------------------


def test_read_only_target_folder(tmp_path, cli):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    before = sha256(ckpt)
    folder, cleanup = unwritable_folder()
    try:
        listing = set(folder.iterdir())
        r = cli("prune", ckpt, "--out-dir", folder)
        assert r.returncode != 0
        assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1
        assert "cannot write in" in r.stderr or "does not exist" in r.stderr
        assert set(folder.iterdir()) == listing
        r = cli("to-diffusers", ckpt, "-o", folder / "pipe")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    finally:
        cleanup()
    assert sha256(ckpt) == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal, like ENOSPC on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))


@pytest.mark.parametrize("command", [["prune", "--ema", "use"], ["to-diffusers", "-o", "{out}/pipe"],
                                     ["extract", "-c", "unet"]])
def test_full_disk(tmp_path, command):
    ckpt = make_model(tmp_path / "m.safetensors", "sd1_checkpoint", ema=True)
    before = sha256(ckpt)
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(out=out) for a in command]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-m", "ckptlab", args[0], str(ckpt), *args[1:], "--out-dir", str(out)]
                       if "-o" not in args else [sys.executable, "-m", "ckptlab", args[0], str(ckpt), *args[1:]],
                       capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300)
    assert r.returncode != 0
    assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "write failed" in r.stderr or "File too large" in r.stderr
    assert list(out.iterdir()) == []
    assert sha256(ckpt) == before


def test_cli_replace_refusal_is_one_line(tmp_path, cli):
    ckpt = make_model(tmp_path / "sd_xl_base_1.0.safetensors", "sdxl_checkpoint")
    vae = make_model(tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors", "sd1_vae")
    r = cli("replace", ckpt, "--vae", vae, "-o", tmp_path / "out.safetensors")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "SD1 VAE" in r.stderr and not (tmp_path / "out.safetensors").exists()


def test_clip_g_extract_then_replace_round_trips(tmp_path):
    donor = make_model(tmp_path / "donor.safetensors", "sdxl_checkpoint", seed=4)
    target = make_model(tmp_path / "target.safetensors", "sdxl_checkpoint")
    [e] = extract([donor], "clip_g")  # HF naming: fused qkv split, projection transposed, logit_scale dropped
    [r] = replace([target], clip_g=e.output, out=tmp_path / "baked.safetensors")
    out, d, t = load(r.output), load(donor), load(target)
    p = "conditioner.embedders.1.model."
    for k in out:
        if k.startswith(p) and not k.endswith("logit_scale"):
            assert torch.equal(out[k], d[k]), k  # fused back exactly, projection transposed back
        else:
            assert torch.equal(out[k], t[k]), k


def test_extract_sd3_text_encoders(tmp_path):
    ckpt = make_model(tmp_path / "sd3.safetensors", "sd3_medium")
    [r] = extract([ckpt], "t5xxl")
    t5 = load(r.output)
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in t5 and "shared.weight" in t5
    [c] = extract([ckpt], "clip_l", out=tmp_path / "l.safetensors")
    assert all(k.startswith(("text_model.", "text_projection")) for k in load(c.output))


def test_folder_input_refused(tmp_path):
    from ckptlab.errors import UnsupportedFormatError
    from ckptlab.ops.prune import prune

    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(UnsupportedFormatError, match="use from-diffusers first"):
        prune([tmp_path / "pipe"])


@pytest.mark.parametrize("command", [["prune"], ["precision", "--to", "fp16"], ["extract", "-c", "vae"],
                                     ["to-diffusers", "-o", "{out}/pipe"], ["replace", "--vae", "{evil}"]])
def test_malicious_pickle_refused_by_every_command(tmp_path, cli, command):
    import pickle
    import zipfile

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))

    evil = tmp_path / "evil.ckpt"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "p": Payload()}, protocol=2))
    target = make_model(tmp_path / "m.safetensors", "sd1_checkpoint")
    out = tmp_path / "out"
    out.mkdir()
    before = (sha256(evil), sha256(target))
    args = [a.format(out=out, evil=evil) for a in command]
    first = target if command[0] == "replace" else evil
    extra = [] if "-o" in args else ["--out-dir", out]
    r = cli(args[0], first, *args[1:], *extra)
    assert r.returncode == 4, r.stderr
    assert r.stderr.startswith("ckptlab: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "malicious" in r.stderr
    assert list(out.iterdir()) == [] and not (tmp_path / "pwned").exists()
    assert (sha256(evil), sha256(target)) == before


def test_extract_sd2_openclip_h_as_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = make_model(tmp_path / "sd2.safetensors", "sd2_checkpoint")
    [r] = extract([ckpt], "openclip_h")
    out, src = load(r.output), load(ckpt)
    w = src["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_bias"]
    d = w.shape[0] // 3
    assert torch.equal(out["text_model.encoder.layers.23.self_attn.v_proj.bias"], w[2 * d:])
    cfg = transformers.CLIPTextConfig(hidden_size=d, intermediate_size=out[
        "text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=24, num_attention_heads=1,
        projection_dim=out["text_projection.weight"].shape[0], vocab_size=49408, max_position_embeddings=77)
    missing, unexpected = transformers.CLIPTextModelWithProjection(cfg).load_state_dict(out, strict=False)
    assert not [m for m in missing if not m.endswith("position_ids")] and not unexpected


def test_extract_names_an_identified_family_it_cannot_split(cli, tmp_path):
    """A Chroma file is identified (inspect says chroma) but its single-file component layout is not in the family
    record: extract says so, rather than calling it a file of no known family."""
    from ckptlab.sample.build import write_model

    p = write_model(tmp_path / "chroma.safetensors", "chroma", sparse=True)
    r = cli("extract", p, "-c", "vae", "-o", tmp_path / "vae.safetensors")
    assert r.returncode == 1 and not (tmp_path / "vae.safetensors").exists()
    assert r.stderr.count("\n") == 1 and "do not support Chroma files yet" in r.stderr, r.stderr
