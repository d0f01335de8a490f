"""replace --vae and merge --vae give the same answer for every (VAE, checkpoint) pair of sample families, through
the real CLI; a file mixing families is refused by every transform with one message.

Expected answers are written by hand from the latent spaces: SD1 and SD2 share one (4-channel KL-f8, the same
VAE ships with both), SDXL and its refiner another (same keys and shapes, other weights), SD3 a 16-channel one."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from ckptlab.errors import MismatchError
from ckptlab.sample.build import write_model

#: VAE file names as they ship (identify tells same-shaped VAE families apart by the name only)
VAES = {"sd1": ("sd1_vae", "vae-ft-mse-840000-ema-pruned"), "sdxl": ("sdxl_vae", "sdxl_vae"),
        "sd3": ("sd3_vae", "sd3_vae")}
CKPTS = {"sd1": "sd1_checkpoint", "sd2": "sd2_checkpoint", "sdxl": "sdxl_checkpoint",
         "sdxl_refiner": "sdxl_refiner", "sd3": "sd3_medium"}
#: (VAE family, checkpoint family) -> accepted; by hand
PAIRS = {
    ("sd1", "sd1"): True, ("sd1", "sd2"): True, ("sd1", "sdxl"): False, ("sd1", "sdxl_refiner"): False,
    ("sdxl", "sdxl"): True, ("sdxl", "sdxl_refiner"): True, ("sdxl", "sd1"): False, ("sdxl", "sd2"): False,
    ("sd3", "sd3"): True, ("sd3", "sdxl"): False, ("sd1", "sd3"): False,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae_pairs")
    out = {}
    for fam, (spec, name) in VAES.items():
        out["vae", fam] = write_model(d / f"{name}.safetensors", spec, dtype="F16", seed=3)
    for fam, spec in CKPTS.items():
        out["ckpt", fam] = write_model(d / f"{spec}-a.safetensors", spec, dtype="F16", seed=1, fmt="safetensors")
        out["ckpt2", fam] = write_model(d / f"{spec}-b.safetensors", spec, dtype="F16", seed=2, fmt="safetensors")
    return out


@pytest.mark.parametrize("vae_fam, ckpt_fam", sorted(PAIRS))
def test_replace_and_merge_agree_on_the_vae(cli, files, tmp_path, vae_fam, ckpt_fam):
    vae, a, b = files["vae", vae_fam], files["ckpt", ckpt_fam], files["ckpt2", ckpt_fam]
    r_out, m_out = tmp_path / "replaced.safetensors", tmp_path / "merged.safetensors"
    r = cli("replace", a, "--vae", vae, "-o", r_out)
    m = cli("merge", "weighted_sum", a, b, "--alpha", "0.5", "--vae", vae, "-o", m_out)
    accepted = PAIRS[vae_fam, ckpt_fam]
    for what, res, out in (("replace", r, r_out), ("merge", m, m_out)):
        assert "Traceback" not in res.stderr, res.stderr
        if accepted:
            assert res.returncode == 0, (what, res.stderr)
            baked = load_file(out)
            src = load_file(vae)
            prefix = "vae." if ckpt_fam == "flux" else "first_stage_model."
            assert all(baked[prefix + k].equal(t) for k, t in src.items()), what
        else:
            assert res.returncode == 1 and not out.exists(), (what, res.returncode, res.stderr)
            line = res.stderr.strip().splitlines()
            assert len(line) == 1 and line[0].startswith("ckptlab: error: "), (what, res.stderr)
    if not accepted and (vae_fam, ckpt_fam) in (("sd1", "sdxl"), ("sdxl", "sd1"), ("sd1", "sdxl_refiner")):
        # same keys and shapes: only the family check can refuse, and both say so the same way
        assert "does not fit a" in r.stderr and "(different latent space)" in r.stderr
        assert r.stderr.split("error: ", 1)[1].split(";")[0].split(" is a ")[1] == \
            m.stderr.split("error: ", 1)[1].split(";")[0].split(" is a ")[1]


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_replace_and_merge_refuse_a_damaged_vae_with_the_same_line(cli, files, tmp_path, damage):
    """A VAE of the right family with a tensor missing, one too many, or a wrong shape: both commands refuse it
    with replace's message (merge used to bake an incomplete VAE and call it 'family unknown')."""
    sd = load_file(files["vae", "sd1"])
    if damage == "missing":
        del sd["decoder.conv_out.weight"], sd["decoder.conv_out.bias"]
        expected = "lacks 2 tensor(s) (first: decoder.conv_out.weight)"
    elif damage == "extra":
        sd["decoder.extra_layer.weight"] = sd["decoder.conv_out.bias"].clone()
        expected = "has 1 unexpected tensor(s) (first: decoder.extra_layer.weight)"
    else:
        sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"][:1].clone()
        expected = "decoder.conv_out.bias is [1], the checkpoint has [3]"
    vae = tmp_path / f"vae-ft-mse-840000-ema-pruned-{damage}.safetensors"
    save_file(sd, vae)
    a, b = files["ckpt", "sd1"], files["ckpt2", "sd1"]
    r = cli("replace", a, "--vae", vae, "-o", tmp_path / "r.safetensors")
    m = cli("merge", "weighted_sum", a, b, "--alpha", "0.5", "--vae", vae, "-o", tmp_path / "m.safetensors")
    for res in (r, m):
        assert res.returncode == 1, res.stderr
        line = res.stderr.strip()
        assert "\n" not in line and f"{vae.name} does not fit this checkpoint's vae: " in line, line
        assert expected in line, line
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """SD1 text encoder + VAE around an SDXL UNet: the kind of file a bad conversion script leaves."""
    d = tmp_path_factory.mktemp("mixed")
    sd1 = load_file(write_model(d / "sd1.safetensors", "sd1_checkpoint", dtype="F16", fmt="safetensors"))
    xl = load_file(write_model(d / "xl.safetensors", "sdxl_checkpoint", dtype="F16", fmt="safetensors"))
    dm = "model.diffusion_model."
    sd = {**{k: v for k, v in sd1.items() if not k.startswith(dm)}, **{k: v for k, v in xl.items() if k.startswith(dm)}}
    path = d / "mixed.safetensors"
    save_file(sd, path)
    return path


WORDS = "text encoders look SD1 (32 wide) but the UNet's cross-attention is"


@pytest.mark.parametrize("op", ["extract", "prune", "precision", "replace", "to_diffusers"])
def test_a_file_mixing_families_is_refused_by_every_transform(mixed, tmp_path, op):
    from ckptlab.ops.components import extract, replace
    from ckptlab.ops.diffusers_io import to_diffusers
    from ckptlab.ops.precision import convert_precision
    from ckptlab.ops.prune import prune

    calls = {
        "extract": lambda: extract([mixed], "vae", out_dir=tmp_path),
        "prune": lambda: prune([mixed], out_dir=tmp_path),
        "precision": lambda: convert_precision([mixed], "bf16", out_dir=tmp_path),
        "replace": lambda: replace([mixed], unet=mixed, out_dir=tmp_path),
        "to_diffusers": lambda: to_diffusers(mixed, tmp_path / "pipe"),
    }
    with pytest.raises(MismatchError, match="the file mixes families"):
        calls[op]()
    assert list(tmp_path.iterdir()) == []


def test_mixed_file_refused_through_the_cli(cli, mixed, tmp_path):
    r = cli("extract", mixed, "--component", "vae", "--out-dir", tmp_path)
    assert r.returncode == 1 and "the file mixes families" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
