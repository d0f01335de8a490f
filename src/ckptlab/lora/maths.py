"""The weight update of one LoRA / LyCORIS module, as the loaders apply it at inference (docs/lora.md,
lora.md §3.1, §3.7, adapters.md §4).

``delta(lora, mod, shape)`` is the additive ΔW of a LoRA/LoCon/CP, LoHa (+Tucker), LoKr (+Tucker) or full
``diff`` module: fp32, the module's scale α/r applied **once** (never LyCORIS 4.1.3's (α/r)² bake), the user's
multiplier not, reshaped to ``shape`` (A1111's rule: same element count; a 4-channel ΔW on a 9-channel inpaint
``conv_in`` is zero-padded on the input channels).

``apply(weight, patches)`` applies a list of ``(lora, module, multiplier)`` to one weight (fp32 torch tensor,
the target's slice when the model fuses q/k/v) in order and returns the new weight: additive algorithms add
``m·ΔW``; DoRA re-normalises ``W + ΔW`` along the axis ``dora_scale``'s shape names and blends
``W + m·(W_dora − W)`` (A1111/ComfyUI); ``norm`` adds ``m·w_norm``; IA3 scales rows (or columns) by
``1 + m·w``; diag-OFT rotates the output rows by ``R_m = m·R + (1−m)·I``. ``apply_bias(bias, patches)`` does the
same for the bias (``diff_b``, ``b_norm``). BOFT and GLoRA are refused (``unsupported``).
"""

from __future__ import annotations

from ckptlab.errors import MismatchError
from ckptlab.formats.arrays import import_torch
from ckptlab.lora.file import LoraFile, LoraModule

#: algorithms whose update is additive: W' = W + m·ΔW (+ DoRA when the module has a magnitude)
ADDITIVE = ("lora", "loha", "lokr", "full")
#: every algorithm ``apply`` handles
SUPPORTED = (*ADDITIVE, "norm", "ia3", "oft")
#: the algorithms refused, with the reason (one line each)
UNSUPPORTED = {
    "glora": "GLoRA is not baked: LyCORIS and A1111/ComfyUI read a1/a2/b1/b2 in two incompatible layouts",
    "boft": "BOFT (butterfly OFT) is not baked yet; only diagonal OFT (3-D oft_blocks) is",
}
#: roles that touch the bias instead of the weight
BIAS_ROLES = ("diff_b", "b_norm")
#: eps of the DoRA norm (LyCORIS adds torch.finfo(float32).eps to ‖W + ΔW‖)
DORA_EPS = 1.1920928955078125e-07


def unsupported(mod: LoraModule) -> str | None:
    """Why ``mod`` cannot be baked (one line), or None."""
    if mod.algo in UNSUPPORTED:
        return UNSUPPORTED[mod.algo]
    if mod.algo not in SUPPORTED:
        return f"{mod.algo} modules are not supported"
    if mod.has_dora and mod.algo not in ADDITIVE:
        return f"DoRA on a {mod.algo} module is not supported"
    return None


def _t(lora: LoraFile, mod: LoraModule, role: str, device: str = "cpu"):
    torch = import_torch("LoRA maths")
    return lora.source.get(mod.params[role]).to(device=device, dtype=torch.float32)


def _fit(d, shape: tuple[int, ...] | None, lora: LoraFile, mod: LoraModule):
    """``d`` reshaped to ``shape`` when the element counts agree (A1111's rule); a conv ΔW with fewer input
    channels than the weight (4-channel LoRA on a 9-channel inpaint ``conv_in``) zero-padded on the input
    channels (A1111, supermerger); else a clear refusal."""
    if shape is None or tuple(d.shape) == tuple(shape):
        return d
    n = 1
    for s in shape:
        n *= s
    if d.numel() == n:
        return d.reshape(shape)
    if (len(shape) == 4 and d.dim() == 4 and d.shape[0] == shape[0] and tuple(d.shape[2:]) == tuple(shape[2:])
            and d.shape[1] < shape[1]):
        torch = import_torch("LoRA maths")
        pad = torch.zeros((shape[0], shape[1] - d.shape[1], *shape[2:]), dtype=d.dtype, device=d.device)
        return torch.cat([d, pad], dim=1)
    raise MismatchError(f"{mod.name}: the LoRA's update is {list(d.shape)}, the model's weight is "
                        f"{list(shape)}", lora.path)


def _lora(lora, mod, device):
    torch = import_torch("LoRA maths")
    up = _t(lora, mod, "up", device)
    down = _t(lora, mod, "down", device)
    r = down.shape[0]
    if "mid" in mod.params:  # CP / Tucker (LoCon use_cp): einsum('n m k l, i n, m j -> i j k l')
        mid = _t(lora, mod, "mid", device)
        return torch.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(r, -1))
    d = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
    if down.dim() == 4:
        d = d.reshape(up.shape[0], *down.shape[1:])
    return d


