"""``TensorSource``: an opened model file of any format, read lazily.

Header-level questions (keys, dtypes, shapes, metadata) never import torch; ``get(key)`` returns
a ``torch.Tensor`` (mmap-backed where the format allows) and is the only place tensors appear.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptlab.formats.dtypes import itemsize


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


class TensorSource(ABC):
    """A model file (or folder) as an ordered mapping ``key -> tensor``, read on demand."""

    #: 'safetensors' | 'pickle' | 'diffusers' | 'gguf'
    format: str = "unknown"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        #: string -> string metadata (safetensors ``__metadata__``, or derived for other formats)
        self.metadata: dict[str, str] = {}
        #: non-tensor values found next to the weights (pickles: ``global_step``, ``epoch``...)
        self.extra: dict[str, Any] = {}
        #: non-fatal oddities noticed while opening (one line each)
        self.warnings: list[str] = []

    # -- header level -------------------------------------------------------------------------
    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Ordered ``key -> TensorInfo`` for every tensor."""

    def keys(self) -> list[str]:
        return list(self.infos())

    def info(self, key: str) -> TensorInfo:
        return self.infos()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.infos()

    def __len__(self) -> int:
        return len(self.infos())

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos())

    @property
    def size(self) -> int:
        """Bytes on disk (sum over files for folders)."""
        return self.path.stat().st_size

    # -- data level ---------------------------------------------------------------------------
    @abstractmethod
    def get(self, key: str):
        """The tensor for ``key`` as a ``torch.Tensor`` (imports torch)."""

    def close(self) -> None:  # noqa: B027 - optional hook; most sources hold nothing to release
        """Release mapped files; sources without resources need not override it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({len(self)} tensors)>"
