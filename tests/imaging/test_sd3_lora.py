"""LoRAs on SD3 through the in-memory pipeline: a diffusers/PEFT-format SD3 LoRA (fused ``qkv`` rows, context
stream, MLP, CLIP-L) applied per key by ``PatchedSource`` gives the image diffusers' own LoRA loader
(``load_lora_weights`` + ``set_adapters``, PEFT layers, not merged) gives, at strength 1 and after an in-place
change to 0.5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes.sample_files import make_model
from fakes.sd3_oracle import config_dir

from ckptlab.ops.run import open_checked

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

#: module -> (out, in) of the small sd3_medium sample (hidden 64, MLP 256, CLIP-L 32); blocks 0 and 1 only: see
#: test_peft_lora_past_block_1_is_taken_for_sdxl
MODULES = {"transformer.transformer_blocks.0.attn.to_q": (64, 64),
           "transformer.transformer_blocks.1.attn.add_v_proj": (64, 64),
           "transformer.transformer_blocks.1.ff.net.0.proj": (256, 64),
           "transformer.transformer_blocks.0.attn.to_out.0": (64, 64),
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32)}


def _lora(path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(11)
    sd = {}
    for m, (out, inp) in MODULES.items():
        sd[f"{m}.lora_A.weight"] = torch.randn(4, inp, generator=g) * 0.3
        sd[f"{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.3
    save_file(sd, str(path))
    return path


def _render(pipe):
    gen = torch.Generator("cpu").manual_seed(4)
    return pipe(prompt="a lighthouse", negative_prompt="", num_inference_steps=2, guidance_scale=4.0, height=64,
                width=64, generator=gen, output_type="np").images[0]


@pytest.mark.slow
def test_lora_image_equals_diffusers_peft_lora(tmp_path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3
    from ckptlab.lora.bake import BakeResult, match_loras
    from ckptlab.lora.file import LoraFile

    src_path = make_model(tmp_path / "m.safetensors", "sd3_medium")
    lora_path = _lora(tmp_path / "style.safetensors")
    theirs = diffusers.StableDiffusion3Pipeline.from_single_file(
        str(src_path), config=str(config_dir(tmp_path / "cfg", "sd3_medium")), text_encoder_3=None,
        tokenizer_3=None, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    plain = _render(theirs)
    theirs.load_lora_weights(str(lora_path), adapter_name="style")

    src = open_checked(src_path)
    lf = LoraFile.open(lora_path)
    report = BakeResult("generate", src_path, None, False, "sd3", [])
    patches = match_loras(src.infos(), "sd3", [lf], [(1.0, 1.0)], report)
    assert sum(len(p) for p in patches[0].values()) == len(MODULES)  # every module found its weight
    ours = load_sd3(src, loras=patches)
    try:
        a, b = _render(ours.pipe), _render(theirs)
        assert np.abs(a - plain).max() > 10 / 255  # the LoRA changes the image
        assert np.abs(a - b).max() <= 1 / 255
        # a new strength, in place: only the touched weights are read again
        half = match_loras(src.infos(), "sd3", [lf], [(0.5, 0.5)], report)
        # to_q and add_v_proj are rows of a fused qkv: its three diffusers slices are read again
        assert ours.set_loras(*half) == 3 + 3 + 1 + 1 + 1
        theirs.set_adapters(["style"], [0.5])
        assert np.abs(_render(ours.pipe) - _render(theirs)).max() <= 1 / 255
    finally:
        ours.close()
        lf.close()


def test_peft_lora_past_block_1_is_sd3_not_sdxl(tmp_path):
    """diffusers' SD3 names past block 1 (transformer_blocks.5.attn.add_k_proj) were taken for SDXL (only SDXL has
    more than two transformer blocks per UNet attention) and the LoRA refused."""
    from safetensors.torch import save_file

    from ckptlab.arch.identify import identify

    path = tmp_path / "l.safetensors"
    save_file({"transformer.transformer_blocks.5.attn.add_k_proj.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.5.attn.add_k_proj.lora_B.weight": torch.zeros(64, 4)}, str(path))
    assert identify(open_checked(path)).family == "sd3"


def test_joint_attention_lora_at_flux_width_is_flux(tmp_path):
    """The same context-stream names at Flux's width (3072) are a Flux LoRA that touches only double blocks."""
    from safetensors.torch import save_file

    from ckptlab.arch.identify import identify

    path = tmp_path / "f.safetensors"
    save_file({"transformer.transformer_blocks.5.attn.add_k_proj.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.5.attn.add_k_proj.lora_B.weight": torch.zeros(3072, 4)}, str(path))
    assert identify(open_checked(path)).family == "flux"
