"""SD3 / SD3.5 single-file checkpoints as diffusers' ``StableDiffusion3Pipeline``, built in memory like the
SD1/SDXL path of ``generate.pipeline``: modules on the meta device, each weight read from the file (through the
LoRA-patching ``PatchedSource``), cast and put in place one tensor at a time (``weights.fill``).

The names and configs come from ``ops.diffusers_mmdit`` (diffusers' own converter's facts, configs from the
shapes). The pipeline runs **without T5-XXL**: ``text_encoder_3=None`` / ``tokenizer_3=None``, which diffusers
supports (the T5 part of the prompt embedding is zeros). The file's T5 weights are never read: ckptlab ships no
T5 tokenizer (a sentencepiece model) and downloads nothing. CLIP-L and CLIP-G use the shipped CLIP tokenizer
files (pad ``<|endoftext|>`` for L, ``!`` for G, as SD3's and SDXL's repos have them).

SD3 is a flow-matching model: the scheduler is ``FlowMatchEulerDiscreteScheduler`` with shift 3.0 (the
official scheduler config). ``FLOW_SAMPLERS`` is the A1111 sampler table for it.
"""

from __future__ import annotations

from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.base import TensorSource
from ckptlab.imaging.pipeline import Loaded, PatchedSource, go_offline, pick_dtype
from ckptlab.imaging.samplers import Sampler
from ckptlab.imaging.weights import clip_tokenizer, empty_model, fill, read_ahead
from ckptlab.ops.diffusers_config import init_kwargs
from ckptlab.ops.stream import Out

FAMILY = "sd3"
#: stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
#: A1111 sampler names that work on a flow-matching model -> diffusers scheduler (Forge's names for SD3)
FLOW_SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", "FlowMatchEulerDiscreteScheduler"),
)
#: schedule types for flow samplers: only the model's own (shifted) sigmas
FLOW_SCHEDULES = ("automatic",)
T5_WARNING = ("SD3 runs without its T5-XXL text encoder here (ckptlab ships no T5 tokenizer; the file's T5 "
              "weights are not read): the prompt is encoded by CLIP-L and CLIP-G only, so long prompts and text "
              "in the image follow less closely than with T5")
NO_T5_WARNING = ("this SD3 file has no T5-XXL text encoder and ckptlab runs SD3 without one: the prompt is "
                 "encoded by CLIP-L and CLIP-G only")


def flow_sampler(name: str) -> Sampler:
    """The flow-matching sampler A1111 calls ``name``; any other is a ``UsageError`` listing the ones that work."""
    from ckptlab.imaging.samplers import find_sampler, norm_name

    for s in FLOW_SAMPLERS:
        if norm_name(s.name) == norm_name(name):
            return s
    known = find_sampler(name).name  # an unknown name gets samplers.py's own message
    raise UsageError(f"sampler {known!r} does not work on SD3 (a flow-matching model); use "
                     f"{', '.join(repr(s.name) for s in FLOW_SAMPLERS)}")


def _check_flow_schedule(schedule: str) -> None:
    if schedule not in FLOW_SCHEDULES:
        raise UsageError(f"schedule type {schedule!r} does not work on SD3; use Automatic (the model's shifted "
                         "flow sigmas)")


def check_flow(sampler: str | None, schedule: str | None) -> None:
    """Refuse, before an SD3 model loads, a sampler or schedule type that does not work on flow matching (None:
    the defaults, Euler and Automatic)."""
    from ckptlab.imaging.samplers import find_schedule

    flow_sampler(sampler or "Euler")
    _check_flow_schedule(find_schedule(schedule))


def flow_scheduler(base_config: dict, sampler: Sampler, schedule: str = "automatic"):
    """The diffusers scheduler of ``sampler`` on the model's own flow config (``shift``); a schedule type other
    than Automatic is refused."""
    import diffusers

    _check_flow_schedule(schedule)
    cfg = init_kwargs(base_config)
    return getattr(diffusers, sampler.scheduler).from_config({**cfg, **sampler.options})



