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
    #: other spellings: A1111's own aliases (``k_euler_a``) and ComfyUI's KSampler names (``euler_ancestral``)
    aliases: tuple[str, ...] = ()


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", aliases=("k_dpmpp_2m", "dpmpp_2m")),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, True,
            ("k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu")),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            True, ("k_dpmpp_3m_sde", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu")),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler", aliases=("k_dpmpp_sde", "dpmpp_sde", "dpmpp_sde_gpu")),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2", "dpm_2")),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", stochastic=True, aliases=("k_dpm_2_a", "dpm_2_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler", "euler")),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", stochastic=True,
            aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral")),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun", "heun")),
    Sampler("LMS", "LMSDiscreteScheduler", aliases=("k_lms", "lms")),
    Sampler("DDIM", "DDIMScheduler", aliases=("ddim",)),
    Sampler("DDPM", "DDPMScheduler", stochastic=True, aliases=("ddpm",)),
    Sampler("PLMS", "PNDMScheduler", aliases=("plms", "pndm")),
    Sampler("UniPC", "UniPCMultistepScheduler", aliases=("unipc", "uni_pc")),
    Sampler("DEIS", "DEISMultistepScheduler", aliases=("deis",)),
    Sampler("LCM", "LCMScheduler", stochastic=True, aliases=("k_lcm", "lcm")),
)
DEFAULT_SAMPLER = "DPM++ 2M"

#: schedule type -> (infotext name, config overrides, other spellings); the scheduler must have the option.
#: ``Normal``/``Uniform`` (k-diffusion's evenly spaced timesteps) are diffusers' ``linspace`` spacing, ``Simple``
#: and ``SGM Uniform`` its ``trailing`` spacing: the closest diffusers has, not the exact A1111/ComfyUI sigmas.
SCHEDULES: dict[str, tuple[str, dict]] = {
    "automatic": ("Automatic", {}),
    "karras": ("Karras", {"use_karras_sigmas": True}),
    "exponential": ("Exponential", {"use_exponential_sigmas": True}),
    "beta": ("Beta", {"use_beta_sigmas": True}),
    "sgm_uniform": ("SGM Uniform", {"timestep_spacing": "trailing"}),
    "simple": ("Simple", {"timestep_spacing": "trailing"}),
    "uniform": ("Uniform", {"timestep_spacing": "linspace"}),
    "normal": ("Normal", {"timestep_spacing": "linspace"}),
}
_SCHEDULE_SUFFIXES = {"karras": "karras", "exponential": "exponential"}


def norm_name(text: str) -> str:
    """A sampler or schedule name compared loosely: lower case, letters, digits and ``+`` only."""
    return "".join(ch for ch in str(text).lower() if ch.isalnum() or ch == "+")


def _lookup(want: str) -> Sampler | None:
    for s in SAMPLERS:
        if want == norm_name(s.name) or want in (norm_name(a) for a in s.aliases):
            return s
    return None


def find_sampler(name: str | None) -> Sampler:
    """The sampler A1111 calls ``name`` (case, spaces and punctuation other than ``+`` ignored), or one of its
    aliases (A1111's ``k_euler_a``, ComfyUI's ``euler_ancestral``, ``dpmpp_2m``...). A name with a schedule
    suffix (``DPM++ 2M Karras``, A1111 before 1.9) gives the sampler; ``resolve`` also takes its schedule.
    Unknown: ``UsageError`` listing the names."""
    return resolve(name, None)[0]


def resolve(sampler: str | None, schedule: str | None) -> tuple[Sampler, str]:
    """``(Sampler, SCHEDULES key)`` for the names a user or an infotext gives (sampler None: the default). A1111 before 1.9 wrote the
    schedule into the sampler's name (``DPM++ 2M Karras``, ``DPM++ 2M SDE Exponential``): that names the
    schedule too, and a different ``schedule`` is refused."""
    sampler = DEFAULT_SAMPLER if sampler is None else sampler
    want = norm_name(sampler)
    found = _lookup(want)
    sched = find_schedule(schedule)
    if found is None:
        for suffix, key in _SCHEDULE_SUFFIXES.items():
            if want.endswith(suffix) and _lookup(want[: -len(suffix)]) is not None:
                found = _lookup(want[: -len(suffix)])
                if schedule is not None and sched not in ("automatic", key):
                    raise UsageError(f"sampler {sampler!r} says {SCHEDULES[key][0]} but --schedule says "
                                     f"{SCHEDULES[sched][0]}: write --sampler {found.name!r} --schedule ...")
                sched = key
                break
    if found is None:
        raise UsageError(f"unknown sampler {sampler!r}; known: {', '.join(s.name for s in SAMPLERS)} (A1111's "
                         "k_* and ComfyUI's names such as euler_ancestral, dpmpp_2m are accepted too)")
    return found, sched


def find_schedule(name: str | None) -> str:
    """The key of ``SCHEDULES`` for ``name`` (None: automatic)."""
    if name is None:
        return "automatic"
    want = norm_name(name)
    for key, (label, _) in SCHEDULES.items():
        if want in (norm_name(key), norm_name(label)):
            return key
    raise UsageError(f"unknown schedule type {name!r}; known: {', '.join(v[0] for v in SCHEDULES.values())}")


def check_schedule(sampler: Sampler, schedule: str) -> None:
    """Refuse a schedule type diffusers' scheduler for ``sampler`` has no option for (one line), before any
    model loads."""
    import inspect

    from ckptlab.imaging.pipeline import go_offline

    go_offline()  # before diffusers (and huggingface_hub) import: they read the switches once
    import diffusers

    accepted = set(inspect.signature(getattr(diffusers, sampler.scheduler).__init__).parameters)
    for k in SCHEDULES[schedule][1]:
        if k not in accepted:
            raise UsageError(f"sampler {sampler.name!r} has no {SCHEDULES[schedule][0]} schedule in diffusers")


def scheduler_for(base_config: dict, sampler: Sampler, schedule: str):
    """A diffusers scheduler for ``sampler``/``schedule`` built on the model's own scheduler config
    (``prediction_type``, betas, spacing); refuses a schedule the scheduler has no option for."""
    import diffusers

    check_schedule(sampler, schedule)
    cls = getattr(diffusers, sampler.scheduler)
    overrides = {**sampler.options, **SCHEDULES[schedule][1]}
    from ckptlab.ops.diffusers_config import init_kwargs

    cfg = init_kwargs(base_config)
    return cls.from_config({**cfg, **overrides})
