"""diffusers itself as the oracle of ``lora bake``: the pipeline of our ``to-diffusers`` folder of the small SD1
checkpoint loads the LoRA with its own ``load_lora_weights`` (PEFT, or diffusers' kohya converter) and fuses it
with ``fuse_lora``; our baked checkpoint, converted with the same ``to-diffusers``, must hold the same UNet and
text-encoder weights within fp32 tolerance."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fakes.sample_files import make_model  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ckptlab.lora.bake import bake  # noqa: E402
from ckptlab.ops.diffusers_io import to_diffusers  # noqa: E402


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake_diffusers")
    ckpt = make_model(d / "sd1.safetensors", "sd1_checkpoint")
    to_diffusers(ckpt, d / "pipe")
    return d, ckpt


def _pipe(folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                             safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("spec,scale", [("sd1_peft_lora", 1.0), ("sd1_kohya_lora", 1.0), ("sd1_kohya_lora", 0.6)])
def test_bake_equals_diffusers_fuse_lora(sd1, tmp_path, spec, scale):
    d, ckpt = sd1
    lora = make_model(tmp_path / f"{spec}.safetensors", spec)
    theirs = _pipe(d / "pipe")
    before = {c: {k: v.clone() for k, v in getattr(theirs, c).state_dict().items()} for c in ("unet", "text_encoder")}
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=scale)
    theirs.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers (plain state-dict names)
    baked = tmp_path / "baked.safetensors"
    bake(ckpt, [lora], baked, strengths=[scale])
    to_diffusers(baked, tmp_path / "ours")
    ours = _pipe(tmp_path / "ours")
    changed = {}
    for comp in ("unet", "text_encoder"):
        sa, sb = getattr(ours, comp).state_dict(), getattr(theirs, comp).state_dict()
        assert set(sa) == set(sb), comp
        for k in sa:
            assert torch.allclose(sa[k], sb[k], atol=1e-5, rtol=1e-5), (comp, k, (sa[k] - sb[k]).abs().max())
        changed[comp] = sum(not torch.equal(sa[k], before[comp][k]) for k in sa)
    # the LoRA did change the model (the comparison is not vacuous): every module of the file, UNet and TE
    with safe_open(str(lora), "pt") as f:
        n_te = sum(1 for k in f.keys() if k.endswith(("lora_down.weight", "lora_A.weight"))
                   and k.startswith(("lora_te", "text_encoder")))
    assert changed["unet"] > 0 and changed["text_encoder"] == n_te, changed
