"""Weights into meta-device modules: one tensor at a time, read and cast ahead in worker threads.

``empty_model`` builds a diffusers/transformers module with its parameters on the ``meta`` device
(``accelerate.init_empty_weights``: no memory); ``fill`` puts each planned weight (``ops.stream.Out``) in place at
the compute dtype, made by one copy from the source's mapped memory, and checks that none is left on meta;
``put`` does it for one weight (and copies into a loaded one in place, for LoRA strength changes and merge
sweeps). A load's weights are read ahead by ``read_ahead`` while the main thread imports the libraries and
builds the modules; what the workers make is the final weights, so no state dict is ever assembled.
"""

from __future__ import annotations

import threading
import weakref

from ckptlab.errors import MismatchError
from ckptlab.ops.stream import Out


def value_of(it: Out):
    """The tensor of a planned item (derived items call ``produce``): a view of the source's memory where the
    reader maps the file (no copy: the mapping is copy-on-write, so the array is writable and ``as_tensor`` takes
    it as it is)."""
    from ckptlab.formats.arrays import as_tensor

    return as_tensor(it.produce() if it.produce is not None else it.source.array(it.src_key), "generate")


#: CPU tensors at least this big get memory of their own, 2 MiB aligned, with transparent huge pages asked for
_HUGE = 2 << 20


def _empty_cpu(shape: tuple[int, ...], dtype):
    """An uninitialised CPU tensor. A big one gets its own anonymous mapping, aligned to 2 MiB and marked
    ``MADV_HUGEPAGE``: filling 4 GB of fp32 weights then takes ~2,000 page faults instead of ~1,000,000 (half the
    time of a load on Linux, where THP is usually ``madvise``). The mapping ends where the data ends, so no huge
    page reaches past it; each tensor keeps its own storage (no arena shared between weights). Elsewhere, or if
    any step is refused: ``torch.empty``."""
    import math
    import mmap

    import torch

    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE or not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(shape, dtype=dtype)
    try:
        import ctypes

        mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        probe = ctypes.c_char.from_buffer(mm)
        pad = -ctypes.addressof(probe) % _HUGE
        del probe  # an exported buffer would block the resize
        mm.resize(pad + nbytes)  # mremap shrinks in place: the mapping now ends with the data
        mm.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, SystemError, TypeError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=n, offset=pad).view(shape)


def _cast(t, device: str, dtype):
    """The final tensor of source tensor ``t`` (``value_of``): a new tensor on ``device``, floating point at
    ``dtype`` (other dtypes kept), made by one copy from the source's mapped memory (the cast happens in the
    copy)."""
    want = dtype if t.is_floating_point() else t.dtype
    if str(device) == "cpu" and t.device.type == "cpu":
        out = _empty_cpu(tuple(t.shape), want)
        out.copy_(t)
        return out
    return t.to(device=device, dtype=want, copy=True)


def put(module, it: Out, device: str, dtype, value=None) -> None:
    """Put one planned weight into ``module`` (a diffusers/transformers model) at ``dtype`` on ``device``: replace
    a meta parameter, or copy into a loaded one (no new allocation when the strengths of a LoRA change).
    ``value``: the weight already made by ``_cast`` (read ahead), used as it is."""
    import torch

    t = value if value is not None else value_of(it)
    key = it.key
    if key.startswith("text_model.") and not hasattr(module, "text_model"):
        key = key[len("text_model."):]  # transformers 5 dropped the CLIPTextModel.text_model wrapper
    owner_name, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        raise MismatchError(f"{it.key}: the model built from the shapes has no such weight",
                            it.source.path if it.source else None) from None
    current = owner._parameters.get(name) if name in owner._parameters else owner._buffers.get(name)
    if current is None and name not in owner._buffers:
        raise MismatchError(f"{it.key}: the model built from the shapes has no such weight",
                            it.source.path if it.source else None)
    if current is not None and tuple(current.shape) != tuple(t.shape):
        raise MismatchError(f"{it.key}: shape {tuple(t.shape)} does not fit the model's {tuple(current.shape)}",
                            it.source.path if it.source else None)
    if current is not None and not current.is_meta:
        with torch.no_grad():
            current.copy_(t)
        return
    if value is None:
        value = _cast(t, device, dtype)
    if name in owner._parameters:
        owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[name] = value


#: threads that read and cast ahead (two: one shares a core with the imports, both work once they are done)
_WORKERS = 2


