"""SD3 images from our in-memory pipeline (no T5) against diffusers' own single-file pipeline, the flow sampler
table, the T5-less warning, and the in-place reload of derived weights (what LoRA strength changes use).

Oracle: ``StableDiffusion3Pipeline.from_single_file(..., text_encoder_3=None, tokenizer_3=None,
config=DIR)`` with a config folder written by hand (``fakes/sd3_oracle``), same prompt, same CPU generator seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes.sample_files import load, make_model
from fakes.sd3_oracle import config_dir

from ckptlab.errors import UsageError
from ckptlab.formats.base import TensorSource
from ckptlab.ops.run import open_checked

diffusers = pytest.importorskip("diffusers")
P = "model.diffusion_model."


def _render(pipe, seed: int, **kw):
    gen = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt="a red fox in snow", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
                height=64, width=64, generator=gen, output_type="np", **kw).images[0]


@pytest.mark.slow
@pytest.mark.parametrize("spec,clip_skip", [("sd3_medium", None), ("sd35_medium", 2)])
def test_image_equals_diffusers_single_file_pipeline(tmp_path, spec, clip_skip):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    src = make_model(tmp_path / f"{spec}.safetensors", spec)
    theirs = diffusers.StableDiffusion3Pipeline.from_single_file(
        str(src), config=str(config_dir(tmp_path / "cfg", spec)), text_encoder_3=None, tokenizer_3=None,
        local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    ours = load_sd3(open_checked(src))
    try:
        a = _render(ours.pipe, 7, clip_skip=clip_skip)
        b = _render(theirs, 7, clip_skip=clip_skip)
        assert a.shape == (64, 64, 3)
        assert np.abs(a - b).max() <= 1 / 255
        assert a.std() > 0.01  # an image, not a constant
        assert np.abs(_render(ours.pipe, 8, clip_skip=clip_skip) - a).max() > 1 / 255  # the seed matters
    finally:
        ours.close()


class Recording(TensorSource):
    """``base`` that records every key read and can serve replaced values."""

    format = "recording"

    def __init__(self, base: TensorSource):
        super().__init__(base.path)
        self.base, self.metadata, self.extra = base, base.metadata, base.extra
        self.read: set[str] = set()
        self.replaced: dict[str, np.ndarray] = {}

    def infos(self):
        return self.base.infos()

    def array(self, key):
        self.read.add(key)
        return self.replaced[key] if key in self.replaced else self.base.array(key)

    def close(self):
        self.base.close()


def test_t5_is_never_read_and_the_warning_says_so(tmp_path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    src = Recording(open_checked(make_model(tmp_path / "m.safetensors", "sd3_medium")))
    assert any(k.startswith("text_encoders.t5xxl.") for k in src.infos())
    ours = load_sd3(src)
    assert ours.pipe.text_encoder_3 is None
    assert not [k for k in src.read if k.startswith("text_encoders.t5xxl.")]
    assert len(ours.warnings) == 1 and "without its T5-XXL" in ours.warnings[0] and "CLIP-L and CLIP-G only" in \
        ours.warnings[0]
    ours.close()


def test_file_without_t5_still_warns_about_clip_only(tmp_path):
    from safetensors.torch import save_file

    from ckptlab.imaging.pipeline_sd3 import load_sd3

    full = make_model(tmp_path / "m.safetensors", "sd3_medium")
    save_file({k: v for k, v in load(full).items() if not k.startswith("text_encoders.t5xxl.")},
              str(tmp_path / "no_t5.safetensors"))
    ours = load_sd3(open_checked(tmp_path / "no_t5.safetensors"))
    assert ours.warnings == [ours.warnings[0]] and "has no T5-XXL" in ours.warnings[0]
    ours.close()


def test_reload_rereads_the_split_and_swapped_weights_in_place(tmp_path):
    from ckptlab.imaging.pipeline_sd3 import load_sd3

    src = Recording(open_checked(make_model(tmp_path / "m.safetensors", "sd3_medium")))
    ours = load_sd3(src)
    tr = ours.pipe.transformer
    qkv_key, ada_key = P + "joint_blocks.2.x_block.attn.qkv.weight", P + "final_layer.adaLN_modulation.1.weight"
    q_param = tr.transformer_blocks[2].attn.to_q.weight
    new_qkv = np.arange(192 * 64, dtype=np.float32).reshape(192, 64) / 1000
    new_ada = np.arange(128 * 64, dtype=np.float32).reshape(128, 64) / 1000
    src.replaced = {qkv_key: new_qkv, ada_key: new_ada}
    assert ours.reload({qkv_key, ada_key}) == 4  # to_q, to_k, to_v, norm_out
    assert tr.transformer_blocks[2].attn.to_q.weight is q_param  # in place
    assert torch.equal(tr.transformer_blocks[2].attn.to_k.weight, torch.from_numpy(new_qkv[64:128]))
    assert torch.equal(tr.norm_out.linear.weight, torch.from_numpy(np.concatenate([new_ada[64:], new_ada[:64]])))
    ours.close()


def test_flow_sampler_table():
    from ckptlab.imaging.pipeline_sd3 import SCHEDULER_CONFIG, flow_sampler, flow_scheduler

    s = flow_sampler("euler")
    assert s.name == "Euler" and flow_sampler("euler") == s
    sched = flow_scheduler(SCHEDULER_CONFIG, s)
    assert type(sched).__name__ == "FlowMatchEulerDiscreteScheduler" and sched.config.shift == 3.0
    with pytest.raises(UsageError, match=r"sampler 'DPM\+\+ 2M' does not work on SD3 .*use 'Euler'$"):
        flow_sampler("dpm++ 2m")
    with pytest.raises(UsageError, match="unknown sampler 'Nope'"):
        flow_sampler("Nope")
    with pytest.raises(UsageError, match="schedule type 'karras' does not work on SD3"):
        flow_scheduler(SCHEDULER_CONFIG, s, "karras")
