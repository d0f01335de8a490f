"""SVD and rank helpers shared by ``lora extract``, ``lora resize`` and ``lora merge --rank`` (docs/lora.md).

- ``top_svd(mat, rank)``: the top ``rank`` singular triplets of a matrix. Randomised (Halko et al.: a seeded
  Gaussian sketch with ``OVERSAMPLE`` extra columns and ``POWER_ITERS`` power iterations, the algorithm of
  ``torch.svd_lowrank``) where that is as accurate as the full SVD for the rank asked - a large matrix
  (``min(out, in) ≥ RANDOMISED_MIN_DIM``) and a rank well below its smaller side (sketch width ≤ ¼ of it);
  the full ``torch.linalg.svd`` otherwise. Measured on Gaussian (flat spectrum, the worst case) and 1/k-decay
  matrices of 320…2560 columns: randomised error ≤ 0.45 % above the Eckart–Young optimum at ranks 4…64.
  The sketch is seeded, so the same inputs give the same bytes.
- ``product_svd(up, down)``: the SVD of ``up @ down`` (rank r) without forming it, exact: two thin QRs and the
  SVD of an r×r core (resize and merge work on products of factors).
- ``dynamic_rank(S, method, value, cap)``: kohya ``resize_lora.py`` rank rules (``sv_ratio``, ``sv_cumulative``,
  ``sv_fro``: first index meeting the rule, +1, capped; a zero matrix ⇒ rank 1).
- ``split(U, S, Vh)``: kohya's split, all singular values on ``up`` (``up = U·diag(S)``, ``down = Vh``), so the
  files we write factor like kohya's ``extract_lora_from_models.py`` / ``resize_lora.py`` output.
"""

from __future__ import annotations

from ckptlab.errors import UsageError
from ckptlab.formats.arrays import import_torch

#: smallest ``min(out, in)`` where the randomised SVD is used
RANDOMISED_MIN_DIM = 256
#: extra sketch columns: ``max(OVERSAMPLE, rank // 2)``
OVERSAMPLE = 10
#: power (subspace) iterations of the randomised SVD (2 gave up to 1.4 % excess error on flat spectra, 4 ≤ 0.45 %)
POWER_ITERS = 4
#: seed of the Gaussian sketch (deterministic output)
SEED = 0
#: a matrix whose largest singular value is at most this is "zero" (kohya ``resize_lora.py``: rank 1)
ZERO_SV = 1e-6
DYNAMIC_METHODS = ("sv_ratio", "sv_cumulative", "sv_fro")


def as_matrix(d):
    """``d`` as the 2-D matrix the SVD works on: ``[out, in·kh·kw]`` (a 1×1 conv is ``[out, in]``)."""
    return d.reshape(d.shape[0], -1)


