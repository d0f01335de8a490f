"""Where UIs keep their models: A1111/Forge/SD.Next and ComfyUI folder names, and ComfyUI's
``extra_model_paths.yaml`` (ComfyUI's ``folder_paths.py`` and ``utils/extra_config.py``; A1111's model folders).

A folder name gives a *hint* of the kind (``models/Lora`` -> ``lora``); identification from the
file's own keys wins when it disagrees.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath

from ckptlab.arch.families import FAMILIES
from ckptlab.errors import FormatError, UnknownChoiceError
from ckptlab.formats import MODEL_SUFFIXES

MODEL_EXTENSIONS = frozenset(MODEL_SUFFIXES)

# -- where each UI keeps each kind of file ----------------------------------------------------------
#: kind (ckptlab's, or a CivitAI type ckptlab has no kind for) -> (A1111/Forge folder, ComfyUI folder) under the
#: install root: where a download of that kind goes (``hub.destination``), and, by the folder's own name, the kind
#: hint a scan reads back (``FOLDERS``). Sources: A1111's ``models/Stable-diffusion``, ``models/VAE``,
#: ``embeddings`` (``modules/paths_internal.py``, ``modules/sd_models.py``) and its built-in Lora extension's
#: ``models/Lora``; ComfyUI's ``folder_paths.py`` (``folder_names_and_paths``); the ADetailer, ControlNet and
#: AnimateDiff extensions and ComfyUI_IPAdapter_plus for theirs.
UI_FOLDERS: dict[str, tuple[str, str]] = {
    "checkpoint": ("models/Stable-diffusion", "models/checkpoints"),
    "lora": ("models/Lora", "models/loras"),
    "embedding": ("embeddings", "models/embeddings"),
    "hypernetwork": ("models/hypernetworks", "models/hypernetworks"),
    "vae": ("models/VAE", "models/vae"),
    "controlnet": ("models/ControlNet", "models/controlnet"),
    "ipadapter": ("models/ControlNet", "models/ipadapter"),  # A1111 keeps IP-Adapters with the ControlNets
    "upscaler": ("models/ESRGAN", "models/upscale_models"),
    "detection": ("models/adetailer", "models/ultralytics"),
    "unet": ("models/Stable-diffusion", "models/diffusion_models"),
    "text_encoder": ("models/text_encoder", "models/text_encoders"),
    "clip_vision": ("models/clip_vision", "models/clip_vision"),
    "motion_module": ("models/AnimateDiff", "models/animatediff_models"),
    "other": ("models/other", "models/other"),
}
#: rows of ``UI_FOLDERS`` that only place downloads: their folders give no kind hint
_PLACE_ONLY = ("motion_module", "other")

#: folder names UIs read that downloads never go to: folder name (lower case) -> (UI, kind hint)
_READ_ONLY_FOLDERS: dict[str, tuple[str, str]] = {
    # A1111 / Forge / SD.Next
    "lycoris": ("a1111", "lora"),
    "realesrgan": ("a1111", "upscaler"),
    "swinir": ("a1111", "upscaler"),
    "dat": ("a1111", "upscaler"),
    "scunet": ("a1111", "upscaler"),
    "ldsr": ("a1111", "upscaler"),
    "gfpgan": ("a1111", "face_restore"),
    "codeformer": ("a1111", "face_restore"),
    "vae-approx": ("a1111", "vae_approx"),
    "text-encoder": ("sdnext", "text_encoder"),
    # ComfyUI's legacy names (``unet``, ``clip``) and its other categories
    "unet": ("any", "unet"),
    "clip": ("any", "text_encoder"),
    "style_models": ("comfyui", "style_model"),
    "vae_approx": ("comfyui", "vae_approx"),
    "t2i_adapter": ("comfyui", "t2i_adapter"),  # read by ComfyUI as part of its controlnet category
    "gligen": ("comfyui", "gligen"),
    "latent_upscale_models": ("comfyui", "upscaler"),
    "photomaker": ("comfyui", "photomaker"),
    "diffusers": ("comfyui", "diffusers"),
    "model_patches": ("comfyui", "model_patch"),
}


def _folder_names() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for kind, folders in UI_FOLDERS.items():
        if kind in _PLACE_ONLY:
            continue
        names = [PurePath(f).name.lower() for f in folders]
        for ui, name in zip(("a1111", "comfyui"), names, strict=True):
            # a name both UIs use is "any"; the first kind that names a folder is its hint
            out.setdefault(name, ("any" if names[0] == names[1] else ui, kind))
    for name, entry in _READ_ONLY_FOLDERS.items():
        out.setdefault(name, entry)
    return out


#: folder name (lower case) -> (UI: a1111 | comfyui | sdnext | any, kind hint), read when scanning
FOLDERS: dict[str, tuple[str, str]] = _folder_names()

#: extra_model_paths.yaml keys that are settings, not folder categories
_RESERVED = {"base_path", "is_default"}
_LEGACY = {"unet": "diffusion_models", "clip": "text_encoders"}


def folder_hint(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[str | None, str | None, str | None]:
    """``(folder name, UI, kind hint)`` from the nearest known ancestor folder of ``path``
    (below ``root`` when given, the root itself included)."""
    p = PurePath(os.fsdecode(path))
    parts = p.parts[:-1]
    if root is not None:
        r = PurePath(os.fsdecode(root)).parts
        if parts[:len(r)] == r:
            parts = parts[len(r) - 1:] if r else parts
    for name in reversed(parts):
        hit = FOLDERS.get(name.lower())
        if hit:
            ui, kind = hit
            return name, ui, kind
    return None, None, None


def is_model_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in MODEL_EXTENSIONS


def read_extra_model_paths(yaml_path: str | Path) -> list[tuple[str, Path]]:
    """``[(category, folder), ...]`` from a ComfyUI ``extra_model_paths.yaml``: values split on
    newlines, relative paths joined to ``base_path`` (or the YAML file's folder), ``~``/``$VARS``
    expanded, legacy names (``unet``, ``clip``) mapped."""
    import yaml

    yaml_path = Path(yaml_path)
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", yaml_path) from None
    except yaml.YAMLError as e:
        raise FormatError(f"not valid YAML: {str(e).splitlines()[0]}", yaml_path) from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise FormatError("extra_model_paths.yaml must map section names to folder settings", yaml_path)
    out: list[tuple[str, Path]] = []
    for section, conf in data.items():
        if conf is None:
            continue
        if not isinstance(conf, dict):
            raise FormatError(f"section {section!r} is not a mapping", yaml_path)
        base = conf.get("base_path")
        base_dir = Path(os.path.expandvars(os.path.expanduser(str(base)))) if base else yaml_path.parent
        if not base_dir.is_absolute():
            base_dir = yaml_path.parent / base_dir
        for key, value in conf.items():
            if key in _RESERVED or value is None:
                continue
            category = _LEGACY.get(str(key), str(key))
            for line in str(value).split("\n"):
                line = line.strip()
                if not line:
                    continue
                folder = Path(os.path.expandvars(os.path.expanduser(line)))
                out.append((category, folder if folder.is_absolute() else base_dir / folder))
    return out


COMFY_CATEGORY_KINDS = {name: kind for name, (ui, kind) in FOLDERS.items() if ui in ("comfyui", "any")}
COMFY_CATEGORY_KINDS.update({"configs": "config"})


# -- names people use for kinds and families (``ckptlab ls --kind/--family``) ------------------------------
#: kinds identification records (``arch.detect``, ``arch.adapters``); kinds found in a catalog are
#: accepted too, so a kind the identifier learns later needs no entry here
KINDS = ("checkpoint", "unet", "vae", "text_encoder", "lora", "lycoris", "embedding", "hypernetwork", "controlnet",
         "ipadapter", "t2i_adapter", "upscaler", "clip_vision")
#: a kind that stands for several when filtering: a LoRA filter includes LyCORIS (LoCon, LoHa, LoKr...)
KIND_GROUPS = {"lora": ("lora", "lycoris")}
#: the one label of each kind in UIs (the web app's card badge, list row, placeholder and kind filter all use it)
KIND_LABELS = {"checkpoint": "Checkpoint", "unet": "Diffusion model (UNet)", "vae": "VAE",
               "text_encoder": "Text encoder", "lora": "LoRA", "lycoris": "LyCORIS", "embedding": "Embedding",
               "hypernetwork": "Hypernetwork", "controlnet": "ControlNet", "ipadapter": "IP-Adapter",
               "t2i_adapter": "T2I-Adapter", "upscaler": "Upscaler", "clip_vision": "CLIP Vision"}


def kind_label(kind: str | None) -> str | None:
    """A kind's label (``KIND_LABELS``); a kind the table does not know, with spaces for underscores; None: None."""
    return None if kind is None else KIND_LABELS.get(kind, kind.replace("_", " "))
#: other spellings: CivitAI's ModelType names (the ``types`` of its public ``/api/v1/models``), adapter algorithms, plurals
KIND_NAMES = {
    "model": "checkpoint", "checkpoints": "checkpoint", "ckpt": "checkpoint", "diffusionmodel": "unet",
    "diffusionmodels": "unet", "textualinversion": "embedding", "ti": "embedding", "embeddings": "embedding",
    "textencoder": "text_encoder", "textencoders": "text_encoder", "loras": "lora", "locon": "lora", "dora": "lora",
    "lyco": "lycoris", "loha": "lycoris", "lokr": "lycoris", "hypernetworks": "hypernetwork", "hypernet": "hypernetwork",
    "vaes": "vae", "upscalers": "upscaler", "upscalemodels": "upscaler", "esrgan": "upscaler",
    "ipadapters": "ipadapter", "t2iadapters": "t2i_adapter", "clipvision": "clip_vision",
}
#: CivitAI ``baseModel`` values (the ``baseModels`` of CivitAI's public ``/api/v1/models``), short names people type, and normalised prefixes of
#: CivitAI names that keep appearing (``Wan Video 2.2 I2V-A14B``, ``Flux.2 Klein 9B``): all read from the family
#: records (``Family.civitai`` / ``aliases`` / ``name_prefixes``)


CIVITAI_BASE_MODELS = {name: f.id for f in FAMILIES for name in f.civitai}
FAMILY_NAMES = {name: f.id for f in FAMILIES for name in f.aliases}
#: longest prefix first: ``ponyv7`` (AuraFlow) before ``pony`` (SDXL)
_FAMILY_PREFIXES = tuple(sorted(((p, f.id) for f in FAMILIES for p in f.name_prefixes),
                                key=lambda pf: -len(pf[0])))


def norm_name(text: str) -> str:
    """The form names are compared in: lower case, letters and digits only (``SD 1.5`` -> ``sd15``)."""
    return re.sub(r"[^0-9a-z]", "", text.lower())


def kind_aliases(known: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """``{normalised name: kind}``: the kinds themselves (and ``known``), UI folder names, other spellings.
    A kind's own name wins over a folder of that name (``LyCORIS`` means LyCORIS files)."""
    out: dict[str, str] = {}
    for folder, (_ui, kind) in FOLDERS.items():
        out[norm_name(folder)] = kind
    for name, kind in KIND_NAMES.items():
        out[norm_name(name)] = kind
    for kind in (*KINDS, *known):
        out[norm_name(kind)] = kind
    return out


def resolve_kind(value: str, known: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The kinds ``value`` stands for (``loras`` -> lora + lycoris, ``Stable-diffusion`` -> checkpoint).
    ``known``: kinds present in the catalog. Raises ``UnknownChoiceError`` listing the valid kinds."""
    kind = kind_aliases(known).get(norm_name(value))
    if kind is None:
        valid = sorted({*KINDS, *known})
        raise UnknownChoiceError(
            f"unknown kind {value!r}: use one of {', '.join(valid)} (also UI folder names such as loras, "
            "checkpoints, Stable-diffusion, embeddings, and CivitAI types such as LORA, TextualInversion)")
    return KIND_GROUPS.get(kind, (kind,))


def family_ids() -> tuple[str, ...]:
    return tuple(f.id for f in FAMILIES)


def family_aliases(known: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """``{normalised name: family}``: family ids and display names (``Stable Diffusion XL``), CivitAI
    base models (``SD 1.5``, ``SDXL 1.0``, ``Pony``), short names (``sd15``, ``xl``)."""
    out: dict[str, str] = {}
    for name, fam in CIVITAI_BASE_MODELS.items():
        out[norm_name(name)] = fam
    for name, fam in FAMILY_NAMES.items():
        out[norm_name(name)] = fam
    for f in FAMILIES:
        out.setdefault(norm_name(f.name), f.id)
    for fam in (*family_ids(), *known):
        out[norm_name(fam)] = fam
    return out


def resolve_family(value: str, known: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The family ``value`` names (``"SD 1.5"``, ``sd15``, ``SDXL 1.0``, ``Pony``, ``flux``...), as a
    one-element tuple. Raises ``UnknownChoiceError`` listing the valid families."""
    key = norm_name(value)
    fam = family_aliases(known).get(key)
    if fam is None and key:
        fam = next((f for prefix, f in _FAMILY_PREFIXES if key.startswith(prefix)), None)
    if fam is None:
        valid = sorted({*family_ids(), *known})
        raise UnknownChoiceError(
            f"unknown family {value!r}: use one of {', '.join(valid)} (also CivitAI base models such as "
            "\"SD 1.5\", \"SDXL 1.0\", Pony, and short names such as sd15)")
    return (fam,)
