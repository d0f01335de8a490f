"""ckptlab - identify, check, organise, transform and merge Stable Diffusion model files.

The public API is imported lazily so that header-only work (``inspect``) never pulls in torch.
"""

from __future__ import annotations

from ckptlab.version import __version__

_LAZY = {
    "open_model": ("ckptlab.formats", "open_model"),
    "SafetensorsWriter": ("ckptlab.formats.writer", "SafetensorsWriter"),
    "CkptlabError": ("ckptlab.errors", "CkptlabError"),
    "identify": ("ckptlab.identify", "identify"),
    "ModelInfo": ("ckptlab.identify", "ModelInfo"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'ckptlab' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