def sketch_width(rank: int, n: int) -> int:
    return min(n, rank + max(OVERSAMPLE, rank // 2))


def use_randomised(shape: tuple[int, int], rank: int) -> bool:
    """The randomised SVD is used for a fixed rank of a large matrix when the sketch is at most ¼ of its
    smaller side (there it is within 0.5 % of the optimum and 10-50× faster on CPU); dynamic ranks need the
    whole spectrum and always use the full SVD."""
    n = min(shape)
    return n >= RANDOMISED_MIN_DIM and 4 * sketch_width(rank, n) <= n


#: LAPACK calls on matrices up to this many elements run on one thread: threads only add synchronisation there
#: (a 32×288 SVD took 150 ms on 2 busy threads and 1.5 ms on one)
SMALL_NUMEL = 1 << 16


class _one_thread:
    """Run a small LAPACK call on one torch thread (the thread count is restored afterwards)."""

    def __init__(self, numel: int):
        self.numel = numel
        self.saved = None

    def __enter__(self):
        torch = import_torch("LoRA SVD")
        if self.numel <= SMALL_NUMEL and torch.get_num_threads() > 1:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.saved is not None:
            import_torch("LoRA SVD").set_num_threads(self.saved)


def full_svd(mat):
    """``U, S, Vh`` of ``mat`` (fp32, thin)."""
    torch = import_torch("LoRA SVD")
    with _one_thread(mat.numel()):
        return torch.linalg.svd(mat.to(torch.float32), full_matrices=False)


def svdvals(mat):
    """Singular values of ``mat`` (fp32)."""
    torch = import_torch("LoRA SVD")
    with _one_thread(mat.numel()):
        return torch.linalg.svdvals(mat.to(torch.float32))


def randomised_svd(mat, rank: int, *, niter: int = POWER_ITERS, seed: int = SEED):
    """Approximate top-``rank`` ``U, S, Vh`` of ``mat`` (Halko–Martinsson–Tropp range finder with power
    iterations, re-orthonormalised by QR at each step like ``torch.svd_lowrank``; seeded sketch)."""
    torch = import_torch("LoRA SVD")
    a = mat.to(torch.float32)
    m, n = a.shape
    q = sketch_width(rank, min(m, n))
    gen = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=a.device, dtype=a.dtype)
    y = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        z = torch.linalg.qr(a.T @ y).Q
        y = torch.linalg.qr(a @ z).Q
    b = y.T @ a  # [q, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = y @ ub
    return u[:, :rank], s[:rank], vh[:rank]


def top_svd(mat, rank: int, *, method: str = "auto"):
    """``(U[:, :k], S[:k], Vh[:k], method)``, ``k = min(rank, out, in)``; ``method`` ``auto`` / ``full`` /
    ``randomised`` (the one used is returned)."""
    k = min(rank, *mat.shape)
    if method == "auto":
        method = "randomised" if use_randomised(tuple(mat.shape), k) else "full"
    if method == "randomised":
        u, s, vh = randomised_svd(mat, k)
        return u, s, vh, method
    u, s, vh = full_svd(mat)
    return u[:, :k], s[:k], vh[:k], method


def product_svd(up2d, down2d):
    """Exact thin SVD of ``up2d @ down2d`` (``[out, r] @ [r, in]``) from ``up = Qu·Ru``, ``downᵀ = Qd·Rd``:
    ``up @ down = Qu (Ru Rdᵀ) Qdᵀ`` and the SVD of the r×r core. Returns ``U, S, Vh`` with r columns."""
    torch = import_torch("LoRA SVD")
    up = up2d.to(torch.float32)
    down = down2d.to(torch.float32)
    with _one_thread(max(up.numel(), down.numel())):
        qu, ru = torch.linalg.qr(up)
        qd, rd = torch.linalg.qr(down.T)
        uc, s, vhc = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    return qu @ uc, s, vhc @ qd.T


def dynamic_rank(s, method: str, value: float, cap: int | None = None, *, full_len: int | None = None) -> int:
    """kohya ``resize_lora.py`` ``rank_resize`` exactly: an index ``i`` - ``sv_ratio``: #(S > S₀/value);
    ``sv_cumulative``: ``searchsorted(cumsum(S)/ΣS, value) + 1``; ``sv_fro``:
    ``searchsorted(cumsum(S²)/ΣS², value²) + 1`` - clamped to ``[1, full_len − 1]`` (``full_len`` = the number of
    singular values of the whole matrix, ``min(out, in)``), then rank ``i + 1``, capped by ``cap`` (``--rank``);
    S₀ ≤ 1e-6 ⇒ 1. One deviation: the rank is also capped by ``len(s)`` (the rank of the input product), where
    kohya would pad with zero singular directions."""
    torch = import_torch("LoRA SVD")
    s = s.to(torch.float64)
    n = s.numel()
    full = full_len if full_len is not None else n
    if n == 0 or float(s[0]) <= ZERO_SV:
        return 1
    if method == "sv_ratio":
        i = int((s > s[0] / value).sum())
    elif method == "sv_cumulative":
        frac = torch.cumsum(s, 0) / s.sum()
        i = int(torch.searchsorted(frac, torch.tensor([value], dtype=frac.dtype)).item()) + 1
    elif method == "sv_fro":
        sq = s * s
        frac = torch.cumsum(sq, 0) / sq.sum()
        i = int(torch.searchsorted(frac, torch.tensor([value * value], dtype=frac.dtype)).item()) + 1
    else:
        raise UsageError(f"unknown rank method {method!r}; use one of {', '.join(DYNAMIC_METHODS)}")
    k = max(1, min(i, full - 1)) + 1
    if cap is not None:
        k = min(k, cap)
    return max(1, min(k, n))


def check_dynamic(method: str | None, value: float | None) -> None:
    """Usage checks of a dynamic rank value: ``sv_fro`` / ``sv_cumulative`` in (0, 1], ``sv_ratio`` ≥ 1."""
    if method is None:
        return
    if value is None or value != value:
        raise UsageError(f"--{method.replace('_', '-')} needs a number")
    if method in ("sv_fro", "sv_cumulative") and not 0 < value <= 1:
        raise UsageError(f"--{method.replace('_', '-')} must be in (0, 1], got {value:g}")
    if method == "sv_ratio" and not value >= 1:
        raise UsageError(f"--sv-ratio is max(S)/min kept S and must be ≥ 1, got {value:g}")


def check_rank(rank: int | None, what: str = "--rank") -> None:
    if rank is not None and rank < 1:
        raise UsageError(f"{what} must be a positive integer, got {rank}")


def split(u, s, vh):
    """kohya's factor split: ``up = U·diag(S)`` ``[out, k]``, ``down = Vh`` ``[k, in…]`` (2-D)."""
    return u * s.unsqueeze(0), vh


def retained(s_all, k: int) -> dict[str, float]:
    """kohya ``resize_lora.py --verbose`` numbers: share of ΣS and of the Frobenius norm kept by the first k
    singular values, and S₀/S_{k-1} (None when S_{k-1} is 0)."""
    torch = import_torch("LoRA SVD")
    s = s_all.to(torch.float64)
    total = float(s.sum())
    fro = float((s * s).sum())
    kept = s[:k]
    return {"sum_retained": float(kept.sum()) / total if total else 1.0,
            "fro_retained": (float((kept * kept).sum()) / fro) ** 0.5 if fro else 1.0,
            "max_ratio": float(s[0] / kept[-1]) if k and float(kept[-1]) else None}


def to_layout(up2d, down2d, out_shape: tuple[int, ...]):
    """Factors shaped for a weight of ``out_shape``: Linear ``[out, k]`` / ``[k, in]``; conv ``[out, k, 1, 1]`` /
    ``[k, in, kh, kw]`` (kohya ``extract_lora_from_models.py`` conv layout)."""
    k = down2d.shape[0]
    if len(out_shape) == 4:
        return up2d.reshape(out_shape[0], k, 1, 1), down2d.reshape(k, *out_shape[1:])
    return up2d, down2d


class Errors:
    """Accumulates ``‖ΔW − ΔŴ‖²`` and ``‖ΔW‖²`` over modules for the total relative Frobenius error."""

    def __init__(self) -> None:
        self.res = 0.0
        self.ref = 0.0

    def add(self, ref, approx) -> float | None:
        """Relative Frobenius error of one module (fp32 tensors of any same numel)."""
        torch = import_torch("LoRA SVD")
        a = ref.reshape(-1).to(torch.float64)
        b = approx.reshape(-1).to(torch.float64)
        res = float(torch.linalg.vector_norm(a - b)) ** 2
        nrm = float(torch.linalg.vector_norm(a)) ** 2
        self.res += res
        self.ref += nrm
        return (res / nrm) ** 0.5 if nrm else (0.0 if res == 0 else None)

    @property
    def total(self) -> float | None:
        """None when ΔW is zero everywhere but the approximation is not (no relative error exists)."""
        return (self.res / self.ref) ** 0.5 if self.ref else (0.0 if self.res == 0 else None)


# -- reading LoRA modules as factors (resize, merge) ------------------------------------------------------------

#: algorithms whose update depends on the base weight (not a ΔW that can be re-factored without the model)
NEEDS_BASE = ("norm", "oft", "boft", "ia3")
#: algorithms with an own ΔW that cannot be re-factored, with the reason
NOT_REFACTORED = {"glora": "GLoRA modules cannot be re-factored: LyCORIS and A1111/ComfyUI read a1/a2/b1/b2 in two "
                          "incompatible layouts"}


def is_plain(mod) -> bool:
    """A plain LoRA / LoCon module: ``up @ down`` with no CP mid and no DoRA magnitude."""
    return mod.algo == "lora" and "mid" not in mod.params and not mod.has_dora


def plain_factors(lora, mod):
    """``(up2d [out, r], down2d [r, in·kh·kw], weight shape)`` of a plain module (fp32); the weight shape is
    ``(out, in)`` for a 2-D ``down`` and ``(out, in, kh, kw)`` for a 4-D one."""
    torch = import_torch("LoRA SVD")
    _no_bias(lora, mod)
    up = lora.source.get(mod.params["up"]).to(torch.float32)
    down = lora.source.get(mod.params["down"]).to(torch.float32)
    r = down.shape[0]
    if up.shape[1] != r:
        from ckptlab.errors import MismatchError

        raise MismatchError(f"{mod.name}: lora_up has rank {up.shape[1]}, lora_down {r}", lora.path)
    shape = (up.shape[0], *down.shape[1:])
    return up.reshape(up.shape[0], -1), down.reshape(r, -1), shape


def module_delta(lora, mod):
    """ΔW of any module ``lora.maths.delta`` supports (scale applied), refusing what needs the base weight."""
    from ckptlab.errors import MismatchError
    from ckptlab.lora.maths import delta

    _no_bias(lora, mod)
    if mod.has_dora:
        raise MismatchError(f"{mod.name}: DoRA modules scale by the base weight's norm and cannot be re-factored "
                            "without the model", lora.path)
    if mod.algo in NEEDS_BASE:
        raise MismatchError(f"{mod.name}: {mod.algo} modules act on the base weight and have no ΔW of their own "
                            "to re-factor", lora.path)
    if mod.algo in NOT_REFACTORED:
        raise MismatchError(f"{mod.name}: {NOT_REFACTORED[mod.algo]}", lora.path)
    return delta(lora, mod, None)


def _no_bias(lora, mod) -> None:
    if "up_bias" in mod.params:
        from ckptlab.errors import MismatchError

        raise MismatchError(f"{mod.name}: the module has a lora_B bias, which a re-factored LoRA cannot carry",
                            lora.path)


def numerical_rank(s, shape) -> int:
    """The number of singular values above ``S₀ · max(out, in) · eps(fp32)`` (at least 1)."""
    torch = import_torch("LoRA SVD")
    if s.numel() == 0:
        return 1
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))
