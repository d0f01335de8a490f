"""numpy arrays are the tensors of ckptlab's core; torch tensors only where a command needs torch.

Every reader returns its tensors as numpy arrays (``TensorSource.array``): zero-copy views of the mapped
file where the format allows, bf16 and fp8 as ``ml_dtypes`` dtypes. ``as_tensor`` turns such an array into a
``torch.Tensor`` without copying (``TensorSource.get`` is built on it) and ``as_array`` goes the other way, so
code written for either kind of tensor can take both. ``import_torch`` is the one place a missing PyTorch
becomes a one-line error naming the extra to install.
"""

from __future__ import annotations

from ckptlab.errors import TorchMissingError

#: what a command that needs torch prints when it is not installed (after "<command> needs PyTorch: ")
INSTALL_HINT = "pip install 'ckptlab[torch]' (see README for CPU/CUDA builds)"


def import_torch(what: str = "this command"):
    """``import torch``, or ``TorchMissingError`` ("merge needs PyTorch: pip install 'ckptlab[torch]' ...")."""
    try:
        import torch
    except ImportError:
        raise TorchMissingError(f"{what} needs PyTorch: {INSTALL_HINT}") from None
    return torch


def is_tensor(x) -> bool:
    """A torch tensor (checked without importing torch: an array never needs it)."""
    return type(x).__module__.startswith("torch")


def as_tensor(a, what: str = "this command"):
    """A numpy array as a ``torch.Tensor`` sharing its memory. bf16/fp8 (``ml_dtypes``, which torch does not
    know) travel as same-width unsigned integers and are viewed back as the torch dtype."""
    torch = import_torch(what)
    import numpy as np

    from ckptlab.formats.dtypes import from_numpy, to_torch, uint_of_width

    if is_tensor(a):
        return a
    a = np.asarray(a)  # a numpy scalar (an element of an array) becomes a 0-d array
    name = from_numpy(a.dtype)
    if a.size == 0:  # numpy gives empty arrays zero strides, which torch cannot view as bytes
        return torch.empty(a.shape, dtype=to_torch(name))
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    native = a.dtype.kind in "biufc" and a.dtype.type.__module__ == "numpy"
    if not native:
        a = a.view(uint_of_width(a.dtype.itemsize))
    if a.ndim and (any(s < 0 for s in a.strides) or any(s % a.itemsize for s in a.strides)):
        a = np.ascontiguousarray(a)  # torch takes only non-negative strides in whole elements
    if not a.flags.writeable:
        a = a.copy()  # torch.from_numpy warns on (and cannot honour) read-only memory
    t = torch.from_numpy(a)
    return t if native else t.view(to_torch(name))


def as_array(x):
    """A numpy array of ``x`` (a numpy array is returned as it is; a CPU torch tensor is viewed, not copied,
    bf16/fp8 as ``ml_dtypes`` dtypes)."""
    if not is_tensor(x):
        return x
    from ckptlab.formats.dtypes import from_torch, to_numpy, uint_of_width

    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    name = from_torch(t.dtype)
    dt = to_numpy(name)
    if dt.type.__module__ == "numpy" and dt.kind in "biufc":
        return t.numpy()
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dt.itemsize]
    if t.dim() == 0:
        t = t.reshape(1)
        return t.view(ints).numpy().view(uint_of_width(dt.itemsize)).view(dt).reshape(())
    return t.view(ints).numpy().view(uint_of_width(dt.itemsize)).view(dt)