def _loha(lora, mod, device):
    torch = import_torch("LoRA maths")
    parts = []
    for i in ("1", "2"):
        a, b = _t(lora, mod, f"w{i}a", device), _t(lora, mod, f"w{i}b", device)
        if f"t{i}" in mod.params:  # Tucker: einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)
            t = _t(lora, mod, f"t{i}", device)
            parts.append(torch.einsum("ijkl,jr,ip->prkl", t, b, a))
        else:
            parts.append(a @ b.reshape(b.shape[0], -1))
    return parts[0] * parts[1]


def _lokr(lora, mod, device):
    torch = import_torch("LoRA maths")
    p = mod.params
    if "k1" in p:
        w1 = _t(lora, mod, "k1", device)
    else:
        w1 = _t(lora, mod, "k1a", device) @ _t(lora, mod, "k1b", device)
    if "k2" in p:
        w2 = _t(lora, mod, "k2", device)
    elif "kt2" in p:  # Tucker: einsum('i j k l, j r, i p -> p r k l', t2, w2_b, w2_a)
        w2 = torch.einsum("ijkl,jr,ip->prkl", _t(lora, mod, "kt2", device), _t(lora, mod, "k2b", device),
                          _t(lora, mod, "k2a", device))
    else:
        b = _t(lora, mod, "k2b", device)
        w2 = _t(lora, mod, "k2a", device) @ b.reshape(b.shape[0], -1)
    if w2.dim() == 4:  # conv: W1 unsqueezed to 4-D (LyCORIS), the same as the 2-D kron reshaped
        return torch.kron(w1.reshape(*w1.shape[:2], 1, 1).contiguous(), w2.contiguous())
    return torch.kron(w1.reshape(w1.shape[0], -1).contiguous(), w2.contiguous())


def module_scale(lora: LoraFile, mod: LoraModule) -> float:
    """The scale applied once: α/r (``LoraFile.scale``: no α ⇒ 1, α = 0 ⇒ 0, LoKr with both factors full ⇒ 1);
    a full ``diff`` has none (1)."""
    if mod.algo == "full":
        return 1.0
    if mod.algo == "lokr" and "k1" in mod.params and "k2" in mod.params:
        return 1.0
    return lora.scale(mod)


def delta(lora: LoraFile, mod: LoraModule, shape: tuple[int, ...] | None = None, *, device: str = "cpu"):
    """ΔW of an additive module (fp32 torch tensor, scale applied once, no multiplier), fitted to ``shape``."""
    if mod.algo == "lora":
        d = _lora(lora, mod, device)
    elif mod.algo == "loha":
        d = _loha(lora, mod, device)
    elif mod.algo == "lokr":
        d = _lokr(lora, mod, device)
    elif mod.algo == "full":
        d = _t(lora, mod, "diff", device)
    else:
        raise MismatchError(f"{mod.name}: {unsupported(mod) or mod.algo + ' has no additive ΔW'}", lora.path)
    s = module_scale(lora, mod)
    return _fit(d * s if s != 1.0 else d, shape, lora, mod)


def dora(weight, dw, magnitude, multiplier: float):
    """DoRA with the A1111/ComfyUI multiplier blend: ``W_dora = (W + ΔW) · g / (‖W + ΔW‖ + eps)`` with the norm
    per output row when ``g`` has one value per output (LyCORIS ``wd_on_out``, PEFT ``lora_magnitude_vector``) or
    per input column when it has one value per input (older LyCORIS); result ``W + m·(W_dora − W)``."""
    torch = import_torch("LoRA maths")
    out, inn = weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1
    merged = weight + dw
    g = magnitude
    if g.numel() == out and (g.dim() <= 1 or g.shape[0] == out):
        dims = tuple(range(1, merged.dim()))
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) if dims else merged.abs()
        g = g.reshape(out, *([1] * (merged.dim() - 1)))
    elif g.numel() == inn:
        dims = (0, *range(2, merged.dim()))
        norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
        g = g.reshape(1, inn, *([1] * (merged.dim() - 2)))
    else:
        raise ValueError(f"DoRA magnitude of {list(magnitude.shape)} fits neither the {out} outputs nor the "
                         f"{inn} inputs")
    w_dora = merged * (g / (norm + DORA_EPS))
    return weight + multiplier * (w_dora - weight)


def _oft(lora, mod, weight, m: float):
    """diag-OFT (LyCORIS / kohya): Q = B − Bᵀ, norm-clamped to c = α·out when α > 0; R = (I+Q)(I−Q)⁻¹ per block;
    R_m = m·R + (1−m)·I; W'_k = R_kᵀ·W_k (``einsum('k n m, k n ... -> k m ...')``); then × ``rescale``."""
    torch = import_torch("LoRA maths")
    blocks = _t(lora, mod, "oft", weight.device)
    n, bs, _ = blocks.shape
    out = weight.shape[0]
    if n * bs != out:
        raise MismatchError(f"{mod.name}: OFT blocks {list(blocks.shape)} do not cover the {out} outputs",
                            lora.path)
    q = blocks - blocks.transpose(1, 2)
    a = lora.alpha(mod)
    if a:
        c = a * out
        qn = q.norm()
        if qn > c:
            q = q * (c / qn)
    eye = torch.eye(bs, dtype=q.dtype, device=q.device).expand(n, bs, bs)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    r = m * r + (1 - m) * eye
    w = weight.reshape(n, bs, *weight.shape[1:])
    w = torch.einsum("knm,kn...->km...", r, w).reshape(weight.shape)
    if "rescale" in mod.params:
        w = w * (1 + m * (_t(lora, mod, "rescale", weight.device).reshape(out, *([1] * (w.dim() - 1))) - 1))
    return w


