"""The merge graph: nodes that know their output plan from headers and compute one key on demand.

``SourceNode`` wraps an opened model file. ``StepNode`` applies a merge method to other nodes: at
construction it plans every output key (which inputs it needs, dtype, shape) and checks families and
shapes, so every refusal happens before anything is written. ``tensor(key)`` then computes that one
key, reading only the tensors it needs; a chain of steps is a lazy per-key graph, so intermediate
models are never held in memory. ``BakeVae`` and ``Prune`` are thin nodes on top.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from ckptlab.errors import MismatchError
from ckptlab.formats.base import TensorInfo, TensorSource
from ckptlab.formats.dtypes import FLOAT_DTYPES, to_torch
from ckptlab.merging.blocks import BlockValues, resolve
from ckptlab.merging.family import check_mergeable, check_same_kind, identify_input
from ckptlab.merging.methods import KeyContext, Method

MISSING_POLICIES = ("keep-a", "union", "intersect", "error")
#: integer and bool buffers (position_ids, step counters): copied from A, never merged
PLAIN_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})
#: keys that mark quantized storage with per-tensor scales (ComfyUI scaled fp8, bitsandbytes NF4)
_SCALED_ENDINGS = ("scaled_fp8", ".scale_weight", ".quant_state.bitsandbytes__nf4")
LIST_MAX = 50

#: rows per chunk are chosen so a chunk holds about this many elements
CHUNK_ELEMS = 1 << 18

_LOCAL = threading.local()  # the stop flag of the write this thread computes for


class Stopped(Exception):
    """The write this computation served was abandoned (error or Ctrl-C in the writer)."""


@contextmanager
def stop_flag(event: threading.Event):
    """Computations in this thread check ``event`` between chunks and raise ``Stopped`` once it is set."""
    prev = getattr(_LOCAL, "stop", None)
    _LOCAL.stop = event
    try:
        yield
    finally:
        _LOCAL.stop = prev


def check_stop() -> None:
    ev = getattr(_LOCAL, "stop", None)
    if ev is not None and ev.is_set():
        raise Stopped


class BufferPool:
    """Output buffers of big chunked keys, reused once written (models repeat the same shapes), so the
    kernel does not have to map and zero fresh pages for every key. Holds at most ``limit`` idle bytes."""

    def __init__(self, limit: int = 96 << 20):
        import threading
        import weakref

        self.limit = limit
        self.idle: dict[int, list] = {}
        self.idle_bytes = 0
        self.owned = weakref.WeakValueDictionary()  # data_ptr -> the very tensor object handed out
        self.lock = threading.Lock()

    def take(self, shape, dtype):
        import torch

        from ckptlab.formats.dtypes import from_torch, itemsize

        n = 1
        for d in shape:
            n *= d
        nbytes = n * itemsize(from_torch(dtype))
        with self.lock:
            free = self.idle.get(nbytes)
            if free:
                raw = free.pop()
                self.idle_bytes -= nbytes
            else:
                raw = None
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        out = raw.view(dtype).view(shape)
        with self.lock:
            self.owned[out.data_ptr()] = out
        return out

    def give_back(self, tensor) -> None:
        """Return ``tensor``'s buffer if it came from ``take`` (after its bytes were written)."""
        import torch

        ptr = tensor.data_ptr()
        with self.lock:
            if self.owned.get(ptr) is not tensor:
                return  # not ours (an input's tensor, a copy...): never recycle it
            del self.owned[ptr]
            nbytes = tensor.numel() * tensor.element_size()
            if self.idle_bytes + nbytes > self.limit:
                return
            self.idle.setdefault(nbytes, []).append(tensor.view(-1).view(torch.uint8))
            self.idle_bytes += nbytes

    def clear(self) -> None:
        with self.lock:
            self.idle.clear()
            self.idle_bytes = 0
            self.owned.clear()


BUFFERS = BufferPool()


@dataclass
class Settings:
    merge_dtype: str = "F32"
    device: str = "cpu"
    missing: str = "keep-a"
    seed: int = 0


