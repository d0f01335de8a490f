"""Diagnostics: things that are odd about a file (as the A1111 Model Toolkit extension reports them).

``file_warnings(infos, comps, det, metadata, has_ema) -> list[str]``: float ``position_ids`` (merge
fingerprint), missing final text-encoder layer, stale or incomplete EMA, missing required diffusion-model keys,
unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ckptlab.arch.components import MARKER_KEYS, SCHEDULE_KEYS
from ckptlab.arch.families import BY_ID
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.dtypes import FLOAT_DTYPES

#: prefixes of keys that are expected extras, never "unknown"
KNOWN_OTHER_PREFIXES = ("depth_model.", "model.model_sampling.", "cc_projection.", "embedder.", "conditioner.embedders.",
                        "clip_l_vision.", "control_model.", "lora_controlnet")
_RESBLOCK_RE = re.compile(r"resblocks\.(\d+)\.")
_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.")


def _top_index(keys, rx) -> int:
    return max((int(m.group(1)) for k in keys if (m := rx.search(k))), default=-1)


def is_merged(infos: Mapping[str, TensorInfo], metadata: Mapping[str, Any]) -> str | None:
    """Why the file looks like a merge, or ``None``."""
    for k in ("sd_merge_recipe", "sd_merge_models", "modelspec.merged_from"):
        if k in metadata:
            return f"metadata {k}"
    fp = next((k for k, i in infos.items() if k.endswith("position_ids") and i.dtype in FLOAT_DTYPES), None)
    return f"float {fp.rsplit('.', 1)[-1]}" if fp else None


def file_warnings(infos: Mapping[str, TensorInfo], comps: Mapping[str, list[str]], det, metadata: Mapping[str, Any],
                  has_ema: bool) -> list[str]:
    out: list[str] = []
    for k, i in infos.items():
        if k.endswith("position_ids") and i.dtype in FLOAT_DTYPES:
            out.append(f"float position_ids ({i.dtype}) in {k}: the file was merged and token positions may be off "
                       "(they should be int64 0..76)")
    diffusion = det.kind in ("checkpoint", "unet")
    old_clip = next((k for k in comps.get("clip_l", []) if k.startswith("cond_stage_model.transformer.")
                     and not k.startswith("cond_stage_model.transformer.text_model.")), None)
    if old_clip:
        out.append(f"old-style CLIP-L key names without 'text_model.' ({old_clip}): a NovelAI-era file; "
                   "loaders rename these keys")
    if "openclip_h" in comps:
        top = _top_index(comps["openclip_h"], _RESBLOCK_RE)
        top = max(top, _top_index(comps["openclip_h"], _LAYER_RE))
        if 0 <= top < 23:
            out.append(f"text encoder is missing its final layer: OpenCLIP-H has blocks 0..{top} of 0..23 "
                       "(SD2 'WD'-style file; use clip skip 2)")
    if "clip_l" in comps and det.family in ("sd1", "sd2", None) and (diffusion or det.kind == "text_encoder"):
        top = _top_index(comps["clip_l"], _LAYER_RE)
        if 0 <= top < 11:
            out.append(f"text encoder is missing its final layer: CLIP-L has layers 0..{top} of 0..11")
    if has_ema:
        why = is_merged(infos, metadata)
        if why:
            out.append(f"EMA weights are probably stale: the file is a merge ({why}) and merges do not update EMA")
        dm = comps.get("unet", [])
        ema_n = len([k for k in comps.get("ema", []) if k not in SCHEDULE_KEYS])
        if dm and ema_n and ema_n != len(dm):
            out.append(f"EMA is incomplete or mismatched: {ema_n} EMA tensors for {len(dm)} UNet tensors")
    if diffusion and det.family:
        fam = BY_ID.get(det.family)
        dm = comps.get(fam.arch if fam else "unet", [])
        variant = next((v for v in fam.variants if v.id == det.variant), None) if fam else None
        if fam and fam.dm_tensors and dm and (variant is None or variant.counted):
            n = len(dm)
            if n < fam.dm_tensors:
                out.append(f"missing required keys: diffusion model has {n} of {fam.dm_tensors} tensors")
            elif n > fam.dm_tensors:
                out.append(f"unknown keys: diffusion model has {n - fam.dm_tensors} more tensors than the "
                           f"{fam.dm_tensors} of {fam.id}")
    if diffusion or det.kind in ("vae", "text_encoder"):
        unknown = [k for k in comps.get("other", []) if k not in SCHEDULE_KEYS and k not in MARKER_KEYS
                   and not k.startswith(KNOWN_OTHER_PREFIXES) and not k.endswith("scaled_fp8")]
        if unknown:
            shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            out.append(f"{len(unknown)} unknown key(s) not part of any recognised component: {shown}")
    return out