def _ia3(lora, mod, weight, m: float):
    w = _t(lora, mod, "ia3", weight.device).flatten()
    on_input = bool(lora.source.get(mod.params["on_input"]).flatten()[0]) if "on_input" in mod.params else False
    if on_input or (w.numel() != weight.shape[0] and weight.dim() > 1 and w.numel() == weight.shape[1]):
        return weight * (1 + m * w.reshape(1, -1, *([1] * (weight.dim() - 2))))
    return weight * (1 + m * w.reshape(-1, *([1] * (weight.dim() - 1))))


def _product_factors(lora: LoraFile, mod: LoraModule, w):
    """``(up [out, r], down [r, n])`` of a plain LoRA whose ``up @ down`` is ``w`` viewed as ``[out, n]``
    (Linear, 1×1 and k×k convs alike), or None when the update needs the general path (CP, a padded inpaint
    ``conv_in``, a LoRA shaped for another weight)."""
    if mod.algo != "lora" or "mid" in mod.params or mod.has_dora:
        return None
    up = _t(lora, mod, "up", w.device)
    down = _t(lora, mod, "down", w.device)
    up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
    if up2.shape[0] != w.shape[0] or up2.shape[1] != down2.shape[0] or up2.shape[0] * down2.shape[1] != w.numel():
        return None
    return up2, down2


#: elements of ``up @ down`` computed at a time (a cache-sized block instead of a ΔW the size of the weight)
PRODUCT_CHUNK = 1 << 18


def _add_product(w2, up, down, alpha: float) -> None:
    """``w2 += alpha · up @ down`` by row blocks. Not ``addmm_``: its BLAS kernel rounds differently with the
    number of intra-op threads, and a bake must give the same bytes inside a merge's worker threads as on its own."""
    step = max(1, PRODUCT_CHUNK // max(1, w2.shape[1]))
    for i in range(0, w2.shape[0], step):
        w2[i:i + step].add_(up[i:i + step] @ down, alpha=alpha)


def apply(weight, patches, shape: tuple[int, ...] | None = None, *, inplace: bool = False):
    """``weight`` (torch, any float dtype) with ``patches`` = ``[(lora, module, multiplier), …]`` applied in
    order, computed in fp32; returns an fp32 tensor of ``weight``'s shape (the caller casts back).
    ``inplace``: ``weight`` is a contiguous fp32 tensor the caller owns, updated and returned (no copy).
    A plain LoRA is added block by block (W += m·(α/r)·up@down): no ΔW the size of the weight."""
    torch = import_torch("LoRA maths")
    w = weight if inplace else weight.to(torch.float32, copy=True).contiguous()
    shape = tuple(w.shape) if shape is None else shape
    for lora, mod, m in patches:
        why = unsupported(mod)
        if why:
            raise MismatchError(f"{mod.name}: {why}", lora.path)
        if mod.algo in ADDITIVE:
            if mod.algo == "full" and "diff" not in mod.params:
                continue  # a bias-only diff
            fused = _product_factors(lora, mod, w) if tuple(w.shape) == tuple(shape) else None
            if fused is not None:
                _add_product(w.view(w.shape[0], -1), *fused, m * module_scale(lora, mod))
                continue
            dw = delta(lora, mod, shape, device=w.device)
            if mod.has_dora:
                try:
                    w.copy_(dora(w, dw, _t(lora, mod, "dora", w.device), m))
                except ValueError as e:
                    raise MismatchError(f"{mod.name}: {e}", lora.path) from None
            else:
                w.add_(dw, alpha=m)
        elif mod.algo == "norm":
            w.add_(_fit(_t(lora, mod, "w_norm", w.device), shape, lora, mod), alpha=m)
        elif mod.algo == "ia3":
            w.copy_(_ia3(lora, mod, w, m))
        elif mod.algo == "oft":
            w.copy_(_oft(lora, mod, w, m))
    return w


def additive_only(mod: LoraModule) -> bool:
    """Whether the module's whole effect scales with ``module_scale`` (so a scale of 0 changes nothing): the
    additive algorithms without DoRA (DoRA re-normalises the weight even when ΔW is 0)."""
    return mod.algo in ADDITIVE and not mod.has_dora


def touches_bias(mod: LoraModule) -> bool:
    return any(r in mod.params for r in BIAS_ROLES)


def apply_bias(bias, patches):
    """``bias`` with the ``diff_b`` / ``b_norm`` of ``patches`` added (``b + m·diff_b``, no scale), fp32."""
    torch = import_torch("LoRA maths")
    b = bias.to(torch.float32)
    for lora, mod, m in patches:
        for role in BIAS_ROLES:
            if role in mod.params:
                b = b + m * _fit(_t(lora, mod, role, b.device), tuple(b.shape), lora, mod)
    return b
