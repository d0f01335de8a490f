"""Which model weight each LoRA module adapts, and the name each naming style gives a module.

Names are resolved *forward*, the way kohya, A1111 and ComfyUI do it (adapters.md §1.1 "parsing back is
ambiguous"): enumerate the model's weights, generate every alias a LoRA may use for each, and look the
LoRA's module names up. Aliases are compared with every ``.`` turned into ``_`` (kohya's own spelling), so
``unet.down_blocks.0.attentions.0.proj_in`` and ``lora_unet_down_blocks_0_attentions_0_proj_in`` meet.

A ``Target`` is one adapted weight in the single-file layout of its family (the keys a checkpoint stores),
with a row slice where the model fuses what the LoRA keeps apart (OpenCLIP ``in_proj_weight`` = q, k, v;
Flux ``qkv``). ``Target.names`` holds the module name per output style:

- ``kohya``: ``lora_unet_`` + the path kohya trains on (SD1/SD2: diffusers names; SDXL: SGM names; Flux: BFL
  names), ``lora_te_`` (one text encoder) or ``lora_te1_`` / ``lora_te2_`` + transformers names;
- ``peft`` and ``diffusers``: ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``text_encoder_2.`` + diffusers or
  transformers names (the two styles differ in their parameter suffixes, ``lora.file`` and ``lora.convert``);
- ``comfy``: ComfyUI's own save format, ``diffusion_model.`` + the single-file path.

``targets_for(infos, family)`` builds the table of a model file (bake, extract); ``reference_targets(family)``
the table of the family's reference layout (convert and info, where no model is given).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorInfo

STYLES = ("kohya", "peft", "diffusers", "comfy")
UNET_PREFIX = "model.diffusion_model."


def underscored(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Target:
    """One adapted weight: ``key`` in the model file, the adapted ``shape`` (the slice's shape when ``rows`` is
    set), ``rows`` = ``(start, stop)`` of a fused weight, ``component`` (``unet``, ``dit``, ``te1``, ``te2``,
    ``te3``) and the module name per style (a style missing from ``names`` cannot name this target)."""

    key: str
    shape: tuple[int, ...]
    component: str
    rows: tuple[int, int] | None = None
    names: tuple[tuple[str, str], ...] = ()

    def name(self, style: str) -> str | None:
        return dict(self.names).get(style)

    @property
    def bias_key(self) -> str:
        return self.key[: -len(".weight")] + ".bias" if self.key.endswith(".weight") else self.key + "_bias"


@dataclass
class TargetTable:
    family: str
    targets: list[Target] = field(default_factory=list)
    by_alias: dict[str, Target] = field(default_factory=dict)

    def add(self, target: Target, aliases: list[str]) -> None:
        self.targets.append(target)
        for a in aliases:
            self.by_alias.setdefault(underscored(a), target)
        for _, n in target.names:
            self.by_alias.setdefault(underscored(n), target)

    def lookup(self, module: str) -> Target | None:
        """The target of a LoRA module name (any style), or None."""
        u = underscored(module)
        t = self.by_alias.get(u)
        if t is None:
            for strip in ("base_model_model_", "lycoris_"):
                if u.startswith(strip):
                    t = self.by_alias.get(u[len(strip):])
                    if t is not None:
                        break
        return t

    def components(self) -> set[str]:
        return {t.component for t in self.targets}


# -- builders per family -------------------------------------------------------------------------------------

Builder = Callable[[Mapping[str, TensorInfo], str], TargetTable]
_BUILDERS: dict[str, Builder] = {}


def register(*families: str):
    def deco(fn: Builder) -> Builder:
        for f in families:
            _BUILDERS[f] = fn
        return fn
    return deco


def targets_for(infos: Mapping[str, TensorInfo], family: str | None) -> TargetTable:
    """The alias table of a model file's weights (``infos``: its keys and shapes)."""
    builder = _BUILDERS.get(family or "")
    if builder is None:
        from ckptlab.arch.families import display_name

        raise MismatchError(f"LoRA work supports {supported_names()}; this model is "
                            f"{display_name(family) if family else 'not recognised'}")
    return builder(infos, family)


def supported_names() -> str:
    from ckptlab.arch.families import display_name

    return ", ".join(display_name(f) for f in _BUILDERS)


#: the sample spec whose full-size layout stands for a family when no model file is given
REFERENCE_SPECS = {"sd1": "sd1_checkpoint", "sd2": "sd2_checkpoint", "sdxl": "sdxl_checkpoint"}
_REFERENCE: dict[str, TargetTable] = {}


def reference_targets(family: str | None) -> TargetTable:
    """The alias table of the family's reference single-file layout (names only: shapes are full-size)."""
    if family not in REFERENCE_SPECS:
        from ckptlab.arch.families import display_name

        raise MismatchError(f"LoRA work supports {supported_names()}; this LoRA is for "
                            f"{display_name(family) if family else 'an unrecognised model'}")
    if family not in _REFERENCE:
        from ckptlab.formats.base import TensorInfo as Info
        from ckptlab.sample.layouts import keys

        lay = keys(REFERENCE_SPECS[family], small=False)
        _REFERENCE[family] = targets_for({k: Info(dt, tuple(s)) for k, (dt, s) in lay.items()}, family)
    return _REFERENCE[family]


