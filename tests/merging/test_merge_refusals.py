"""What `merge` refuses (issue 11 §3): inputs that are not full models of one kind, non-float dtypes, unknown
devices, a VAE of another latent space. Each refusal: one line on stderr, a documented exit code, nothing
written; through the real CLI and at API level. Test models use the real key names (``ckptlab.sample``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptlab.errors import CkptlabError, MismatchError
from ckptlab.merging import merge
from ckptlab.merging.recipe import RecipeError
from ckptlab.sample.build import write_model


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    d = tmp_path_factory.mktemp("refusals")
    specs = {
        "a": "sd1_checkpoint", "b": "sd1_checkpoint", "xl": "sdxl_checkpoint", "xl2": "sdxl_checkpoint",
        "lora": "sd1_kohya_lora", "loha": "sd1_loha", "vae": "sd1_vae", "unet": "sd1_unet",
        "clip": "clip_l", "cn": "sd1_controlnet", "fp8": "flux_dev_fp8_scaled",
    }
    # identification names the VAE family from the file name where keys cannot tell (as for real files)
    names = {"vae": "vae-ft-mse-840000-ema-pruned", "xlvae": "sdxl_vae"}
    out = {k: write_model(d / f"{names.get(k, k)}.safetensors", spec, dtype="F32", seed=i + 1)
           for i, (k, spec) in enumerate(specs.items())}
    out["xlvae"] = write_model(d / "sdxl_vae.safetensors", "sdxl_vae", dtype="F32", seed=40)
    return out


def _refused(r, code: int, words: str, folder) -> None:
    """One ``ckptlab: error:`` line naming ``words``, exit ``code``, no traceback, nothing left in ``folder``."""
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(folder.iterdir()) == [], list(folder.iterdir())


@pytest.mark.parametrize("which, words", [
    ("lora", "it is a LoRA, not a full model; LoRAs are baked into a checkpoint with `ckptlab lora bake`"),
    ("loha", "it is a LyCORIS adapter"),
    ("vae", "it is a VAE, not a full model; bake a VAE into the output with --vae"),
    ("clip", "it is a text encoder"),
    ("cn", "it is a ControlNet"),
])
def test_cli_refuses_inputs_that_are_not_full_models(cli, m, tmp_path, which, words):
    """`merge weighted_sum CKPT LORA` printed "0 merged, 1143 kept from A", exited 0 and wrote a copy of A."""
    out = tmp_path / "o.safetensors"
    r = cli("merge", "weighted_sum", m["a"], m[which], "-o", out)
    _refused(r, 1, words, tmp_path)
    assert "cannot merge B (" in r.stderr


def test_api_refuses_a_lora_either_side(m, tmp_path):
    for pair in ([m["a"], m["lora"]], [m["lora"], m["a"]]):
        with pytest.raises(MismatchError, match="is a LoRA, not a full model"):
            merge("weighted_sum", pair, tmp_path / "o.safetensors")
    with pytest.raises(MismatchError, match="is a LoRA"):  # a later input of a 3-model method too
        merge("add_difference", [m["a"], m["b"], m["lora"]], tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_checkpoint_with_a_unet_only_file(cli, m, tmp_path):
    """Different kinds share no tensor names (``model.diffusion_model.`` prefix vs none): A would be copied."""
    r = cli("merge", "weighted_sum", m["a"], m["unet"], "-o", tmp_path / "o.safetensors")
    _refused(r, 1, "A is a full checkpoint, B is a UNet/DiT-only file", tmp_path)
    with pytest.raises(MismatchError, match="different kinds of model"):
        merge("weighted_sum", [m["unet"], m["a"]], tmp_path / "o.safetensors")


def test_unet_only_files_still_merge(m, tmp_path):
    """Two UNet-only files are the same kind: merged tensor by tensor (formula computed here)."""
    u2 = write_model(tmp_path / "u2.safetensors", "sd1_unet", dtype="F32", seed=77)
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [m["unet"], u2], out, params={"alpha": 0.25})
    a, b, o = load_file(m["unet"]), load_file(u2), load_file(out)
    assert r.steps[0].merged == len(a) and set(o) == set(a)
    for k in a:
        torch.testing.assert_close(o[k], (a[k].double() * 0.75 + b[k].double() * 0.25).float())


def test_refuses_layouts_with_nothing_in_common(m, tmp_path):
    """Both UNet-only, but one in LDM names and one a diffusers folder (``unet.conv_in.weight``...): no key in
    common, refused instead of a copy of A. A file whose names match no model layout is refused too."""
    from test_merge_checks import _diffusers_folder

    folder = _diffusers_folder(tmp_path / "in" / "pipe", 5)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(MismatchError, match="no tensors in common to merge"):
        merge("weighted_sum", [m["unet"], folder], out_dir / "o.safetensors")
    sd = {"renamed." + k: t for k, t in load_file(m["b"]).items()}
    other = tmp_path / "in" / "renamed.safetensors"
    save_file(sd, other)
    with pytest.raises(MismatchError, match="no known model layout matches its tensor names"):
        merge("weighted_sum", [m["a"], other], out_dir / "o.safetensors")
    assert list(out_dir.iterdir()) == []


def test_refuses_quantized_weights(cli, m, tmp_path):
    """ComfyUI scaled fp8: each weight has its own scale_weight; mixing the raw values would be wrong."""
    r = cli("merge", "weighted_sum", m["fp8"], m["fp8"], "-o", tmp_path / "o.safetensors")
    _refused(r, 1, "quantized weights with scales", tmp_path)


@pytest.mark.parametrize("dtype", ["int8", "bool", "complex64", "uint8", "int64"])
def test_cli_refuses_non_float_output_dtype(cli, m, tmp_path, dtype):
    """int8/bool/complex64 wrote a "model" with 0 parameters and exited 0."""
    r = cli("merge", "weighted_sum", m["a"], m["b"], "--dtype", dtype, "-o", tmp_path / "o.safetensors")
    _refused(r, 2, f"dtype '{dtype}': {dtype} is not a floating-point type", tmp_path)


@pytest.mark.parametrize("value, words", [
    ("fp8", "fp8_e4m3fn is not a type merges compute in"),
    ("int8", "int8 is not a floating-point type"),
    ("foo", "merge_dtype 'foo': unknown dtype; use one of fp32, fp64, fp16, bf16"),
])
def test_cli_refuses_bad_merge_dtype(cli, m, tmp_path, value, words):
    """fp8 and int8 math ended in exit 70 (torch has no lerp for them)."""
    r = cli("merge", "weighted_sum", m["a"], m["b"], "--merge-dtype", value, "-o", tmp_path / "o.safetensors")
    _refused(r, 2, words, tmp_path)


@pytest.mark.parametrize("device", ["mps", "foo", "cpu:0", "cuda:x", "CUDA0"])
def test_cli_refuses_unknown_device(cli, m, tmp_path, device):
    r = cli("merge", "weighted_sum", m["a"], m["b"], "--device", device, "-o", tmp_path / "o.safetensors")
    _refused(r, 2, f"--device '{device}': use cpu, cuda or cuda:N", tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cli_unavailable_cuda_is_one_line(cli, m, tmp_path, device):
    r = cli("merge", "weighted_sum", m["a"], m["b"], "--device", device, "-o", tmp_path / "o.safetensors")
    _refused(r, 1, "torch sees no CUDA GPU on this machine", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_past_the_last_device_is_one_line(m, tmp_path):
    with pytest.raises(CkptlabError, match="CUDA device"):
        merge("weighted_sum", [m["a"], m["b"]], tmp_path / "o.safetensors",
              device=f"cuda:{torch.cuda.device_count()}")


def test_api_dtype_and_device_refusals_are_usage_errors(m, tmp_path):
    out = tmp_path / "o.safetensors"
    for kw in ({"dtype": "bool"}, {"merge_dtype": "fp8"}, {"device": "mps"}):
        with pytest.raises(RecipeError) as e:
            merge("weighted_sum", [m["a"], m["b"]], out, **kw)
        assert e.value.exit_code == 2
    assert not out.exists()


def test_fp8_output_dtype_is_written_and_checked(m, tmp_path):
    """fp8 is a float storage type: allowed as output (computed in fp32, then cast as torch casts)."""
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [m["a"], m["b"]], out, params={"alpha": 0.5}, dtype="fp8")
    a, b, o = load_file(m["a"]), load_file(m["b"]), load_file(out)
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert o[k].dtype == torch.float8_e4m3fn
    ref = torch.from_numpy(a[k].double().numpy() * 0.5 + b[k].double().numpy() * 0.5).float()
    assert o[k].view(torch.uint8).equal(ref.to(torch.float8_e4m3fn).view(torch.uint8))
    assert o["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert r.steps[0].nonfinite == 0


def test_fp8_overflow_is_reported_not_an_internal_error(m, tmp_path):
    """fp8 has no aminmax kernel (exit 70 before). Values beyond fp8_e5m2's range become Inf in torch's cast, and a
    NaN input stays NaN in fp8_e4m3fn (which saturates overflow at 448): both counted as non-finite."""
    sd = load_file(m["b"])
    k, k2 = "model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.out.2.bias"
    sd[k] = torch.full_like(sd[k], 1e6)
    sd[k2] = torch.full_like(sd[k2], float("nan"))
    big = tmp_path / "big.safetensors"
    save_file(sd, big)
    r = merge("weighted_sum", [m["a"], big], tmp_path / "o.safetensors", dtype="fp8_e5m2")
    assert set(r.steps[0].nonfinite_keys) == {k, k2}
    r = merge("weighted_sum", [m["a"], big], tmp_path / "o2.safetensors", dtype="fp8")
    assert r.steps[0].nonfinite_keys == [k2]


# -- the VAE family check: one check (arch.vae_fit), called by replace and by merge ----------------------
def test_sd1_vae_into_sdxl_refused_by_merge_and_replace_alike(cli, m, tmp_path):
    """Same key layout and shapes: only the family (latent space) tells them apart. Before, merge accepted
    it and replace refused it."""
    out = tmp_path / "o.safetensors"
    r = cli("merge", "weighted_sum", m["xl"], m["xl2"], "--vae", m["vae"], "-o", out)
    _refused(r, 1, "is a SD1 VAE; it does not fit a SDXL checkpoint (different latent space)", tmp_path)
    r2 = cli("replace", m["xl"], "--vae", m["vae"], "-o", out)
    assert r2.returncode == 1 and "is a SD1 VAE; it does not fit a SDXL checkpoint (different latent space)" \
        in r2.stderr and not out.exists(), r2.stderr
    with pytest.raises(MismatchError, match="SD1 VAE; it does not fit a SDXL"):
        merge("weighted_sum", [m["xl"], m["xl2"]], out, vae=m["vae"])
    assert list(tmp_path.iterdir()) == []


def test_sdxl_vae_into_sd1_refused_and_right_family_baked(m, tmp_path):
    with pytest.raises(MismatchError, match="is a SDXL VAE; it does not fit a SD1 checkpoint"):
        merge("weighted_sum", [m["a"], m["b"]], tmp_path / "x.safetensors", vae=m["xlvae"])
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [m["xl"], m["xl2"]], out, vae=m["xlvae"])
    v, o = load_file(m["xlvae"]), load_file(out)
    assert r.vae_replaced == len(v) and all(o["first_stage_model." + k].equal(t) for k, t in v.items())


def test_vae_of_unknown_family_is_a_warning_as_in_replace(m, tmp_path):
    unnamed = tmp_path / "in" / "model.safetensors"  # neither keys nor name tell its family
    unnamed.parent.mkdir()
    unnamed.write_bytes(m["vae"].read_bytes())
    r = merge("weighted_sum", [m["a"], m["b"]], tmp_path / "o.safetensors", vae=unnamed)
    assert any("VAE family unknown (keys and shapes match)" in w for w in r.warnings), r.warnings


def test_the_vae_check_lives_in_one_place():
    """replace and merge both call arch.vae_fit.check_vae_fits; no second copy of the rule remains."""
    import inspect

    import ckptlab.merging.engine as engine
    import ckptlab.ops.components as components

    for mod in (engine, components):
        src = inspect.getsource(mod)
        assert "check_vae_fits(" in src and "VAE_GROUPS" not in src
