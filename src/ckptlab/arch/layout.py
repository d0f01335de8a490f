"""A family's key layout as one file holds it: what the transforms (extract, replace, prune, precision,
to-diffusers) act on. The family is the one ``ckptlab.arch.identify`` gives (the detector in ``arch.detect``);
where each component lives is read from its record (``Family.prefixes``); the text encoders are checked to
be the family's own, so a file that mixes families is refused instead of being cut in the wrong places.
Header-only; no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ckptlab.arch.components import UNET_PREFIX, split_components
from ckptlab.arch.families import FAMILIES, get
from ckptlab.arch.family import Family
from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorInfo, TensorSource


@dataclass
class FileLayout:
    """``family``: the record of identify's family (``None`` when unknown); ``kind``: identify's kind;
    ``components``: as ``split_components``."""

    family: Family | None
    kind: str | None
    components: dict[str, list[str]]

    @property
    def family_id(self) -> str | None:
        return self.family.id if self.family else None

    def prefix(self, component: str) -> str:
        """The single-file prefix of ``component`` (``unet`` means the diffusion model, UNet or DiT)."""
        if self.family is None:
            raise MismatchError(f"cannot tell which model family this is, so the {component} is not located")
        comp = self.family.arch if component in ("unet", "dit") else component
        prefix = self.family.prefix(comp)
        if prefix is None:
            raise MismatchError(f"a {self.family.display_name} checkpoint has no {component} component")
        return prefix


def cross_attention_width(infos: Mapping[str, TensorInfo], prefix: str = UNET_PREFIX) -> int | None:
    """The context width the diffusion model's cross-attention takes (first ``attn2.to_k`` under ``prefix``)."""
    for key, info in infos.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and len(info.shape) == 2:
            return info.shape[1]
    return None


def text_width(infos: Mapping[str, TensorInfo], family: Family) -> int | None:
    """Context width ``family``'s single-file text encoders give the UNet (SDXL: CLIP-L + CLIP-G widths), or
    None when the file does not hold all of them."""
    total = 0
    for key in family.text_tokens:
        info = infos.get(key)
        if info is None or len(info.shape) != 2:
            return None
        total += info.shape[1]
    return total or None


def text_encoder_family(infos: Mapping[str, TensorInfo]) -> Family | None:
    """The family whose single-file text encoders the file holds (the most specific: SDXL's pair before a
    single encoder), or None."""
    best = None
    for fam in FAMILIES:
        if fam.text_tokens and all(k in infos for k in fam.text_tokens):
            if best is None or len(fam.text_tokens) > len(best.text_tokens):
                best = fam
    return best


def check_text_encoders(infos: Mapping[str, TensorInfo], family: Family | None, path=None) -> None:
    """Refuse a file whose text encoders give a context width the diffusion model's cross-attention does not
    take (an SD1 CLIP next to an SDXL UNet...): every transform would cut it in the wrong places."""
    te_fam = text_encoder_family(infos)
    if te_fam is None:
        return
    dm_prefix = (family.prefix(family.arch) if family else None) or UNET_PREFIX
    width = cross_attention_width(infos, dm_prefix)
    te = text_width(infos, te_fam)
    if width is not None and te is not None and width != te:
        raise MismatchError(f"text encoders look {te_fam.display_name} ({te} wide) but the UNet's "
                            f"cross-attention is {width} wide; the file mixes families", path)


def file_layout(src: TensorSource) -> FileLayout:
    """Identify ``src`` (the one detector), check its text encoders against its diffusion model, and return
    where its components are."""
    from ckptlab.arch.identify import identify

    info = identify(src)
    family = get(info.family)
    infos = src.infos()
    check_text_encoders(infos, family, src.path)
    return FileLayout(family, info.kind or None, split_components(infos))
