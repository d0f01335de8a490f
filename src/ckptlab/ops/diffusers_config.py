"""diffusers/transformers config files derived from tensor shapes (works for real and small models).

What shapes cannot tell is taken from the family's record (``Family.diffusers``; diffusers'
``single_file_utils``): SD1 uses 8 attention heads everywhere, SD2/SDXL 64-wide heads; CLIP-L uses ``quick_gelu``, OpenCLIP
``gelu``; VAE scaling 0.18215 (SD1/SD2) or 0.13025 (SDXL); pipeline and scheduler classes as the official
repos ship them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ckptlab.arch.families import get
from ckptlab.arch.family import Diffusers
from ckptlab.errors import MismatchError
from ckptlab.ops.diffusers_map import UNetLayout, VAELayout

DIFFUSERS_VERSION = "0.30.0"
TRANSFORMERS_VERSION = "4.40.0"


def spec(family: str | None) -> Diffusers:
    """The diffusers part of ``family``'s record; ``MismatchError`` when the family has none."""
    fam = get(family)
    if fam is None or fam.diffusers is None:
        raise MismatchError(f"no diffusers pipeline is known for {fam.display_name if fam else 'this model'}")
    return fam.diffusers


def _fixed_heads(family: str) -> int | None:
    fam = get(family)
    return fam.diffusers.fixed_heads if fam and fam.diffusers else None


def _heads(width: int, family: str) -> int:
    fixed = _fixed_heads(family)
    if fixed:
        return fixed if width % fixed == 0 else 1
    h = max(1, width // 64)
    while width % h:
        h -= 1
    return h


def unet_config(lay: UNetLayout, shapes: dict[str, tuple[int, ...]], family: str, sample_size: int,
                pooled_width: int | None = None) -> dict:
    L = lay.layers
    chans = [shapes[f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight"][0] for i in range(lay.levels)]
    depth = []
    cross = None
    linear = False
    for i in range(lay.levels):
        base = f"input_blocks.{1 + i * (L + 1)}.1."
        n = len({k.split(".")[4] for k in shapes if k.startswith(base + "transformer_blocks.")})
        depth.append(max(n, 1))
        if lay.attn[i]:
            cross = shapes[base + "transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shapes[base + "proj_in.weight"]) == 2
    if cross is None and lay.mid_attn:
        cross = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        linear = len(shapes["middle_block.1.proj_in.weight"]) == 2
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in lay.attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(lay.attn)]
    heads = [_heads(c, family) for c in chans]
    cfg: dict = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads[0] if _fixed_heads(family) else heads,
        "block_out_channels": chans,
        "center_input_sample": False,
        "cross_attention_dim": cross,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "layers_per_block": L,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if lay.mid_attn else None,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": shapes["out.2.weight"][0],
        "sample_size": sample_size,
        "up_block_types": up,
        "use_linear_projection": linear,
    }
    mid_depth = len({k.split(".")[3] for k in shapes if k.startswith("middle_block.1.transformer_blocks.")})
    # diffusers sizes the mid block from the last entry: levels without attention carry the mid depth
    depth = [d if a else max(mid_depth, 1) for d, a in zip(depth, lay.attn, strict=True)]
    if any(d > 1 for d in depth):
        cfg["transformer_layers_per_block"] = depth[0] if len(set(depth)) == 1 else depth
    if lay.label_emb:
        in_dim = shapes["label_emb.0.0.weight"][1]
        cfg.update({"addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
                    "addition_time_embed_dim": _time_embed_dim(in_dim, family, pooled_width),
                    "projection_class_embeddings_input_dim": in_dim})
    return cfg


def _time_embed_dim(in_dim: int, family: str, pooled_width: int | None) -> int:
    """SDXL: in = pooled CLIP-G width + 6 x d (base) or 5 x d (refiner: aesthetic score replaces the
    target size); real files have d = 256."""
    n = spec(family).time_ids
    if pooled_width and (in_dim - pooled_width) > 0 and (in_dim - pooled_width) % n == 0:
        return (in_dim - pooled_width) // n
    return 256


def vae_config(lay: VAELayout, shapes: dict[str, tuple[int, ...]], family: str) -> dict:
    chans = [shapes[f"encoder.down.{i}.block.{lay.layers - 1}.conv2.weight"][0] for i in range(lay.levels)]
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": chans,
        "down_block_types": ["DownEncoderBlock2D"] * lay.levels,
        "force_upcast": True,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": shapes["post_quant_conv.weight"][0] if "post_quant_conv.weight" in shapes
        else shapes["decoder.conv_in.weight"][1],
        "layers_per_block": lay.layers,
        "norm_num_groups": 32,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "sample_size": spec(family).vae_sample_size,
        "scaling_factor": spec(family).vae_scaling,
        "up_block_types": ["UpDecoderBlock2D"] * lay.levels,
    }


def clip_config(hf_shapes: dict[str, tuple[int, ...]], *, act: str, with_projection: bool) -> dict:
    """``CLIPTextConfig`` for an HF-layout CLIP text model (keys as transformers names them)."""
    tok = hf_shapes["text_model.embeddings.token_embedding.weight"]
    pos = hf_shapes["text_model.embeddings.position_embedding.weight"]
    width = tok[1]
    layers = len({k.split(".")[3] for k in hf_shapes if k.startswith("text_model.encoder.layers.")})
    inter = hf_shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    proj = hf_shapes["text_projection.weight"][0] if "text_projection.weight" in hf_shapes else width
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": pos[0],
        "model_type": "clip_text_model",
        "num_attention_heads": _heads(width, "clip"),
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": proj,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_VERSION,
        "vocab_size": tok[0],
    }


