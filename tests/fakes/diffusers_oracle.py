"""The independent oracle of ``ckptlab generate``: diffusers' own pipeline from diffusers' own single-file conversion.

The config folders are written here, by hand, from the published diffusers configs of each model (SD1.5
``runwayml/stable-diffusion-v1-5``, SD2.1, SDXL 1.0 base and refiner) with the small sample shapes of
``ckptlab.sample`` (block widths 32/64/128, tiny CLIP) — never from ``ckptlab.ops.diffusers_config``. The
tokenizer files are the CLIP BPE files (the same vocabulary every SD family uses).
"""

from __future__ import annotations

import inspect
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

SCHED_COMMON = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}


def _unet(block_out, down, up, cross, heads, *, linear, sample, **extra):
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
            "block_out_channels": block_out, "center_input_sample": False, "cross_attention_dim": cross,
            "down_block_types": down, "up_block_types": up, "downsample_padding": 1, "flip_sin_to_cos": True,
            "freq_shift": 0, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
            "norm_eps": 1e-05, "norm_num_groups": 32, "sample_size": sample, "use_linear_projection": linear, **extra}


def _vae(scaling, sample=512, block_out=(32, 64, 128, 128)):
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(block_out),
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": sample, "scaling_factor": scaling}


def _clip(hidden, layers, act, cls="CLIPTextModel"):
    return {"architectures": [cls], "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
            "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": hidden * 4, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
            "model_type": "clip_text_model", "num_attention_heads": 1, "num_hidden_layers": layers,
            "pad_token_id": 1, "projection_dim": hidden, "vocab_size": 49408}


_SD_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_SD_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3


def configs(family: str, *, v: bool = False, small: bool = True) -> dict[str, dict]:
    """``{relative config path: dict}`` of a diffusers folder for the small sample shapes of ``family``
    (sd1, sd2, sdxl, sdxl_refiner); ``small=False``: SD1.5's published configs."""
    sd_sched = {"_class_name": "PNDMScheduler", **SCHED_COMMON, "skip_prk_steps": True,
                "prediction_type": "epsilon", "timestep_spacing": "leading"}
    if family == "sd1":
        unet = _unet([32, 64, 128, 128], _SD_DOWN, _SD_UP, 32, 8, linear=False, sample=64)
        te = _clip(32, 12, "quick_gelu")
        if not small:
            unet = _unet([320, 640, 1280, 1280], _SD_DOWN, _SD_UP, 768, 8, linear=False, sample=64)
            te = _clip(768, 12, "quick_gelu")
            te["num_attention_heads"] = 12
            te["intermediate_size"] = 3072
            te["projection_dim"] = 768
            return {"unet/config.json": unet, "vae/config.json": _vae(0.18215, block_out=(128, 256, 512, 512)),
                    "text_encoder/config.json": te, "scheduler/scheduler_config.json": sd_sched,
                    "model_index.json": _index("StableDiffusionPipeline", "PNDMScheduler")}
        return {"unet/config.json": unet, "vae/config.json": _vae(0.18215), "text_encoder/config.json": te,
                "scheduler/scheduler_config.json": sd_sched,
                "model_index.json": _index("StableDiffusionPipeline", "PNDMScheduler")}
    if family == "sd2":
        unet = _unet([32, 64, 128, 128], _SD_DOWN, _SD_UP, 48, [1, 1, 2, 2], linear=True, sample=96 if v else 64)
        sched = {"_class_name": "DDIMScheduler", **SCHED_COMMON, "skip_prk_steps": True,
                 "prediction_type": "v_prediction" if v else "epsilon", "timestep_spacing": "leading"}
        return {"unet/config.json": unet, "vae/config.json": _vae(0.18215),
                "text_encoder/config.json": _clip(48, 23, "gelu"), "scheduler/scheduler_config.json": sched,
                "model_index.json": _index("StableDiffusionPipeline", "DDIMScheduler")}
    xl_sched = {"_class_name": "EulerDiscreteScheduler", **SCHED_COMMON, "interpolation_type": "linear",
                "prediction_type": "epsilon", "sample_max_value": 1.0, "skip_prk_steps": True,
                "timestep_spacing": "leading", "use_karras_sigmas": False}
    if family == "sdxl":
        unet = _unet([32, 64, 128], ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], 96, [1, 1, 2], linear=True,
                     sample=128, transformer_layers_per_block=[10, 2, 10], addition_embed_type="text_time",
                     addition_embed_type_num_heads=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=112)
        return {"unet/config.json": unet, "vae/config.json": _vae(0.13025, 1024),
                "text_encoder/config.json": _clip(32, 12, "quick_gelu"),
                "text_encoder_2/config.json": _clip(64, 32, "gelu", "CLIPTextModelWithProjection"),
                "scheduler/scheduler_config.json": xl_sched,
                "model_index.json": _index("StableDiffusionXLPipeline", "EulerDiscreteScheduler", xl=True)}
    if family == "sdxl_refiner":
        unet = _unet([32, 64, 128, 128], ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
                     ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], 64, [1, 1, 2, 2],
                     linear=True, sample=128, transformer_layers_per_block=4, addition_embed_type="text_time",
                     addition_embed_type_num_heads=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=104)
        index = _index("StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler", xl=True)
        index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
        return {"unet/config.json": unet, "vae/config.json": _vae(0.13025),
                "text_encoder_2/config.json": _clip(64, 32, "gelu", "CLIPTextModelWithProjection"),
                "scheduler/scheduler_config.json": xl_sched, "model_index.json": index}
    raise ValueError(family)


