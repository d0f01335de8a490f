"""The shape of a family description: ``Marker`` (one key, optionally with a shape rule), ``Variant``,
``Diffusers`` (what a diffusers pipeline of the family needs beyond tensor shapes) and ``Family``, the one
record every module reads. The descriptions themselves are data, in ``ckptlab.arch.families``; the detector
(``ckptlab.arch.detect``) and the transforms, merges and catalog only interpret them.

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
class Diffusers:
    """What ``to-diffusers`` / ``from-diffusers`` need for a family that shapes cannot tell (diffusers'
    ``single_file_utils`` and the official pipeline repos)."""

    #: ``model_index.json`` ``_class_name``
    pipeline: str
    #: ``(folder, single-file prefix, kind)`` per text encoder; kind ``hf`` (CLIP in transformers names),
    #: ``openclip_h`` / ``openclip_g`` (OpenCLIP names, converted)
    text_encoders: tuple[tuple[str, str, str], ...]
    #: scheduler class the official repos ship
    scheduler: str
    #: ``model_index.json`` entries besides version, class and scheduler (``text_encoder``, ``tokenizer``...)
    index: tuple[tuple[str, object], ...]
    #: UNet ``sample_size`` (latent pixels); ``sample_size_v``: for v-prediction models (SD2 768-v), if other
    sample_size: int = 64
    sample_size_v: int | None = None
    #: attention heads: a fixed count at every level (SD1: 8), else ``None`` (64-wide heads)
    fixed_heads: int | None = None
    #: SDXL ``addition_time_embed_dim`` divisor: number of micro-conditioning values (base 6, refiner 5)
    time_ids: int = 6
    #: VAE config
    vae_scaling: float = 0.18215
    vae_sample_size: int = 512


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
    #: where the keys cannot tell the prediction (SD2 512-eps vs 768-v): ``(global_step, prediction, rule)`` of
    #: known releases, the ComfyUI std heuristic ``(key, threshold)`` (v above it; only with heuristics on) and
    #: the evidence line when neither decides
    prediction_by_step: tuple[tuple[int, str, str], ...] = ()
    prediction_std: tuple[str, float] | None = None
    prediction_unknown: str | None = None
    #: tensor count of the complete diffusion model (for "missing keys" warnings), when exactly known
    dm_tensors: int | None = None
    #: remarks shown nowhere but kept with the data (why a default is what it is)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # ---- what the transforms, merges and the catalog read ------------------------------------------------
    #: short name in messages ("SD1", "SDXL"); ``display_name`` falls back to ``name``
    short_name: str | None = None
    #: single-file (LDM/SGM/ComfyUI) key layout: component -> key prefixes, first one written. Empty: the
    #: family has no known single-file layout, so extract/replace cannot locate its components
    prefixes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: token-embedding keys of the single-file text encoders; their widths add up to the context width the
    #: diffusion model's cross-attention takes (the check that refuses a file mixing families)
    text_tokens: tuple[str, ...] = ()
    #: context width of the diffusion model's cross-attention (adapters are told by it)
    context_width: int | None = None
    #: VAE latent-space group: VAEs of one group are interchangeable (``None``: no VAE check for the family)
    vae_group: str | None = None
    #: merge block names (supermerger), BASE first; empty: the family merges with one BASE block
    merge_blocks: tuple[str, ...] = ()
    #: to/from diffusers support (``None``: not supported)
    diffusers: Diffusers | None = None
    #: native resolution per prediction when it depends on it (SD2: 512 eps, 768 v)
    resolution_by_prediction: tuple[tuple[str, int], ...] = ()
    #: CivitAI ``baseModel`` values of the family, other names people type, and normalised name prefixes of
    #: CivitAI values that keep appearing (``Wan Video 2.2 I2V-A14B`` -> ``wanvideo``)
    civitai: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    name_prefixes: tuple[str, ...] = ()
    #: standalone VAE files of same-shaped families differ in their weights only: a file-name pattern
    #: (case-insensitive regex) tells them apart, among the families with the VAE's latent channels
    vae_file_names: str | None = None
    #: A1111's "sd version" (user-metadata sidecars): SD1 / SD2 / SDXL, else ``None`` ("Unknown")
    a1111_version: str | None = None

    @property
    def display_name(self) -> str:
        return self.short_name or self.name

    @property
    def component_prefixes(self) -> dict[str, tuple[str, ...]]:
        """Single-file component prefixes of this family (``{}`` when it has no single-file layout)."""
        return dict(self.prefixes)

    def prefix(self, component: str) -> str | None:
        """The single-file prefix ``component`` is written under, or None when the family has none."""
        found = dict(self.prefixes).get(component)
        return found[0] if found else None

    def native_resolution(self, prediction: str | None = None) -> int | None:
        """The native resolution; ``None`` when it depends on a prediction that is not known."""
        if not self.resolution_by_prediction:
            return self.resolution
        return dict(self.resolution_by_prediction).get(prediction or "")


def unet_blocks(n: int) -> tuple[str, ...]:
    """supermerger block names of a UNet with ``n`` input and ``n`` output blocks: ``BASE, IN00..,
    M00, OUT00..`` (SD1/SD2: 12 -> 26 names; SDXL: 9 -> 20 names)."""
    return ("BASE", *(f"IN{i:02}" for i in range(n)), "M00", *(f"OUT{i:02}" for i in range(n)))
