"""Where a downloaded file goes: the folder for its CivitAI model type (and file type) in an
A1111/Forge or ComfyUI install (reference/hub.md §4.2). ``flat`` puts everything in the given folder.
"""

from __future__ import annotations

from pathlib import Path

# CivitAI ModelType (as spelled by the API) -> (A1111 folder, ComfyUI folder), relative to the install root
_BY_MODEL_TYPE: dict[str, tuple[str, str]] = {
    "checkpoint": ("models/Stable-diffusion", "models/checkpoints"),
    "lora": ("models/Lora", "models/loras"),
    "dora": ("models/Lora", "models/loras"),
    "locon": ("models/Lora", "models/loras"),
    "textualinversion": ("embeddings", "models/embeddings"),
    "hypernetwork": ("models/hypernetworks", "models/hypernetworks"),
    "vae": ("models/VAE", "models/vae"),
    "controlnet": ("models/ControlNet", "models/controlnet"),
    "ipadapter": ("models/ControlNet", "models/ipadapter"),  # not a CivitAI type: ckptlab's identified kind
    "upscaler": ("models/ESRGAN", "models/upscale_models"),
    "detection": ("models/adetailer", "models/ultralytics"),
    "motionmodule": ("models/AnimateDiff", "models/animatediff_models"),
}

# CivitAI ModelFileType overrides (a VAE or text encoder shipped inside a checkpoint version)
_BY_FILE_TYPE: dict[str, tuple[str, str]] = {
    "vae": ("models/VAE", "models/vae"),
    "text encoder": ("models/text_encoder", "models/text_encoders"),
    "unet": ("models/Stable-diffusion", "models/diffusion_models"),
    "diffusion model": ("models/Stable-diffusion", "models/diffusion_models"),
    "controlnet": ("models/ControlNet", "models/controlnet"),
    "upscaler": ("models/ESRGAN", "models/upscale_models"),
    "clipvision": ("models/clip_vision", "models/clip_vision"),
}

_OTHER = ("models/other", "models/other")

# ckptlab kinds (identify / --type) -> CivitAI model type
KIND_TO_TYPE = {"checkpoint": "checkpoint", "lora": "lora", "lycoris": "locon", "embedding": "textualinversion",
                "hypernetwork": "hypernetwork", "vae": "vae", "controlnet": "controlnet", "upscaler": "upscaler",
                "unet": "checkpoint", "text_encoder": "checkpoint", "t2i_adapter": "controlnet", "ipadapter": "ipadapter"}
# ... and the CivitAI file type that refines the folder for kinds shipped as parts of a checkpoint
KIND_TO_FILE_TYPE = {"unet": "diffusion model", "text_encoder": "text encoder"}


def folder_for_kind(root: Path, layout: str, kind: str | None) -> Path:
    """The folder for a file of ckptlab kind ``kind`` (or a CivitAI type name given with ``--type``)."""
    k = (kind or "").lower()
    return target_folder(root, layout, KIND_TO_TYPE.get(k, k or None), KIND_TO_FILE_TYPE.get(k))


def detect_layout(root: Path) -> str:
    """``a1111`` or ``comfyui`` from the folders already under ``root``; ``flat`` when neither."""
    models = root / "models"
    if (models / "Stable-diffusion").is_dir() or (models / "Lora").is_dir() or (root / "webui.py").is_file():
        return "a1111"
    if (models / "checkpoints").is_dir() or (models / "loras").is_dir() or (root / "comfy").is_dir():
        return "comfyui"
    return "flat"


def target_folder(root: Path, layout: str, model_type: str | None, file_type: str | None = None) -> Path:
    """The folder under ``root`` for a file of this CivitAI model type / file type."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "flat":
        return root
    if layout not in ("a1111", "comfyui"):
        raise ValueError(f"unknown layout {layout!r}")
    col = 0 if layout == "a1111" else 1
    ft = (file_type or "").strip().lower()
    mt = (model_type or "").strip().lower()
    if ft in _BY_FILE_TYPE and not (ft == "unet" and layout == "a1111" and mt != "checkpoint"):
        return root / _BY_FILE_TYPE[ft][col]
    return root / _BY_MODEL_TYPE.get(mt, _OTHER)[col]
