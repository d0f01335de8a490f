"""``to-diffusers`` / ``from-diffusers``: single-file SD1/SD2/SDXL checkpoints <-> diffusers folders.

to-diffusers writes a folder ``StableDiffusion(XL)Pipeline.from_pretrained(DIR)`` loads offline:
``model_index.json``, per-component ``config.json`` derived from the tensor shapes, the scheduler
config, and the CLIP tokenizer files shipped in ``ckptlab/data``. Tensors diffusers has no place for
(LDM schedule buffers, ``position_ids``, SD2's last text layer / ``text_projection`` / ``logit_scale``,
SDXL's ``logit_scale``, marker tensors) go to ``ckptlab_extra.safetensors`` under their original
names, so from-diffusers gives back exactly the input tensors. EMA is dropped (or used, ``ema="use"``).

The folder is built under a hidden temporary name next to the target and renamed into place when
every file is complete; any error removes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.arch.components import UNET_PREFIX, ema_pairs, is_ema
from ckptlab.arch.families import FAMILIES, display_name
from ckptlab.arch.layout import file_layout
from ckptlab.atomic import Staged
from ckptlab.errors import CkptlabError, FormatError, MismatchError, OutputError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.hashes import NO_CACHE, HashCache
from ckptlab.ops import diffusers_config as cfgs
from ckptlab.ops.diffusers_map import (
    UNetLayout,
    VAELayout,
    hf_to_openclip,
    is_vae_attn_weight,
    openclip_to_hf,
    unet_layout_from_ldm,
    unet_map,
    vae_layout_from_ldm,
    vae_map,
)
from ckptlab.ops.run import open_checked
from ckptlab.ops.stream import (
    FileHasher,
    Out,
    TransformResult,
    check_folder,
    make_folder,
    output_path,
    placeholder,
    provenance,
    same_file,
    write_plan,
)
from ckptlab.progress import Progress, null_progress

EXTRA_FILE = "ckptlab_extra.safetensors"
TO_DIFFUSERS_EMA = ("drop", "use")
VAE_PREFIX = "first_stage_model."
#: families with a diffusers pipeline in their record, and their text encoders: (folder, single-file prefix, kind)
SUPPORTED = tuple(f.id for f in FAMILIES if f.diffusers)
TEXT_ENCODERS = {f.id: list(f.diffusers.text_encoders) for f in FAMILIES if f.diffusers}
UNET_FILE = "diffusion_pytorch_model.safetensors"
TE_FILE = "model.safetensors"


@dataclass
class FolderResult:
    """What ``to_diffusers`` / ``from_diffusers`` did (the ``--json`` record)."""

    operation: str
    input: Path
    output: Path
    family: str
    dry_run: bool = False
    files: dict[str, int] = field(default_factory=dict)  # relative file -> tensors
    extra_tensors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# single file -> diffusers


def slice_out(key: str, src: TensorSource, src_key: str, part: int, parts: int) -> Out:
    info = src.info(src_key)
    rows = info.shape[0] // parts
    shape = (rows, *info.shape[1:])
    return Out(key, TensorInfo(info.dtype, shape), source=src, src_key=src_key,
               produce=lambda: src.array(src_key)[part * rows:(part + 1) * rows])


def reshape_out(key: str, src: TensorSource, src_key: str, shape: tuple[int, ...]) -> Out:
    info = src.info(src_key)
    return Out(key, TensorInfo(info.dtype, shape), source=src, src_key=src_key,
               produce=lambda: src.array(src_key).reshape(shape))


def transpose_out(key: str, src: TensorSource, src_key: str) -> Out:
    info = src.info(src_key)
    return Out(key, TensorInfo(info.dtype, tuple(reversed(info.shape))), source=src, src_key=src_key,
               produce=lambda: _transposed(src.array(src_key)))


def _transposed(a):
    """``a.t().contiguous()`` in numpy: a 2-D array transposed into a new C-ordered array (bf16/fp8 as their bits)."""
    import numpy as np

    from ckptlab.formats.dtypes import uint_of_width

    return np.ascontiguousarray(a.view(uint_of_width(a.itemsize)).T).view(a.dtype)


def plan_vae(src: TensorSource, prefix: str) -> tuple[list[Out], VAELayout, dict[str, tuple[int, ...]], list[str]]:
    """The diffusers ``AutoencoderKL`` items of the VAE under ``prefix`` in ``src`` (``first_stage_model.`` in a
    checkpoint, ``""`` in a standalone VAE file): ``(items, layout, shapes by short key, source keys used)``."""
    infos = src.infos()
    vae_keys = [k for k in infos if k.startswith(prefix) and k[len(prefix):].startswith(("encoder.", "decoder.",
                                                                                        "quant_conv.",
                                                                                        "post_quant_conv."))]
    if not vae_keys:
        raise MismatchError(f"missing component: VAE (no {prefix}encoder.* keys)", src.path)
    vshapes = {k[len(prefix):]: infos[k].shape for k in vae_keys}
    vlay = vae_layout_from_ldm(vshapes)
    vmap = vae_map(vlay)
    items = []
    used = []
    for k in vae_keys:
        short = k[len(prefix):]
        d = vmap.forward(short)
        if d is None:
            continue
        shape = infos[k].shape
        if is_vae_attn_weight(short) and len(shape) == 4:
            items.append(reshape_out(d, src, k, shape[:2]))
        else:
            items.append(Out.copy(d, src, k))
        used.append(k)
    return items, vlay, vshapes, used


def plan_to_diffusers(src: TensorSource, ema: str = "drop") -> tuple[str, dict[str, list[Out]], dict[str, dict],
                                                                     list[str], dict[str, int]]:
    """``(family, {relative file: items}, {relative config file: dict}, warnings, dropped)``."""
    layout = file_layout(src)
    fam = layout.family_id
    if fam not in SUPPORTED:
        what = display_name(fam) if fam else "an unrecognised model"
        raise MismatchError(f"to-diffusers supports SD1, SD2 and SDXL checkpoints; this is {what}", src.path)
    infos = src.infos()
    used: set[str] = set()
    warnings: list[str] = []
    dropped: dict[str, int] = {}
    files: dict[str, list[Out]] = {}
    configs: dict[str, dict] = {}

    # UNet
    unet_keys = [k for k in infos if k.startswith(UNET_PREFIX)]
    if not unet_keys:
        raise MismatchError("missing component: UNet (no model.diffusion_model.* keys)", src.path)
    ushapes = {k[len(UNET_PREFIX):]: infos[k].shape for k in unet_keys}
    ulay = unet_layout_from_ldm(ushapes)
    umap = unet_map(ulay)
    values: dict[str, str] = {k: k for k in unet_keys}
    if ema == "use":
        pairs, missing = ema_pairs(src)
        if not pairs or missing:
            raise MismatchError("--ema use: the file has no complete EMA copy of the UNet", src.path)
        values = pairs
    items = []
    for k in unet_keys:
        d = umap.forward(k[len(UNET_PREFIX):])
        if d is None:
            continue
        items.append(Out(d, infos[values[k]], source=src, src_key=values[k]))
        used.add(k)
    files[f"unet/{UNET_FILE}"] = items

    # VAE
    items, vlay, vshapes, vused = plan_vae(src, VAE_PREFIX)
    used.update(vused)
    files[f"vae/{UNET_FILE}"] = items

    # text encoders
    te_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for folder, prefix, kind in TEXT_ENCODERS[fam]:
        keys = [k for k in infos if k.startswith(prefix)]
        if not keys:
            raise MismatchError(f"missing component: text encoder ({prefix}* keys)", src.path)
        items = []
        if kind == "hf":
            for k in keys:
                short = k[len(prefix):]
                if short.endswith("position_ids") or not short.startswith(("text_model.", "text_projection")):
                    continue
                items.append(Out.copy(short, src, k))
                used.add(k)
        else:
            layers = {int(k[len(prefix):].split(".")[2]) for k in keys
                      if k[len(prefix):].startswith("transformer.resblocks.")}
            n_layers = max(layers) + 1 if layers else 0
            drop_last = kind == "openclip_h"  # diffusers SD2 uses the penultimate layer: 23 of 24 layers
            for k in keys:
                short = k[len(prefix):]
                if drop_last and short.startswith(f"transformer.resblocks.{n_layers - 1}."):
                    continue
                if short == "text_projection":
                    if kind == "openclip_g":
                        items.append(transpose_out("text_projection.weight", src, k))
                        used.add(k)
                    continue
                m = openclip_to_hf(short)
                if m is None:
                    continue
                if isinstance(m, tuple):
                    layer, which = m[1].split(".")
                    for i, p in enumerate(("q", "k", "v")):
                        items.append(slice_out(f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{which}",
                                                src, k, i, 3))
                else:
                    items.append(Out.copy(m, src, k))
                used.add(k)
        files[f"{folder}/{TE_FILE}"] = items
        te_shapes[folder] = {it.key: it.info.shape for it in items}

    # everything else: extras (EMA and training state are dropped)
    training = set(layout.components.get("training", ()))
    extras = []
    for k in infos:
        if k in used:
            continue
        if is_ema(k):
            dropped["ema"] = dropped.get("ema", 0) + 1
        elif k in training:
            dropped["training"] = dropped.get("training", 0) + 1
        else:
            extras.append(Out.copy(k, src, k))
    unmapped = [o.key for o in extras if o.key.startswith((UNET_PREFIX, VAE_PREFIX))]
    if unmapped:
        warnings.append(f"{len(unmapped)} UNet/VAE tensor(s) have no diffusers name and were kept in "
                        f"{EXTRA_FILE} (first: {unmapped[0]})")
    if extras:
        files[EXTRA_FILE] = extras

    # configs
    prediction = _prediction_type(src, fam, warnings)
    d = cfgs.spec(fam)
    sample = d.sample_size_v if prediction == "v_prediction" and d.sample_size_v else d.sample_size
    pooled = te_shapes.get("text_encoder_2", {}).get("text_projection.weight", (None,))[0]
    configs["unet/config.json"] = cfgs.unet_config(ulay, ushapes, fam, sample, pooled)
    configs["vae/config.json"] = cfgs.vae_config(vlay, vshapes, fam)
    for folder, _, kind in TEXT_ENCODERS[fam]:
        configs[f"{folder}/config.json"] = cfgs.clip_config(
            te_shapes[folder], act="quick_gelu" if kind == "hf" else "gelu", with_projection=folder == "text_encoder_2")
    configs["scheduler/scheduler_config.json"] = cfgs.scheduler_config(fam, prediction)
    configs["model_index.json"] = cfgs.model_index(fam)
    return fam, files, configs, warnings, dropped


def _prediction_type(src: TensorSource, fam: str, warnings: list[str] | None = None) -> str:
    """diffusers' ``prediction_type`` of ``src``: what ``arch.identify`` decides (metadata, marker keys,
    ``global_step``, and for SD2 files with none of those ComfyUI's one-tensor heuristic, noted in ``warnings``);
    epsilon where nothing tells."""
    from ckptlab.arch.identify import identify

    info = identify(src, heuristics=True)
    if info.prediction == "v":
        pred = "v_prediction"
    elif info.prediction == "eps":
        pred = "epsilon"
    else:
        return "epsilon"
    guessed = [e for e in info.evidence if e.startswith("prediction") and "heuristic" in e]
    if guessed and warnings is not None:
        warnings.append(f"{pred}: guessed from the weights ({guessed[0].split(': ', 1)[1].split(';')[0]}); no "
                        "metadata says which SD2 prediction this is")
    return pred


def to_diffusers(path: Path, out: Path, *, ema: str = "drop", precision: str | None = None, clamp: bool = False,
                 overwrite: bool = False, dry_run: bool = False, progress: Progress = null_progress,
                 cache: HashCache = NO_CACHE, create_parent: bool = False) -> FolderResult:
    """Write the diffusers folder ``out``. ``precision`` (fp16/bf16/fp32) casts UNet and text-encoder
    weights (``precision`` rules: the VAE stays as it is; diffusers upcasts fp16 VAEs anyway). ``cache``:
    where the input's known sha256 is taken from (default: none; the input is hashed). ``create_parent`` (``--out-dir``): ``out``'s parent
    folder is created when missing (once every check passed; never on dry runs)."""
    from ckptlab.ops.prune import check_ema

    check_ema(ema, TO_DIFFUSERS_EMA)
    path, out = Path(path), Path(out)
    src = open_checked(path)
    try:
        fam, files, configs, warnings, dropped = plan_to_diffusers(src, ema)
        if precision:
            _cast_folder(files, configs, precision, clamp)
        result = FolderResult("to-diffusers", path, out, fam, dry_run=dry_run,
                              files={f: len(v) for f, v in files.items()},
                              extra_tensors=len(files.get(EXTRA_FILE, [])), dropped=dropped, warnings=warnings)
        target = _check_folder_target(out, path, overwrite, create_parent)
        if dry_run:
            return result
        make_folder(target.parent)
        hasher = FileHasher(path, cache=cache)
        ph = placeholder(0)
        tok_files: dict[str, bytes] = {}
        for folder, _, kind in TEXT_ENCODERS[fam]:
            tok = folder.replace("text_encoder", "tokenizer")
            pad = "<|endoftext|>" if kind == "hf" else "!"
            for name, data in cfgs.tokenizer_files(pad).items():
                tok_files[f"{tok}/{name}"] = data

        def build(tmp: Path) -> None:
            for rel, obj in configs.items():
                _write_bytes(tmp / rel, cfgs.dumps(obj))
            for rel, data in tok_files.items():
                _write_bytes(tmp / rel, data)
            total = sum(it.info.nbytes for items in files.values() for it in items)
            progress(0, total=total, description=f"to-diffusers {path.name}")
            for rel, items in files.items():
                meta = provenance("to-diffusers", [(path, ph)], {"ema": ema, "precision": precision, "file": rel})
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                write_plan(tmp / rel, items, meta, progress=progress, pending={ph: hasher}, set_total=False)

        _atomic_folder(target, build, overwrite)
        hasher.result()
        return result
    finally:
        src.close()


def _cast_folder(files: dict[str, list[Out]], configs: dict[str, dict], precision: str, clamp: bool) -> None:
    from ckptlab.formats.dtypes import FLOAT_DTYPES
    from ckptlab.ops.precision import cast_item, target_dtype

    target = target_dtype(precision)
    for rel, items in files.items():
        if not rel.startswith(("unet/", "text_encoder")):
            continue
        files[rel] = [cast_item(it, target, clamp) if it.info.dtype in FLOAT_DTYPES and it.info.dtype != target
                      and it.info.shape else it for it in items]
        folder = rel.split("/", 1)[0]
        if folder.startswith("text_encoder"):
            configs[f"{folder}/config.json"]["torch_dtype"] = {"F16": "float16", "BF16": "bfloat16",
                                                               "F32": "float32"}.get(target, "float32")


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise OutputError(f"write failed: {e.strerror or e}", path) from None


def _check_folder_target(out: Path, inp: Path, overwrite: bool, create_parent: bool = False) -> Path:
    """Refuse before any work an output folder that is, contains or is inside the input (resolved
    paths, so ``-o .`` and symlinks are caught), exists without ``overwrite``, or cannot be written.
    Returns the resolved folder to write."""
    target, src = out.resolve(), inp.resolve()
    if target == src or target in src.parents or src in target.parents or same_file(target, src):
        raise OutputError(f"output folder would replace or contain the input {inp.name}; choose another folder",
                          out)
    if target.exists() and not overwrite:
        raise OutputError("output already exists (use --overwrite to replace it)", out)
    check_folder(target.parent, out, create=create_parent)
    return target


def _atomic_folder(out: Path, build, overwrite: bool) -> None:
    """Build the folder ``out`` under a temporary name (``atomic.Staged``), then put it in place; an existing
    ``out`` is replaced only with ``overwrite``. On any failure the temporary folder goes, ``out`` untouched."""
    with Staged(out, overwrite=overwrite) as st:
        try:
            tmp = st.create_folder(0o700)
        except OSError as e:
            raise OutputError(f"cannot create a folder in {out.parent}: {e.strerror or e}", out) from None
        try:
            build(tmp)
            st.commit(0o755)
        except FileExistsError:
            raise OutputError("output appeared while writing; not replaced", out) from None
        except OSError as e:
            raise OutputError(f"cannot finish writing: {e.strerror or e}", out) from None


# ----------------------------------------------------------------------------------------------
# diffusers -> single file


class _Component:
    """The weights of one component folder (one file or a sharded set), key -> source."""

    def __init__(self, folder: Path, stem: str, opened: list[TensorSource]):
        self.folder = folder
        self.where: dict[str, TensorSource] = {}
        self.files: list[Path] = []
        candidates = [folder / f"{stem}.safetensors", folder / f"{stem}.fp16.safetensors"]
        index = [folder / f"{stem}.safetensors.index.json", folder / f"{stem}.safetensors.index.fp16.json"]
        bins = [folder / f"{stem}.bin", folder / f"{stem}.fp16.bin"]
        chosen: list[Path] = []
        for c in candidates:
            if c.is_file():
                chosen = [c]
                break
        if not chosen:
            for ix in index:
                if ix.is_file():
                    weight_map = cfgs.read_json(ix).get("weight_map", {})
                    chosen = sorted({folder / v for v in weight_map.values()})
                    break
        if not chosen:
            for b in bins:
                if b.is_file():
                    chosen = [b]
                    break
        if not chosen:
            raise MismatchError(f"missing component: no {stem}.safetensors (or .bin) in {folder.name}/", folder)
        for f in chosen:
            src = open_checked(f)
            opened.append(src)
            self.files.append(f)
            for k in src.keys():
                self.where[k] = src

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: s.info(k).shape for k, s in self.where.items()}

    def out(self, key: str, src_key: str) -> Out:
        return Out.copy(key, self.where[src_key], src_key)


def _family_of(folder: Path, index: dict) -> str:
    cls = index.get("_class_name", "")
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
               "StableDiffusionXLInpaintPipeline"):
        te = index.get("text_encoder") or [None, None]
        return "sdxl" if te[0] else "sdxl_refiner"
    if cls.startswith("StableDiffusion"):
        unet = cfgs.read_json(folder / "unet" / "config.json")
        cross = unet.get("cross_attention_dim")
        te = cfgs.read_json(folder / "text_encoder" / "config.json")
        if te.get("hidden_act") == "gelu" or te.get("num_hidden_layers", 12) > 12 or cross == 1024:
            return "sd2"
        return "sd1"
    raise MismatchError(f"from-diffusers supports StableDiffusion / StableDiffusionXL pipelines; this folder is "
                        f"{cls or 'not a pipeline'}", folder)


def plan_from_diffusers(folder: Path, opened: list[TensorSource]) -> tuple[str, list[Out], list[str], list[Path]]:
    index = cfgs.read_json(folder / "model_index.json")
    fam = _family_of(folder, index)
    warnings: list[str] = []
    items: list[Out] = []
    weight_files: list[Path] = []

    # UNet
    ucfg = cfgs.read_json(folder / "unet" / "config.json")
    unet = _Component(folder / "unet", "diffusion_pytorch_model", opened)
    weight_files += unet.files
    blocks = ucfg.get("down_block_types") or []
    lay = UNetLayout(len(ucfg["block_out_channels"]), int(ucfg.get("layers_per_block", 2)),
                     tuple("CrossAttn" in b for b in blocks),
                     mid_attn=ucfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2D",
                     label_emb=bool(ucfg.get("addition_embed_type") or ucfg.get("class_embed_type")))
    umap = unet_map(lay)
    for k in unet.where:
        ldm = umap.backward(k)
        if ldm is None:
            raise MismatchError(f"diffusers UNet tensor {k!r} has no single-file name", folder / "unet")
        items.append(unet.out(UNET_PREFIX + ldm, k))

    # VAE
    vcfg = cfgs.read_json(folder / "vae" / "config.json")
    vae = _Component(folder / "vae", "diffusion_pytorch_model", opened)
    weight_files += vae.files
    vmap = vae_map(VAELayout(len(vcfg["block_out_channels"]), int(vcfg.get("layers_per_block", 2))))
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    for k in vae.where:
        name = k
        for a, b in legacy.items():
            if ".attentions." in name:
                name = name.replace(a, b)
        ldm = vmap.backward(name)
        if ldm is None:
            raise MismatchError(f"diffusers VAE tensor {k!r} has no single-file name", folder / "vae")
        info = vae.where[k].info(k)
        if is_vae_attn_weight(ldm) and len(info.shape) == 2:
            src = vae.where[k]
            shape = (*info.shape, 1, 1)
            items.append(reshape_out(VAE_PREFIX + ldm, src, k, shape))
        else:
            items.append(vae.out(VAE_PREFIX + ldm, k))

    # text encoders
    for te_folder, prefix, kind in TEXT_ENCODERS[fam]:
        te = _Component(folder / te_folder, "model", opened)
        weight_files += te.files
        if kind == "hf":
            for k in te.where:
                items.append(te.out(prefix + k, k))
            continue
        qkv: dict[tuple[str, str], dict[str, str]] = {}
        for k in te.where:
            if k == "text_projection.weight":
                if kind == "openclip_g":
                    items.append(transpose_out(prefix + "text_projection", te.where[k], k))
                continue
            m = hf_to_openclip(k)
            if m is None:
                if k.endswith("position_ids"):
                    continue
                raise MismatchError(f"text encoder tensor {k!r} has no OpenCLIP name", folder / te_folder)
            if isinstance(m, tuple):
                _, layer, which = m
                p, part = which.split(".")
                qkv.setdefault((layer, part), {})[p] = k
            else:
                items.append(te.out(prefix + m, k))
        for (layer, part), parts in sorted(qkv.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
            if set(parts) != {"q", "k", "v"}:
                raise MismatchError(f"text encoder layer {layer}: q/k/v projections incomplete", folder / te_folder)
            name = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{part}"
            items.append(cat_out(name, [(te.where[parts[p]], parts[p]) for p in ("q", "k", "v")]))
        if kind == "openclip_h" and not (folder / EXTRA_FILE).is_file():
            warnings.append("SD2 text encoder: diffusers keeps 23 of 24 layers and no text_projection/logit_scale; "
                            "the single file lacks them (A1111 and ComfyUI load it without)")

    # extras written by to-diffusers
    extra_path = folder / EXTRA_FILE
    if extra_path.is_file():
        extra = open_checked(extra_path)
        opened.append(extra)
        weight_files.append(extra_path)
        have = {it.key for it in items}
        for k in extra.keys():
            if k not in have:
                items.append(Out.copy(k, extra, k))
    return fam, items, warnings, weight_files


def cat_out(key: str, parts: list[tuple[TensorSource, str]]) -> Out:
    infos = [s.info(k) for s, k in parts]
    if len({i.dtype for i in infos}) != 1 or len({i.shape[1:] for i in infos}) != 1:
        raise MismatchError(f"{key}: q/k/v projections differ in dtype or shape")
    shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])

    def produce():
        import numpy as np

        return np.concatenate([s.array(k) for s, k in parts], axis=0)

    return Out(key, TensorInfo(infos[0].dtype, shape), produce=produce)


def from_diffusers(folder: Path, out: Path, *, overwrite: bool = False, dry_run: bool = False,
                   progress: Progress = null_progress, cache: HashCache = NO_CACHE,
                   create_parent: bool = False) -> TransformResult:
    """Write the single-file checkpoint ``out`` from the diffusers folder ``folder``. ``cache`` and
    ``create_parent``: as for ``to_diffusers``."""
    from ckptlab.ops.stream import check_output

    folder, out = Path(folder), Path(out)
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        raise FormatError("not a diffusers pipeline folder (no model_index.json)", folder)
    opened: list[TensorSource] = []
    try:
        fam, items, warnings, weight_files = plan_from_diffusers(folder, opened)
        result = TransformResult("from-diffusers", folder, out, dry_run=dry_run,
                                 tensors_in=sum(len(s) for s in opened), tensors_out=len(items),
                                 bytes_in=sum(s.size for s in opened),
                                 bytes_out=sum(i.info.nbytes for i in items), warnings=warnings)
        if not items:
            raise CkptlabError("no tensors to write; no output made", folder)
        check_output(out, weight_files, overwrite, create_folder=create_parent)
        if dry_run:
            return result
        make_folder(out.parent)
        hashers = [FileHasher(f, cache=cache) for f in weight_files]
        pending = {placeholder(i): h for i, h in enumerate(hashers)}
        inputs = [(f.relative_to(folder), placeholder(i)) for i, f in enumerate(weight_files)]
        meta = provenance("from-diffusers", inputs, {"family": fam})
        progress(0, description=f"from-diffusers {folder.name}")
        write_plan(out, items, meta, progress=progress, overwrite=overwrite, pending=pending)
        return result
    finally:
        for s in opened:
            s.close()


# ----------------------------------------------------------------------------------------------
# several inputs: every one planned and checked before the first is written


def _each(paths: list[Path], output: Path | None, out_dir: Path | None, name_out, run, dry_run: bool) -> list:
    paths = [Path(p) for p in paths]
    if not paths:
        raise CkptlabError("no input files")
    if output is not None and len(paths) != 1:
        raise CkptlabError("-o/--output takes one input; use --out-dir for several")
    outs = [Path(output) if output is not None else name_out(p) for p in paths]
    seen: set[Path] = set()
    for p, out in zip(paths, outs, strict=True):
        if out.resolve() in seen:
            raise CkptlabError(f"two inputs would both be written to {out}", p)
        seen.add(out.resolve())
    create = output is None
    planned = [run(p, out, dry_run=True, create_parent=create) for p, out in zip(paths, outs, strict=True)]
    if dry_run:
        return planned
    return [run(p, out, dry_run=False, create_parent=create) for p, out in zip(paths, outs, strict=True)]


def to_diffusers_each(paths: list[Path], *, output: Path | None = None, out_dir: Path | None = None,
                      ema: str = "drop", precision: str | None = None, clamp: bool = False, overwrite: bool = False,
                      dry_run: bool = False, progress: Progress = null_progress,
                      cache: HashCache = NO_CACHE) -> list[FolderResult]:
    """``ckptlab to-diffusers`` for several inputs: ``output`` (one input) or ``<out_dir or the input's
    folder>/<stem>-diffusers``. Every input is opened, planned and its target checked before the first folder
    is written, so a bad second input stops the command with nothing written."""
    def run(p: Path, out: Path, *, dry_run: bool, create_parent: bool) -> FolderResult:
        return to_diffusers(p, out, ema=ema, precision=precision, clamp=clamp, overwrite=overwrite, dry_run=dry_run,
                            progress=progress, cache=cache, create_parent=create_parent)

    return _each(paths, output, out_dir, lambda p: output_path(p, out_dir, "-diffusers", ext=""), run, dry_run)


def from_diffusers_each(folders: list[Path], *, output: Path | None = None, out_dir: Path | None = None,
                        overwrite: bool = False, dry_run: bool = False, progress: Progress = null_progress,
                        cache: HashCache = NO_CACHE) -> list[TransformResult]:
    """``ckptlab from-diffusers`` for several pipeline folders: ``output`` (one folder) or ``<out_dir or the
    folder's parent>/<folder name>.safetensors``; all planned and checked before the first is written."""
    def run(p: Path, out: Path, *, dry_run: bool, create_parent: bool) -> TransformResult:
        return from_diffusers(p, out, overwrite=overwrite, dry_run=dry_run, progress=progress, cache=cache,
                              create_parent=create_parent)

    return _each(folders, output, out_dir, lambda p: output_path(p, out_dir, ""), run, dry_run)
