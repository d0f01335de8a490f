"""The weight update of one LoRA module, as the loaders apply it at inference (docs/lora.md, lora.md §3.1).

``delta(lora, mod, shape)`` is ΔW = (α / r) · (up @ down) (scale applied once, the user's multiplier not), in
fp32, reshaped to ``shape`` (the adapted weight's shape: a 4-D LoRA on a Linear is squeezed, a 2-D one on a
1×1 conv gets its trailing 1s; a 3×3 LoCon composes ``up [out, r, 1, 1]`` with ``down [r, in, 3, 3]``).
"""

from __future__ import annotations

from ckptlab.errors import MismatchError
from ckptlab.formats.arrays import import_torch
from ckptlab.lora.file import LoraFile, LoraModule


def _t(lora: LoraFile, mod: LoraModule, role: str, device: str = "cpu"):
    torch = import_torch("LoRA maths")
    return lora.source.get(mod.params[role]).to(device=device, dtype=torch.float32)


def _fit(d, shape: tuple[int, ...] | None, lora: LoraFile, mod: LoraModule):
    """``d`` reshaped to ``shape`` when the element counts agree (A1111's rule), else a clear refusal."""
    if shape is None or tuple(d.shape) == tuple(shape):
        return d
    n = 1
    for s in shape:
        n *= s
    if d.numel() != n:
        raise MismatchError(f"{mod.name}: the LoRA's update is {list(d.shape)}, the model's weight is "
                            f"{list(shape)}", lora.path)
    return d.reshape(shape)


def delta(lora: LoraFile, mod: LoraModule, shape: tuple[int, ...] | None = None, *, device: str = "cpu"):
    """ΔW of ``mod`` (fp32 torch tensor, scale applied, no multiplier), fitted to ``shape``."""
    if mod.algo != "lora":
        raise MismatchError(f"{mod.name}: {mod.algo} modules are not supported here", lora.path)
    up = _t(lora, mod, "up", device)
    down = _t(lora, mod, "down", device)
    r = down.shape[0]
    if "mid" in mod.params:  # CP / Tucker (LoCon use_cp): einsum('n m k l, i n, m j -> i j k l')
        import torch

        mid = _t(lora, mod, "mid", device)
        d = torch.einsum("nmkl,in,mj->ijkl", mid, up.reshape(up.shape[0], -1), down.reshape(r, -1))
    else:
        d = up.reshape(up.shape[0], -1) @ down.reshape(r, -1)
        if down.dim() == 4:
            d = d.reshape(up.shape[0], *down.shape[1:])
    return _fit(d * lora.scale(mod), shape, lora, mod)
