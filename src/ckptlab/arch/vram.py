"""VRAM estimate for inference at a family's native resolution, from parameter counts, dtypes and the family
(never from the file size). Formulas: ComfyUI's (``model_base.BaseModel.memory_required`` for
activations, ``sd.VAE`` decode memory, ``model_management.minimum_inference_memory`` reserve); docs/inspect.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptlab.arch.family import Family

GIB = 1024**3
#: typical parameter counts of components a pipeline needs when the file does not carry them
TYPICAL_PARAMS = {"clip_l": 123_060_480, "clip_g": 694_659_841, "openclip_h": 354_032_641,
                  "t5xxl": 4_762_310_656, "vae": 83_653_863}
RESERVE_GIB = 1.2  # ComfyUI minimum_inference_memory 0.8 GiB + 400 MiB extra reserve
DECODE_BYTES_PER_LATENT_PIXEL = 2178 * 64  # ComfyUI sd.VAE.memory_used_decode, per latent pixel, per byte of dtype


@dataclass
class VramEstimate:
    gib: float
    resolution: int | None
    weights_gib: float
    working_gib: float
    reserve_gib: float
    #: the two candidates for working memory (their max is ``working_gib``); 0 for weights-only estimates
    activations_gib: float = 0.0
    vae_decode_gib: float = 0.0
    assumptions: list[str] = field(default_factory=list)


def estimate(family: Family | None, present: dict[str, tuple[int, float]], *, diffusion: bool,
             resolution: int | None = None, notes: list[str] | None = None) -> VramEstimate | None:
    """``present``: component -> (params, bytes per parameter at inference: fp32/fp64 already counted as 2,
    quantized types at their packed size). ``diffusion``: the file is (or holds) a diffusion model; other files
    (adapters, VAEs, text encoders) get a weights-only figure. ``notes``: assumptions made by the caller."""
    assumptions: list[str] = list(notes or [])
    if not present:
        return None
    weights = sum(params * b for params, b in present.values())
    if not diffusion or family is None:
        assumptions.insert(0, "weights of this file only (no family-level pipeline known or needed)")
        return VramEstimate(round(weights / GIB, 2), None, round(weights / GIB, 2), 0.0, 0.0, assumptions=assumptions)
    res, f = resolution or family.resolution, family.latent_factor
    missing = [c for c in (*family.text_encoders, "vae") if c not in present]
    for comp in missing:
        weights += TYPICAL_PARAMS.get(comp, 0) * 2
    if missing:
        assumptions.append(f"not in the file, typical fp16 sizes counted: {', '.join(missing)}")
    latent = (res // f) ** 2
    compute = 2  # activations and decode run in fp16/bf16 whatever the weights' storage
    act = family.cfg_batch * latent * compute * 0.01 * family.memory_factor * 1024**2  # ComfyUI, optimised attention
    decode = latent * DECODE_BYTES_PER_LATENT_PIXEL * compute
    working = max(act, decode)
    assumptions += [
        f"{res}x{res}, batch 1, {family.cfg_batch} model evaluation(s) per step"
        + (" (classifier-free guidance)" if family.cfg_batch == 2 else ""),
        "all components resident on the GPU (no offloading)",
        f"working memory: max(denoising activations {act / GIB:.2f} GiB [ComfyUI memory_usage_factor "
        f"{family.memory_factor}, optimised attention], untiled VAE decode {decode / GIB:.2f} GiB)",
        f"{RESERVE_GIB} GiB reserve (ComfyUI minimum inference memory)",
    ]
    total = weights + working + RESERVE_GIB * GIB
    return VramEstimate(round(total / GIB, 2), res, round(weights / GIB, 2), round(working / GIB, 2), RESERVE_GIB,
                        round(act / GIB, 3), round(decode / GIB, 3), assumptions)
