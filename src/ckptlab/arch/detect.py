"""Decide kind, family, variant and prediction of a file from its keys, shapes, metadata and wrapper values.

Order: adapters/auxiliary files (``arch.adapters``), then diffusion-model families (``arch.families``, first
match wins, each under the prefixes ``model.diffusion_model.``, ``unet.``, ``transformer.`` or none), then
standalone VAEs / text encoders. Metadata (``modelspec.architecture``, ``modelspec.prediction_type``,
``ss_base_model_version``, ``ss_v2``) wins over what the keys suggest; a disagreement becomes a warning.
Every decision adds one line to ``evidence``. Header-only; no torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptlab.arch.adapters import detect_adapter, detect_taesd
from ckptlab.arch.components import split_components
from ckptlab.arch.families import BY_ID, FAMILIES, GGUF_ARCH, KOHYA_BASE, MODELSPEC_ARCH
from ckptlab.arch.family import Family, Marker
from ckptlab.formats.base import TensorInfo

DM_PREFIXES = ("model.diffusion_model.", "unet.", "transformer.", "")
TEXT_ENCODERS = ("clip_l", "clip_g", "openclip_h", "t5xxl")
_PRED_WORDS = {"v": "v", "v_prediction": "v", "v-prediction": "v", "epsilon": "eps", "eps": "eps",
               "flow": "flow", "rectified_flow": "flow", "flow_matching": "flow", "edm": "edm"}
#: every ``kind`` the detector answers, and those that are add-ons to a diffusion model (no components listed,
#: weights-only VRAM figure)
KINDS = ("checkpoint", "unet", "vae", "text_encoder", "lora", "lycoris", "embedding", "hypernetwork", "controlnet",
         "ipadapter", "t2i_adapter", "upscaler", "unknown")
ADAPTER_KINDS = ("lora", "lycoris", "embedding", "hypernetwork", "controlnet", "ipadapter", "t2i_adapter", "upscaler")


@dataclass
class Detection:
    kind: str = "unknown"
    family: str | None = None
    variant: str | None = None
    prediction: str | None = None
    components: dict[str, list[str]] = field(default_factory=dict)
    dm_prefix: str | None = None
    evidence: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


_DM_NONEMPTY = tuple(p for p in DM_PREFIXES if p)  # no key starts with two of them


def _views(infos: Mapping[str, TensorInfo]) -> dict[str, Mapping[str, TensorInfo]]:
    """The keys under each diffusion-model prefix, stripped (prefixes with no key left out; ``""``: all)."""
    found: dict[str, dict[str, TensorInfo]] = {p: {} for p in _DM_NONEMPTY}
    for k, i in infos.items():
        if k.startswith(_DM_NONEMPTY):  # one pass over the keys for all prefixes
            for p in _DM_NONEMPTY:
                if k.startswith(p):
                    found[p][k[len(p):]] = i
                    break
    views: dict[str, Mapping[str, TensorInfo]] = {p: v for p, v in found.items() if v}
    views[""] = infos
    return views


def _match(msets: tuple[tuple[Marker, ...], ...], dm, top) -> tuple[Marker, ...] | None:
    for mset in msets:
        if all(m.matches(dm, top) for m in mset):
            return mset
    return None


def _describe(mset, dm, top) -> str:
    return "; ".join(m.describe(dm, top) for m in mset)


def find_family(infos: Mapping[str, TensorInfo]):
    """``(family, prefix, view, markers)`` of the first family whose markers match, else ``None``."""
    views = _views(infos)
    for fam in FAMILIES:
        for prefix, view in views.items():
            mset = _match(fam.markers, view, infos)
            if mset:
                return fam, prefix, view, mset
    return None


def _meta_arch(metadata: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(base architecture id, adapter suffix) from ``modelspec.architecture``."""
    arch = metadata.get("modelspec.architecture")
    if not isinstance(arch, str) or not arch:
        return None, None
    base, _, suffix = arch.partition("/")
    return base.strip().lower(), (suffix.strip().lower() or None)