def load_sd3(src: TensorSource, *, device: str = "cpu", dtype=None, vae: TensorSource | None = None,
             loras: tuple[dict, dict] | None = None) -> Loaded:
    """diffusers' ``StableDiffusion3Pipeline`` of the SD3 / SD3.5 all-in-one checkpoint ``src`` (MMDiT, VAE,
    CLIP-L, CLIP-G; T5 left out, with a warning) on ``device`` at ``dtype`` (default: fp32 on CPU, bf16 on
    CUDA). ``vae``: an SD3 VAE file used instead of the checkpoint's; ``loras``: ``(weight patches, bias
    patches)`` keyed by source names (``lora.bake.match_loras``). A component missing from the file (a
    transformer-only file) is a ``MismatchError`` naming it."""
    go_offline()
    from ckptlab.ops import diffusers_mmdit as mm

    dtype = dtype if dtype is not None else pick_dtype(None, device, FAMILY)
    patched = PatchedSource(src)
    if loras is not None:
        patched.set_patches(*loras)
    items: dict[str, list[Out]] = {}
    items["transformer"], t_cfg, _ = mm.plan_transformer(patched)
    keys = src.infos()
    wanted = [("CLIP-L", mm.CLIP_PREFIXES["clip_l"]), ("CLIP-G", mm.CLIP_PREFIXES["clip_g"])]
    if vae is None:
        wanted.insert(0, ("VAE", mm.VAE_PREFIX))
    lacking = [name for name, prefix in wanted if not any(k.startswith(prefix) for k in keys)]
    if lacking:
        names = ", ".join(lacking[:-1]) + " and " + lacking[-1] if len(lacking) > 1 else lacking[0]
        raise MismatchError(f"missing component: {names} (not in this SD3 file): generate needs an all-in-one "
                            "checkpoint with CLIP-L and CLIP-G inside, such as sd3_medium_incl_clips*.safetensors "
                            "(separate text-encoder files are not loaded; a VAE file can be given with --vae)",
                            src.path)
    items["vae"], v_cfg = mm.plan_sd3_vae(vae) if vae is not None else mm.plan_sd3_vae(patched, mm.VAE_PREFIX)
    items["text_encoder"], l_cfg = mm.plan_clip(patched, "clip_l")
    items["text_encoder_2"], g_cfg = mm.plan_clip(patched, "clip_g")
    ahead = read_ahead(list(items.values()), device, dtype)  # noqa: F841 - alive until fill has taken its values

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    transformer = empty_model(lambda: diffusers.SD3Transformer2DModel.from_config(init_kwargs(t_cfg)))
    fill(transformer, items["transformer"], device, dtype, "MMDiT", src.path)
    vae_model = empty_model(lambda: diffusers.AutoencoderKL.from_config(init_kwargs(v_cfg)))
    fill(vae_model, items["vae"], device, dtype, "VAE", vae.path if vae is not None else src.path)
    parts: dict[str, object] = {"transformer": transformer, "vae": vae_model}
    for folder, cfg, pad in (("text_encoder", l_cfg, "<|endoftext|>"), ("text_encoder_2", g_cfg, "!")):
        cfg = {k: v for k, v in cfg.items() if k != "architectures"}
        te = empty_model(lambda cfg=cfg: CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))
        fill(te, items[folder], device, dtype, "CLIP-L" if folder == "text_encoder" else "CLIP-G", src.path)
        parts[folder] = te
        parts[folder.replace("text_encoder", "tokenizer")] = clip_tokenizer(pad)
    parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(init_kwargs(SCHEDULER_CONFIG))
    pipe = diffusers.StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    warnings = [T5_WARNING if mm.has_t5(src) else NO_T5_WARNING]
    return Loaded(pipe, FAMILY, "flow", patched, device, dtype, items, vae, warnings, dict(SCHEDULER_CONFIG))
