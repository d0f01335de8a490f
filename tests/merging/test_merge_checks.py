"""Refusals and key policies: families, shapes, inpaint conv_in, missing keys, outputs; VAE bake, prune."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptlab.errors import CkptlabError, MismatchError, OutputError
from ckptlab.merging import merge
from ckptlab.sample.build import write_model

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("checks")
    return {
        "a": write_model(d / "a.safetensors", "sd1_checkpoint", dtype="F32", seed=1),
        "b": write_model(d / "b.safetensors", "sd1_checkpoint", dtype="F32", seed=2),
        "xl": write_model(d / "xl.safetensors", "sdxl_checkpoint", dtype="F32", seed=3),
        "inpaint": write_model(d / "inpaint.safetensors", "sd1_inpaint", dtype="F32", seed=4),
        "vae": write_model(d / "vae.safetensors", "sd1_vae", dtype="F32", seed=5),
        "ema": write_model(d / "ema.safetensors", "sd1_checkpoint", dtype="F16", seed=6, ema=True),
        "xl_unet": write_model(d / "unet.safetensors", "sd1_unet", dtype="F16", seed=7),
    }


def test_refuses_different_families_naming_them(files, tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(MismatchError) as e:
        merge("weighted_sum", [files["xl"], files["a"]], out)
    assert "sdxl" in str(e.value) and "sd1" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_shape_mismatch_before_writing(files, tmp_path):
    sd = load_file(files["b"])
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    sd[k] = torch.zeros(sd[k].shape[0] + 1, *sd[k].shape[1:])
    bad = tmp_path / "bad.safetensors"
    save_file(sd, bad)
    out = tmp_path / "o.safetensors"
    with pytest.raises(MismatchError, match="different shapes"):
        merge("add_difference", [files["a"], bad, files["b"]], out)
    assert not out.exists()


def test_inpaint_a_merges_shared_channels(files, tmp_path):
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [files["inpaint"], files["a"]], out, params={"alpha": 0.4})
    assert r.steps[0].inpaint_sliced == 1
    a, b, o = load_file(files["inpaint"])[CONV_IN], load_file(files["a"])[CONV_IN], load_file(out)[CONV_IN]
    assert a.shape[1] == 9 and b.shape[1] == 4 and o.shape == a.shape
    torch.testing.assert_close(o[:, :4], a[:, :4] * 0.6 + b * 0.4)
    assert o[:, 4:].equal(a[:, 4:])


def test_inpaint_must_be_a(files, tmp_path):
    with pytest.raises(MismatchError, match="inpaint/pix2pix model first"):
        merge("weighted_sum", [files["a"], files["inpaint"]], tmp_path / "o.safetensors")


@pytest.fixture(scope="session")
def b_partial(files, tmp_path_factory):
    """B without one UNet key and with one key A does not have."""
    sd = load_file(files["b"])
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.extra_head.weight"] = torch.full((3, 3), 7.0)
    p = tmp_path_factory.mktemp("partial") / "b_partial.safetensors"
    save_file(sd, p)
    return p


@pytest.mark.parametrize("policy", ["keep-a", "union", "intersect", "error"])
def test_missing_key_policies(policy, files, b_partial, tmp_path):
    out = tmp_path / "o.safetensors"
    gone, extra = "model.diffusion_model.out.2.bias", "model.diffusion_model.extra_head.weight"
    if policy == "error":
        with pytest.raises(MismatchError, match="--missing error"):
            merge("weighted_sum", [files["a"], b_partial], out, missing=policy)
        return
    r = merge("weighted_sum", [files["a"], b_partial], out, missing=policy)
    o, a = load_file(out), load_file(files["a"])
    s = r.steps[0]
    if policy == "intersect":
        assert gone not in o and extra not in o and s.dropped == 2
    else:
        assert o[gone].equal(a[gone]) and s.kept_from_a >= 1 and gone in s.only_in_a_keys
    if policy == "union":
        assert o[extra].equal(torch.full((3, 3), 7.0)) and s.copied_from_other == 1
    else:
        assert extra not in o


def test_output_rules(files, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        merge("weighted_sum", [files["a"], files["b"]], out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OutputError, match="one of the inputs"):
        merge("weighted_sum", [files["a"], files["b"]], files["a"], overwrite=True)
    with pytest.raises(CkptlabError, match="unknown merge method"):
        merge("average_everything", [files["a"], files["b"]], tmp_path / "x.safetensors")
    with pytest.raises(MismatchError, match="takes 3 models"):
        merge("triple_sum", [files["a"], files["b"]], tmp_path / "x.safetensors")


def test_vae_bake_and_prune(files, tmp_path):
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [files["ema"], files["ema"]], out, vae=files["vae"], prune=True)
    o, v = load_file(out), load_file(files["vae"])
    assert r.vae_replaced == len(v) and r.pruned > 0
    assert not any(k.startswith("model_ema.") for k in o)
    for k, t in v.items():
        assert o["first_stage_model." + k].equal(t.half())  # A is fp16: the VAE is cast to A's dtype
    a = load_file(files["ema"])
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert o[k].equal(a[k])


def test_vae_that_does_not_fit_is_refused(files, tmp_path):
    v = load_file(files["vae"])
    k = next(k for k in v if k.endswith("conv_in.weight"))
    v[k] = torch.zeros(v[k].shape[0] * 2, *v[k].shape[1:])
    bad = tmp_path / "bad_vae.safetensors"
    save_file(v, bad)
    with pytest.raises(MismatchError, match="does not fit"):
        merge("weighted_sum", [files["a"], files["b"]], tmp_path / "o.safetensors", vae=bad)
    with pytest.raises(MismatchError, match="no VAE weights"):
        merge("weighted_sum", [files["a"], files["b"]], tmp_path / "o.safetensors", vae=files["xl_unet"])


def test_pickle_checkpoint_input(files, tmp_path):
    pytest.importorskip("ckptlab.formats.pickle")
    ck = write_model(tmp_path / "b.ckpt", "sd1_checkpoint", dtype="F32", seed=2, fmt="ckpt")
    out = tmp_path / "o.safetensors"
    merge("weighted_sum", [files["a"], ck], out, params={"alpha": 0.5})
    ref = tmp_path / "ref.safetensors"
    merge("weighted_sum", [files["a"], files["b"]], ref, params={"alpha": 0.5})
    o, r = load_file(out), load_file(ref)
    assert set(o) == set(r) and all(o[k].equal(r[k]) for k in r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_clean_refusal(files, tmp_path):
    out = tmp_path / "o.safetensors"
    with pytest.raises(CkptlabError, match="no CUDA GPU"):
        merge("weighted_sum", [files["a"], files["b"]], out, device="cuda")
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_path_matches_cpu(files, tmp_path):
    cpu, gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    for dev, out in (("cpu", cpu), ("cuda", gpu)):
        merge("add_difference", [files["a"], files["b"], files["a"]], out, params={"alpha": "GRAD_V"}, device=dev)
    x, y = load_file(cpu), load_file(gpu)
    assert set(x) == set(y)
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6)


def _diffusers_folder(root, seed):
    """A minimal diffusers pipeline folder (model_index.json + unet/) with real diffusers UNet key names."""
    import json

    g = torch.Generator().manual_seed(seed)
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                           "cross_attention_dim": 768}))
    keys = {"conv_in.weight": (32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (32, 32, 3, 3),
            "mid_block.resnets.0.norm1.weight": (64,), "up_blocks.3.attentions.2.proj_out.weight": (32, 32),
            "conv_out.bias": (4,)}
    save_file({k: torch.randn(s, generator=g) for k, s in keys.items()},
              root / "unet" / "diffusion_pytorch_model.safetensors")
    return root


def test_diffusers_folders_merge_into_one_file(tmp_path):
    from ckptlab.merging.provenance import sha256_path

    a = _diffusers_folder(tmp_path / "a", 1)
    b = _diffusers_folder(tmp_path / "b", 2)
    out = tmp_path / "o.safetensors"
    r = merge("weighted_sum", [a, b], out, params={"alpha": 0.25})
    o = load_file(out)
    ua = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    ub = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(o) == {"unet." + k for k in ua}
    for k in ua:
        torch.testing.assert_close(o["unet." + k], ua[k] * 0.75 + ub[k] * 0.25)
    assert r.inputs[0].format == "diffusers" and r.inputs[0].sha256 == sha256_path(a)
    with pytest.raises(MismatchError, match="diffusers folder"):
        merge("weighted_sum", [a, b], tmp_path / "v.safetensors", vae=tmp_path / "a" / "unet" /
              "diffusion_pytorch_model.safetensors")


def test_parameter_the_method_does_not_take_is_refused(files, tmp_path):
    with pytest.raises(CkptlabError, match="does not take --density"):
        merge("weighted_sum", [files["a"], files["b"]], tmp_path / "o.safetensors", params={"density": 0.3})


# -- parameter ranges: refused before anything is written --------------------------------------------
@pytest.mark.parametrize(("method", "params", "needle"), [
    ("ties", {"density": 7}, "--density 7 is outside (0, 1]"),
    ("ties", {"density": 0}, "--density 0 is outside (0, 1]"),
    ("dare", {"density": -0.5}, "--density -0.5 is outside (0, 1]"),
    ("ties", {"density": "0.5,IN=1.5"}, "--density 1.5 is outside"),
    ("dare", {"density": "0,IN=0.5"}, "--density 0 is outside (0, 1]"),  # a bare 0 for the unnamed blocks
    ("extract", {"gamma": -1}, "--gamma -1 is outside [0, inf)"),
    ("weighted_sum", {"alpha": "nan"}, "--alpha nan"),
    ("weighted_sum", {"alpha": "0.5,OUT=inf"}, "--alpha inf"),
])
def test_out_of_range_parameters_are_refused_before_writing(files, tmp_path, method, params, needle):
    from ckptlab.merging.methods import MethodError

    models = [files["a"], files["b"]] + ([files["b"]] if method == "extract" else [])
    out = tmp_path / "o.safetensors"
    with pytest.raises(MethodError) as e:
        merge(method, models, out, params=params)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_density_one_is_allowed(files, tmp_path):
    merge("ties", [files["a"], files["b"]], tmp_path / "o.safetensors", params={"density": 1})
    assert (tmp_path / "o.safetensors").exists()


def test_chain_with_a_bad_later_step_writes_no_intermediate(files, tmp_path):
    """The range check of step 2's per-block density happens before step 1's intermediate is written."""
    from ckptlab.merging import loads, run_recipe
    from ckptlab.merging.methods import MethodError

    save = tmp_path / "mix.safetensors"
    text = f"""version = 1
