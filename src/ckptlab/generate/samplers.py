"""A1111's sampler and schedule-type names, mapped onto diffusers' schedulers.

The table follows diffusers' own "A1111/k-diffusion <-> diffusers" list (docs: schedulers overview). A sampler
is a scheduler class plus config overrides; a schedule type adds sigma spacing overrides. ``Automatic`` (A1111's
default) keeps the scheduler's own spacing from the model's scheduler config: what diffusers does by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptlab.errors import UsageError


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its infotext name, diffusers' scheduler class and config overrides."""

    name: str
    scheduler: str
    options: dict = field(default_factory=dict)
    #: samplers that draw fresh noise every step (their images depend on the generator past the first latents)
    stochastic: bool = False


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            True),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler"),
    Sampler("DPM2", "KDPM2DiscreteScheduler"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True),
    Sampler("Euler", "EulerDiscreteScheduler"),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True),
    Sampler("Heun", "HeunDiscreteScheduler"),
    Sampler("LMS", "LMSDiscreteScheduler"),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("DDPM", "DDPMScheduler", stochastic=True),
    Sampler("PLMS", "PNDMScheduler"),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("DEIS", "DEISMultistepScheduler"),
    Sampler("LCM", "LCMScheduler", stochastic=True),
)
DEFAULT_SAMPLER = "DPM++ 2M"

#: schedule type -> (infotext name, config overrides); the scheduler must have the option
SCHEDULES: dict[str, tuple[str, dict]] = {
    "automatic": ("Automatic", {}),
    "karras": ("Karras", {"use_karras_sigmas": True}),
    "exponential": ("Exponential", {"use_exponential_sigmas": True}),
    "beta": ("Beta", {"use_beta_sigmas": True}),
    "sgm_uniform": ("SGM Uniform", {"timestep_spacing": "trailing"}),
    "uniform": ("Uniform", {"timestep_spacing": "linspace"}),
}


def _norm(text: str) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum() or ch == "+")


def find_sampler(name: str) -> Sampler:
    """The sampler A1111 calls ``name`` (case, spaces and punctuation other than ``+`` ignored); a ``Karras`` suffix (``DPM++ 2M Karras``, A1111 before 1.9) is
    refused with the spelling to use. Unknown: ``UsageError`` listing the names."""
    want = _norm(name)
    for s in SAMPLERS:
        if _norm(s.name) == want:
            return s
    for s in SAMPLERS:
        if _norm(s.name + " karras") == want:
            raise UsageError(f"sampler {name!r}: write --sampler {s.name!r} --schedule karras (A1111 1.9 split them)")
    raise UsageError(f"unknown sampler {name!r}; known: {', '.join(s.name for s in SAMPLERS)}")


def find_schedule(name: str | None) -> str:
    """The key of ``SCHEDULES`` for ``name`` (None: automatic)."""
    if name is None:
        return "automatic"
    want = _norm(name)
    for key, (label, _) in SCHEDULES.items():
        if want in (_norm(key), _norm(label)):
            return key
    if want == "normal":
        return "automatic"
    raise UsageError(f"unknown schedule type {name!r}; known: {', '.join(v[0] for v in SCHEDULES.values())}")


def scheduler_for(base_config: dict, sampler: Sampler, schedule: str):
    """A diffusers scheduler for ``sampler``/``schedule`` built on the model's own scheduler config
    (``prediction_type``, betas, spacing); refuses a schedule the scheduler has no option for."""
    import inspect

    import diffusers

    cls = getattr(diffusers, sampler.scheduler)
    _, extra = SCHEDULES[schedule]
    overrides = {**sampler.options, **extra}
    accepted = set(inspect.signature(cls.__init__).parameters)
    for k in extra:
        if k not in accepted:
            raise UsageError(f"sampler {sampler.name!r} has no {SCHEDULES[schedule][0]} schedule in diffusers")
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    return cls.from_config({**cfg, **overrides})