def _metadata_family(metadata: Mapping[str, Any]) -> tuple[str | None, str | None, str | None, str | None]:
    """(family, variant, prediction, evidence) from metadata, or Nones."""
    base, _ = _meta_arch(metadata)
    if base:
        hit = MODELSPEC_ARCH.get(base)
        if hit is None:
            for prefix in sorted(MODELSPEC_ARCH, key=len, reverse=True):
                if base.startswith(prefix):
                    hit = (MODELSPEC_ARCH[prefix][0], None, MODELSPEC_ARCH[prefix][2])
                    break
        if hit:
            return (*hit, f"metadata modelspec.architecture = {metadata['modelspec.architecture']!r}")
    ver = metadata.get("ss_base_model_version")
    if isinstance(ver, str) and ver:
        hit = KOHYA_BASE.get(ver)
        if hit is None and ver.startswith("sdxl_"):
            hit = ("sdxl", None, None)
        if hit:
            return (*hit, f"metadata ss_base_model_version = {ver!r}")
    if metadata.get("ss_v2") == "True":
        return "sd2", None, None, "metadata ss_v2 = 'True'"
    arch = metadata.get("general.architecture")
    if isinstance(arch, str) and arch in GGUF_ARCH:
        return GGUF_ARCH[arch], None, None, f"GGUF general.architecture = {arch!r}"
    return None, None, None, None


def _scheduler_prediction(metadata: Mapping[str, Any]) -> str | None:
    for key, value in metadata.items():
        if "scheduler" in key and isinstance(value, dict) and isinstance(value.get("prediction_type"), str):
            return value["prediction_type"]
    return None


def _decide_prediction(det: Detection, fam: Family | None, variant_pred: str | None, metadata, infos, extra,
                       read_std: Callable[[str], float | None] | None) -> None:
    def done(value: str | None, how: str) -> None:
        det.prediction = value
        det.evidence.append(f"prediction {value or 'unknown'}: {how}")

    mp = metadata.get("modelspec.prediction_type")
    if isinstance(mp, str) and mp.strip().lower() in _PRED_WORDS:
        return done(_PRED_WORDS[mp.strip().lower()], f"metadata modelspec.prediction_type = {mp!r}")
    _, _, meta_pred, meta_ev = _metadata_family(metadata)
    if meta_pred:
        return done(meta_pred, meta_ev)
    if metadata.get("ss_v_parameterization") == "True":
        return done("v", "metadata ss_v_parameterization = 'True'")
    sp = _scheduler_prediction(metadata)
    if sp and sp.lower() in _PRED_WORDS:
        return done(_PRED_WORDS[sp.lower()], f"diffusers scheduler_config prediction_type = {sp!r}")
    if "v_pred" in infos:
        z = " with zero-terminal-SNR (ztsnr key)" if "ztsnr" in infos else ""
        return done("v", f"marker key v_pred present{z}")
    if "edm_vpred.sigma_max" in infos or "edm_vpred.sigma_min" in infos:
        return done("v", "marker keys edm_vpred.* (v-prediction on an EDM schedule, CosXL style)")
    if "edm_mean" in infos and "edm_std" in infos:
        return done("edm", "marker keys edm_mean/edm_std (EDM, Playground v2.5 style)")
    if fam is None:
        return done(None, "family unknown")
    if variant_pred:
        return done(variant_pred, f"{fam.id} {det.variant} models are {variant_pred}")
    if fam.prediction_by_step or fam.prediction_std:  # the keys cannot tell (SD2 512-eps vs 768-v)
        step = extra.get("global_step")
        for known, value, rule in fam.prediction_by_step:
            if isinstance(step, int) and step == known:
                return done(value, f"global_step = {step} ({rule})")
        if fam.prediction_std:
            key, threshold = fam.prediction_std
            std = read_std(key) if read_std else None
            if std is not None:
                value = "v" if std > threshold else "eps"
                return done(value, f"heuristic (ComfyUI rule, unreliable): std({key}) = {std:.4f} "
                                   f"{'>' if value == 'v' else '<='} {threshold}; metadata would be authoritative")
        return done(None, fam.prediction_unknown or f"the keys of {fam.id} cannot tell the prediction")
    if fam.default_prediction:
        return done(fam.default_prediction, f"family default for {fam.id}")
    return done(None, f"no default prediction for {fam.id}")