[inputs.A]
path = "{files['a']}"
[inputs.B]
path = "{files['b']}"
[[steps]]
name = "mix"
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.5
save = "{save}"
[[steps]]
name = "t"
method = "ties"
inputs = ["A", "mix"]
density = "GRAD_A"
"""
    with pytest.raises(MethodError, match=r"step 't': block BASE: --density 0"):  # a preset's BASE is 0
        run_recipe(loads(text), tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MethodError, match=r"step 't': --density 7"):  # no family needed: refused at load
        loads(text.replace('"GRAD_A"', "7")).validate()


def test_hashing_a_vanished_input_is_a_one_line_error(tmp_path):
    """The inputs are hashed while the merge runs; one deleted meanwhile is a FormatError, not an OSError."""
    from ckptlab.errors import FormatError
    from ckptlab.merging.provenance import sha256_many

    with pytest.raises(FormatError, match="cannot read to hash"):
        sha256_many([tmp_path / "gone.safetensors"])


def test_overflow_to_inf_is_reported(files, tmp_path):
    """A difference scaled past fp16's range (65504) turns into Inf when cast: the merge says so, with the
    key, instead of silently writing a model that renders black."""
    a, b = files["a"], files["b"]
    ok = merge("add_difference", [a, b, a], tmp_path / "ok.safetensors", params={"alpha": 1.0}, dtype="fp16")
    assert ok.steps[0].nonfinite == 0 and not any("NaN or Inf" in w for w in ok.warnings)
    bad = merge("add_difference", [a, b, a], tmp_path / "bad.safetensors", params={"alpha": 1e6}, dtype="fp16")
    out = load_file(tmp_path / "bad.safetensors")
    really = [k for k, t in out.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    assert bad.steps[0].nonfinite == len(really) > 0
    assert bad.steps[0].nonfinite_keys[0] in really
    assert any("NaN or Inf" in w and bad.steps[0].nonfinite_keys[0] in w for w in bad.warnings)
    # fp32 output keeps the same values finite
    wide = merge("add_difference", [a, b, a], tmp_path / "wide.safetensors", params={"alpha": 1e6}, dtype="fp32")
    assert wide.steps[0].nonfinite == 0