def _index(cls, sched, xl=False):
    d = {"_class_name": cls, "scheduler": ["diffusers", sched], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        d.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                 tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        d.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    return d


def write_config_dir(folder: Path, family: str, *, v: bool = False, small: bool = True) -> Path:
    """A diffusers config folder (no weights) for ``from_single_file(..., config=folder)``."""
    folder = Path(folder)
    for rel, cfg in configs(family, v=v, small=small).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(cfg))
    data = resources.files("ckptlab") / "data" / "clip_tokenizer"
    toks = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    if family == "sd2":
        toks = {"tokenizer": "!"}
    if family == "sdxl_refiner":
        toks = {"tokenizer_2": "!"}
    for name, pad in toks.items():
        (folder / name).mkdir(exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            with resources.as_file(data / f) as p:
                shutil.copyfile(p, folder / name / f)
        (folder / name / "tokenizer_config.json").write_text(json.dumps({
            "model_max_length": 77, "pad_token": pad, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def oracle_pipe(model: Path, config_dir: Path, family: str, *, dtype=None):
    """diffusers' pipeline of the single file ``model`` with the hand-written configs of ``config_dir``."""
    import diffusers
    import torch

    cls = {"sdxl": diffusers.StableDiffusionXLPipeline,
           "sdxl_refiner": diffusers.StableDiffusionXLImg2ImgPipeline}.get(family, diffusers.StableDiffusionPipeline)
    kw = {"safety_checker": None, "requires_safety_checker": False} if cls is diffusers.StableDiffusionPipeline else {}
    pipe = cls.from_single_file(str(model), config=str(config_dir), local_files_only=True,
                                torch_dtype=dtype or torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    ORIGINAL_SCHEDULER[id(pipe)] = dict(pipe.scheduler.config)
    return pipe


#: A1111 sampler -> (diffusers scheduler class, config overrides), from diffusers' scheduler overview table
ORACLE_SAMPLERS = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
}


ORIGINAL_SCHEDULER: dict[int, dict] = {}


def set_scheduler(pipe, sampler: str, karras: bool = False):
    import diffusers

    name, over = ORACLE_SAMPLERS[sampler]
    cls = getattr(diffusers, name)
    # from_config carries every key of the old config over: say karras either way
    extra = {"use_karras_sigmas": karras} if "use_karras_sigmas" in inspect.signature(cls.__init__).parameters else {}
    # from_config also carries earlier overrides (algorithm_type...): always start from the model's own config
    base = ORIGINAL_SCHEDULER.setdefault(id(pipe), dict(pipe.scheduler.config))
    pipe.scheduler = cls.from_config(base, **over, **extra)
    return pipe


def run_oracle(pipe, *, prompt, negative="", seed, steps, cfg, size, **kw):
    """The oracle image as a uint8 array."""
    import torch

    w, h = size
    with torch.inference_mode():
        img = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=cfg,
                   width=w, height=h, generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]
    return np.asarray(img)


def pixels(path_or_image) -> np.ndarray:
    from PIL import Image

    img = path_or_image if hasattr(path_or_image, "size") else Image.open(path_or_image)
    return np.asarray(img.convert("RGB"))


def max_diff(a, b) -> int:
    a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())
