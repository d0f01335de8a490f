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

Flux and SD3 fuse q/k/v (and Flux's single-block MLP input) into one weight. The whole weight is one target
(kohya / comfy / BFL / XLabs names); each diffusers module of it (``attn.to_q``, ``add_k_proj``, ``proj_mlp`` …) is a
second target with ``rows`` and only peft/diffusers names. Weights whose diffusers layout differs by more than a
rename (``final_layer.adaLN_modulation``: shift and scale swapped) get no diffusers name. docs/lora.md has
the tables; the tests check them against diffusers' own converters.

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
REFERENCE_SPECS = {"sd1": "sd1_checkpoint", "sd2": "sd2_checkpoint", "sdxl": "sdxl_checkpoint",
                   "flux": "flux_dev", "sd3": "sd3_medium"}
#: text encoders a family's LoRAs may adapt that its reference file lacks: (spec, key prefix) borrowed from
#: (BFL's flux1-dev carries no text encoders; CLIP-L and T5-XXL are those of SD3 medium's all-in-one file)
REFERENCE_EXTRA = {"flux": ("sd3_medium", ("text_encoders.clip_l.", "text_encoders.t5xxl."))}
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

        lay = dict(keys(REFERENCE_SPECS[family], small=False))
        if family in REFERENCE_EXTRA:
            spec, prefixes = REFERENCE_EXTRA[family]
            lay.update({k: v for k, v in keys(spec, small=False).items() if k.startswith(prefixes)})
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


# -- Flux and SD3 (transformers with fused qkv) ---------------------------------------------------------------

#: single-file text-encoder prefix (ComfyUI all-in-one files) -> (component, kohya prefix, diffusers folder) per
#: family; kohya's Flux/SD3 trainers name CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_`` and T5 ``lora_te3_``
_DIT_TEXT = {
    "flux": (("text_encoders.clip_l.transformer.", "te1", "lora_te1_", "text_encoder"),
             ("text_encoders.t5xxl.transformer.", "te3", "lora_te3_", "text_encoder_2")),
    "sd3": (("text_encoders.clip_l.transformer.", "te1", "lora_te1_", "text_encoder"),
            ("text_encoders.clip_g.transformer.", "te2", "lora_te2_", "text_encoder_2"),
            ("text_encoders.t5xxl.transformer.", "te3", "lora_te3_", "text_encoder_3")),
}


_NOT_DIT = ("text_encoders.", "first_stage_model.", "vae.", "model.model_sampling")


def _dit_prefix(infos: Mapping[str, TensorInfo], marker: str) -> str | None:
    for prefix in (UNET_PREFIX, "diffusion_model.", "model.", ""):
        if any(k.startswith(prefix + marker) for k in infos):
            return prefix
    return None


def _flux_diffusers(path: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, int] | None]]:
    """diffusers module(s) of one BFL Flux weight path (``double_blocks.0.img_attn.qkv``): a plain rename, row
    slices of a fused weight, or nothing where the layouts differ by more than names (``final_layer.adaLN_modulation``
    swaps shift and scale) — diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``."""
    parts = path.split(".")
    if parts[0] == "double_blocks" and len(parts) >= 4:
        b = f"transformer_blocks.{parts[1]}."
        rest = ".".join(parts[2:])
        h = shape[0] // 3
        qkv = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        if rest in qkv:
            return [(b + n, (j * h, (j + 1) * h)) for j, n in enumerate(qkv[rest])]
        plain = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                 "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj",
                 "txt_mlp.2": "ff_context.net.2", "img_mod.lin": "norm1.linear",
                 "txt_mod.lin": "norm1_context.linear"}
        return [(b + plain[rest], None)] if rest in plain else []
    if parts[0] == "single_blocks" and len(parts) >= 3:
        b = f"single_transformer_blocks.{parts[1]}."
        rest = ".".join(parts[2:])
        if rest == "linear1":
            h = shape[1]
            mlp = shape[0] - 3 * h
            return [(b + "attn.to_q", (0, h)), (b + "attn.to_k", (h, 2 * h)), (b + "attn.to_v", (2 * h, 3 * h)),
                    (b + "proj_mlp", (3 * h, 3 * h + mlp))]
        plain = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
        return [(b + plain[rest], None)] if rest in plain else []
    top = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "final_layer.linear": "proj_out"}
    return [(top[path], None)] if path in top else []


