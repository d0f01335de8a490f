"""``extract`` a component into a standalone file and ``replace`` (bake) one into a checkpoint.

Standalone naming follows what the field's loaders expect for files of that kind:
- UNet: LDM names without ``model.diffusion_model.`` (ComfyUI "diffusion_models" / A1111 UNet files);
- VAE: without ``first_stage_model.`` (``vae.`` for Flux all-in-ones), LDM names (A1111/ComfyUI VAE files);
- CLIP-L / CLIP-G / OpenCLIP-H (SD2) / T5: transformers names (``text_model.…``, ``text_projection.weight``; ``encoder.block.…``)
  as in the ``clip_l`` / ``clip_g`` / ``t5xxl`` files SD3 and Flux ship; SDXL's OpenCLIP-bigG is converted
  (fused qkv split, ``text_projection`` transposed; ``logit_scale`` has no home there and is dropped);
- EMA: the EMA copy under the UNet's standalone names.

``replace`` accepts a component in any of those namings (or with its checkpoint prefix, or a diffusers VAE)
and refuses unless every tensor of the checkpoint's component has a counterpart of the same shape and the
component's family fits (an SD1/SD2 VAE never goes into an SDXL checkpoint or the other way round).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ckptlab.arch.components import UNET_PREFIX, ema_pairs
from ckptlab.arch.layout import FileLayout, file_layout
from ckptlab.arch.vae_fit import check_vae_fits
from ckptlab.errors import BadChoiceError, CkptlabError, MismatchError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops.diffusers_io import cat_out, reshape_out, slice_out, transpose_out
from ckptlab.ops.diffusers_map import VAELayout, hf_to_openclip, is_vae_attn_weight, openclip_to_hf, vae_map
from ckptlab.ops.run import open_checked, run_each
from ckptlab.ops.stream import Out, TransformResult
from ckptlab.progress import Progress, null_progress

EXTRACT_CHOICES = ("unet", "vae", "clip_l", "clip_g", "openclip_h", "t5xxl", "ema")
#: the single-file checkpoint's VAE prefix, and the LDM names of a VAE's weights under it
VAE_PREFIX = "first_stage_model."
VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
REPLACE_CHOICES = ("unet", "vae", "clip_l", "clip_g")


def component_prefix(layout: FileLayout, component: str, src: TensorSource) -> str:
    """The key prefix of ``component`` in this checkpoint, checked to be present."""
    comp = "unet" if component == "ema" else component
    if layout.family is None:
        raise MismatchError("not a checkpoint of a known family; cannot locate its components", src.path)
    if not layout.family.prefixes:  # identified, but its single-file layout is not in the family record
        raise MismatchError(f"extract/replace do not support {layout.family.display_name} files yet (its "
                            "single-file component layout is not known to ckptlab)", src.path)
    prefix = layout.prefix(comp)
    if not any(k.startswith(prefix) for k in src.keys()):
        raise MismatchError(f"missing component: this {layout.family.display_name} file has no {component} "
                            f"({prefix}* keys)", src.path)
    return prefix


def _is_openclip(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix + "transformer.resblocks.") for k in keys)


def extract_plan(src: TensorSource, component: str) -> list[Out]:
    if component not in EXTRACT_CHOICES:
        raise BadChoiceError(f"--component {component!r}: use one of {', '.join(EXTRACT_CHOICES)}")
    layout = file_layout(src)
    prefix = component_prefix(layout, component, src)
    keys = [k for k in src.keys() if k.startswith(prefix)]
    if component == "ema":
        pairs, missing = ema_pairs(src)
        if not pairs:
            raise MismatchError("missing component: no EMA weights (model_ema.*) in this file", src.path)
        if missing:
            raise MismatchError(f"EMA incomplete: {len(missing)} UNet tensor(s) have no EMA copy", src.path)
        return [Out.copy(k[len(UNET_PREFIX):], src, e) for k, e in pairs.items()]
    if component in ("clip_l", "clip_g", "t5xxl") and prefix.startswith("text_encoders."):
        prefix += "transformer."
        keys = [k for k in keys if k.startswith(prefix)]
    if component in ("clip_g", "openclip_h") and _is_openclip(keys, prefix):
        return openclip_to_hf_items(src, keys, prefix, drop_last=False)
    out = []
    for k in keys:
        short = k[len(prefix):]
        if component in ("clip_l", "clip_g") and short.endswith("position_ids"):
            continue  # a buffer, not a weight: transformers rebuilds it (and merges corrupt it)
        out.append(Out.copy(short, src, k))
    return out


def openclip_to_hf_items(src: TensorSource, keys: list[str], prefix: str, drop_last: bool) -> list[Out]:
    """OpenCLIP text keys under ``prefix`` as transformers ``CLIPTextModelWithProjection`` tensors."""
    items = []
    for k in keys:
        short = k[len(prefix):]
        if short == "text_projection":
            items.append(transpose_out("text_projection.weight", src, k))
            continue
        m = openclip_to_hf(short)
        if m is None:
            continue  # logit_scale, attn_mask: no home in transformers
        if isinstance(m, tuple):
            layer, which = m[1].split(".")
            for i, p in enumerate(("q", "k", "v")):
                items.append(slice_out(f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{which}", src, k, i, 3))
        else:
            items.append(Out.copy(m, src, k))
    return items


def extract(inputs: list[Path], component: str, *, out: Path | None = None, out_dir: Path | None = None,
            overwrite: bool = False, dry_run: bool = False, progress: Progress = null_progress,
            cache: HashCache = NO_CACHE) -> list[TransformResult]:
    """``ckptlab extract``: ``<stem>-<component>.safetensors`` per input (or ``out`` for one input)."""
    if out is not None and len(inputs) != 1:
        raise CkptlabError("-o/--output takes one input; use --out-dir for several")

    def one(path: Path, src: TensorSource, result: TransformResult):
        items = extract_plan(src, component)
        result.dropped = {"tensors of other components": len(src) - len(items)} if len(src) > len(items) else {}
        return items, {"component": component}, False

    return run_each(inputs, "extract", f"-{component}", one, out_dir=out_dir, outputs=[out] if out else None,
                    overwrite=overwrite, dry_run=dry_run, progress=progress, cache=cache)


# ----------------------------------------------------------------------------------------------
# replace


def is_diffusers_vae(keys) -> bool:
    """Whether a VAE file's keys are diffusers names (``encoder.down_blocks.…``), bare or under ``vae.``."""
    return any(k.startswith(("encoder.down_blocks.", "vae.encoder.down_blocks.")) for k in keys)


