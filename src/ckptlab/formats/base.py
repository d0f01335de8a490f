"""``TensorSource``: an opened model file of any format, read lazily.

Header-level questions (keys, dtypes, shapes, metadata) import neither numpy nor torch. ``array(key)`` is the
one data path of every format: a numpy array (a zero-copy view of the mapped file where the format allows;
bf16/fp8 as ``ml_dtypes`` dtypes), no torch. ``get(key)`` is the torch entry point (merge): the same array as a
``torch.Tensor`` sharing its memory, implemented once here on top of ``array``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptlab.formats.dtypes import itemsize
from ckptlab.remote import RemoteURL, as_path

#: The most dimensions a tensor may have. NumPy's own limit (NPY_MAXDIMS, 64 since NumPy 2; the reference
#: ``safetensors`` loader for numpy refuses a 65-dimension tensor); the model formats ckptlab reads use at most 5
#: (GGML at most 4). A longer shape list is a resource bomb, not a model.
MAX_RANK = 64
#: Element and byte counts are unsigned 64-bit numbers in the reference implementation (checked_mul on usize).
MAX_COUNT = 2**64 - 1

#: How much of an untrusted value (a key, a shape, a dtype) an error message quotes.
BRIEF_CHARS = 120


def checked_numel(shape, limit: int = MAX_COUNT) -> int | None:
    """The product of ``shape``, or ``None`` as soon as a partial product exceeds ``limit``.

    The reference implementation multiplies with ``checked_mul`` from the first dimension on, so a product that
    overflows before a later ``0`` is still an overflow there; stopping early keeps every intermediate number
    below ``limit * max(dim)``: linear time whatever the shape list holds."""
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return None
    return n


def brief(value, limit: int = BRIEF_CHARS) -> str:
    """A short ``repr`` of an untrusted value for an error message: long strings and lists are cut, nested
    containers are not walked (a 100,000-deep list must not cost a recursion or a megabyte of message)."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return repr(value[:limit]) + f"… ({len(value)} characters)"
    if isinstance(value, (list, tuple)):
        parts, size = [], 2
        for v in value:
            item = "[…]" if isinstance(v, (list, tuple)) else "{…}" if isinstance(v, dict) else brief(v, limit)
            size += len(item) + 2
            if size > limit:
                return "[" + ", ".join(parts) + f", … ({len(value)} items)]"
            parts.append(item)
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        return f"{{…}} (object with {len(value)} keys)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


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
        self.path = as_path(path)  # a Path, or a RemoteURL (a str) for s3://, https://... objects
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
        """Bytes on disk (sum over files for folders); a remote object's size."""
        if type(self.path) is RemoteURL:
            from ckptlab.remote.reader import open_remote

            return open_remote(self.path).size
        return self.path.stat().st_size

    # -- data level ---------------------------------------------------------------------------
    @abstractmethod
    def array(self, key: str):
        """The tensor for ``key`` as a numpy array (native byte order; bf16/fp8 as ``ml_dtypes`` dtypes). Never
        imports torch. Raises ``FormatError`` (``UnsupportedFormatError`` for data ckptlab cannot decode)."""

    def get(self, key: str):
        """The tensor for ``key`` as a ``torch.Tensor`` sharing the memory of ``array(key)`` (imports torch;
        ``TorchMissingError`` where it is not installed)."""
        from ckptlab.formats.arrays import as_tensor

        return as_tensor(self.array(key))

    def close(self) -> None:  # noqa: B027 - optional hook; most sources hold nothing to release
        """Release mapped files; sources without resources need not override it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({len(self)} tensors)>"