@dataclass
class StepSummary:
    name: str
    method: str
    merged: int = 0
    kept_from_a: int = 0        # present only in A (or non-float): A's tensor unchanged
    copied_from_other: int = 0  # absent from A, taken from another input (policy "union")
    dropped: int = 0
    inpaint_sliced: int = 0
    nonfinite: int = 0          # merged tensors holding NaN or Inf (overflow: a black or noisy model)
    dropped_keys: list[str] = field(default_factory=list)     # first LIST_MAX of them
    nonfinite_keys: list[str] = field(default_factory=list)   # first LIST_MAX of them
    only_in_a_keys: list[str] = field(default_factory=list)   # first LIST_MAX of them

    def note(self, which: list[str], key: str) -> None:
        if len(which) < LIST_MAX:
            which.append(key)


class Node:
    name: str
    family: str | None
    kind: str = "weight"  # or "delta"
    model_kind: str | None = None  # what identification calls it: "checkpoint", "unet", "lora"... (None: unknown)
    plan: dict[str, TensorInfo]

    def tensor(self, key: str):
        raise NotImplementedError

    def raw(self, key: str):
        """The stored bytes of ``key`` when they can be written unchanged, else None."""
        return None

    def cost(self, key: str) -> int:
        """Rough bytes of working memory needed to produce ``key``."""
        return self.plan[key].nbytes


class SourceNode(Node):
    def __init__(self, name: str, source: TensorSource, family: str | None = None, model_kind: str | None = None):
        self.name = name
        self.source = source
        if family is None and model_kind is None:
            model_kind, family = identify_input(source)
        self.family = family
        self.model_kind = model_kind
        self.plan = dict(source.infos())

    def tensor(self, key: str):
        return self.source.get(key)

    def raw(self, key: str):
        raw = getattr(self.source, "raw_bytes", None)
        return raw(key) if raw is not None else None

    def cost(self, key: str) -> int:
        return 0  # mmap-backed (page cache, not our memory)


def _conv_in(key: str) -> bool:
    return key.endswith(("diffusion_model.input_blocks.0.0.weight", "conv_in.weight")) and "vae" not in key \
        and not key.startswith("first_stage_model.")