def check_component_fits(target: Mapping[str, TensorInfo], given: Mapping[str, TensorInfo], *, prefix: str,
                         name: str, component: str, path=None) -> None:
    """The one keys-and-shapes check of a component baked into a checkpoint (``replace`` and ``merge --vae``):
    ``given`` (the replacement's tensors under the checkpoint's names) must hold exactly the keys of ``target``
    (the checkpoint's own tensors of that component), with the same shapes; else ``MismatchError`` naming the
    first difference. ``name``: the replacement file, ``path``: the checkpoint the error is about."""
    missing = [k for k in target if k not in given]
    extra = [k for k in given if k not in target]
    if missing or extra:
        what = (f"lacks {len(missing)} tensor(s) (first: {missing[0][len(prefix):]})" if missing
                else f"has {len(extra)} unexpected tensor(s) (first: {extra[0][len(prefix):]})")
        raise MismatchError(f"{name} does not fit this checkpoint's {component}: it {what}", path)
    for k, info in given.items():
        if info.shape != target[k].shape:
            raise MismatchError(f"{name} does not fit this checkpoint's {component}: {k[len(prefix):]} is "
                                f"{list(info.shape)}, the checkpoint has {list(target[k].shape)}", path)


def vae_bake_map(keys) -> dict[str, str]:
    """``{checkpoint key: VAE file key}`` for baking an LDM-layout VAE file into a single-file checkpoint:
    bare LDM names (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``) and ``vae.``-prefixed
    ones go under ``first_stage_model.``; ``first_stage_model.`` keys keep their name; anything else is not
    VAE weight and is left out. ``merge --vae`` bakes with this map."""
    out: dict[str, str] = {}
    for k in keys:
        if k.startswith(VAE_PARTS):
            out[VAE_PREFIX + k] = k
        elif k.startswith(VAE_PREFIX):
            out[k] = k
        elif k.startswith("vae.") and k[4:].startswith(VAE_PARTS):
            out[VAE_PREFIX + k[4:]] = k
    return out


