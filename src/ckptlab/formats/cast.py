"""Float casts in numpy (+ ``ml_dtypes``) that give the bytes torch's ``Tensor.to(dtype)`` gives, without torch.

What torch (2.13, the pinned dev build, CPU) does and this module copies, checked against torch over random
values and every special (±0, subnormals, largest finite, overflow, ±inf, NaN with payloads) in
tests/formats/test_cast_oracle.py:

- Every narrowing goes through fp32: an fp64 value is rounded to fp32 first, then to the target (torch's
  ``Half``/``BFloat16``/``Float8`` constructors take a float), so fp64 -> fp16 can round twice.
- fp16: round to nearest even, overflow to ±inf; a NaN keeps its sign and the top 9 payload bits, quiet bit
  set (``sign | 0x7E00 | payload >> 13``). numpy's own cast agrees except for NaN payloads.
- bf16: round to nearest even on the fp32 bits, overflow to ±inf; every NaN becomes 0xFFFF.
- fp8 e4m3fn: round to nearest even; torch saturates: finite overflow and ±inf become ±448; a NaN is
  ``sign | 0x7F``.
- fp8 e5m2: round to nearest even, overflow to ±inf; a NaN is ``sign | 0x7F``.
- Widening (to fp32, and to fp64 through fp32) is exact. NaNs come out as torch makes them: an fp16 NaN keeps
  its payload with the quiet bit set, an e5m2 NaN is widened as the fp16 it is the top byte of, an e4m3fn NaN
  is ``sign | 0x7FF00000``, the NaN of e8m0 and of the fnuz kinds is 0x7F800001.
- bf16 NaN: 0xFFFF from fp32/fp64 (torch's vectorised cast) but 0x7FC0 from every other dtype (its scalar
  ``round_to_nearest_even``).

torch's own NaN bits depend on where the NaN sits: the scalar tail of its vectorised loops (the last ``n % 16``
elements of each thread's share) gives other bits than the body (fp64 -> bf16: 0x7FC0, fp16 -> fp32:
0x7FFFFFFF). ``cast`` gives the body's bits everywhere, so tensors holding NaNs may differ from torch's in those
NaN bits (never in any other value); such a model is broken anyway (``check --deep`` reports it). Also unlike
torch, fp8 sources can be range-checked (``count_over``): torch has no fp8 compare, and the torch-era
``precision`` failed with an internal error on an fp8 input.

Large arrays are cast in chunks so that the temporaries stay small.
"""

from __future__ import annotations

from ckptlab.formats.dtypes import FLOAT_DTYPES, from_numpy, to_numpy, uint_of_width

#: elements per pass over a large array
CHUNK = 1 << 22


def cast(a, target: str):
    """``a`` (a numpy array of any float dtype ckptlab reads) cast to the safetensors dtype ``target`` as torch's
    ``.to()`` does; ``a`` itself when it already has that dtype. Integer/bool targets use numpy's C cast."""
    import numpy as np

    src = from_numpy(a.dtype)
    if src == target:
        return a
    dt = to_numpy(target)
    if target not in FLOAT_DTYPES:
        with np.errstate(all="ignore"):
            return a.astype(dt)
    if target == "F64":
        with np.errstate(all="ignore"):
            return _f32(a, src).astype(np.float64)
    out = np.empty(a.shape, dtype=dt)
    flat_in = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
    flat_out = out.reshape(-1)
    narrow = {"F32": None, "F16": _to_f16, "BF16": _to_bf16, "F8_E4M3": _to_e4m3fn, "F8_E5M2": _to_e5m2}[target]
    for i in range(0, flat_in.size, CHUNK):
        f = _f32(flat_in[i:i + CHUNK], src)
        if narrow is None:
            flat_out[i:i + CHUNK] = f
        elif narrow is _to_bf16:
            flat_out.view(np.uint16)[i:i + CHUNK] = _to_bf16(f, 0xFFFF if src in ("F32", "F64") else 0x7FC0)
        else:
            flat_out.view(uint_of_width(dt.itemsize))[i:i + CHUNK] = narrow(f)
    return out


