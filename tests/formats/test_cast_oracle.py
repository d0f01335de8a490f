"""numpy casts against torch, the oracle: ``formats.cast.cast`` must give the bytes of ``Tensor.to(dtype)`` for every
source/target pair over random values and every special (±0, subnormals, largest finite, the rounding boundary
past it, overflow, ±inf, NaNs with signs and payloads), every bit pattern of the 8- and 16-bit dtypes; precision's
range check/clamp, the position-id repair and the fingerprint digests must equal what their torch versions (kept
here verbatim as the oracle) gave; ``as_tensor``/``as_array`` move every dtype without copying.

torch's own NaN bits depend on where a NaN sits in the tensor: its vectorised loop body and its scalar tail (the
last ``n % 16`` elements of each thread's share) differ (fp64 -> bf16: 0xFFFF in the body, 0x7FC0 in the tail).
``cast`` gives the body's bits everywhere, so the oracle runs torch on blocks of ``BLOCK`` elements: one thread
(under the grain size), no tail (a multiple of the vector width)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from ckptlab.formats import cast as cast_mod
from ckptlab.formats.arrays import as_array, as_tensor
from ckptlab.formats.cast import cast
from ckptlab.formats.dtypes import DTYPES, to_numpy, to_torch

FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
EXOTIC = ["F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"]  # read only (fingerprints widen them)
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(UINT[a.dtype.itemsize])


def torch_bits(t: torch.Tensor) -> np.ndarray:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints).numpy().view(UINT[t.element_size()])


BLOCK = 4096


def torch_to_bits(a: np.ndarray, target: str) -> np.ndarray:
    """The bits of ``torch.from_numpy(a).to(target)``, computed ``BLOCK`` elements at a time (see the docstring)."""
    flat = np.ascontiguousarray(a).reshape(-1)
    n = flat.size
    padded = np.concatenate([flat, np.zeros(-n % BLOCK, dtype=a.dtype)])
    out = [torch_bits(as_tensor(padded[i:i + BLOCK]).to(to_torch(target))) for i in range(0, padded.size, BLOCK)]
    return np.concatenate(out)[:n].reshape(a.shape) if out else np.empty(a.shape, UINT[to_numpy(target).itemsize])


F32_SPECIALS = [
    0x00000000, 0x80000000,  # ±0
    0x00000001, 0x80000001, 0x007FFFFF, 0x00400000,  # fp32 subnormals
    0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,  # smallest normal, ±largest finite
    0x7F800000, 0xFF800000,  # ±inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FA00000, 0x7FFFFFFF, 0x7FC00001, 0xFFBFFFFF,  # NaNs
    0x33800000, 0x33000000, 0x33800001, 0x387FC000, 0x38800000,  # fp16 subnormal boundaries (2^-24, 2^-25 ...)
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # fp16 max 65504, its rounding edge, overflow
    0x43E00000, 0x43E7FFFF, 0x43E80000, 0x43EFFFFF, 0x43F00000, 0x43F00001, 0x44000000,  # e4m3fn 448 .. 480 ..
    0x47600000, 0x476FFFFF, 0x47700000, 0x47800000,  # e5m2 57344, its rounding edge 61440, 65536
    0x3B000000, 0x3A800000, 0x3B100000, 0x3C000000,  # fp8 subnormal boundaries
    0x3F808000, 0x3F818000, 0x3F800001, 0x3F80FFFF, 0x3F817FFF,  # bf16 ties to even / just off them
]


def f32_values(n: int = 200_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(n).astype(np.float32)
    with np.errstate(over="ignore"):  # overflow to inf is one of the cases
        scaled = (normal * np.float32(2.0) ** rng.integers(-140, 128, n).astype(np.float32)).astype(np.float32)
    patterns = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array(F32_SPECIALS, dtype=np.uint32).view(np.float32)
    return np.concatenate([specials, -specials, normal, scaled, patterns])


def source_values(src: str) -> np.ndarray:
    """Every bit pattern of the 8/16-bit dtypes; random values and specials for fp32/fp64."""
    dt = to_numpy(src)
    if dt.itemsize <= 2:
        return np.arange(2 ** (8 * dt.itemsize), dtype=np.uint32).astype(UINT[dt.itemsize]).view(dt)
    f = f32_values()
    if src == "F32":
        return f
    rng = np.random.default_rng(1)
    with np.errstate(all="ignore"):
        wide = f.astype(np.float64)
    doubles = rng.integers(0, 2**64, 200_000, dtype=np.uint64).view(np.float64)
    # values an fp32 step in between would round differently: fp64 -> fp16 / bf16 / fp8 rounds twice in torch
    twice = np.array([1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, 1 + 2**-4 + 2**-40, 1 + 2**-3 + 2**-40,
                      65504 + 16 + 2**-20, 448 + 16 + 2**-30, 2**-24 * 1.5 + 2**-60, 1e300, 1e-300, 5e-324],
                     dtype=np.float64)
    nans = np.array([0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF8000020000000,
                     0x7FFFFFFFFFFFFFFF], dtype=np.uint64).view(np.float64)
    return np.concatenate([wide, doubles, twice, -twice, nans])


@pytest.mark.parametrize("target", FLOATS)
@pytest.mark.parametrize("src", FLOATS + EXOTIC)
def test_cast_gives_the_bytes_of_torch_to(src, target):
    a = source_values(src)
    want = torch_to_bits(a, target)
    got = bits(cast(a, target))
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(int(bits(a)[i])), hex(int(got[i])), hex(int(want[i]))) for i in bad[:8]]


@pytest.mark.parametrize("target", ["F16", "BF16", "F8_E4M3"])
def test_cast_in_chunks_and_of_strided_arrays(monkeypatch, target):
    monkeypatch.setattr(cast_mod, "CHUNK", 1000)  # many chunks, the last one short
    a = f32_values(5_000, seed=3)[: 4 * 3 * 617].reshape(4, 3, 617)
    view = a[:, ::2, ::-1]  # not contiguous, negative stride
    for x in (a, view, a[0, 0, 5]):
        want = torch_to_bits(x, target)
        got = cast(x, target)
        assert got.shape == x.shape
        assert np.array_equal(bits(got).reshape(-1), want.reshape(-1))


# ---------------------------------------------------------------------------------------------------------------
# precision's produce (range check, clamp) and the position-id repair against their torch implementations


def torch_cast_item(t: torch.Tensor, target: str, clamp: bool, limits=None):
    """The torch implementation precision.cast_item had (verbatim but for the error type)."""
    from ckptlab.ops.precision import LIMITS

    limit = (limits or LIMITS).get(target)
    if limit is not None and t.dtype.is_floating_point and t.numel():
        fp8 = t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if fp8:
            # torch has no abs/compare/clamp for fp8 (the torch-era code failed with an internal error here): the
            # same steps on the exact fp32 values, with the limit rounded to the fp8 dtype as torch rounds a scalar
            src_dtype, t = t.dtype, t.float()
            limit = float(torch.tensor(limit).to(src_dtype).float())
        over = (t.abs() > limit) & t.isfinite()
        n = int(over.sum())
        if n:
            if not clamp:
                peak = float(t.abs().masked_fill(~t.isfinite(), 0).max())
                return ("refused", n, peak)
            t = torch.where(t.isfinite(), t.clamp(-limit, limit), t)
        if fp8:
            t = t.to(src_dtype)
    return t.to(to_torch(target))


def numpy_cast_item(a: np.ndarray, target: str, clamp: bool):
    from ckptlab.formats.base import TensorInfo
    from ckptlab.ops.precision import OverflowRefused, cast_item
    from ckptlab.ops.stream import Out

    item = Out("k", TensorInfo("F32", a.shape), produce=lambda: a)
    try:
        return cast_item(item, target, clamp).produce()
    except OverflowRefused as e:
        return e


@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("target", ["F16", "BF16", "F32", "F8_E4M3"])
@pytest.mark.parametrize("src", FLOATS)
def test_precision_range_check_and_clamp_match_torch(src, target, clamp):
    rng = np.random.default_rng(7)
    specials = np.array([0.0, -0.0, 448, 449, 464, 480, 65504, 65520, 65536, 70000, 1e6, 3e38,
                         np.inf, -np.inf, np.nan, -np.nan, 1e-40], dtype=np.float32)
    base = np.concatenate([specials, -specials, rng.standard_normal(BLOCK - 2 * specials.size).astype(np.float32) * 100])
    tame = np.where(np.isfinite(base) & (np.abs(base) <= 400), base, np.float32(1.0))
    for values in (base, tame):  # with and without overflow; BLOCK elements (one torch call, no tail)
        a = cast(values, src)
        want = torch_cast_item(as_tensor(a), target, clamp)
        got = numpy_cast_item(a, target, clamp)
        if isinstance(want, tuple):
            assert not isinstance(got, np.ndarray), (src, target, "torch refused, numpy wrote")
            assert f"{want[1]} value(s)" in str(got) and f"largest |x| = {want[2]:g} " in str(got)
        else:
            assert isinstance(got, np.ndarray), str(got)
            assert np.array_equal(bits(got), torch_bits(want))


def test_bf16_65536_is_not_above_the_fp16_limit_as_in_torch():
    """torch compares a bf16 tensor with 65504 rounded to bf16 (65536): that value is not refused and becomes inf
    in fp16. Kept as it was (byte-identical to the torch path), and pinned here so a change is deliberate."""
    a = np.array([65536.0, 1.0], dtype=np.float32).astype(ml_dtypes.bfloat16)
    got = numpy_cast_item(a, "F16", clamp=False)
    assert isinstance(got, np.ndarray) and np.isinf(got[0].astype(np.float32))


@pytest.mark.parametrize("src", ["F64", "F32", "F16", "BF16"])
def test_position_ids_repair_matches_torch(src):
    from ckptlab.formats.base import TensorInfo, TensorSource
    from ckptlab.ops.precision import position_ids_out

    values = np.array([0, 1, 2.5, 3.5, 75.9975, 76.0001, -0.5, 1e10, np.inf, -np.inf, np.nan], dtype=np.float64)
    a = cast(values, src)

    class One(TensorSource):
        def infos(self):
            return {"p": TensorInfo(src, a.shape)}

        def array(self, key):
            return a

    out = position_ids_out("p", One("x"), "p", []).produce()
    want = as_tensor(a).to(torch.float64).round().to(torch.int64).numpy()
    assert out.dtype == np.int64 and np.array_equal(out, want)


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def torch_tensor_digest(t: torch.Tensor, bf16: bool = False) -> str:
    """The torch implementation of library.fingerprint._tensor_digest (verbatim)."""
    import blake3

    t = t.detach()
    if t.is_floating_point():
        t = t.to(torch.bfloat16 if bf16 else torch.float16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    elif t.is_complex():
        t = torch.view_as_real(t).to(torch.float16)
    else:
        t = t.to(torch.int64)
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return blake3.blake3(b"").hexdigest()
    return blake3.blake3(t.view(torch.uint8).numpy()).hexdigest()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_fingerprint_digest_matches_the_torch_digest(dtype):
    from ckptlab.library.fingerprint import _tensor_digest

    dt = to_numpy(dtype)
    rng = np.random.default_rng(11)
    if dtype in FLOATS + EXOTIC:
        arrays = [source_values(dtype)[:65_536]]  # two thread shares of 32768: no tail (module docstring)
    else:
        raw = rng.integers(0, 256, 4096 * dt.itemsize, dtype=np.uint16).astype(np.uint8)
        arrays = [raw.view(np.uint8).astype(bool) if dtype == "BOOL" else raw.view(dt)]
    if dtype == "C64":
        arrays = [source_values("F32")[:65_536].view(np.complex64)]
    arrays += [np.empty((0, 3), dtype=dt), arrays[0][:8].reshape(2, 4)[:, ::2]]  # empty, strided (no NaN: tail)
    for a in arrays:
        for flag in (False, True):
            assert _tensor_digest(a, bf16=flag) == torch_tensor_digest(as_tensor(a), bf16=flag), (dtype, a.shape)
            assert _tensor_digest(as_tensor(a), bf16=flag) == torch_tensor_digest(as_tensor(a), bf16=flag)


# ---------------------------------------------------------------------------------------------------------------
# numpy <-> torch without copies


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_as_tensor_and_as_array_share_memory_for_every_dtype(dtype):
    dt = to_numpy(dtype)
    raw = np.arange(24 * dt.itemsize, dtype=np.uint16).astype(np.uint8)
    a = (raw % 2).astype(bool).reshape(2, 3, 4) if dtype == "BOOL" else raw.view(dt).reshape(2, 3, 4)
    t = as_tensor(a)
    assert t.dtype == to_torch(dtype) and tuple(t.shape) == (2, 3, 4)
    assert t.data_ptr() == a.ctypes.data  # zero-copy
    back = as_array(t)
    assert back.dtype == dt and np.shares_memory(back, a)
    assert bits(back).tobytes() == bits(a).tobytes()
    s = as_tensor(a[:, 1:, ::2])  # strided view: still shared
    assert s.data_ptr() == a[:, 1:, ::2].ctypes.data and bits(as_array(s)).tobytes() == bits(a[:, 1:, ::2]).tobytes()
    assert tuple(as_tensor(a[0, 0, 0]).shape) == () and as_array(as_tensor(a[0, 0, 0])).shape == ()
    e = as_tensor(np.empty((0, 5), dtype=dt))
    assert tuple(e.shape) == (0, 5) and e.dtype == to_torch(dtype)
