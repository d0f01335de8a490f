"""ckptlab - identify, check, organise, transform and merge Stable Diffusion model files.

The public Python API (docs/api.md)::

    import ckptlab

    info = ckptlab.identify("model.safetensors")        # ModelInfo: kind, family, variant, components ...
    verdict = ckptlab.check("old.ckpt").verdict          # safe | suspicious | malicious | corrupt
    ckptlab.convert("old.ckpt")                          # -> old.safetensors, nothing in the pickle executed
    ckptlab.scan("sd/models", db="lib.db", hash=True)    # the catalog; then dupes(db=...), link(...)

Every name is imported on first use, so ``import ckptlab`` is cheap and pulls in neither torch nor httpx.
"""

from __future__ import annotations

from ckptlab.version import __version__

#: public name -> (module, attribute); the functions are in ``ckptlab.api``, the types where they are defined
_LAZY = {
    # files
    "open_model": ("ckptlab.api", "open_model"),
    "identify": ("ckptlab.api", "identify"),
    "check": ("ckptlab.api", "check"),
    "hash_file": ("ckptlab.api", "hash_file"),
    # transforms and merges
    "convert": ("ckptlab.api", "convert"),
    "prune": ("ckptlab.api", "prune"),
    "precision": ("ckptlab.api", "precision"),
    "extract": ("ckptlab.api", "extract"),
    "replace": ("ckptlab.api", "replace"),
    "to_diffusers": ("ckptlab.api", "to_diffusers"),
    "from_diffusers": ("ckptlab.api", "from_diffusers"),
    "merge": ("ckptlab.api", "merge"),
    # LoRAs
    "lora_bake": ("ckptlab.api", "lora_bake"),
    "lora_extract": ("ckptlab.api", "lora_extract"),
    "lora_resize": ("ckptlab.api", "lora_resize"),
    "lora_merge": ("ckptlab.api", "lora_merge"),
    "lora_convert": ("ckptlab.api", "lora_convert"),
    "lora_info": ("ckptlab.api", "lora_info"),
    # images
    "generate": ("ckptlab.api", "generate"),
    "grid": ("ckptlab.api", "grid"),
    "images": ("ckptlab.api", "images"),
    "preview": ("ckptlab.api", "preview"),
    # the library catalog
    "Catalog": ("ckptlab.library.catalog", "Catalog"),
    "scan": ("ckptlab.api", "scan"),
    "show": ("ckptlab.api", "show"),
    "dupes": ("ckptlab.api", "dupes"),
    # CivitAI and Hugging Face
    "link": ("ckptlab.api", "link"),
    "download": ("ckptlab.api", "download"),
    # what they return
    "TensorSource": ("ckptlab.formats.base", "TensorSource"),
    "SafetensorsWriter": ("ckptlab.formats.writer", "SafetensorsWriter"),
    "ModelInfo": ("ckptlab.arch.identify", "ModelInfo"),
    "CheckResult": ("ckptlab.security", "CheckResult"),
    "Hashes": ("ckptlab.hashes", "Hashes"),
    "TransformResult": ("ckptlab.ops.stream", "TransformResult"),
    "FolderResult": ("ckptlab.ops.diffusers_io", "FolderResult"),
    "MergeResult": ("ckptlab.merging.engine", "MergeResult"),
    "GenerateResult": ("ckptlab.imaging.render", "GenerateResult"),
    "GridResult": ("ckptlab.imaging.grid", "GridResult"),
    "ImageReport": ("ckptlab.imaging.images", "ImageReport"),
    "PreviewResult": ("ckptlab.imaging.preview", "PreviewResult"),
    "FileRecord": ("ckptlab.library.catalog", "FileRecord"),
    "ScanSummary": ("ckptlab.library.scanner", "ScanSummary"),
    "DupesResult": ("ckptlab.library.dupes", "DupesResult"),
    "BakeResult": ("ckptlab.lora.bake", "BakeResult"),
    "ExtractResult": ("ckptlab.lora.extract", "ExtractResult"),
    "ResizeResult": ("ckptlab.lora.resize", "ResizeResult"),
    "LoraMergeResult": ("ckptlab.lora.combine", "LoraMergeResult"),
    "LoraConvertResult": ("ckptlab.lora.convert", "LoraConvertResult"),
    "LoraInfo": ("ckptlab.lora.info", "LoraInfo"),
    "LinkReport": ("ckptlab.hub.link", "LinkReport"),
    "DownloadResult": ("ckptlab.hub.download", "DownloadResult"),
    "CkptlabError": ("ckptlab.errors", "CkptlabError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value  # once resolved, a plain attribute
        return value
    raise AttributeError(f"module 'ckptlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", *_LAZY]