def _f32(a, src: str):
    """fp32 of ``a`` (dtype ``src``) as torch makes it: exact from fp16/bf16/fp8, rounded to nearest even from
    fp64 (the hardware cast), NaNs as the module docstring says."""
    import numpy as np

    if src == "F32":
        return a
    if src == "F8_E5M2":  # e5m2 is the top byte of an fp16: widen that fp16 (torch does the same)
        return _f32((a.view(np.uint8).astype(np.uint16) << 8).view(np.float16), "F16")
    with np.errstate(all="ignore"):
        f = a.astype(np.float32)
    nan_bits = {"F8_E4M3": 0x7FF00000, "F8_E8M0": 0x7F800001, "F8_E4M3FNUZ": 0x7F800001,
                "F8_E5M2FNUZ": 0x7F800001}.get(src)
    if src == "F16" or nan_bits is not None:
        nan = np.isnan(f)
        if nan.any():
            u = f.view(np.uint32)
            if src == "F16":
                u[nan] |= 0x00400000  # the quiet bit, as the hardware cast sets it
            elif src == "F8_E4M3":
                u[nan] = (u[nan] & 0x80000000) | nan_bits
            else:
                u[nan] = nan_bits
    return f


def _to_f16(f):
    import numpy as np

    with np.errstate(all="ignore"):
        h = f.astype(np.float16).view(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        u = f.view(np.uint32)[nan]
        h[nan] = ((u >> 16) & 0x8000 | 0x7E00 | (u >> 13) & 0x03FF).astype(np.uint16)
    return h


def _to_bf16(f, nan_bits: int):
    import numpy as np

    u = f.view(np.uint32)
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)  # no wrap: NaNs are replaced below
    nan = np.isnan(f)
    if nan.any():
        r[nan] = nan_bits
    return r


def _fp8_nan(f, q) -> None:
    """Every NaN of ``f`` as ``sign | 0x7F`` in the fp8 bits ``q``."""
    import numpy as np

    nan = np.isnan(f)
    if nan.any():
        q[nan] = ((f.view(np.uint32)[nan] >> 24) & 0x80 | 0x7F).astype(np.uint8)


def _to_e4m3fn(f):
    import ml_dtypes
    import numpy as np

    with np.errstate(all="ignore"):
        q = f.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    # ml_dtypes turns overflow and inf into NaN (0x7F); torch saturates them to the largest finite value (0x7E)
    over = ((q & 0x7F) == 0x7F) & ~np.isnan(f)
    if over.any():
        q[over] -= 1
    _fp8_nan(f, q)
    return q


def _to_e5m2(f):
    import ml_dtypes
    import numpy as np

    with np.errstate(all="ignore"):
        q = f.astype(ml_dtypes.float8_e5m2).view(np.uint8)
    _fp8_nan(f, q)
    return q


def widen(a):
    """``a`` as fp32 (fp64 stays fp64), exactly: the domain range checks and clamps are done in. NaNs stay NaN
    but need not keep the bits ``cast`` would give them: cast the original, not this, where NaNs matter."""
    import numpy as np

    if a.dtype == np.float64 or a.dtype == np.float32:
        return a
    with np.errstate(all="ignore"):
        return a.astype(np.float32)


def limit_in(dtype: str, limit: float) -> float:
    """``limit`` rounded to ``dtype``, as torch rounds a Python scalar it compares with or clamps a tensor of that
    dtype to (65504 is 65536 in bf16)."""
    import numpy as np

    return float(widen(cast(np.array([limit], dtype=np.float64 if dtype == "F64" else np.float32), dtype))[0])


def count_over(a, limit: float) -> tuple[int, float]:
    """``(n, peak)``: how many finite values of ``a`` exceed ``limit`` in magnitude, and the largest finite
    magnitude (0.0 when there is none), chunk by chunk. Compared as torch's ``t.abs() > limit`` compares: with
    ``limit`` rounded to ``a``'s dtype (a bf16 65536 is not above the fp16 limit 65504)."""
    import numpy as np

    limit = limit_in(from_numpy(a.dtype), limit)
    flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
    n, peak = 0, 0.0
    for i in range(0, flat.size, CHUNK):
        w = np.abs(widen(flat[i:i + CHUNK]))
        fin = np.isfinite(w)
        n += int(np.count_nonzero((w > limit) & fin))
        if fin.any():
            peak = max(peak, float(w[fin].max()))
    return n, peak


def clamp_finite(a, limit: float):
    """A copy of ``a`` with finite values beyond ±``limit`` set to ±``limit`` rounded to ``a``'s own dtype (as
    torch's ``clamp`` on a tensor of that dtype does: 65504 is 65536 in bf16); infinities and NaNs stay."""
    import numpy as np

    w = widen(a)
    fin = np.isfinite(w)
    src = from_numpy(a.dtype)
    lim = cast(np.array([limit, -limit], dtype=np.float64 if src == "F64" else np.float32), src)
    bound = limit_in(src, limit)
    out = np.array(a, copy=True)
    out[fin & (w > bound)] = lim[0]
    out[fin & (w < -bound)] = lim[1]
    return out
