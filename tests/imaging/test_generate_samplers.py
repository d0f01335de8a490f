"""Sampler and schedule names as A1111 and ComfyUI users write them, mapped onto diffusers' schedulers.

The expected classes are diffusers' own "A1111/k-diffusion -> diffusers" table (docs: schedulers overview),
written out here; the aliases are A1111's (``sd_samplers_kdiffusion.py``: ``k_euler_a``...) and ComfyUI's KSampler
``sampler_name`` values.
"""

from __future__ import annotations

import pytest

from ckptlab.errors import UsageError
from ckptlab.imaging.samplers import SAMPLERS, find_sampler, find_schedule, resolve, scheduler_for

TABLE = {  # what a user types -> (diffusers class, overrides that must be set)
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "k_dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_gpu": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "uni_pc": ("UniPCMultistepScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
}
MODEL_CFG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1,
             "clip_sample": False, "set_alpha_to_one": False}


@pytest.mark.parametrize("name", list(TABLE))
def test_names_map_to_diffusers_table(name):
    pytest.importorskip("diffusers")
    cls, over = TABLE[name]
    sched = scheduler_for(MODEL_CFG, find_sampler(name), "automatic")
    assert type(sched).__name__ == cls
    for k, v in over.items():
        assert sched.config[k] == v
    # the model's own config is kept: v-prediction and its spacing survive the sampler change
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.timestep_spacing == "leading"


def test_every_sampler_builds_and_names_are_unique():
    pytest.importorskip("diffusers")
    seen: set[str] = set()
    for s in SAMPLERS:
        mine = {n.lower() for n in (s.name, *s.aliases)}
        assert not mine & seen
        seen |= mine
        for n in (s.name, *s.aliases):
            assert find_sampler(n) is s
            assert find_sampler(n.upper()) is s
        scheduler_for(MODEL_CFG, s, "automatic")


@pytest.mark.parametrize(("given", "schedule", "want"), [
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "karras")),
    ("DPM++ 2M Karras", "karras", ("DPM++ 2M", "karras")),
    ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "karras")),
    ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "exponential")),
    ("dpmpp_2m", "karras", ("DPM++ 2M", "karras")),
    ("Euler", "sgm_uniform", ("Euler", "sgm_uniform")),
    ("Euler", "SGM Uniform", ("Euler", "sgm_uniform")),
    ("Euler", "normal", ("Euler", "normal")),
    ("DDIM", None, ("DDIM", "automatic")),
])
def test_old_a1111_names_carry_their_schedule(given, schedule, want):
    s, k = resolve(given, schedule)
    assert (s.name, k) == want


def test_schedule_overrides_reach_the_scheduler():
    pytest.importorskip("diffusers")
    karras = scheduler_for(MODEL_CFG, find_sampler("DPM++ 2M"), "karras")
    assert karras.config.use_karras_sigmas is True
    auto = scheduler_for(MODEL_CFG, find_sampler("DPM++ 2M"), "automatic")
    assert not auto.config.use_karras_sigmas
    assert scheduler_for(MODEL_CFG, find_sampler("Euler"), "sgm_uniform").config.timestep_spacing == "trailing"
    assert scheduler_for(MODEL_CFG, find_sampler("Euler"), "uniform").config.timestep_spacing == "linspace"


@pytest.mark.parametrize(("sampler", "schedule", "words"), [
    ("Euler b", None, "unknown sampler"),
    ("DPM++ 2M Karras", "exponential", "Karras"),
    ("Euler", "polyexponential-ish", "unknown schedule"),
])
def test_bad_names_are_usage_errors(sampler, schedule, words):
    with pytest.raises(UsageError, match=words):
        resolve(sampler, schedule)


def test_schedule_the_scheduler_lacks_is_refused():
    pytest.importorskip("diffusers")
    with pytest.raises(UsageError, match="no Karras schedule"):
        scheduler_for(MODEL_CFG, find_sampler("Euler a"), "karras")
    assert find_schedule(None) == "automatic"


def test_defaults_are_documented_values():
    """The defaults a user can predict: DPM++ 2M, Automatic schedule, 20 steps, CFG 7 (A1111's txt2img defaults
    except the schedule, see docs)."""
    from ckptlab.imaging.render import Settings
    from ckptlab.imaging.samplers import DEFAULT_SAMPLER, resolve

    s = Settings("x")
    assert (s.sampler, s.schedule, s.steps, s.cfg, s.clip_skip, s.seed) == (None, None, 20, 7.0, 1, -1)
    assert resolve(s.sampler, s.schedule)[0].name == "DPM++ 2M"  # None: the default (SD3 has its own: Euler)
    assert DEFAULT_SAMPLER == "DPM++ 2M"