class StepNode(Node):
    def __init__(self, name: str, method: Method, inputs: list[Node], params: dict[str, float | BlockValues],
                 settings: Settings, dtype: str | None = None):
        self.name = name
        self.method = method
        self.inputs = inputs
        self.params = params
        self.settings = settings
        self.out_dtype = dtype
        self.kind = method.output
        self.summary = StepSummary(name, method.name)
        self._lock = threading.Lock()
        n = len(inputs)
        if not method.min_inputs <= n <= method.max_inputs:
            want = (f"{method.min_inputs}" if method.min_inputs == method.max_inputs
                    else f"{method.min_inputs} to {method.max_inputs}")
            raise MismatchError(f"{method.name} takes {want} models, got {n}")
        self._check_families()
        self.family = inputs[0].family
        self.model_kind = inputs[0].model_kind
        self.actions: dict[str, tuple] = {}
        self.plan = {}
        self._plan()

    # -- planning -----------------------------------------------------------------------------
    def _check_families(self) -> None:
        for i in self.inputs:
            if isinstance(i, SourceNode):
                check_mergeable(i.name, str(i.source.path) if getattr(i.source, "path", None) else None,
                                i.model_kind)
        check_same_kind(self.inputs)
        a = self.inputs[0]
        for other in self.inputs[1:]:
            if a.family and other.family and a.family != other.family:
                raise MismatchError(f"cannot merge different model families: {a.name} is {a.family}, "
                                    f"{other.name} is {other.family}")
        deltas = [i.name for i in self.inputs if i.kind == "delta"]
        if deltas and not (self.method.name == "add_difference" and len(self.inputs) == 2
                           and deltas == [self.inputs[1].name]):
            raise MismatchError(f"{', '.join(deltas)} is a difference (delta) model; only "
                                f"`add_difference A DELTA` takes one")

    def _plan(self) -> None:
        ins = self.inputs
        a = ins[0]
        policy = self.settings.missing
        s = self.summary
        delta_out = self.kind == "delta"
        mismatched: list[str] = []
        quantized: list[str] = []  # quantized storage (GGUF Q4_K...): copying A's would be a silent non-merge
        for key, ia in a.plan.items():
            present = [key in i.plan for i in ins]
            if not all(present):
                if policy == "error":
                    missing = [i.name for i, p in zip(ins, present, strict=True) if not p]
                    raise MismatchError(f"key {key!r} is in {a.name} but not in {', '.join(missing)} "
                                        f"(--missing error)")
                if policy == "intersect" or delta_out:
                    s.dropped += 1
                    s.note(s.dropped_keys, key)
                    continue
                self._add(key, ia, ("copy", 0))
                s.kept_from_a += 1
                s.note(s.only_in_a_keys, key)
                continue
            infos = [i.plan[key] for i in ins]
            odd = next((x.dtype for x in infos if x.dtype not in FLOAT_DTYPES and x.dtype not in PLAIN_DTYPES), None)
            if odd is not None and len(quantized) < LIST_MAX:
                quantized.append(f"{key} ({odd})")
            if ia.dtype not in FLOAT_DTYPES or any(x.dtype not in FLOAT_DTYPES for x in infos):
                if delta_out:
                    s.dropped += 1
                    s.note(s.dropped_keys, key)
                else:
                    self._add(key, ia, ("copy", 0))
                    s.kept_from_a += 1
                continue
            shapes = [x.shape for x in infos]
            if all(sh == ia.shape for sh in shapes):
                self._add(key, ia, ("merge", None))
                s.merged += 1
                continue
            if _conv_in(key) and all(len(sh) == len(ia.shape) and sh[0] == ia.shape[0] and sh[2:] == ia.shape[2:]
                                     for sh in shapes):
                widest = max(range(len(ins)), key=lambda i: shapes[i][1])
                if shapes[widest][1] > ia.shape[1]:
                    raise MismatchError(f"{key}: {ins[widest].name} has {shapes[widest][1]} input channels but "
                                        f"{a.name} has {ia.shape[1]}; put the inpaint/pix2pix model first (as A)")
                width = min(sh[1] for sh in shapes)
                self._add(key, ia, ("merge", width))
                s.inpaint_sliced += 1
                continue
            mismatched.append(f"{key} {list(ia.shape)} vs " + " vs ".join(str(list(sh)) for sh in shapes[1:]))
        if quantized:
            raise MismatchError(f"{', '.join(i.name for i in ins)}: quantized tensors cannot be merged as stored, "
                                f"e.g. {quantized[0]}; merge the full-precision models")
        scaled = next((k for i in ins for k in i.plan if k.endswith(_SCALED_ENDINGS)), None)
        if scaled is not None:
            raise MismatchError(f"{', '.join(i.name for i in ins)}: quantized weights with scales ({scaled}) cannot "
                                "be merged as stored; merge the full-precision models")
        if mismatched:
            raise MismatchError(f"{len(mismatched)} tensors have different shapes in {', '.join(i.name for i in ins)}"
                                f" (not the same architecture?), e.g. {mismatched[0]}")
        if policy == "union" and not delta_out:
            for idx, other in enumerate(ins[1:], start=1):
                for key, info in other.plan.items():
                    if key not in self.plan and key not in a.plan:
                        self._add(key, info, ("copy", idx))
                        s.copied_from_other += 1
        else:
            extra = {k for other in ins[1:] for k in other.plan if k not in a.plan}
            s.dropped += len(extra)
            for k in sorted(extra):
                s.note(s.dropped_keys, k)
        if not self.plan or not (s.merged or s.inpaint_sliced):
            raise MismatchError(f"{', '.join(i.name for i in ins)} have no tensors in common to merge (different "
                                "layouts - a single file and a diffusers folder: convert one with `ckptlab "
                                "from-diffusers` or `to-diffusers` first - or different architectures)")

    def _add(self, key: str, info: TensorInfo, action: tuple) -> None:
        dtype = info.dtype
        if self.out_dtype and info.dtype in FLOAT_DTYPES:
            dtype = self.out_dtype
        self.plan[key] = TensorInfo(dtype, info.shape)
        self.actions[key] = action

    # -- computing ----------------------------------------------------------------------------
    def raw(self, key: str):
        op, arg = self.actions[key]
        if op == "copy" and self.inputs[arg].plan[key].dtype == self.plan[key].dtype:
            return self.inputs[arg].raw(key)
        return None

    def cost(self, key: str) -> int:
        op, arg = self.actions[key]
        info = self.plan[key]
        below = max(i.cost(key) for i in self.inputs if key in i.plan)
        if op == "copy":
            return info.nbytes + below
        if arg is None and self._pieces(key) is not None:
            return info.nbytes + below + CHUNK_ELEMS * 4 * (len(self.inputs) + 4)
        return info.nbytes + below + info.numel * 4 * (len(self.inputs) + 3)

    def _pieces(self, key: str) -> list[tuple] | None:
        """Index tuples that cut ``key``'s tensor into pieces of about ``CHUNK_ELEMS`` elements along the
        axis the method allows (see ``merging.methods``), or None to compute it whole."""
        m = self.method
        shape = self.plan[key].shape
        numel = self.plan[key].numel
        if not shape or numel == 0:
            return None
        if m.elementwise or m.prepare is not None:
            axis = 0
        elif m.split and len(shape) >= 2:
            axis = 0 if m.split == "rows" else 1
        else:
            return None
        if numel <= CHUNK_ELEMS and m.prepare is None:
            return None  # small: one piece is the whole tensor
        step = max(1, CHUNK_ELEMS // (numel // shape[axis]))
        lead = (slice(None),) * axis
        return [(*lead, slice(i, i + step)) for i in range(0, shape[axis], step)]

    def _params_for(self, key: str) -> dict[str, float]:
        fam = self.family
        return {k: resolve(v, key, fam) for k, v in self.params.items()}

    def tensor(self, key: str):
        check_stop()
        op, arg = self.actions[key]
        info = self.plan[key]
        out_dt = to_torch(info.dtype)
        if op == "copy":
            t = self.inputs[arg].tensor(key)
            return t if t.dtype == out_dt else t.to(out_dt)
        xs = [i.tensor(key) for i in self.inputs]
        return self._checked(key, self._compute(key, xs, self._params_for(key), arg, out_dt))

    def _checked(self, key: str, t):
        """``t``, after counting it in the summary if it holds NaN or Inf (an fp16 overflow, a broken input)."""
        import torch

        if not t.is_floating_point() or not t.numel():
            return t
        if t.element_size() == 1:  # fp8: no aminmax kernel; fp16 holds every fp8 value (NaN and Inf included)
            flat = t.reshape(-1)
            finite = all(math.isfinite(float(x)) for i in range(0, flat.numel(), CHUNK_ELEMS)
                         for x in torch.aminmax(flat[i:i + CHUNK_ELEMS].to(torch.float16)))
        else:
            lo, hi = torch.aminmax(t)  # one pass, no temporaries; NaN and Inf propagate (isfinite().all(): 13x slower)
            finite = math.isfinite(float(lo)) and math.isfinite(float(hi))
        if not finite:
            with self._lock:
                self.summary.nonfinite += 1
                self.summary.note(self.summary.nonfinite_keys, key)
        return t

    def _compute(self, key: str, xs, p, arg, out_dt):
        import torch

        info = self.plan[key]
        seed = self.settings.seed
        ctx = KeyContext(key, seed)
        dev = torch.device(self.settings.device)
        mdt = to_torch(self.settings.merge_dtype)
        fn = self.method.fn
        if arg is not None:  # inpaint / pix2pix conv_in: merge the shared channels, keep A's extra ones
            out = xs[0].to(out_dt, copy=True)
            part = [x[:, :arg].to(dev, mdt) for x in xs]
            out[:, :arg].copy_(fn(part, p, ctx))
            return out
        pieces = self._pieces(key)
        if pieces is None:
            res = fn([x.to(dev, mdt) for x in xs], p, ctx)
            return res.to(out_dt).cpu() if res.dtype != out_dt or res.device.type != "cpu" else res.contiguous()
        if self.method.prepare is not None:  # a first pass for per-tensor scalars (norms, thresholds)
            def each_piece():
                for idx in pieces:
                    check_stop()
                    yield [x[idx].to(dev, mdt) for x in xs]

            p = {**p, **self.method.prepare(each_piece, info.numel, p, ctx)}
        out = BUFFERS.take(info.shape, out_dt)
        for idx in pieces:
            check_stop()
            part = [x[idx].to(dev, mdt) for x in xs]
            out[idx].copy_(fn(part, p, KeyContext(key, seed, idx[-1].start)))
        return out


class BakeVae(Node):
    """Replace (or add) the ``first_stage_model.`` keys of ``node`` with a VAE file's tensors."""

    PREFIX = "first_stage_model."

    def __init__(self, node: Node, vae: SourceNode):
        self.name = node.name
        self.node = node
        self.vae = vae
        self.family = node.family
        self.kind = node.kind
        from ckptlab.ops.components import check_component_fits, is_diffusers_vae, vae_bake_map

        vkeys = list(vae.plan)
        if any(k.startswith(("vae.", "unet.")) for k in node.plan) and not any(
                k.startswith(self.PREFIX) for k in node.plan):
            raise MismatchError("--vae bakes into single-file checkpoints; this model is a diffusers folder "
                                "(replace its vae/ folder instead)")
        if is_diffusers_vae(vkeys):
            raise MismatchError(f"{vae.name}: VAE is in diffusers layout; convert it to the single-file layout first")
        self.map: dict[str, str] = vae_bake_map(vkeys)  # the transforms' key table (ops.components)
        if not self.map:
            raise MismatchError(f"{vae.name}: no VAE weights found (expected encoder.*/decoder.* keys)")
        float_dtypes = [i.dtype for i in node.plan.values() if i.dtype in FLOAT_DTYPES]
        default_dt = Counter(float_dtypes).most_common(1)[0][0] if float_dtypes else "F16"
        own = {k: info for k, info in node.plan.items() if k.startswith(self.PREFIX)}
        if own:  # replacing the model's VAE: replace --vae's own keys-and-shapes check
            check_component_fits(own, {k: vae.plan[vk] for k, vk in self.map.items()}, prefix=self.PREFIX,
                                 name=vae.source.path.name, component="vae")
        self.plan = {}
        self.replaced = self.added = 0
        for k, info in node.plan.items():
            if k in self.map:
                self.replaced += 1
            self.plan[k] = info
        for k, vk in self.map.items():
            if k not in self.plan:
                vinfo = vae.plan[vk]
                dt = default_dt if vinfo.dtype in FLOAT_DTYPES else vinfo.dtype
                self.plan[k] = TensorInfo(dt, vinfo.shape)
                self.added += 1

    def _from_vae(self, key: str) -> bool:
        return key in self.map

    def tensor(self, key: str):
        if self._from_vae(key):
            t = self.vae.tensor(self.map[key])
            want = to_torch(self.plan[key].dtype)
            return t if t.dtype == want else t.to(want)
        return self.node.tensor(key)

    def raw(self, key: str):
        if self._from_vae(key):
            return self.vae.raw(self.map[key]) if self.vae.plan[self.map[key]].dtype == self.plan[key].dtype else None
        return self.node.raw(key)

    def cost(self, key: str) -> int:
        return self.plan[key].nbytes if self._from_vae(key) else self.node.cost(key)


class Prune(Node):
    """Drop EMA weights and training state: exactly the keys ``ckptlab prune`` drops (``ops.prune.pruned_keys``)."""

    def __init__(self, node: Node):
        from ckptlab.ops.prune import pruned_keys

        self.name = node.name
        self.node = node
        self.family = node.family
        self.kind = node.kind
        drop = pruned_keys(node.plan, "drop")
        self.dropped = len(drop)
        self.plan = {k: v for k, v in node.plan.items() if k not in drop}

    def tensor(self, key: str):
        return self.node.tensor(key)

    def raw(self, key: str):
        return self.node.raw(key)

    def cost(self, key: str) -> int:
        return self.node.cost(key)
