"""One vocabulary for a catalogued file's precision, from the ``files.dtypes`` the scan stored (``{dtype: bytes}``).

- ``byte_counts(dtypes)``: the column's real byte counts only. The column is JSON that an older version, another
  tool or a hand edit may have written: a string, a bool, NaN or inf (``1e400``) where a count belongs is dropped,
  so every reader (the ``show`` output, the model page, the library index, ``dupes``) sees numbers.
- ``precision_of(dtypes)``: one word, by bytes: the kind (``PRECISIONS``) holding >= 90 % of them, else ``mixed``.
  This is what the library page's precision badge and filter and the model page say.

``library.dupes.precision`` answers a different question on purpose: the *largest float dtype* (``F16``,
``F32``...) by bytes, ignoring quantized and integer tensors, because the disk plan compares the float widths of
copies to decide which one to keep; it is not a label.
"""

from __future__ import annotations

import math

#: every word ``precision_of`` answers, in the order a filter lists them
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "fp64", "quantized", "mixed")


def byte_counts(dtypes) -> dict[str, int]:
    """``{dtype: bytes}`` with only the finite, non-negative numeric counts of ``dtypes`` (anything else: {})."""
    if not isinstance(dtypes, dict):
        return {}
    return {str(k): int(n) for k, n in dtypes.items()
            if isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) and n >= 0}


def dtype_word(name: str) -> str:
    """The precision word of one dtype name (``F16`` -> ``fp16``, ``Q4_K`` -> ``quantized``); an unknown name
    lower-cased."""
    n = name.lower()
    if n in ("f32", "float32", "float", "fp32"):
        return "fp32"
    if n in ("f16", "float16", "half", "fp16"):
        return "fp16"
    if n in ("bf16", "bfloat16"):
        return "bf16"
    if n.startswith(("f8", "float8", "fp8")):
        return "fp8"
    if n.startswith(("q", "iq", "tq")) or n in ("i8", "u8", "int8", "uint8", "nf4", "fp4", "i4", "u4"):
        return "quantized"
    if n in ("f64", "float64", "double"):
        return "fp64"
    return n


def precision_of(dtypes) -> str | None:
    """One word for a file's tensor dtypes, by bytes: the word (``dtype_word``) holding >= 90 % of the bytes, else
    ``mixed``; None when no byte count is known."""
    by: dict[str, int] = {}
    for name, n in byte_counts(dtypes).items():
        w = dtype_word(name)
        by[w] = by.get(w, 0) + n
    total = sum(by.values())
    if not total:
        return None
    name, n = max(by.items(), key=lambda kv: kv[1])
    return name if n / total >= 0.9 else "mixed"