def normalise_component(comp_src: TensorSource, component: str, target_prefix: str,
                        target_keys: dict[str, TensorInfo], openclip_target: bool) -> list[Out]:
    """The replacement's tensors under the checkpoint's names (``target_prefix`` + name)."""
    keys = comp_src.keys()
    # strip any known checkpoint prefix the component file still carries
    strip = ""
    for p in ("model.diffusion_model.", "first_stage_model.", "vae.", "cond_stage_model.transformer.",
              "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.",
              "conditioner.embedders.0.model.", "text_encoders.clip_l.transformer.",
              "text_encoders.clip_g.transformer.", "cond_stage_model.model."):
        if keys and all(k.startswith(p) for k in keys):
            strip = p
            break
    short = {k[len(strip):]: k for k in keys}
    items: list[Out] = []
    if component == "vae" and any(s.startswith("encoder.down_blocks.") for s in short):
        levels = 1 + max(int(s.split(".")[2]) for s in short if s.startswith("encoder.down_blocks."))
        layers = 1 + max(int(s.split(".")[4]) for s in short if s.startswith("encoder.down_blocks.0.resnets."))
        vmap = vae_map(VAELayout(levels, layers))
        for s, k in short.items():
            ldm = vmap.backward(s)
            if ldm is None:
                raise MismatchError(f"diffusers VAE tensor {s!r} has no single-file name", comp_src.path)
            info = comp_src.info(k)
            if is_vae_attn_weight(ldm) and len(info.shape) == 2:
                items.append(reshape_out(target_prefix + ldm, comp_src, k, (*info.shape, 1, 1)))
            else:
                items.append(Out.copy(target_prefix + ldm, comp_src, k))
        return items
    hf = any(s.startswith("text_model.") for s in short)
    if component in ("clip_g",) and openclip_target and hf:
        qkv: dict[tuple[str, str], dict[str, str]] = {}
        for s, k in short.items():
            if s == "text_projection.weight":
                items.append(transpose_out(target_prefix + "text_projection", comp_src, k))
                continue
            m = hf_to_openclip(s)
            if m is None:
                continue  # position_ids
            if isinstance(m, tuple):
                _, layer, which = m
                p, part = which.split(".")
                qkv.setdefault((layer, part), {})[p] = k
            else:
                items.append(Out.copy(target_prefix + m, comp_src, k))
        for (layer, part), parts in sorted(qkv.items()):
            if set(parts) != {"q", "k", "v"}:
                raise MismatchError(f"layer {layer}: q/k/v projections incomplete", comp_src.path)
            items.append(cat_out(f"{target_prefix}transformer.resblocks.{layer}.attn.in_proj_{part}",
                                  [(comp_src, parts[p]) for p in ("q", "k", "v")]))
        return items
    for s, k in short.items():
        items.append(Out.copy(target_prefix + s, comp_src, k))
    return items


def replace_plan(src: TensorSource, replacements: dict[str, TensorSource], result: TransformResult) -> list[Out]:
    layout = file_layout(src)
    if layout.family is None or not layout.family.prefixes:
        raise MismatchError("replace needs a checkpoint of a known family", src.path)
    infos = src.infos()
    new: dict[str, Out] = {}
    for component, comp_src in replacements.items():
        if component not in REPLACE_CHOICES:
            raise BadChoiceError(f"cannot replace {component!r}; use one of {', '.join(REPLACE_CHOICES)}")
        prefix = component_prefix(layout, component, src)
        target = {k: v for k, v in infos.items() if k.startswith(prefix)}
        items = normalise_component(comp_src, component, prefix, target,
                                    openclip_target=_is_openclip(list(target), prefix))
        by_key = {it.key: it for it in items}
        # position_ids (a buffer) and OpenCLIP's logit_scale (unused by SD, absent from HF-layout files):
        # keep the checkpoint's own when the replacement has none
        for k in target:
            if k not in by_key and k.endswith(("position_ids", "logit_scale")):
                by_key[k] = Out.copy(k, src, k)
                if k.endswith("logit_scale"):
                    result.warnings.append(f"{comp_src.path.name} has no logit_scale; the checkpoint's own is kept")
        check_component_fits(target, {k: it.info for k, it in by_key.items()}, prefix=prefix,
                             name=comp_src.path.name, component=component, path=src.path)
        if component == "vae":  # the one VAE family check (merge --vae calls it too)
            warning = check_vae_fits(comp_src, layout.family_id, path=src.path)  # the opened file: not read twice
            if warning:
                result.warnings.append(warning)
        new.update(by_key)
        result.converted += len(by_key)
    return [new[k] if k in new else Out.copy(k, src, k) for k in infos]


def replace(inputs: list[Path], *, vae: Path | None = None, clip_l: Path | None = None, clip_g: Path | None = None,
            unet: Path | None = None, out: Path | None = None, out_dir: Path | None = None, overwrite: bool = False,
            dry_run: bool = False, progress: Progress = null_progress,
            cache: HashCache = NO_CACHE) -> list[TransformResult]:
    """``ckptlab replace``: bake components into each input (``<stem>-baked.safetensors`` or ``out``)."""
    given = {"vae": vae, "clip_l": clip_l, "clip_g": clip_g, "unet": unet}
    given = {k: Path(v) for k, v in given.items() if v is not None}
    if not given:
        raise CkptlabError("nothing to replace: give --vae, --clip-l, --clip-g or --unet")
    if out is not None and len(inputs) != 1:
        raise CkptlabError("-o/--output takes one input; use --out-dir for several")
    comps: dict[str, TensorSource] = {}
    try:
        for name, p in given.items():
            comps[name] = open_checked(p)

        def one(path: Path, src: TensorSource, result: TransformResult):
            items = replace_plan(src, comps, result)
            opts = {"replaced": {n: p.name for n, p in given.items()}}
            return items, opts, True

        return run_each(inputs, "replace", "-baked", one, out_dir=out_dir, outputs=[out] if out else None,
                        overwrite=overwrite, dry_run=dry_run, progress=progress, extra_inputs=list(given.values()),
                        cache=cache)
    finally:
        for s in comps.values():
            s.close()
