"""Downloads and scans read one UI folder table (``library.ui_folders.UI_FOLDERS``): where a download of a
kind goes is a folder that a scan reads back as that kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptlab.hub.destination import KIND_TO_TYPE, detect_ui, folder_for_kind, target_folder
from ckptlab.library.ui_folders import FOLDERS, UI_FOLDERS, folder_hint

#: ComfyUI's own model categories (``folder_paths.py``, ``folder_names_and_paths``), written out by hand
COMFYUI_CATEGORIES = {"checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models", "clip_vision",
                      "style_models", "embeddings", "diffusers", "vae_approx", "controlnet", "gligen",
                      "upscale_models", "latent_upscale_models", "hypernetworks", "photomaker", "classifiers",
                      "model_patches", "audio_encoders"}
#: folders of ComfyUI custom nodes: ComfyUI_IPAdapter_plus, Impact Subpack (ultralytics), AnimateDiff-Evolved
CUSTOM_NODE_FOLDERS = {"ipadapter", "ultralytics", "animatediff_models", "other"}

#: what a scan should read back for a download of each kind: the kind itself, or the kind of the folder the UI
#: shares with it (A1111 keeps IP-/T2I-Adapters with the ControlNets and UNets with the checkpoints)
SHARED = {("a1111", "ipadapter"): "controlnet", ("a1111", "t2i_adapter"): "controlnet",
          ("comfyui", "t2i_adapter"): "controlnet", ("a1111", "unet"): "checkpoint", ("a1111", "lycoris"): "lora",
          ("comfyui", "lycoris"): "lora"}


@pytest.mark.parametrize("ui", ["a1111", "comfyui"])
@pytest.mark.parametrize("kind", sorted(KIND_TO_TYPE))
def test_a_download_is_scanned_back_as_its_kind(tmp_path, ui, kind):
    folder = folder_for_kind(tmp_path, ui, kind)
    assert folder != tmp_path / "models/other", kind
    _, _, hint = folder_hint(folder / "x.safetensors", tmp_path)
    assert hint == SHARED.get((ui, kind), kind)


def test_comfyui_folders_are_comfyuis():
    comfy = {Path(c).name for _, c in UI_FOLDERS.values()}
    assert comfy - COMFYUI_CATEGORIES == CUSTOM_NODE_FOLDERS
    assert all(Path(c).parts[0] == "models" for _, c in UI_FOLDERS.values())
    # every ComfyUI category ckptlab knows a kind for is read back by a scan
    assert {n for n, (ui, _) in FOLDERS.items() if ui in ("comfyui", "any")} - COMFYUI_CATEGORIES \
        == {"ipadapter", "ultralytics", "unet", "clip", "t2i_adapter"}  # custom nodes and ComfyUI's legacy names


def test_place_only_rows_give_no_hint(tmp_path):
    for ui, col in (("a1111", 0), ("comfyui", 1)):
        assert target_folder(tmp_path, ui, "MotionModule") == tmp_path / UI_FOLDERS["motion_module"][col]
        assert target_folder(tmp_path, ui, "Workflows") == tmp_path / "models/other"
    assert folder_hint(tmp_path / "models/AnimateDiff/mm.safetensors") == (None, None, None)
    assert folder_hint(tmp_path / "models/other/x.safetensors") == (None, None, None)


def test_detect_ui(tmp_path):
    assert detect_ui(tmp_path) == "flat"
    (tmp_path / "models/loras").mkdir(parents=True)
    assert detect_ui(tmp_path) == "comfyui"
    (tmp_path / "webui.py").write_text("")
    assert detect_ui(tmp_path) == "a1111"
