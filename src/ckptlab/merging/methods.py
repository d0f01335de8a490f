"""Merge methods: a registry of small pure functions on tensors with declared parameters.

Each method gets its input tensors (already on the merge device, in the merge dtype), a dict of
scalar parameters already resolved for the key (block weights applied) and a ``KeyContext``; it
returns the merged tensor. How the engine may cut a tensor into pieces to keep memory small:

- ``elementwise``: any row slices (a piece's ``KeyContext.part`` seeds its random numbers);
- ``prepare``: a first streaming pass over the pieces computes per-tensor scalars (slerp's norms, the
  TIES trim thresholds), added to the parameters as ``_name`` entries; then the method is elementwise;
- ``split="rows"`` / ``"cols"``: for tensors of 2+ dimensions the result is independent along dim 0 /
  dim 1 (the reduction runs along the other axes); 0- and 1-d tensors are computed whole.

The rest see whole tensors. ``output`` is ``"weight"`` for a model and ``"delta"`` for a difference
(``subtract``, ``extract``).

Conventions: A is the first input. ``add_difference``/``train_difference``: A + (B - C) scaled; ``ties``,
``dare`` and ``extract``: A is the common base the other inputs were fine-tuned from.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from ckptlab.errors import MethodError


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    help: str
    per_block: bool = True  # may take block weights
    lo: float | None = None  # allowed range; every value must also be finite
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed

    def range_text(self) -> str:
        left = "-inf" if self.lo is None else f"{self.lo:g}"
        right = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo is None or self.lo_open else '['}{left}, {right}{')' if self.hi is None else ']'}"

    def check(self, value: float, where: str = "") -> None:
        """Raise ``MethodError`` (one line) unless ``value`` is finite and in range; ``where`` names the
        step/block for the message."""
        import math

        v = float(value)
        bad = not math.isfinite(v)
        bad = bad or (self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo))
        bad = bad or (self.hi is not None and v > self.hi)
        if bad:
            raise MethodError(f"{where}--{self.name} {v:g} is outside {self.range_text()} ({self.help})")


@dataclass(frozen=True)
class KeyContext:
    key: str
    seed: int
    part: int = 0  # the first row of the piece being computed (0 for a whole tensor)

    def generator(self):
        """A CPU generator seeded from (seed, key, part): the same numbers whatever the thread order."""
        import torch

        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.key.encode()) + self.part * 7_919) % (2**63))
        return g


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    min_inputs: int
    max_inputs: int
    params: tuple[Param, ...]
    help: str
    elementwise: bool = True
    prepare: Callable | None = None  # (pieces, numel, params, ctx) -> {"_name": float}; see the module doc
    split: str = ""  # "rows" or "cols": see the module doc
    output: str = "weight"
    a1111_name: str = ""
    aliases: tuple[str, ...] = field(default=())

    def defaults(self) -> dict[str, float]:
        return {p.name: p.default for p in self.params}


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    for a in method.aliases:
        _ALIASES[a] = method.name
    return method


def get_method(name: str) -> Method:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    try:
        return METHODS[key]
    except KeyError:
        raise MethodError(f"unknown merge method {name!r}; choose one of {', '.join(sorted(METHODS))}") from None


_ALPHA = Param("alpha", 0.5, "weight of B (0 = A, 1 = B)")


# -- the methods -----------------------------------------------------------------------------------
def weighted_sum(xs, p, ctx):
    import torch

    a, b = xs
    return torch.lerp(a, b, p["alpha"])  # A*(1-alpha) + B*alpha


def add_difference(xs, p, ctx):
    """A + (B - C)*alpha with one fused multiply-add (the same rounding as sd-mecha's addcmul)."""
    import torch

    if len(xs) == 2:  # B is already a difference (e.g. written by `extract`/`subtract`)
        a, d = xs
    else:
        a, b, c = xs
        d = b - c
    return torch.addcmul(a, d, torch.tensor(p["alpha"], dtype=d.dtype, device=d.device))


def triple_sum(xs, p, ctx):
    a, b, c = xs
    return a * (1.0 - p["alpha"] - p["beta"]) + b * p["alpha"] + c * p["beta"]


def sum_twice(xs, p, ctx):
    import torch

    a, b, c = xs
    return torch.lerp(torch.lerp(a, b, p["alpha"]), c, p["beta"])


def _slerp_stats(pieces, numel, p, ctx) -> dict[str, float]:
    """Norms of A and B and their dot product, accumulated piece by piece in float64."""
    na2 = nb2 = dot = 0.0
    for a, b in pieces():
        a64, b64 = a.double(), b.double()
        na2 += float((a64 * a64).sum())
        nb2 += float((b64 * b64).sum())
        dot += float((a64 * b64).sum())
    return {"_na": na2 ** 0.5, "_nb": nb2 ** 0.5, "_dot": dot}


def slerp(xs, p, ctx):
    """Spherical interpolation of the flattened tensors; magnitude interpolated linearly. Falls back
    to a linear blend when the tensors are (anti)parallel or zero. Norms and dot product come from
    ``prepare`` (the whole tensor), so each piece is a blend with two scalar weights."""
    import math

    import torch

    a, b = xs
    t = p["alpha"]
    if "_na" not in p:
        p = {**p, **_slerp_stats(lambda: [xs], a.numel(), p, ctx)}
    na, nb = p["_na"], p["_nb"]
    if na == 0.0 or nb == 0.0:
        return torch.lerp(a, b, t)
    cos = min(max(p["_dot"] / (na * nb), -1.0), 1.0)
    if abs(cos) > 0.9995:
        return torch.lerp(a, b, t)
    omega = math.acos(cos)
    so = math.sin(omega)
    scale = na * (1.0 - t) + nb * t
    return torch.add(a * (math.sin((1.0 - t) * omega) / so * scale / na), b,
                     alpha=math.sin(t * omega) / so * scale / nb)


def train_difference(xs, p, ctx):
    """A + (B - C) * 1.8 * alpha * |B - A| / (|B - A| + |B - C|) (supermerger trainDifference)."""
    import torch

    a, b, c = xs
    diff = b - c
    dist_a = (b - a).abs()
    total = dist_a + diff.abs()
    scale = torch.where(total != 0, dist_a / total, torch.zeros_like(total))
    return a + diff * scale * (1.8 * p["alpha"])


def _kth_smallest(values, k: int) -> float:
    """The k-th smallest (1-based) of a tensor of non-negative floats."""
    return float(values.flatten().kthvalue(k).values)


def _radix_kth_abs(pieces, which: int, k: int) -> float:
    """The k-th smallest |X_which - X_0| over all pieces (see ``_radix_kth_abs_many``)."""
    return _radix_kth_abs_many(pieces, {which: k})[which]


def _radix_kth_abs_many(pieces, ks: dict[int, int]) -> dict[int, float]:
    """For each ``which: k``, the k-th smallest |X_which - X_0| over all pieces, exactly, without holding
    the whole tensor: non-negative floats order like their bit patterns, so a few histogram passes over
    the pieces (16 bits at a time: two passes for float32) narrow the pattern down, as a radix select
    does. All task vectors share each pass, so every piece is converted once per pass."""
    import torch

    state = {i: [0, k] for i, k in ks.items()}  # i -> [prefix (the top `known` bits), k left]
    known = 0
    total_bits = dtype = ibits = None
    while total_bits is None or known < total_bits:
        hists: dict[int, object] = {}
        width = 16
        for xs in pieces():
            for i in ks:
                d = (xs[i] - xs[0]).abs()
                if total_bits is None:
                    dtype, ibits = d.dtype, {2: torch.int16, 4: torch.int32, 8: torch.int64}[d.element_size()]
                    total_bits = d.element_size() * 8 - 1  # the sign bit of |d| is 0
                width = min(16, total_bits - known)
                u = d.flatten().view(ibits).to(torch.int64)
                low = total_bits - known - width  # bits below this pass's window
                if known:
                    u = u[(u >> (total_bits - known)) == state[i][0]]
                h = torch.bincount((u >> low) & ((1 << width) - 1), minlength=1 << width)
                hists[i] = h if i not in hists else hists[i] + h
        if not hists:
            raise ValueError("no values")
        for i, hist in hists.items():
            csum = torch.cumsum(hist, 0)
            k = state[i][1]
            b = int(torch.searchsorted(csum, torch.tensor([k], dtype=csum.dtype, device=csum.device))[0])
            state[i] = [(state[i][0] << width) | b, k - (int(csum[b - 1]) if b else 0)]
        known += width
    return {i: float(torch.tensor([st[0]], dtype=torch.int64).to(ibits).view(dtype)) for i, st in state.items()}


#: up to this many elements a task vector's magnitudes are gathered whole for ``kthvalue`` (16 MiB in
#: float32); bigger tensors use the radix select over pieces
KTH_WHOLE_MAX = 4 << 20


def _ties_thresholds(pieces, numel, p, ctx) -> dict[str, float]:
    """Each task vector's trim threshold: the ``(1 - density)`` quantile of its magnitudes (``_t1``...)."""
    import torch

    density = p["density"]
    first = next(iter(pieces()))
    n = len(first)
    if density >= 1.0:
        return {f"_t{i}": float("-inf") for i in range(1, n)}
    k = max(int((1.0 - density) * numel), 1)
    if first[0].numel() == numel:  # one piece: the whole tensor is here already
        return {f"_t{i}": _kth_smallest((first[i] - first[0]).abs(), k) for i in range(1, n)}
    if numel <= KTH_WHOLE_MAX:  # gather every task vector's magnitudes in one pass over the pieces
        mags: dict[int, list] = {i: [] for i in range(1, n)}
        for xs in pieces():
            for i in mags:
                mags[i].append((xs[i] - xs[0]).abs().flatten())
        out = {}
        for i in list(mags):
            out[f"_t{i}"] = _kth_smallest(torch.cat(mags.pop(i)), k)
        return out
    found = _radix_kth_abs_many(pieces, {i: k for i in range(1, n)})
    return {f"_t{i}": v for i, v in found.items()}


def ties(xs, p, ctx):
    """TIES-merging: task vectors M_i - A; keep each one's top ``density`` magnitudes (trim; the
    thresholds come from ``prepare`` over the whole tensor), elect the sign of the summed trimmed
    vectors, average the entries that agree with it (disjoint mean); A + alpha * merged."""
    import torch

    base = xs[0]
    if "_t1" not in p:
        p = {**p, **_ties_thresholds(lambda: [xs], base.numel(), p, ctx)}
    deltas = []
    for i, x in enumerate(xs[1:], start=1):
        d = x - base
        t = p[f"_t{i}"]
        if t > float("-inf"):  # trim: keep |d| >= t. sign(|d| - t) + 1, capped at 1, is that mask as
            keep = d.abs().sub_(t).sign_().add_(1).clamp_(max=1)  # floats (5x faster than a bool mask)
            d.mul_(keep)
        deltas.append(d)
    sign = deltas[0].clone()
    for d in deltas[1:]:
        sign.add_(d)
    sign.sign_()  # the elected sign (0 where the trimmed vectors cancel)
    # d agrees when d * sign > 0; then d = sign * (d * sign), so the disjoint sum is sign * sum(relu(d * sign))
    # and the count is sum(sign(relu(d * sign))): float ops only (bool masks are several times slower)
    num = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for d in deltas:
        pos = d.mul_(sign).clamp_(min=0)
        num.add_(pos)
        count.add_(pos.sign_())
    return base + num.mul_(sign).div_(count.clamp_(min=1)) * p["alpha"]


def dare(xs, p, ctx):
    """DARE: each task vector M_i - A keeps an element with probability ``density`` (seeded by --seed, the
    key and the piece), kept elements are rescaled by 1/density; A + alpha * mean of the results."""
    import torch

    base = xs[0]
    density = p["density"]
    g = ctx.generator()
    total = torch.zeros_like(base)
    for x in xs[1:]:
        keep = torch.rand(base.shape, generator=g, dtype=torch.float32).to(base.device) < density
        total += (x - base) * keep / max(density, 1e-12)
    return base + total * (p["alpha"] / (len(xs) - 1))


def add_cosine(xs, p, ctx):
    """sd-mecha's add_cosine_a / supermerger cosineA: blend factor per output row from the cosine
    similarity of A and B along dim 0: k = 1 - clamp(sim - alpha, 0, 1); lerp(A, B, k)."""
    import torch
    import torch.nn.functional as F

    a, b = xs
    if a.dim() == 0:
        return torch.lerp(a, b, 1.0 - min(max(1.0 - p["alpha"], 0.0), 1.0))
    an = F.normalize(a, dim=0)
    bn = F.normalize(b, dim=0)
    sim = F.cosine_similarity(an, bn, dim=0)
    k = 1.0 - torch.clamp(sim - p["alpha"], 0.0, 1.0)
    return torch.lerp(a, b, k)


def subtract(xs, p, ctx):
    """The difference A - B (times alpha): a file you can add to another model with add_difference."""
    a, b = xs
    return (a - b) * p["alpha"]


def extract(xs, p, ctx):
    """supermerger's extract: with base A, d1 = B - A, d2 = C - A, c = cos(d1, d2) along the last dim,
    s = ((c + 1) / 2) ** gamma; difference = lerp(d1, d2, alpha) * lerp(s, 1 - s, beta).
    beta = 0 keeps what B and C share, beta = 1 what differs. Writes the difference (no base added)."""
    import torch
    import torch.nn.functional as F

    base, b, c = xs
    d1, d2 = b - base, c - base
    if d1.dim() == 0:
        cos = torch.sign(d1 * d2)
    else:
        cos = F.cosine_similarity(d1, d2, dim=-1).clamp(-1.0, 1.0).unsqueeze(-1)
    s = ((cos + 1.0) / 2.0) ** p["gamma"]
    return torch.lerp(d1, d2, p["alpha"]) * torch.lerp(s, 1.0 - s, p["beta"])


register(Method("weighted_sum", weighted_sum, 2, 2, (_ALPHA,), "A*(1-alpha) + B*alpha",
                a1111_name="Weighted sum", aliases=("ws", "weight_sum")))
register(Method("add_difference", add_difference, 2, 3, (Param("alpha", 1.0, "scale of the difference"),),
                "A + (B - C)*alpha  (with 2 inputs: A + B*alpha, B a difference file)",
                a1111_name="Add difference", aliases=("ad", "add_diff")))
register(Method("triple_sum", triple_sum, 3, 3,
                (Param("alpha", 0.33, "weight of B"), Param("beta", 0.33, "weight of C")),
                "A*(1-alpha-beta) + B*alpha + C*beta", a1111_name="Triple sum", aliases=("trs",)))
register(Method("sum_twice", sum_twice, 3, 3,
                (Param("alpha", 0.5, "weight of B in the first sum"), Param("beta", 0.5, "weight of C")),
                "(A*(1-alpha) + B*alpha)*(1-beta) + C*beta", a1111_name="sum Twice", aliases=("st",)))
register(Method("slerp", slerp, 2, 2, (_ALPHA,), "spherical interpolation A -> B", elementwise=False,
                prepare=_slerp_stats))
register(Method("train_difference", train_difference, 3, 3, (Param("alpha", 1.0, "strength"),),
                "A + (B - C)*1.8*alpha*|B-A|/(|B-A|+|B-C|)", aliases=("td", "traindiff")))
register(Method("ties", ties, 2, 8,
                (Param("alpha", 1.0, "scale of the merged task vector"),
                 Param("density", 0.2, "fraction of each task vector kept (top magnitudes)", lo=0.0, hi=1.0,
                       lo_open=True)),
                "A + alpha*TIES(B-A, C-A, ...)", elementwise=False, prepare=_ties_thresholds,
                aliases=("ties_merging",)))
register(Method("dare", dare, 2, 8,
                (Param("alpha", 1.0, "scale of the merged task vector"),
                 Param("density", 0.5, "probability each difference element is kept", lo=0.0, hi=1.0,
                       lo_open=True)),
                "A + alpha*mean(drop-and-rescale(B-A), ...), seeded"))
register(Method("add_cosine", add_cosine, 2, 2, (Param("alpha", 0.5, "similarity threshold"),),
                "lerp(A, B, 1-clamp(cos(A,B)-alpha, 0, 1)) per row", elementwise=False, split="cols",
                aliases=("cosine", "add_cosine_a")))
register(Method("subtract", subtract, 2, 2, (Param("alpha", 1.0, "scale"),), "(A - B)*alpha  -> difference file",
                output="delta", aliases=("sub", "difference")))
register(Method("extract", extract, 3, 3,
                (Param("alpha", 0.5, "blend of B-A vs C-A"), Param("beta", 0.0, "0 = shared, 1 = different"),
                 Param("gamma", 1.0, "sharpness of the similarity mask", per_block=False, lo=0.0)),
                "supermerger extract on base A -> difference file", elementwise=False, split="rows",
                output="delta"))