def _vae_family(det: Detection, infos: Mapping[str, TensorInfo], vae_keys: list[str], path: Path | None) -> None:
    conv = next((k for k in vae_keys if k.endswith("decoder.conv_in.weight")), None)
    if conv is None:  # TAESD: the first decoder conv takes the latent channels
        conv = next((k for k in vae_keys if k.endswith("taesd_decoder.1.weight")), None)
        if conv:
            det.variant = "taesd"
    ch = infos[conv].shape[1] if conv and len(infos[conv].shape) == 4 else None
    if any(k.endswith("decoder.mid.block_1.mix_factor") for k in vae_keys):
        det.family = "svd"
        det.evidence.append("temporal VAE decoder (decoder.mid.block_1.mix_factor): SVD")
        return
    if ch is not None:
        det.evidence.append(f"{conv} {list(infos[conv].shape)}: {ch}-channel latent VAE")
    name = path.name if path else ""
    named = [f for f in FAMILIES if f.vae_file_names and f.latent_channels == ch]
    candidates = "/".join(sorted(f.id for f in named))
    for fam in named:
        if re.search(fam.vae_file_names, name, re.I):
            det.family = fam.id
            det.evidence.append(f"family {fam.id} from the file name {name!r} (keys cannot tell {candidates})")
            return
    if candidates:
        det.evidence.append(f"family not determinable from keys: {candidates} VAEs share every key and shape")


