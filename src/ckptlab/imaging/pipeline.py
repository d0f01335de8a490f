"""A diffusers pipeline built in memory from any model ckptlab reads: no folder on disk, no second copy in RAM.

The weights come from ``ops.diffusers_io``'s plan (the same single-file -> diffusers names ``to-diffusers``
writes, checked there against diffusers' own converter), the configs from the tensor shapes
(``ops.diffusers_config``), the tokenizers from the CLIP files ckptlab ships. Every module is built on the
``meta`` device (``accelerate.init_empty_weights``: no memory) and each weight is read from the
``TensorSource``, cast to the compute dtype and put in place one tensor at a time, so the peak is the weights at
the compute dtype plus one tensor. Nothing is fetched: the hub libraries are switched offline before they load.

LoRAs are applied with the bake's own per-key step (``lora.bake.baked``) through ``PatchedSource``; changing
their strengths re-reads only the weights they touch (``Loaded.set_loras``), in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ckptlab.arch.families import display_name, get
from ckptlab.errors import MismatchError, UsageError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.imaging.weights import clip_tokenizer, empty_model, fill, put, read_ahead
from ckptlab.ops.diffusers_config import init_kwargs
from ckptlab.ops.stream import Out

#: families generate can build a pipeline for (diffusers' StableDiffusion(XL)Pipeline)
TXT2IMG = ("sd1", "sd2", "sdxl")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1",
            # the libraries' own chatter (torchvision fallbacks, config notes) is not the user's business
            "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def go_offline() -> None:
    """Switch huggingface_hub / transformers / diffusers offline and quiet (before they are imported: they read it
    once)."""
    for k, v in _OFFLINE.items():
        os.environ[k] = v


def pick_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; a named device that is not there is a usage error."""
    import torch

    if device not in DEVICES:
        raise UsageError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device == "mps" and not mps:
        raise UsageError("--device mps: no MPS device is available")
    return device


def pick_dtype(dtype: str | None, device: str, family: str | None = None):
    """The compute dtype: given, else fp32 on CPU and fp16 on CUDA/MPS (bf16 for the families that need it)."""
    import torch

    if dtype is None:
        if device == "cpu":
            return torch.float32
        fam = get(family)
        return torch.bfloat16 if fam and fam.id in ("flux", "sd3") else torch.float16
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


class PatchedSource(TensorSource):
    """``base`` with LoRA patches applied to the weights they touch (``lora.bake.baked``, fp32); every other key
    reads through. ``set_patches`` swaps the patch set (a new strength) without reopening anything."""

    format = "patched"

    def __init__(self, base: TensorSource):
        super().__init__(base.path)
        self.base = base
        self.metadata = base.metadata
        self.extra = base.extra
        self.weights: dict[str, list] = {}
        self.biases: dict[str, list] = {}

    def set_patches(self, weights: dict[str, list], biases: dict[str, list]) -> set[str]:
        """Use these patches from now on; returns every key whose value changes (the old and new touched keys)."""
        changed = set(self.weights) | set(self.biases) | set(weights) | set(biases)
        self.weights, self.biases = weights, biases
        return changed

    def infos(self) -> dict[str, TensorInfo]:
        return self.base.infos()

    def __getattr__(self, name: str):
        # what only some readers have (``data_range``: identify's SD2 v/eps heuristic reads one raw tensor) is
        # the base's: the heuristic reads a norm bias no LoRA here patches
        if name == "data_range":
            return getattr(self.base, name)
        raise AttributeError(name)

    def array(self, key: str):
        from ckptlab.formats.arrays import as_array
        from ckptlab.lora.bake import baked

        if key in self.weights or key in self.biases:
            bias = key in self.biases
            patches = self.biases[key] if bias else self.weights[key]
            return as_array(baked(self.base.get, self.base.__contains__, key, patches, "F32", self.path, bias=bias))
        return self.base.array(key)

    def close(self) -> None:
        self.base.close()


@dataclass
class Loaded:
    """A pipeline ready to run, and where each of its weights came from."""

    pipe: object
    family: str
    prediction: str
    source: PatchedSource
    device: str
    dtype: object
    #: component name -> planned items (diffusers key <- source key)
    items: dict[str, list[Out]]
    vae_source: TensorSource | None = None
    warnings: list[str] = field(default_factory=list)
    #: the model's own scheduler config (samplers are built on it: prediction type, betas, spacing)
    scheduler_config: dict = field(default_factory=dict)

    def set_loras(self, weights: dict[str, list], biases: dict[str, list]) -> int:
        """Apply this patch set (``lora.bake.match_loras``' output) instead of the current one; re-reads only
        the weights either set touches. Returns how many weights were reloaded."""
        changed = self.source.set_patches(weights, biases)
        return self.reload(changed)

    def reload(self, keys: set[str] | None = None) -> int:
        """Read the weights derived from source ``keys`` again (all when None), in place."""
        n = 0
        for comp, items in self.items.items():
            module = getattr(self.pipe, comp)
            for it in items:
                if keys is None or it.src_key in keys:
                    put(module, it, self.device, self.dtype)
                    n += 1
        return n

    def upcast_vae(self) -> None:
        """Switch the VAE to fp32 with its weights read again from the file (not the fp16-rounded copies): what
        the VAE computes when an fp16 decode overflowed."""
        import torch

        vae = self.pipe.vae
        vae.to(torch.float32)
        for it in self.items["vae"]:
            put(vae, it, self.device, torch.float32)

    def close(self) -> None:
        self.source.close()
        if self.vae_source is not None:
            self.vae_source.close()


