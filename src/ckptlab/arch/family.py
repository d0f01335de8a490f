"""The shape of a family description: ``Marker`` (one key, optionally with a shape rule), ``Variant`` and
``Family``. The descriptions themselves are data, in ``ckptlab.arch.families``; the detector
(``ckptlab.arch.detect``) only interprets them.

Marker keys are relative to the diffusion-model prefix (``model.diffusion_model.`` in single files, none in
UNet/DiT-only files, ``unet.``/``transformer.`` in diffusers folders) unless ``top=True`` (file top level).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ckptlab.formats.base import TensorInfo


@dataclass(frozen=True)
class Marker:
    key: str
    #: exact shape; ``None`` entries are wildcards
    shape: tuple[int | None, ...] | None = None
    #: ``(axis, size)`` pairs the shape must have (negative axes allowed)
    dims: tuple[tuple[int, int], ...] = ()
    #: number of dimensions
    ndim: int | None = None
    #: the key must be absent
    absent: bool = False
    #: the key is at the file's top level rather than under the diffusion-model prefix
    top: bool = False

    def matches(self, dm: Mapping[str, TensorInfo], top: Mapping[str, TensorInfo]) -> bool:
        info = (top if self.top else dm).get(self.key)
        if self.absent:
            return info is None
        if info is None:
            return False
        shape = info.shape
        if self.ndim is not None and len(shape) != self.ndim:
            return False
        if self.shape is not None:
            if len(shape) != len(self.shape) or any(w is not None and w != s for w, s in zip(self.shape, shape,
                                                                                            strict=True)):
                return False
        for axis, size in self.dims:
            if not -len(shape) <= axis < len(shape) or shape[axis] != size:
                return False
        return True

    def describe(self, dm: Mapping[str, TensorInfo] | None = None, top: Mapping[str, TensorInfo] | None = None) -> str:
        """One evidence line, with the shape actually found where there is one."""
        if self.absent:
            return f"no {self.key}"
        info = ((top if self.top else dm) or {}).get(self.key)
        if info is not None:
            return f"{self.key} {list(info.shape)}"
        return self.key


def M(key: str, *shape: int | None, dims: tuple[tuple[int, int], ...] = (), ndim: int | None = None,
      absent: bool = False, top: bool = False) -> Marker:
    """Compact constructor for the data tables: ``M("img_in.weight", 3072, 64)``."""
    return Marker(key, tuple(shape) if shape else None, dims, ndim, absent, top)


def absent(key: str, top: bool = False) -> Marker:
    return Marker(key, absent=True, top=top)


@dataclass(frozen=True)
class Variant:
    id: str
    #: alternative marker sets; the variant applies when every marker of one set matches
    markers: tuple[tuple[Marker, ...], ...]
    #: prediction implied by the variant (e.g. SD2 inpaint/depth are eps), else ``None``
    prediction: str | None = None
    #: native resolution override (e.g. SD2 768-v)
    resolution: int | None = None
    #: whether the family's ``dm_tensors`` count applies (False for distilled or extended UNets)
    counted: bool = True


@dataclass(frozen=True)
class Family:
    id: str
    name: str
    #: "unet" or "dit": which component holds the diffusion model
    arch: str
    #: alternative marker sets (LDM naming, diffusers naming...); one full set proves the family
    markers: tuple[tuple[Marker, ...], ...]
    variants: tuple[Variant, ...] = ()
    #: native resolution (square side, pixels), latent channels and pixel-to-latent factor
    resolution: int = 512
    latent_channels: int = 4
    latent_factor: int = 8
    #: 'eps' | 'v' | 'flow' | 'edm' | None (None: cannot be known from the family alone)
    default_prediction: str | None = None
    #: text encoders the family's pipeline uses
    text_encoders: tuple[str, ...] = ()
    #: ComfyUI ``memory_usage_factor`` (activation memory per latent pixel, relative)
    memory_factor: float = 2.0
    #: batch per step at inference: 2 with classifier-free guidance, 1 for guidance-distilled models
    cfg_batch: int = 2
    #: metadata ids: ``modelspec.architecture`` base ids and kohya ``ss_base_model_version`` values
    modelspec: tuple[str, ...] = ()
    kohya: tuple[str, ...] = ()
    #: tensor count of the complete diffusion model (for "missing keys" warnings), when exactly known
    dm_tensors: int | None = None
    #: remarks shown nowhere but kept with the data (why a default is what it is)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def component_prefixes(self) -> dict[str, tuple[str, ...]]:
        """Single-file component prefixes of this family (``arch.components.COMPONENT_PREFIXES``), if known."""
        from ckptlab.arch.components import COMPONENT_PREFIXES

        return COMPONENT_PREFIXES.get(self.id, {})