def _te_family(det: Detection, comps: Mapping[str, list[str]]) -> None:
    tes = [c for c in TEXT_ENCODERS if c in comps]
    det.evidence.append(f"text encoder(s) only: {', '.join(tes)}")
    if len(tes) == 1:
        det.variant = tes[0]  # which encoder (ComfyUI detect_te_model: CLIP_L / CLIP_H / CLIP_G / T5_XXL)
    if tes == ["openclip_h"]:
        det.family = "sd2"
        det.evidence.append("OpenCLIP-H text encoder: SD2")
    elif set(tes) == {"clip_l", "clip_g"}:
        det.family = "sdxl"
        det.evidence.append("CLIP-L + OpenCLIP-bigG pair: SDXL text encoders")
    else:
        det.evidence.append("family not determinable: this text encoder is shared by several families")


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None, path: str | Path | None = None,
           read_std: Callable[[str], float | None] | None = None) -> Detection:
    metadata = metadata or {}
    extra = extra or {}
    path = Path(path) if path is not None else None
    det = Detection()
    comps = split_components(infos)
    det.components = comps
    meta_fam, meta_var, _, meta_ev = _metadata_family(metadata)
    _, meta_suffix = _meta_arch(metadata)

    guess = detect_adapter(infos, extra) or detect_taesd(infos, path.name if path else "")
    fam: Family | None = None
    variant_pred = None
    if guess:
        det.kind, det.family, det.variant = guess.kind, guess.family, guess.variant
        det.evidence += guess.evidence
        if guess.kind == "vae":  # TAESD: bare Sequential keys are the whole VAE
            comps.clear()
            comps["vae"] = list(infos)
    else:
        found = find_family(infos)
        if found:
            fam, prefix, view, mset = found
            det.family, det.dm_prefix = fam.id, prefix
            where = f" under {prefix!r}" if prefix else ""
            det.evidence.append(f"{fam.id}: {_describe(mset, view, infos)}{where}")
            for var in fam.variants:
                vset = _match(var.markers, view, infos)
                if vset:
                    det.variant, variant_pred = var.id, var.prediction
                    det.evidence.append(f"variant {var.id}: {_describe(vset, view, infos)}")
                    break
            dm_comp = fam.arch
            others = [c for c in ("vae", *TEXT_ENCODERS) if c in comps]
            if dm_comp not in comps:
                comps[dm_comp] = [k for k in infos if k.startswith(prefix)] if prefix else list(view)
            det.kind = "checkpoint" if others else "unet"
            det.evidence.append(f"kind {det.kind}: {dm_comp}" + (f" + {', '.join(others)}" if others else " only"))
        elif "unet" in comps or "dit" in comps:
            dm_comp = "unet" if "unet" in comps else "dit"
            others = [c for c in ("vae", *TEXT_ENCODERS) if c in comps]
            det.kind = "checkpoint" if others else "unet"
            det.evidence.append(f"kind {det.kind}: {dm_comp} keys" + (f" + {', '.join(others)}" if others else ""))
            det.warnings.append(f"diffusion model not recognised as any known family ({len(comps[dm_comp])} keys)")
        elif "vae" in comps and not any(c in comps for c in TEXT_ENCODERS):
            det.kind = "vae"
            _vae_family(det, infos, comps["vae"], path)
        elif any(c in comps for c in TEXT_ENCODERS):
            det.kind = "text_encoder"
            _te_family(det, comps)
        else:
            det.evidence.append("no known layout matched")

    module = metadata.get("ss_network_module")
    if det.kind == "lora" and isinstance(module, str) and module.startswith("lycoris"):
        args = metadata.get("ss_network_args")
        algo = args.get("algo") if isinstance(args, dict) and isinstance(args.get("algo"), str) else "locon"
        det.kind, det.variant = "lycoris", algo.lower()
        det.evidence.append(f"metadata ss_network_module = {module!r}: LyCORIS {det.variant} with LoRA-style keys")
    index = metadata.get("model_index.json")
    if isinstance(index, dict) and isinstance(index.get("_class_name"), str):
        det.evidence.append(f"diffusers pipeline {index['_class_name']}")

    # metadata wins over guesses
    if meta_fam and meta_ev:
        kind_from_meta = {"lora": "lora", "lycoris": "lycoris", "textual-inversion": "embedding",
                          "controlnet": "controlnet"}.get(meta_suffix or "")
        if kind_from_meta and det.kind in ("unknown", "lora", "lycoris", "embedding", "controlnet") \
                and det.kind != kind_from_meta and not (kind_from_meta == "lora" and det.kind == "lycoris"):
            det.warnings.append(f"metadata says {kind_from_meta}, keys say {det.kind}")
            det.kind = kind_from_meta
        if det.family and det.family != meta_fam:
            det.warnings.append(f"metadata says family {meta_fam} but the keys suggest {det.family}; metadata wins")
        if det.family != meta_fam:
            det.evidence.append(f"family {meta_fam}" + (f" variant {meta_var}" if meta_var else "") + f" from {meta_ev}")
        det.family = meta_fam
        if meta_var and det.variant != meta_var and det.kind in ("checkpoint", "unet"):
            if det.variant and det.variant != meta_var:
                det.warnings.append(f"metadata says variant {meta_var}, keys say {det.variant}; metadata wins")
            det.variant = meta_var
            det.evidence.append(f"variant {meta_var} from {meta_ev}")
        fam = BY_ID.get(meta_fam, fam)
        if det.kind == "unknown" and "general.architecture" in metadata and fam is not None:
            det.kind = "unet"  # ComfyUI-GGUF files hold the diffusion model alone
            det.evidence.append("kind unet: a GGUF diffusion model (ComfyUI-GGUF stores the UNet/DiT alone)")
    if det.kind in ("checkpoint", "unet"):
        _decide_prediction(det, fam, variant_pred, metadata, infos, extra, read_std)
        if det.family == "sdxl" and det.prediction == "v" and det.variant is None:
            det.variant = "v_pred"
    elif det.kind in ("lora", "lycoris", "embedding", "controlnet", "ipadapter", "t2i_adapter"):
        mp = metadata.get("modelspec.prediction_type")
        if isinstance(mp, str) and mp.lower() in _PRED_WORDS:
            det.prediction = _PRED_WORDS[mp.lower()]
            det.evidence.append(f"prediction {det.prediction}: metadata modelspec.prediction_type = {mp!r}")
    return det