def vae_plan(vae: TensorSource):
    """``(items, config)`` of a standalone VAE file (LDM names, with or without ``first_stage_model.``, or
    diffusers' ``AutoencoderKL`` names)."""
    from ckptlab.ops.diffusers_io import VAE_PREFIX, plan_vae

    keys = vae.infos()
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in keys) else ""
    if f"{prefix}encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        raise MismatchError("a VAE in diffusers' layout: convert it with `ckptlab from-diffusers` first, or give "
                            "the single-file VAE", vae.path)
    items, lay, shapes, _ = plan_vae(vae, prefix)
    return items, lay, shapes


def load(src: TensorSource, *, device: str = "cpu", dtype=None, vae: TensorSource | None = None,
         loras: tuple[dict, dict] | None = None, refiner: bool = False) -> Loaded:
    """Build the pipeline of ``src`` (SD1, SD2 eps/v, SDXL base) on ``device`` at ``dtype`` (default: fp32 on
    CPU, fp16 on CUDA). ``vae``: a VAE file that replaces the model's (already checked to fit); ``loras``:
    ``(weight patches, bias patches)`` from ``lora.bake.match_loras``. Raises ``MismatchError`` for a model
    diffusers has no text-to-image pipeline for. ``refiner``: ``src`` is an SDXL refiner, built as diffusers'
    ``StableDiffusionXLImg2ImgPipeline`` (it takes the base's latents)."""
    go_offline()
    from ckptlab.arch.layout import file_layout
    from ckptlab.ops import diffusers_config as cfgs
    from ckptlab.ops.diffusers_io import TEXT_ENCODERS, plan_to_diffusers

    fam = file_layout(src).family_id
    if fam == "sdxl_refiner" and not refiner:
        raise MismatchError("this is an SDXL refiner: it refines an SDXL base's image; give the base model and "
                            "--refiner with this file", src.path)
    if refiner and fam != "sdxl_refiner":
        raise MismatchError(f"--refiner takes an SDXL refiner; this is {display_name(fam)}", src.path)
    if fam == "sd3" and not refiner:
        from ckptlab.imaging.pipeline_sd3 import load_sd3

        return load_sd3(src, device=device, dtype=dtype, vae=vae, loras=loras)
    if fam not in TXT2IMG and not refiner:
        what = display_name(fam) if fam else "an unrecognised model"
        raise MismatchError(f"generate supports SD1, SD2 and SDXL checkpoints; this is {what}", src.path)
    dtype = dtype if dtype is not None else pick_dtype(None, device, fam)
    patched = PatchedSource(src)
    if loras is not None:
        patched.set_patches(*loras)
    fam, files, configs, warnings, _ = plan_to_diffusers(patched)
    items = {"unet": files["unet/diffusion_pytorch_model.safetensors"],
             "vae": files["vae/diffusion_pytorch_model.safetensors"]}
    vae_cfg = configs["vae/config.json"]
    if vae is not None:
        items["vae"], lay, shapes = vae_plan(vae)
        vae_cfg = cfgs.vae_config(lay, shapes, fam)
    prediction = configs["scheduler/scheduler_config.json"]["prediction_type"]
    for folder, _, _ in TEXT_ENCODERS[fam]:
        items[folder] = files[f"{folder}/model.safetensors"]
    ahead = read_ahead(list(items.values()), device, dtype)  # noqa: F841 - alive until fill has taken its values

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = empty_model(lambda: diffusers.UNet2DConditionModel.from_config(init_kwargs(configs["unet/config.json"])))
    fill(unet, items["unet"], device, dtype, "UNet", src.path)
    vae_model = empty_model(lambda: diffusers.AutoencoderKL.from_config(init_kwargs(vae_cfg)))
    fill(vae_model, items["vae"], device, dtype, "VAE", vae.path if vae is not None else src.path)
    parts: dict[str, object] = {"unet": unet, "vae": vae_model}
    for folder, _, kind in TEXT_ENCODERS[fam]:
        cfg = dict(configs[f"{folder}/config.json"])
        cfg.pop("architectures", None)
        cls = CLIPTextModelWithProjection if folder == "text_encoder_2" else CLIPTextModel
        te = empty_model(lambda cls=cls, cfg=cfg: cls(CLIPTextConfig(**cfg)))
        fill(te, items[folder], device, dtype, folder.replace("_", " "), src.path)
        if not hasattr(te, "text_model"):
            # transformers 5 dropped the ``text_model`` wrapper that diffusers' clip-skip path still reads
            # (``text_encoder.text_model.final_layer_norm``): point it at the model itself, unregistered
            object.__setattr__(te, "text_model", te)
        parts[folder] = te
        parts[folder.replace("text_encoder", "tokenizer")] = clip_tokenizer("<|endoftext|>" if kind == "hf" else "!")
    sched_cfg = configs["scheduler/scheduler_config.json"]
    parts["scheduler"] = getattr(diffusers, sched_cfg["_class_name"]).from_config(init_kwargs(sched_cfg))
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                          requires_aesthetics_score=True, add_watermarker=False)
    elif fam == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Loaded(pipe, fam, prediction, patched, device, dtype, items, vae, warnings, dict(sched_cfg))

