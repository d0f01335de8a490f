"""What the transforms need to know about a checkpoint's layout, on top of ``arch.components``:
which single-file layout it is (from key names *and* shapes), where each component lives, and how
LDM EMA keys relate to UNet keys. Header-only; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckptlab.arch.components import COMPONENT_PREFIXES, SCHEDULE_KEYS, split_components
from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorSource

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
POSITION_IDS_SUFFIX = "embeddings.position_ids"

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner", "sd3": "SD3",
                "flux": "Flux"}


@dataclass
class Layout:
    """``family`` is a single-file layout id (``sd1``...) or ``None``; ``components`` as ``split_components``."""

    family: str | None
    components: dict[str, list[str]]

    def prefix(self, component: str) -> str:
        if self.family is None:
            raise MismatchError(f"cannot tell which model family this is, so the {component} is not located")
        prefixes = COMPONENT_PREFIXES[self.family].get(component)
        if not prefixes:
            raise MismatchError(f"a {FAMILY_NAMES[self.family]} checkpoint has no {component} component")
        return prefixes[0]


def _to_k_width(src: TensorSource, prefix: str) -> int | None:
    for key, info in src.infos().items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and len(info.shape) == 2:
            return info.shape[1]
    return None


def detect_layout(src: TensorSource) -> Layout:
    """Single-file family from the text-encoder groups, confirmed by the UNet's cross-attention width."""
    keys = src.keys()
    comps = split_components(keys)
    has = set(comps)
    k = set(keys)

    def any_prefix(p: str) -> bool:
        return any(x.startswith(p) for x in k)

    family = None
    if any_prefix("joint_blocks.") or any_prefix(UNET_PREFIX + "joint_blocks."):
        family = "sd3"
    elif any_prefix(UNET_PREFIX + "double_blocks."):
        family = "flux"
    elif any_prefix("conditioner.embedders.1.model."):
        family = "sdxl"
    elif any_prefix("conditioner.embedders.0.model."):
        family = "sdxl_refiner"
    elif any_prefix("conditioner.embedders.0.transformer."):
        family = "sdxl"
    elif any_prefix("cond_stage_model.model."):
        family = "sd2"
    elif any_prefix("cond_stage_model.transformer."):
        family = "sd1"
    elif "unet" in has:
        width = _to_k_width(src, UNET_PREFIX)
        family = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}.get(width or 0)
    if family in ("sd1", "sd2", "sdxl", "sdxl_refiner") and "unet" in has:
        width = _to_k_width(src, UNET_PREFIX)
        te = text_width(src, family)
        if width is not None and te is not None and width != te:
            raise MismatchError(f"text encoders look {FAMILY_NAMES[family]} ({te} wide) but the UNet's "
                                f"cross-attention is {width} wide; the file mixes families", src.path)
    return Layout(family, comps)


_TE_TOKENS = {
    "sd1": ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",),
    "sd2": ("cond_stage_model.model.token_embedding.weight",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight"),
    "sdxl_refiner": ("conditioner.embedders.0.model.token_embedding.weight",),
}


def text_width(src: TensorSource, family: str) -> int | None:
    """Context width the text encoders give the UNet (SDXL: CLIP-L + CLIP-G widths)."""
    total = 0
    for key in _TE_TOKENS.get(family, ()):
        if key not in src:
            return None
        total += src.info(key).shape[1]
    return total or None


def ema_key(unet_key: str) -> str:
    """LDM EMA name of a UNet key: ``model_ema.`` + the key after ``model.`` with every dot removed."""
    return EMA_PREFIX + "".join(unet_key.split(".")[1:])


def ema_pairs(src: TensorSource) -> tuple[dict[str, str], list[str]]:
    """``{unet_key: ema_key}`` for UNet keys with an EMA copy, and the UNet keys without one."""
    keys = set(src.keys())
    pairs: dict[str, str] = {}
    missing: list[str] = []
    for key in src.keys():
        if key.startswith(UNET_PREFIX):
            e = ema_key(key)
            if e in keys:
                pairs[key] = e
            else:
                missing.append(key)
    return pairs, missing


def is_ema(key: str) -> bool:
    return key.startswith(EMA_PREFIX)


def is_schedule(key: str) -> bool:
    return key in SCHEDULE_KEYS and not is_ema(key)


def is_position_ids(key: str) -> bool:
    return key.endswith(POSITION_IDS_SUFFIX)
