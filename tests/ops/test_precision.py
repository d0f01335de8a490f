"""precision: exact casts (oracle: tensor.to(dtype)), overflow refusal/clamp, VAE policy, --only."""

from __future__ import annotations

import json

import pytest
import torch
from fakes.sample_files import load, make_model, sha256

from ckptlab.errors import MismatchError
from ckptlab.formats.writer import write_safetensors
from ckptlab.ops.precision import convert_precision

UNET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VAE = "first_stage_model.decoder.conv_in.weight"
TE = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


@pytest.fixture
def model(tmp_path):
    return make_model(tmp_path / "m.safetensors", "sd1_checkpoint")


@pytest.mark.parametrize("to,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_equals_torch_to(tmp_path, model, to, dtype):
    [r] = convert_precision([model], to)
    src, out = load(model), load(r.output)
    assert r.output.name == f"m-{to}.safetensors"
    assert set(src) == set(out)
    converted = 0
    for k in src:
        if k.startswith("first_stage_model.") or k.endswith("position_ids") or "." not in k:
            # VAE, integer position ids and top-level schedule buffers keep their dtype and bytes
            assert out[k].dtype == src[k].dtype and torch.equal(out[k], src[k]), k
        else:
            assert out[k].dtype == dtype and torch.equal(out[k], src[k].to(dtype)), k
            converted += 1
    assert converted == r.converted == 686 + 196  # UNet + CLIP-L weights (position_ids excluded)


def test_only_vae_and_back_to_fp32(tmp_path, model):
    [r] = convert_precision([model], "fp16", only=["vae"])
    src, out = load(model), load(r.output)
    assert out[VAE].dtype == torch.float16 and torch.equal(out[VAE], src[VAE].half())
    assert out[UNET].dtype == torch.float32
    [r2] = convert_precision([r.output], "fp32")
    up = load(r2.output)
    assert up[VAE].dtype == torch.float32 and torch.equal(up[VAE], src[VAE].half().float())


def test_fp16_overflow_refused_then_clamped(tmp_path):
    sd = load(make_model(tmp_path / "m.safetensors", "sd1_checkpoint"))
    big = sd[UNET].clone()
    big[0, 0] = 70000.0
    big[0, 1] = -1e6
    big[0, 2] = float("inf")  # already infinite: not an overflow
    sd[UNET] = big
    p = write_safetensors(tmp_path / "hot.safetensors", sd)
    before = sha256(p)
    with pytest.raises(MismatchError, match=r"2 value\(s\) of .*exceed the F16 range.*--clamp"):
        convert_precision([p], "fp16")
    assert not (tmp_path / "hot-fp16.safetensors").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temp file left
    assert sha256(p) == before
    [r] = convert_precision([p], "fp16", clamp=True)
    out = load(r.output)[UNET]
    assert out[0, 0].item() == 65504.0 and out[0, 1].item() == -65504.0 and out[0, 2].item() == float("inf")
    assert torch.equal(out[1:], big[1:].half())


def test_fp8_and_bf16_ranges(tmp_path, model):
    [r] = convert_precision([model], "fp8_e4m3fn", only=["unet"])
    src, out = load(model), load(r.output)
    assert out[UNET].dtype == torch.float8_e4m3fn
    assert torch.equal(out[UNET].view(torch.uint8), src[UNET].to(torch.float8_e4m3fn).view(torch.uint8))
    assert out[TE].dtype == torch.float32


def test_standalone_vae_needs_only_vae(tmp_path):
    p = make_model(tmp_path / "vae.safetensors", "sd1_vae")
    with pytest.raises(MismatchError, match="--only vae"):
        convert_precision([p], "fp16")
    [r] = convert_precision([p], "fp16", only=["vae"])
    assert all(t.dtype == torch.float16 for t in load(r.output).values())


def test_cli_precision(tmp_path, cli, model):
    r = cli("precision", model, "--to", "fp16", "--only", "te")
    assert r.returncode == 0, r.stderr
    out = load(tmp_path / "m-fp16.safetensors")
    assert out[TE].dtype == torch.float16 and out[UNET].dtype == torch.float32
    r = cli("precision", model, "--to", "fp12")
    assert r.returncode != 0 and "unknown precision" in r.stderr


def test_nothing_to_convert_writes_nothing(tmp_path, cli, model):
    """precision --to fp32 of an fp32 file (or fp16 of a file whose converted weights are fp16 already)
    wrote a full copy: now one line on stdout, exit 0, nothing written."""
    r = cli("precision", model, "--to", "fp32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{model}: nothing to convert: the weights --to fp32 applies to are fp32 "
                                "already; nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    r = cli("precision", model, "--to", "fp16")
    assert r.returncode == 0, r.stderr
    half = tmp_path / "m-fp16.safetensors"
    assert half.is_file()
    r = cli("precision", half, "--to", "fp16", "--json")  # the VAE stayed fp32, the rest is fp16: no-op
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] is None
    assert not (tmp_path / "m-fp16-fp16.safetensors").exists()
    r = cli("precision", half, "--to", "fp16", "--only", "vae")  # asking for the VAE is a change
    assert r.returncode == 0 and (tmp_path / "m-fp16-fp16.safetensors").is_file(), r.stderr


def test_output_must_be_named_safetensors(tmp_path, model):
    from ckptlab.errors import OutputError

    for name in ("x.ckpt", "x.pt", "x", "x.safetensors.tmp"):
        with pytest.raises(OutputError, match="name it .safetensors"):
            convert_precision([model], "fp16", outputs=[tmp_path / name])
    [r] = convert_precision([model], "fp16", outputs=[tmp_path / "X.SafeTensors"])
    assert r.output.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.SafeTensors", "m.safetensors"]
