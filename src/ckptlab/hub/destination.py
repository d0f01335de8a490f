"""Where a downloaded file goes: the folder for its CivitAI model type (and file type) in an
A1111/Forge or ComfyUI install, from the UI folder table ``library.ui_folders.UI_FOLDERS`` (the
same table a scan reads folder names back from). ``flat`` puts everything in the given folder.

The install style (``a1111``, ``comfyui``, ``flat`` or ``auto``) is called ``ui`` here; the user sees it
as ``download --layout`` and the config's ``[download] layout`` (names kept: users type them).
"""

from __future__ import annotations

from pathlib import Path

from ckptlab.library.ui_folders import UI_FOLDERS

UIS = ("a1111", "comfyui")

# CivitAI ModelType (as spelled by the API, lower case) -> the UI_FOLDERS row it goes to
_BY_MODEL_TYPE: dict[str, str] = {
    "checkpoint": "checkpoint",
    "lora": "lora",
    "dora": "lora",
    "locon": "lora",
    "textualinversion": "embedding",
    "hypernetwork": "hypernetwork",
    "vae": "vae",
    "controlnet": "controlnet",
    "ipadapter": "ipadapter",  # not a CivitAI type: ckptlab's identified kind
    "upscaler": "upscaler",
    "detection": "detection",
    "motionmodule": "motion_module",
}

# CivitAI ModelFileType overrides (a VAE or text encoder shipped inside a checkpoint version)
_BY_FILE_TYPE: dict[str, str] = {
    "vae": "vae",
    "text encoder": "text_encoder",
    "unet": "unet",
    "diffusion model": "unet",
    "controlnet": "controlnet",
    "upscaler": "upscaler",
    "clipvision": "clip_vision",
}

# ckptlab kinds (identify / --type) -> CivitAI model type
KIND_TO_TYPE = {"checkpoint": "checkpoint", "lora": "lora", "lycoris": "locon", "embedding": "textualinversion",
                "hypernetwork": "hypernetwork", "vae": "vae", "controlnet": "controlnet", "upscaler": "upscaler",
                "unet": "checkpoint", "text_encoder": "checkpoint", "t2i_adapter": "controlnet", "ipadapter": "ipadapter"}
# ... and the CivitAI file type that refines the folder for kinds shipped as parts of a checkpoint
KIND_TO_FILE_TYPE = {"unet": "diffusion model", "text_encoder": "text encoder"}


def folder_for_kind(root: Path, ui: str, kind: str | None) -> Path:
    """The folder for a file of ckptlab kind ``kind`` (or a CivitAI type name given with ``--type``)."""
    k = (kind or "").lower()
    return target_folder(root, ui, KIND_TO_TYPE.get(k, k or None), KIND_TO_FILE_TYPE.get(k))


def detect_ui(root: Path) -> str:
    """``a1111`` or ``comfyui`` from the folders already under ``root``; ``flat`` when neither."""
    if any((root / UI_FOLDERS[k][0]).is_dir() for k in ("checkpoint", "lora")) or (root / "webui.py").is_file():
        return "a1111"
    if any((root / UI_FOLDERS[k][1]).is_dir() for k in ("checkpoint", "lora")) or (root / "comfy").is_dir():
        return "comfyui"
    return "flat"


def target_folder(root: Path, ui: str, model_type: str | None, file_type: str | None = None) -> Path:
    """The folder under ``root`` for a file of this CivitAI model type / file type."""
    if ui == "auto":
        ui = detect_ui(root)
    if ui == "flat":
        return root
    if ui not in UIS:
        raise ValueError(f"unknown layout {ui!r}")
    col = UIS.index(ui)
    ft = (file_type or "").strip().lower()
    mt = (model_type or "").strip().lower()
    if ft in _BY_FILE_TYPE and not (ft == "unet" and ui == "a1111" and mt != "checkpoint"):
        return root / UI_FOLDERS[_BY_FILE_TYPE[ft]][col]
    return root / UI_FOLDERS[_BY_MODEL_TYPE.get(mt, "other")][col]