def _sd3_diffusers(path: str, shape: tuple[int, ...], last_block: int) -> list[tuple[str, tuple[int, int] | None]]:
    """diffusers module(s) of one SD3 MMDiT weight path (``joint_blocks.0.x_block.attn.qkv``), diffusers'
    ``convert_sd3_transformer_checkpoint_to_diffusers``; the last block's context adaLN (shift/scale swapped in
    diffusers) and ``final_layer.adaLN_modulation`` get no diffusers name."""
    parts = path.split(".")
    if parts[0] == "joint_blocks" and len(parts) >= 5:
        i = int(parts[1])
        b = f"transformer_blocks.{i}."
        side, rest = parts[2], ".".join(parts[3:])
        h = shape[0] // 3
        if side == "x_block":
            if rest in ("attn.qkv", "attn2.qkv"):
                a = rest.split(".")[0]
                return [(f"{b}{a}.to_{p}", (j * h, (j + 1) * h)) for j, p in enumerate("qkv")]
            plain = {"attn.proj": "attn.to_out.0", "attn2.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj",
                     "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm1.linear"}
        elif side == "context_block":
            if rest == "attn.qkv":
                return [(f"{b}attn.add_{p}_proj", (j * h, (j + 1) * h)) for j, p in enumerate("qkv")]
            plain = {"attn.proj": "attn.to_add_out", "mlp.fc1": "ff_context.net.0.proj",
                     "mlp.fc2": "ff_context.net.2"}
            if i != last_block:
                plain["adaLN_modulation.1"] = "norm1_context.linear"
        else:
            return []
        return [(b + plain[rest], None)] if rest in plain else []
    top = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
           "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out"}
    return [(top[path], None)] if path in top else []


def _add_dit(table: TargetTable, key: str, path: str, shape: tuple[int, ...],
             diff: list[tuple[str, tuple[int, int] | None]], extra_aliases: list[str]) -> None:
    """The targets of one transformer weight: the whole weight (kohya / comfy names, diffusers too when it is a
    plain rename) and one row-slice target per diffusers module of a fused weight (peft / diffusers names)."""
    names = [("kohya", "lora_unet_" + underscored(path)), ("comfy", "diffusion_model." + path)]
    aliases = [path, key[: -len(".weight")], "model.diffusion_model." + path, "lora_transformer_" + path,
               *extra_aliases]
    fused = bool(diff) and diff[0][1] is not None
    if diff and not fused:
        d = diff[0][0]
        names += [("peft", "transformer." + d), ("diffusers", "transformer." + d)]
        aliases += [d, "lora_transformer_" + d]
    table.add(Target(key, shape, "dit", names=tuple(names)), aliases)
    if fused:
        for d, rows in diff:
            assert rows is not None
            sl = (rows[1] - rows[0], *shape[1:])
            table.add(Target(key, sl, "dit", rows=rows,
                             names=(("peft", "transformer." + d), ("diffusers", "transformer." + d))),
                      [d, "lora_transformer_" + d])


def _dit_text(table: TargetTable, infos: Mapping[str, TensorInfo], family: str) -> None:
    for prefix, comp, kohya, folder in _DIT_TEXT[family]:
        for key, info in infos.items():
            if not key.startswith(prefix) or not key.endswith(".weight") or len(info.shape) != 2:
                continue
            hf = key[len(prefix): -len(".weight")]
            if not (".layers." in hf or ".block." in hf) or "relative_attention_bias" in hf:
                continue
            names = (("kohya", kohya + underscored(hf)), ("peft", f"{folder}.{hf}"), ("diffusers", f"{folder}.{hf}"),
                     ("comfy", prefix + hf))
            aliases = [key[: -len(".weight")]]
            if comp == "te3" and family == "flux":
                aliases.append("lora_te2_" + hf)  # some Flux trainers count T5 as the second text encoder
            table.add(Target(key, tuple(info.shape), comp, names=names), aliases)


@register("flux")
def _flux_targets(infos: Mapping[str, TensorInfo], family: str) -> TargetTable:
    table = TargetTable(family)
    prefix = _dit_prefix(infos, "double_blocks.")
    if prefix is not None:
        for key, info in infos.items():
            if not key.startswith(prefix) or not key.endswith(".weight") or key.startswith(_NOT_DIT):
                continue
            path = key[len(prefix): -len(".weight")]
            if len(info.shape) < 2:
                continue
            extra = []
            parts = path.split(".")
            if parts[0] == "double_blocks" and len(parts) == 4 and parts[3] in ("qkv", "proj"):
                n = "1" if parts[2] == "img_attn" else "2"
                extra.append(f"double_blocks.{parts[1]}.processor.{parts[3]}_lora{n}")  # XLabs
            _add_dit(table, key, path, tuple(info.shape), _flux_diffusers(path, tuple(info.shape)), extra)
    _dit_text(table, infos, family)
    if not table.targets:
        raise MismatchError("no Flux transformer or text-encoder weights to adapt")
    return table


@register("sd3")
def _sd3_targets(infos: Mapping[str, TensorInfo], family: str) -> TargetTable:
    table = TargetTable(family)
    prefix = _dit_prefix(infos, "joint_blocks.")
    if prefix is not None:
        blocks = {int(k[len(prefix):].split(".")[1]) for k in infos if k.startswith(prefix + "joint_blocks.")}
        last = max(blocks) if blocks else -1
        for key, info in infos.items():
            if not key.startswith(prefix) or not key.endswith(".weight") or len(info.shape) < 2:
                continue
            path = key[len(prefix): -len(".weight")]
            if key.startswith(_NOT_DIT):
                continue
            _add_dit(table, key, path, tuple(info.shape), _sd3_diffusers(path, tuple(info.shape), last), [])
    _dit_text(table, infos, family)
    if not table.targets:
        raise MismatchError("no SD3 transformer or text-encoder weights to adapt")
    return table