# -- SD1 / SD2 / SDXL (LDM UNet + CLIP / OpenCLIP text encoders) ---------------------------------------------

#: (folder in diffusers, single-file prefix, kind) per text encoder, in kohya's te1/te2 order
_SD_TEXT = {
    "sd1": (("text_encoder", "cond_stage_model.transformer.", "hf"),),
    "sd2": (("text_encoder", "cond_stage_model.model.", "openclip"),),
    "sdxl": (("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
}
#: old diffusers attention processors name ``attn1.processor.to_q`` (module of ``to_q_lora.down.weight``)
_PROCESSOR = {"to_q": "processor.to_q", "to_k": "processor.to_k", "to_v": "processor.to_v",
              "to_out.0": "processor.to_out"}


def _unet_prefix(infos: Mapping[str, TensorInfo]) -> str | None:
    if any(k.startswith(UNET_PREFIX) for k in infos):
        return UNET_PREFIX
    if any(k.startswith("input_blocks.") for k in infos):
        return ""  # a standalone LDM UNet
    return None


@register("sd1", "sd2", "sdxl")
def _sd_targets(infos: Mapping[str, TensorInfo], family: str) -> TargetTable:
    from ckptlab.ops.diffusers_map import openclip_to_hf, unet_layout_from_ldm, unet_map

    table = TargetTable(family)
    prefix = _unet_prefix(infos)
    if prefix is not None:
        ushapes = {k[len(prefix):]: i.shape for k, i in infos.items() if k.startswith(prefix)}
        umap = unet_map(unet_layout_from_ldm(ushapes))
        for short, shape in ushapes.items():
            if not short.endswith(".weight"):
                continue
            ldm = short[: -len(".weight")]
            d = umap.forward(short)
            diff = d[: -len(".weight")] if d else None
            kohya_path = ldm if family == "sdxl" or diff is None else diff
            names = [("kohya", "lora_unet_" + underscored(kohya_path)), ("comfy", "diffusion_model." + ldm)]
            aliases = ["lora_unet_" + ldm, ldm]
            if diff is not None:
                names += [("peft", "unet." + diff), ("diffusers", "unet." + diff)]
                aliases += ["lora_unet_" + diff, diff, "unet." + diff]
                for a, b in _PROCESSOR.items():
                    if diff.endswith("." + a) and ".attn" in diff:
                        old = diff[: -len(a)] + b
                        aliases += [old, "unet." + old]
            table.add(Target(prefix + short, tuple(shape), "unet", names=tuple(names)), aliases)
    texts = _SD_TEXT[family]
    for i, (folder, te_prefix, kind) in enumerate(texts):
        comp = f"te{i + 1}"
        kohya = "lora_te_" if len(texts) == 1 else f"lora_{comp}_"
        extra_kohya = ["lora_te1_"] if len(texts) == 1 else []  # diffusers' PEFT -> kohya writes te1 for SD1 too
        for key, info in infos.items():
            if not key.startswith(te_prefix) or not key.endswith(("weight", ".weight")):
                continue
            short = key[len(te_prefix):]
            if kind == "hf":
                if not short.endswith(".weight"):
                    continue
                hf = short[: -len(".weight")]
                if not hf.startswith("text_model."):
                    hf = "text_model." + hf  # pre-transformers-4.x checkpoints lack ``text_model.``
                parts = [(hf, None, tuple(info.shape))]
            else:
                m = openclip_to_hf(short)
                if m is None:
                    continue
                if isinstance(m, tuple):
                    layer, which = m[1].split(".")
                    if which != "weight":
                        continue
                    d = info.shape[0] // 3
                    parts = [(f"text_model.encoder.layers.{layer}.self_attn.{p}_proj", (j * d, (j + 1) * d),
                              (d, *info.shape[1:])) for j, p in enumerate("qkv")]
                elif m.endswith(".weight"):
                    parts = [(m[: -len(".weight")], None, tuple(info.shape))]
                else:
                    continue
            for hf, rows, shape in parts:
                names = (("kohya", kohya + underscored(hf)), ("peft", f"{folder}.{hf}"),
                         ("diffusers", f"{folder}.{hf}"), ("comfy", f"{te_prefix}{hf}" if kind == "hf" else
                                                           f"{folder}.{hf}"))
                aliases = [k + hf for k in extra_kohya] + [f"{folder}.{hf[len('text_model.'):]}"]
                table.add(Target(key, shape, comp, rows=rows, names=names), aliases)
    if not table.targets:
        raise MismatchError("no UNet or text-encoder weights to adapt")
    return table
