"""The data-only pickle machine: plain values across protocols 0-5 come out equal to the objects
that were pickled (the original objects are the oracle; nothing is unpickled), globals are
classified by exact (module, name), and the header path never imports torch."""

from __future__ import annotations

import argparse
import collections
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

from ckptlab.formats import pickle_symbols as sym
from ckptlab.formats.pickle_vm import Call, PickleVM

VALUES = [
    None, True, False, 0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**64 + 7, -(2**100), 0.5, -1e300,
    float("inf"), "", "ascii", "ünïcödé ☃", "x" * 300, b"", b"\x00\xff" * 200, (), (1,), (1, 2), (1, 2, 3),
    (1, 2, 3, 4), [], [1, [2, [3]]], {}, {"a": 1, 2: "b", (3, 4): [5]}, {1, 2, 3}, frozenset({"a"}),
    collections.OrderedDict([("z", 1), ("a", 2)]), 1 + 2j,
    {"nested": {"list": [{"k": (1.5, None)}] * 3, "bytes": b"abc" * 1000}},
    ["big frame"] + ["y" * 1000] * 200,  # > 64 KiB: several FRAMEs in protocols 4-5
]


def _plain(v):
    if isinstance(v, collections.OrderedDict):
        return dict(v)
    return v


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("i", range(len(VALUES)))
def test_plain_values_round_trip(protocol, i):
    value = VALUES[i]
    vm = PickleVM(pickle.dumps(value, protocol=protocol)).run()
    assert vm.complete, vm.findings
    assert not [f for f in vm.findings if f.severity != "info"], vm.findings
    got = vm.result
    if isinstance(value, float) and math.isinf(value):
        assert got == value
    else:
        assert got == _plain(value)


def test_shared_references_stay_shared():
    inner = [1, 2]
    vm = PickleVM(pickle.dumps([inner, inner], protocol=2)).run()
    assert vm.result[0] is vm.result[1]


def test_numpy_scalars_are_decoded_without_numpy():
    for v, want in ((np.float64(0.25), 0.25), (np.int64(840000), 840000), (np.float32(0.5), 0.5)):
        for proto in (2, 4):
            vm = PickleVM(pickle.dumps(v, protocol=proto)).run()
            assert vm.result == want and type(vm.result) in (int, float)
            assert sym.BENIGN in set(vm.globals.values()) <= {sym.BENIGN, sym.TENSOR}


def test_namespace_is_an_inert_record():
    vm = PickleVM(pickle.dumps(argparse.Namespace(lr=0.1, name="x"), protocol=2)).run()
    assert isinstance(vm.result, Call) and vm.result.qualname == "argparse.Namespace"
    assert vm.result.state == {"lr": 0.1, "name": "x"}


@pytest.mark.parametrize("module,name,category", [
    ("torch._utils", "_rebuild_tensor_v2", sym.TENSOR),
    ("torch", "HalfStorage", sym.TENSOR),
    ("torch", "bfloat16", sym.TENSOR),
    ("collections", "OrderedDict", sym.TENSOR),
    ("__builtin__", "set", sym.TENSOR),
    ("_codecs", "encode", sym.TENSOR),
    ("numpy.core.multiarray", "scalar", sym.BENIGN),
    ("numpy._core.multiarray", "_reconstruct", sym.BENIGN),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint", sym.BENIGN),
    ("argparse", "Namespace", sym.BENIGN),
    ("torch", "os.system", sym.DANGEROUS),
    ("torch.serialization", "load", sym.DANGEROUS),
    ("torch", "load", sym.DANGEROUS),
    ("os.path", "join", sym.DANGEROUS),
    ("posix", "system", sym.DANGEROUS),
    ("__builtin__", "eval", sym.DANGEROUS),
    ("builtins", "getattr", sym.DANGEROUS),
    ("copy_reg", "_reconstructor", sym.BENIGN),
    ("functools", "partial", sym.DANGEROUS),
    ("_operator", "attrgetter", sym.DANGEROUS),
    ("pkgutil", "resolve_name", sym.DANGEROUS),
    ("asyncio.unix_events", "_UnixSubprocessTransport", sym.DANGEROUS),
    ("ckptlab.formats", "open_model", sym.DANGEROUS),
    ("torchvision.models.resnet", "ResNet", sym.UNKNOWN),
    ("torch.nn.modules.linear", "Linear", sym.UNKNOWN),
    ("torch.serialization", "_get_layout", sym.BENIGN),
    ("pathlib", "PosixPath", sym.BENIGN),
    ("omegaconf.dictconfig", "DictConfig", sym.BENIGN),
    ("builtins", "dict", sym.BENIGN),
    ("uuid", "UUID", sym.DANGEROUS),
    ("torch ", "HalfStorage", sym.DANGEROUS),
    ("torch", "Half Storage", sym.DANGEROUS),
    (1, "x", sym.DANGEROUS),
])
def test_classification_is_exact(module, name, category):
    assert sym.classify(module, name)[0] == category


def test_header_path_does_not_import_torch(tmp_path):
    import torch

    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, p)
    code = ("import sys; from ckptlab.security import check; from ckptlab.formats import open_model;"
            f"r = check({str(p)!r}); s = open_model({str(p)!r}); s.infos();"
            "print(r.verdict, 'torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["safe", "False", "False"], out.stderr
