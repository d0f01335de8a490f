"""The ``lora`` recipe step: LoRAs baked into a model inside a merge recipe (docs/lora.md).

```toml
[[steps]]
name = "styled"
method = "lora"
inputs = ["A", "STYLE", "DETAIL"]   # a model (an input or an earlier step), then LoRA inputs
strengths = [0.8, 0.5]              # one per LoRA, or one for all (default 1.0)
te_strengths = [0.0]                # text-encoder strengths, likewise (default: the strengths)
```

``BakeLora`` is the step's lazy per-key node: it plans every key from its model's plan and the LoRA headers
(``lora.bake.match_loras``, the same matching and refusals as ``ckptlab lora bake``) and computes one adapted
weight when that key is asked for (``lora.bake.patch_weight``), so a recipe "bake, then merge" equals
``lora bake`` followed by ``merge`` tensor for tensor, without an intermediate file.

The step's method is not a merge method (``merge --method lora`` stays unknown): ``step_method`` returns the
``LORA`` record for it and the merge method otherwise.
"""

from __future__ import annotations

from ckptlab.errors import RecipeError
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.dtypes import FLOAT_DTYPES, to_torch
from ckptlab.merging.graph import Node, StepSummary
from ckptlab.merging.methods import Method, get_method

LORA_METHOD = "lora"
LORA_PARAMS = ("strengths", "te_strengths")


def _no_fn(xs, p, ctx):  # pragma: no cover - BakeLora never calls a method function
    raise RuntimeError("the lora step has no merge function")


#: the step's record: not registered among the merge methods
LORA = Method(LORA_METHOD, _no_fn, 2, 1 << 16, (), "bake LoRAs into a model (inputs: the model, then LoRAs)",
              output="weight", a1111_name="")


def is_lora(name: str) -> bool:
    return str(name).strip().lower() == LORA_METHOD


def step_method(name: str) -> Method:
    """``LORA`` for a ``lora`` step, else the merge method (``MethodError`` when unknown)."""
    return LORA if is_lora(name) else get_method(name)


def _numbers(v, what: str) -> list[float]:
    vals = v if isinstance(v, list) else [v]
    out = []
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RecipeError(f"{what}: {x!r} is not a number")
        out.append(float(x))
    return out


def validate_step(step, inputs: dict) -> None:
    """A ``lora`` step's own checks: a model then at least one LoRA, the LoRAs recipe inputs (files, pinned),
    only ``strengths`` / ``te_strengths``, numbers, one value or one per LoRA."""
    where = f"step {step.name!r}"
    if len(step.inputs) < 2:
        raise RecipeError(f"{where}: a lora step takes a model and at least one LoRA (inputs = [MODEL, LORA...])")
    for name in step.inputs[1:]:
        if name not in inputs:
            raise RecipeError(f"{where}: LoRA {name!r} must be a recipe input (a file), not a step")
    unknown = set(step.params) - set(LORA_PARAMS)
    if unknown:
        raise RecipeError(f"{where}: a lora step takes only {', '.join(LORA_PARAMS)}, not {', '.join(sorted(unknown))}")
    n = len(step.inputs) - 1
    for k in LORA_PARAMS:
        if k in step.params:
            vals = _numbers(step.params[k], f"{where}: {k}")
            if len(vals) not in (1, n):
                raise RecipeError(f"{where}: {k} has {len(vals)} values for {n} LoRAs; give one value (all LoRAs) "
                                  "or one per LoRA, in order")


def strengths_of(step) -> list[tuple[float, float]]:
    """``(strength, te_strength)`` per LoRA of a validated step (``lora.bake.strengths_for``)."""
    from ckptlab.lora.bake import strengths_for

    s = step.params.get("strengths")
    t = step.params.get("te_strengths")
    return strengths_for(len(step.inputs) - 1, _numbers(s, "strengths") if s is not None else None,
                         _numbers(t, "te_strengths") if t is not None else None)


class BakeLora(Node):
    """``node`` with LoRAs baked in, per key: adapted weights computed on demand (fp32, cast to the node's
    dtype or ``dtype``), every other key passed through (raw bytes where the dtype is unchanged)."""

    def __init__(self, name: str, node: Node, loras: list, strengths: list[tuple[float, float]],
                 dtype: str | None = None):
        from pathlib import Path

        from ckptlab.lora.bake import BakeResult, match_loras
        from ckptlab.lora.file import LoraFile

        self.name = name
        self.node = node
        self.family = node.family
        self.kind = node.kind
        self.model_kind = node.model_kind
        self.summary = StepSummary(name, LORA_METHOD)
        self.files = [LoraFile(n.source) for n in loras]  # the engine owns (and closes) the sources
        self.report = BakeResult("lora-bake", Path(name), Path(), False, node.family, [])
        self.by_key, self.bias = match_loras(node.plan, node.family, self.files, strengths, self.report)
        self.warnings = [f"step {name!r}: {w}" for w in self.report.warnings]
        self.plan = {}
        for k, info in node.plan.items():
            dt = dtype if dtype and info.dtype in FLOAT_DTYPES else info.dtype
            self.plan[k] = TensorInfo(dt, info.shape)
        self.summary.merged = len(self.by_key) + len(self.bias)
        self.summary.kept_from_a = len(self.plan) - self.summary.merged

    def tensor(self, key: str):
        from ckptlab.lora.bake import baked

        dt = self.plan[key].dtype
        if key in self.by_key or key in self.bias:
            bias = key not in self.by_key
            patches = self.bias[key] if bias else self.by_key[key]
            return baked(self.node.tensor, self.node.plan.__contains__, key, patches, dt, self.name, bias=bias)
        t = self.node.tensor(key)
        want = to_torch(dt)
        return t if t.dtype == want else t.to(want)

    def raw(self, key: str):
        if key in self.by_key or key in self.bias or self.plan[key].dtype != self.node.plan[key].dtype:
            return None
        return self.node.raw(key)

    def cost(self, key: str) -> int:
        info = self.plan[key]
        if key in self.by_key or key in self.bias:
            return info.nbytes + info.numel * 4 * 3 + self.node.cost(key)
        return self.node.cost(key)