class _ReadAhead:
    """Reads and casts every planned weight of one ``load`` in worker threads, submitted in the order ``fill``
    puts them, while the main thread imports diffusers/transformers and builds the empty modules (an import is
    Python work on one core; the copy is memory work that releases the GIL). What the workers make is the final
    weights themselves (``put`` installs them without another copy), so running ahead costs no memory beyond
    what the loaded model holds.

    Torch's intra-op threads are set to one for the load (restored when the last list is taken or on
    ``cancel``): two OpenMP threads for a memory-bound cast gain little on an idle machine and spin for seconds on
    a busy one (measured: 7 s against 1.7 s for SD1.5's weights on a loaded 2-core machine)."""

    def __init__(self, lists: list[list[Out]], device: str, dtype, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        import torch

        _one_thread(torch)
        self.restored = False
        self.pool = ThreadPoolExecutor(max_workers=workers or _WORKERS, thread_name_prefix="ckptlab-load")
        self.futures = {id(lst): [self.pool.submit(_cast_item, it, device, dtype) for it in lst] for lst in lists}

    def has(self, lst: list[Out]) -> bool:
        return id(lst) in self.futures

    def take(self, lst: list[Out]):
        """The values of ``lst``, in order, as the workers make them (a worker's exception is raised here)."""
        futures = self.futures[id(lst)]
        for k in range(len(futures)):
            value = futures[k].result()
            futures[k] = None  # the module holds the value from here on
            yield value
        del self.futures[id(lst)]
        if not self.futures:
            self.pool.shutdown(wait=False)
            self._restore()

    def cancel(self) -> None:
        self.futures.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._restore()

    def _restore(self) -> None:
        if not self.restored:
            self.restored = True
            _threads_back()

    def __del__(self) -> None:
        # a load that failed before ``fill`` took everything (a config refused, an import error): stop the
        # workers and give torch its threads back when the load's frame lets go of this object
        if not getattr(self, "restored", True):
            self.cancel()


def _cast_item(it: Out, device: str, dtype):
    return _cast(value_of(it), device, dtype)


#: [loads under way, torch's intra-op thread setting before the first of them]: loads in several threads (a
#: grid preparing its next model) restore the user's setting when the last one ends, not one another's "1"
_THREADS: list = [0, None]
_THREADS_LOCK = threading.Lock()


def _one_thread(torch) -> None:
    with _THREADS_LOCK:
        if _THREADS[0] == 0:
            _THREADS[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS[0] += 1


def _threads_back() -> None:
    import torch

    with _THREADS_LOCK:
        _THREADS[0] -= 1
        if _THREADS[0] == 0:
            torch.set_num_threads(_THREADS[1])


#: planned-items list id -> the read-ahead making its values (weak: a load that fails drops it with its frame)
_AHEAD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def read_ahead(lists: list[list[Out]], device: str, dtype):
    """Start reading and casting the weights of ``lists`` ahead, in the order ``fill`` will be called with them;
    ``fill`` takes each list's values from it. The caller keeps the returned object alive until the modules are
    filled (a load that fails drops it, which stops the workers)."""
    ahead = _ReadAhead(lists, device, dtype)
    for lst in lists:
        _AHEAD[id(lst)] = ahead
    return ahead


def clip_tokenizer(pad: str):
    """The shipped CLIP BPE files as a ``CLIPTokenizer`` padding with ``pad`` to 77 tokens (``<|endoftext|>`` for
    CLIP-L, ``!`` for OpenCLIP), as the official repos' tokenizers do."""
    from importlib import resources

    from transformers import CLIPTokenizer

    data = resources.files("ckptlab") / "data" / "clip_tokenizer"
    with resources.as_file(data / "vocab.json") as vocab, resources.as_file(data / "merges.txt") as merges:
        return CLIPTokenizer(str(vocab), str(merges), pad_token=pad, model_max_length=77)


def empty_model(build):
    """``build()`` with its parameters on the meta device (no memory until ``fill`` puts the weights in)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def fill(module, items: list[Out], device: str, dtype, name: str, where) -> None:
    """Put every planned weight of ``items`` into ``module`` (from the read-ahead when ``load`` started one for
    this list), then check that none is left on the meta device. Every weight is made on ``device``, so the
    final ``module.to(device)`` only moves buffers the plan has no value for (no copy of a weight)."""
    ahead = _AHEAD.get(id(items))
    try:
        if ahead is not None and ahead.has(items):
            for it, value in zip(items, ahead.take(items), strict=True):
                put(module, it, device, dtype, value)
        else:
            for it in items:
                put(module, it, device, dtype)
    except BaseException:
        if ahead is not None:
            ahead.cancel()
        raise
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise MismatchError(f"{name}: {len(missing)} weight(s) missing from the file (first: {missing[0]})", where)
    module.to(device)
    module.eval()
    module.requires_grad_(False)
