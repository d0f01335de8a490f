"""Where UIs keep their models: A1111/Forge/SD.Next and ComfyUI folder names, and ComfyUI's
``extra_model_paths.yaml`` (reference/hub.md §4.2).

A folder name gives a *hint* of the kind (``models/Lora`` -> ``lora``); identification from the
file's own keys wins when it disagrees.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from ckptlab.errors import FormatError
from ckptlab.formats import MODEL_SUFFIXES

MODEL_EXTENSIONS = frozenset(MODEL_SUFFIXES)

# folder name (lower case) -> (layout, kind hint)
FOLDERS: dict[str, tuple[str, str]] = {
    # A1111 / Forge / SD.Next
    "stable-diffusion": ("a1111", "checkpoint"),
    "lora": ("a1111", "lora"),
    "lycoris": ("a1111", "lora"),
    "hypernetworks": ("any", "hypernetwork"),
    "esrgan": ("a1111", "upscaler"),
    "realesrgan": ("a1111", "upscaler"),
    "swinir": ("a1111", "upscaler"),
    "dat": ("a1111", "upscaler"),
    "scunet": ("a1111", "upscaler"),
    "ldsr": ("a1111", "upscaler"),
    "gfpgan": ("a1111", "face_restore"),
    "codeformer": ("a1111", "face_restore"),
    "vae-approx": ("a1111", "vae_approx"),
    "text-encoder": ("sdnext", "text_encoder"),
    "adetailer": ("a1111", "detection"),
    # shared names
    "vae": ("any", "vae"),
    "embeddings": ("any", "embedding"),
    "controlnet": ("any", "controlnet"),
    "unet": ("any", "unet"),
    "clip": ("any", "text_encoder"),
    # ComfyUI
    "checkpoints": ("comfyui", "checkpoint"),
    "loras": ("comfyui", "lora"),
    "text_encoders": ("comfyui", "text_encoder"),
    "diffusion_models": ("comfyui", "unet"),
    "clip_vision": ("comfyui", "clip_vision"),
    "style_models": ("comfyui", "style_model"),
    "vae_approx": ("comfyui", "vae_approx"),
    "t2i_adapter": ("comfyui", "t2i_adapter"),  # read by ComfyUI as part of its controlnet category
    "ipadapter": ("comfyui", "ipadapter"),  # ComfyUI_IPAdapter_plus (A1111 keeps IP-Adapters in ControlNet)
    "gligen": ("comfyui", "gligen"),
    "upscale_models": ("comfyui", "upscaler"),
    "latent_upscale_models": ("comfyui", "upscaler"),
    "photomaker": ("comfyui", "photomaker"),
    "diffusers": ("comfyui", "diffusers"),
    "ultralytics": ("comfyui", "detection"),
    "model_patches": ("comfyui", "model_patch"),
}

#: extra_model_paths.yaml keys that are settings, not folder categories
_RESERVED = {"base_path", "is_default"}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def folder_hint(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str | None, str | None, str | None]:
    """``(folder name, layout, kind hint)`` from the nearest known ancestor folder of ``path``
    (below ``root`` when given, the root itself included)."""
    p = PurePath(os.fsdecode(path))
    parts = p.parts[:-1]
    if root is not None:
        r = PurePath(os.fsdecode(root)).parts
        if parts[:len(r)] == r:
            parts = parts[len(r) - 1:] if r else parts
    for name in reversed(parts):
        hit = FOLDERS.get(name.lower())
        if hit:
            layout, kind = hit
            return name, layout, kind
    return None, None, None


def is_model_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS


def read_extra_model_paths(yaml_path: str | Path) -> list[tuple[str, Path]]:
    """``[(category, folder), ...]`` from a ComfyUI ``extra_model_paths.yaml``: values split on
    newlines, relative paths joined to ``base_path`` (or the YAML file's folder), ``~``/``$VARS``
    expanded, legacy names (``unet``, ``clip``) mapped."""
    import yaml

    yaml_path = Path(yaml_path)
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", yaml_path) from None
    except yaml.YAMLError as e:
        raise FormatError(f"not valid YAML: {str(e).splitlines()[0]}", yaml_path) from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise FormatError("extra_model_paths.yaml must map section names to folder settings", yaml_path)
    out: list[tuple[str, Path]] = []
    for section, conf in data.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise FormatError(f"section {section!r} is not a mapping", yaml_path)
        base = conf.get("base_path")
        base_dir = Path(os.path.expandvars(os.path.expanduser(str(base)))) if base else yaml_path.parent
        if not base_dir.is_absolute():
            base_dir = yaml_path.parent / base_dir
        for key, value in conf.items():
            if key in _RESERVED or value is None:
                continue
            category = _LEGACY.get(str(key), str(key))
            for line in str(value).split("\n"):
                line = line.strip()
                if not line:
                    continue
                folder = Path(os.path.expandvars(os.path.expanduser(line)))
                out.append((category, folder if folder.is_absolute() else base_dir / folder))
    return out


COMFY_CATEGORY_KINDS = {name: kind for name, (layout, kind) in FOLDERS.items() if layout in ("comfyui", "any")}
COMFY_CATEGORY_KINDS.update({"configs": "config"})
