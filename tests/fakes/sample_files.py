"""Shared helpers of the transform tests: real-layout sample files from ``ckptlab.sample`` (small widths)."""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

_CACHE: dict[tuple, Path] = {}
_CACHE_DIR: Path | None = None


def make_model(path: Path, spec: str, *, dtype: str = "F32", ema: bool = False, seed: int = 0, metadata=None,
               fmt: str | None = None, training_state: bool = False) -> Path:
    """Write sample ``spec`` (small real layout, deterministic values) to ``path``.

    Each distinct file is generated once per test process and copied afterwards (generation dominates
    the run time of these tests otherwise)."""
    from ckptlab.sample.build import write_model

    global _CACHE_DIR
    key = (spec, dtype, ema, seed, tuple(sorted((metadata or {}).items())), fmt, training_state, Path(path).suffix)
    if key not in _CACHE:
        if _CACHE_DIR is None:
            _CACHE_DIR = Path(tempfile.mkdtemp(prefix="ckptlab-ops-samples-"))
            atexit.register(shutil.rmtree, _CACHE_DIR, True)
        cached = _CACHE_DIR / f"{len(_CACHE)}{Path(path).suffix}"
        write_model(cached, spec, small=True, dtype=dtype, ema=ema, seed=seed, metadata=metadata, fmt=fmt,
                    training_state=training_state)
        _CACHE[key] = cached
    shutil.copyfile(_CACHE[key], path)
    return Path(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
