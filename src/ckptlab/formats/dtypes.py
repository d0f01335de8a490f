"""Dtype names. ckptlab names dtypes the way the safetensors header does (``F32``, ``BF16``...);
this module maps them to element sizes, human names and (lazily) torch dtypes."""

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