def scheduler_config(family: str, prediction: str) -> dict:
    """The scheduler config the official repos ship (SD1.5: PNDM, SD2: DDIM, SDXL: EulerDiscrete) - with
    ``clip_sample: false`` and ``steps_offset: 1`` set explicitly, so pipelines load without the
    "has not set the configuration `clip_sample`"/``steps_offset`` deprecation warnings."""
    cls = spec(family).scheduler
    cfg = {
        "_class_name": cls,
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": prediction,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }
    if cls == "EulerDiscreteScheduler":  # stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
        cfg.update({"interpolation_type": "linear", "sample_max_value": 1.0, "use_karras_sigmas": False})
    return cfg


def tokenizer_files(pad_token: str) -> dict[str, bytes]:
    """The four tokenizer files: shipped ``vocab.json``/``merges.txt`` plus small generated configs."""
    data = resources.files("ckptlab") / "data" / "clip_tokenizer"
    files = {name: (data / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    tok_cfg = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
               "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer", **special}
    files["special_tokens_map.json"] = dumps(special)
    files["tokenizer_config.json"] = dumps(tok_cfg)
    return files


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def model_index(family: str) -> dict:
    d = spec(family)
    idx: dict = {"_diffusers_version": DIFFUSERS_VERSION, "_class_name": d.pipeline,
                 "scheduler": ["diffusers", d.scheduler]}
    idx.update({k: _jsonable(v) for k, v in d.index})
    return idx


def scheduler_class(family: str) -> str:
    return scheduler_config(family, "epsilon")["_class_name"]


def init_kwargs(cfg: dict) -> dict:
    """A config file's dict as a class's keyword arguments: ``_class_name``, ``_diffusers_version`` and the
    other ``_`` bookkeeping entries left out."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_json(path: Path) -> dict:
    from ckptlab.errors import FormatError
    from ckptlab.jsonable import loads_limited

    try:
        return loads_limited(Path(path).read_text(encoding="utf-8"))  # nesting limited: never a RecursionError
    except FileNotFoundError:
        raise FormatError("missing file in the diffusers folder", path) from None
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read JSON: {e}", path) from None
