"""Dtype names. ckptlab names dtypes the way the safetensors header does (``F32``, ``BF16``...);
this module maps them to element sizes, human names, numpy dtypes (bf16 and the fp8 kinds through
``ml_dtypes``) and torch dtypes. numpy, ``ml_dtypes`` and torch are each imported only inside the functions
that need them: header-level work imports none of them, and only the torch functions import torch."""

from __future__ import annotations

# safetensors name -> (bytes per element, friendly name used in reports)
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "fp64"),
    "F32": (4, "fp32"),
    "F16": (2, "fp16"),
    "BF16": (2, "bf16"),
    "F8_E4M3": (1, "fp8_e4m3fn"),
    "F8_E5M2": (1, "fp8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    # rarer types the safetensors format also names (MX block scales, AMD fp8, complex)
    "F8_E8M0": (1, "fp8_e8m0"),
    "F8_E4M3FNUZ": (1, "fp8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "fp8_e5m2fnuz"),
    "C64": (8, "complex64"),
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_FRIENDLY_TO_ST = {friendly: st for st, (_, friendly) in DTYPES.items()}
_FRIENDLY_TO_ST.update({"float32": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16",
                        "float64": "F64", "fp8": "F8_E4M3", "float8_e4m3fn": "F8_E4M3",
                        "float8_e5m2": "F8_E5M2"})


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def friendly(dtype: str) -> str:
    return DTYPES[dtype][1] if dtype in DTYPES else dtype.lower()


def parse_dtype(name: str) -> str:
    """Accept ``fp16``/``float16``/``F16``... and return the safetensors name."""
    if name.upper() in DTYPES:
        return name.upper()
    try:
        return _FRIENDLY_TO_ST[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_FRIENDLY_TO_ST))}") from None


#: ``ml_dtypes`` attribute of each dtype numpy itself does not have
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
              "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
#: numpy type codes of the rest (little-endian, as every format ckptlab writes stores them)
_NP_CODES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?", "C64": "<c8"}
_np_cache: dict[str, object] = {}
_np_back: dict[object, str] = {}


def _np_tables() -> dict[str, object]:
    if not _np_cache:
        import ml_dtypes
        import numpy as np

        table = {k: np.dtype(v) for k, v in _NP_CODES.items()}
        table.update({k: np.dtype(getattr(ml_dtypes, v)) for k, v in _ML_DTYPES.items()})
        _np_back.update({v: k for k, v in table.items()})
        _np_cache.update(table)
    return _np_cache


def to_numpy(dtype: str):
    """The numpy dtype of a safetensors dtype name (native little-endian; bf16/fp8 from ``ml_dtypes``)."""
    return _np_tables()[dtype]


def from_numpy(npdtype) -> str:
    """The safetensors name of a numpy dtype (either byte order)."""
    import numpy as np

    _np_tables()
    dt = np.dtype(npdtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    try:
        return _np_back[dt]
    except KeyError:
        raise ValueError(f"dtype {dt} cannot be stored in safetensors") from None


def uint_of_width(width: int):
    """The numpy unsigned integer dtype ``width`` bytes wide (to move bf16/fp8 bits through numpy and torch)."""
    import numpy as np

    return np.dtype({1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}[width])


def dtype_of(array_or_tensor) -> str:
    """The safetensors dtype name of a numpy array or a torch tensor (torch is not imported for arrays)."""
    dt = array_or_tensor.dtype
    if hasattr(dt, "byteorder"):  # a numpy dtype; torch.dtype has no byte order
        return from_numpy(dt)
    return from_torch(dt)


def to_torch(dtype: str):
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
        "BOOL": torch.bool,
        "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
        "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
    }[dtype]


def from_torch(tdtype) -> str:
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float8_e8m0fnu: "F8_E8M0", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
        torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64",
    }
    try:
        return table[tdtype]
    except KeyError:
        raise ValueError(f"dtype {tdtype} cannot be stored in safetensors") from None
