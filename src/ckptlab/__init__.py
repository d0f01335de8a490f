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

import sys
import types

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
    "ModelInfo": ("ckptlab.identify", "ModelInfo"),
    "CheckResult": ("ckptlab.security", "CheckResult"),
    "Hashes": ("ckptlab.hashes", "Hashes"),
    "TransformResult": ("ckptlab.ops.stream", "TransformResult"),
    "FolderResult": ("ckptlab.ops.diffusers_io", "FolderResult"),
    "MergeResult": ("ckptlab.merge.engine", "MergeResult"),
    "FileRecord": ("ckptlab.library.catalog", "FileRecord"),
    "ScanSummary": ("ckptlab.library.scanner", "ScanSummary"),
    "DupesResult": ("ckptlab.library.dupes", "DupesResult"),
    "LinkReport": ("ckptlab.hub.link", "LinkReport"),
    "DownloadResult": ("ckptlab.hub.download", "DownloadResult"),
    "CkptlabError": ("ckptlab.errors", "CkptlabError"),
}


#: public functions that share their name with a submodule (``ckptlab/identify.py``, ``ckptlab/merge/``)
_ALSO_SUBMODULES = frozenset({"identify", "merge"})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        if name in _ALSO_SUBMODULES:
            value = _named_like_the_submodule(name, value)
        globals()[name] = value  # once resolved, a plain attribute
        return value
    raise AttributeError(f"module 'ckptlab' has no attribute {name!r}")


def _named_like_the_submodule(name: str, fn):
    """``fn`` under the submodule's full name. ``import ckptlab.merge.engine as engine`` reads the package
    attribute ``merge`` (the function) and then, when ``engine`` is not an attribute of it, takes
    ``sys.modules[f"{merge.__name__}.engine"]``: so the function's ``__name__`` is ``ckptlab.merge``."""
    import functools

    @functools.wraps(fn)
    def public(*args, **kwargs):
        return fn(*args, **kwargs)

    public.__name__ = f"ckptlab.{name}"
    return public


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """``ckptlab.identify`` and ``ckptlab.merge`` name both a public function and a submodule. Importing the
    submodule sets the package attribute of that name to the module; here the public function wins.
    ``from ckptlab.merge import run_recipe``, ``import ckptlab.merge.engine as engine`` and
    ``importlib.import_module("ckptlab.identify")`` still reach the modules; ``import ckptlab.identify as m``
    gives the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["__version__", *_LAZY]
