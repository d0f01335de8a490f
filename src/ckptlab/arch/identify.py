"""``identify(path_or_source) -> ModelInfo``: what a model file is, from its header alone.

Reads keys, dtypes, shapes, metadata and (for pickles) the wrapper's plain values through a ``TensorSource``;
never loads the weights and never imports torch. The one exception is opt-in (``heuristics=True``): an SD2
model without metadata or ``global_step`` then gets ComfyUI's prediction heuristic, which reads one ``[320]``
tensor's bytes from a safetensors file (numpy, no torch), and says so in ``evidence``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptlab.arch.checks import file_warnings
from ckptlab.arch.components import COMPONENTS, MARKER_KEYS, SCHEDULE_KEYS
from ckptlab.arch.detect import ADAPTER_KINDS, TEXT_ENCODERS, detect
from ckptlab.arch.families import get
from ckptlab.arch.vram import VramEstimate, estimate
from ckptlab.errors import UnsupportedFormatError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.formats.dtypes import DTYPES, friendly

REPORTED_COMPONENTS = ("unet", "dit", "vae", "clip_l", "clip_g", "openclip_h", "t5xxl", "ema")
_TRAINING_EXTRA = ("optimizer_states", "lr_schedulers", "callbacks", "loops", "optimizer", "optimizer_state_dict",
                   "amp_scaler", "native_amp_scaling_state", "grad_scaler")
EMA_MIN_KEYS = 100  # diffusers: a file "has EMA" when more than 100 keys start with model_ema


@dataclass
class ModelInfo:
    """What ``identify`` found in one model file (the ``inspect --json`` record)."""

    path: str
    format: str
    size: int
    tensors: int
    params: int
    kind: str
    family: str | None
    variant: str | None
    prediction: str | None
    components: list[str]
    dtypes: dict[str, int]
    has_ema: bool
    training_state: bool
    pruned: bool
    metadata: dict[str, Any]
    vram: VramEstimate | None
    evidence: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_metadata(raw: dict[str, Any]) -> dict[str, Any]:
    """String metadata with JSON objects/arrays inside strings parsed (``sd_merge_recipe``, ``ss_tag_frequency``,
    diffusers configs...). Other values are kept as they are, and so is a string that is not JSON or nests
    deeper than ``jsonable.MAX_JSON_DEPTH`` (a hostile file must not cost a RecursionError here or later)."""
    from ckptlab.jsonable import loads_limited

    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, str) and v[:1] in ("{", "["):
            try:
                out[k] = loads_limited(v)
                continue
            except ValueError:
                pass
        out[k] = v
    return out


_QUANT_ENDINGS = (".quant_state.bitsandbytes__nf4", "scaled_fp8")


def quantization_notes(infos: dict[str, TensorInfo]) -> list[str]:
    """Evidence lines for quantized storage (bitsandbytes' NF4 keys, ComfyUI's ``scaled_fp8`` marker, the F8 dtypes): BnB-NF4, ComfyUI scaled fp8, fp8 dtypes."""
    notes = []
    nf4, scaled = 0, None
    for k in infos:  # one pass; most files have neither ending
        if k.endswith(_QUANT_ENDINGS):
            if k.endswith(".quant_state.bitsandbytes__nf4"):
                nf4 += 1
            if scaled is None and k.endswith("scaled_fp8"):
                scaled = k
    if nf4:
        notes.append(f"bitsandbytes NF4 quantized ({nf4} *.quant_state.bitsandbytes__nf4 keys; shapes are packed)")
    if scaled:
        kind = "fp8_e4m3fn" if infos[scaled].dtype in ("F32", "F8_E4M3") else friendly(infos[scaled].dtype)
        notes.append(f"ComfyUI scaled fp8 weights ({scaled}: {kind})")
    fp8 = sum(i.numel for i in infos.values() if i.dtype in ("F8_E4M3", "F8_E5M2"))
    if fp8 and not scaled:
        notes.append(f"fp8 storage for {fp8:,} parameters")
    return notes


_NOT_WEIGHT_KEYS = SCHEDULE_KEYS | MARKER_KEYS
_NOT_WEIGHT_SUFFIXES = ("position_ids", "scaled_fp8", "model_ema.decay", "model_ema.num_updates")
_WEIGHT_DTYPE: dict[str, bool] = {}  # dtype -> holds weights (not an integer/bool buffer); filled on first use


def _is_weight(key: str, info: TensorInfo, comp: str) -> bool:
    if comp == "training" or key in _NOT_WEIGHT_KEYS or key.endswith(_NOT_WEIGHT_SUFFIXES) \
            or key.startswith("model.model_sampling."):
        return False
    d = info.dtype
    w = _WEIGHT_DTYPE.get(d)
    if w is None:
        w = _WEIGHT_DTYPE[d] = not (d.startswith(("I", "U")) and d in DTYPES or d == "BOOL")
    return w


def _inference_bytes(infos: dict[str, TensorInfo], keys: list[str], notes: list[str],
                     numels: dict[str, int] | None = None) -> float:
    """Average bytes per parameter at inference: fp32/fp64 counted as 2 (UIs cast to half precision), known
    dtypes at their size, quantized GGUF types at their packed size. ``numels`` caches ``infos[k].numel``."""
    total = numel = 0.0
    for k in keys:
        i = infos[k]
        n = numels[k] if numels is not None else i.numel
        if i.dtype in ("F32", "F64"):
            size = 2.0
            note = "fp32 weights counted as fp16 (UIs cast to half precision for inference)"
            if note not in notes:
                notes.append(note)
        elif i.dtype in DTYPES:
            size = float(DTYPES[i.dtype][0])
        else:
            try:
                size = i.nbytes / n if n else 1.0
            except (KeyError, ValueError):
                size = 1.0
        total += size * n
        numel += n
    return total / numel if numel else 2.0


def _std_reader(source: TensorSource):
    """Std of one tensor read from a safetensors file with numpy (for the SD2 heuristic), else None."""
    data_range = getattr(source, "data_range", None)
    if data_range is None:
        return None

    def read(key_rel: str) -> float | None:
        import numpy as np

        for prefix in ("model.diffusion_model.", ""):
            key = prefix + key_rel
            if key in source.infos():
                info = source.info(key)
                if info.dtype not in ("F16", "F32", "BF16") or info.numel == 0:
                    return None
                begin, end = data_range(key)
                if isinstance(source.path, str):  # a remote URL (remote.RemoteURL): one ranged GET
                    raw = bytes(source.raw_bytes(key))
                else:
                    with open(source.path, "rb") as fh:
                        fh.seek(begin)
                        raw = fh.read(end - begin)
                if info.dtype == "BF16":
                    arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = np.frombuffer(raw, "<f2" if info.dtype == "F16" else "<f4").astype(np.float64)
                return float(arr.std())
        return None

    return read


def _open(path_or_source) -> tuple[TensorSource, bool]:
    if isinstance(path_or_source, TensorSource):
        return path_or_source, False
    from ckptlab.formats import detect_format, open_model

    try:
        return open_model(path_or_source), True
    except ImportError:
        fmt = detect_format(path_or_source)
        if fmt == "pickle":
            raise UnsupportedFormatError("legacy pickle checkpoint: needs ckptlab's safe pickle reader, which is not "
                                         "available in this build (it is never opened with torch.load/pickle.load)",
                                         path_or_source) from None
        raise UnsupportedFormatError(f"{fmt} files are not readable in this build", path_or_source) from None


def identify(path_or_source: str | Path | TensorSource, *, heuristics: bool = False) -> ModelInfo:
    """Identify one model file or folder (or an already opened ``TensorSource``).

    ``heuristics=True`` also applies rules that read tensor values (today: ComfyUI's SD2 v/eps rule, one
    ``[320]`` tensor); without it ``prediction`` stays ``None`` where the header cannot decide."""
    source, owned = _open(path_or_source)
    try:
        return _identify(source, heuristics)
    finally:
        if owned:
            source.close()


def _identify(source: TensorSource, heuristics: bool = False) -> ModelInfo:
    infos = source.infos()
    metadata = parse_metadata(dict(source.metadata))
    extra = dict(getattr(source, "extra", {}) or {})
    det = detect(infos, metadata, extra, source.path, read_std=_std_reader(source) if heuristics else None)
    comps = det.components
    comp_of = {k: c for c, ks in comps.items() for k in ks}

    params = 0
    dtypes: dict[str, int] = {}
    weight_keys: dict[str, list[str]] = {}
    numels: dict[str, int] = {}  # of the weight keys
    names: dict[str, str] = {}  # friendly dtype names
    prod = math.prod
    weight_dtype = _WEIGHT_DTYPE.get
    for k, i in infos.items():
        c = comp_of.get(k, "other")
        # _is_weight(k, i, c), inlined for the common case (a known weight dtype): this loop sees every key
        if c != "training" and weight_dtype(i.dtype) and k not in _NOT_WEIGHT_KEYS \
                and not k.endswith(_NOT_WEIGHT_SUFFIXES) and not k.startswith("model.model_sampling.") \
                or weight_dtype(i.dtype) is None and _is_weight(k, i, c):
            n = numels[k] = prod(i.shape)  # TensorInfo.numel, inlined: this loop sees every key
            params += n
            d = i.dtype
            name = names.get(d) or names.setdefault(d, friendly(d))
            dtypes[name] = dtypes.get(name, 0) + n
            weight_keys.setdefault(c, []).append(k)

    has_ema = len(comps.get("ema", [])) > EMA_MIN_KEYS
    # pickles: the reader leaves training state out of the key space and names it in ``dropped``
    seen = set(extra) | set(getattr(source, "dropped", ()) or ())
    training_keys = [x for x in _TRAINING_EXTRA if x in seen] + (["training keys"] if "training" in comps else [])
    training_state = bool(training_keys)
    if has_ema:
        det.evidence.append(f"EMA: {len(comps['ema'])} model_ema.* keys")
    if training_state:
        det.evidence.append(f"training state: {', '.join(training_keys)}")
    if "pytorch-lightning_version" in extra:
        det.evidence.append(f"PyTorch Lightning wrapper (version {extra['pytorch-lightning_version']})")

    det.evidence += quantization_notes(infos)
    fmt = source.format

    adapters = ADAPTER_KINDS
    listed = [] if det.kind in adapters else [c for c in REPORTED_COMPONENTS if c in comps and c != "ema"]
    if has_ema and det.kind not in adapters:
        listed.append("ema")

    warnings = list(source.warnings) + det.warnings + file_warnings(infos, comps, det, metadata, has_ema)

    fam = get(det.family)
    notes: list[str] = []
    present = {c: (sum(numels[k] for k in weight_keys[c]), _inference_bytes(infos, weight_keys[c], notes, numels))
               for c in COMPONENTS if c in weight_keys and c in ("unet", "dit", "vae", *TEXT_ENCODERS)}
    if det.kind in adapters or det.kind == "unknown" or not present:
        everything = [k for ks in weight_keys.values() for k in ks]
        present = {"file": (params, _inference_bytes(infos, everything, notes, numels))} if params else {}
    res = fam.native_resolution(det.prediction) if fam else None  # SD2: 512-base (eps) vs 768-v
    vram = estimate(fam, present, diffusion=det.kind in ("checkpoint", "unet"), resolution=res, notes=notes)

    return ModelInfo(
        path=str(source.path), format=fmt, size=source.size, tensors=len(infos), params=params,
        kind=det.kind, family=det.family, variant=det.variant, prediction=det.prediction, components=listed,
        dtypes=dict(sorted(dtypes.items(), key=lambda kv: -kv[1])), has_ema=has_ema, training_state=training_state,
        pruned=not has_ema and not training_state, metadata=metadata, vram=vram, evidence=det.evidence,
        warnings=warnings,
    )
