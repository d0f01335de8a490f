"""``TensorSource.array``: every format's one data path, as numpy, without torch; ``get`` is the same memory as a
torch tensor. Oracles: the reference ``safetensors`` loader, the tensors ``torch.save`` was given (views with offsets
and strides, shared storages), the ``gguf`` library's own writer input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptlab.errors import UnsupportedFormatError
from ckptlab.formats import open_model
from ckptlab.formats.arrays import as_array
from ckptlab.formats.dtypes import to_numpy

SRC = Path(__file__).resolve().parents[2] / "src"


def _bits(x) -> bytes:
    a = np.ascontiguousarray(as_array(x))
    return a.reshape(-1).view(np.uint8).tobytes()


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 10
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "e4m3": base.clamp(-448, 448).to(torch.float8_e4m3fn), "e5m2": base.to(torch.float8_e5m2),
        "i64": base.long(), "i32": base.int(), "i16": base.short(), "i8": base.to(torch.int8),
        "u8": base.abs().to(torch.uint8), "bool": base > 0, "u16": base.abs().to(torch.uint16),
        "scalar": torch.tensor(1.5), "empty": torch.empty(0, 4), "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "c64": torch.complex(base, -base),
    }


def test_safetensors_array_is_a_zero_copy_view_equal_to_the_reference_loader(tmp_path):
    p = tmp_path / "all.safetensors"
    tensors = _every_dtype()
    save_file(tensors, str(p))
    ref = load_file(str(p))
    with open_model(p) as src:
        for k, t in ref.items():
            a = src.array(k)
            assert a.shape == tuple(t.shape) and a.dtype == to_numpy(src.info(k).dtype), k
            assert _bits(a) == _bits(t), k
            if t.numel():
                assert not a.flags.owndata, k  # a view of the mapped file, not a copy
                g = src.get(k)
                assert g.dtype == t.dtype and g.data_ptr() == a.ctypes.data, k  # get() is the same memory
    assert src.array("bf16").dtype == ml_dtypes.bfloat16 and src.array("e4m3").dtype == ml_dtypes.float8_e4m3fn


def test_pickle_views_with_offsets_strides_and_shared_storage(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = {
        "whole": base,
        "cols": base[:, ::3],  # strided
        "t": base.t(),  # transposed
        "tail": base[4:, 5:],  # offset + strides
        "row": base[2],  # offset, 1-D
        "elem": base[3, 7],  # 0-d with an offset
        "bcast": torch.ones(1, 4).expand(3, 4),  # stride 0
        "bf16": base.bfloat16()[1:, ::2],
        "empty": base[:0],
        "flag": torch.tensor([True, False, True]),
    }
    p = tmp_path / "views.ckpt"
    torch.save(sd, p)
    with open_model(p) as src:
        assert src.verdict == "safe"
        for k, t in sd.items():
            a = src.array(k)
            assert a.shape == tuple(t.shape), k
            assert _bits(a) == _bits(t), k
            assert _bits(src.get(k)) == _bits(t), k
        # views of one storage share memory in the file's map (nothing was copied per view)
        assert np.shares_memory(src.array("whole"), src.array("tail"))


def test_gguf_array_and_quantized_refusal(tmp_path):
    from test_formats_gguf import BIAS, NORM, QKV, _write

    from ckptlab.formats.gguf import QUANTIZED_MESSAGE

    p = tmp_path / "f.gguf"
    tensors = _write(p)
    with open_model(p) as src:
        np.testing.assert_array_equal(src.array(NORM), tensors[NORM])
        np.testing.assert_array_equal(src.array(BIAS), tensors[BIAS])
        assert not src.array(NORM).flags.owndata
        with pytest.raises(UnsupportedFormatError, match=QUANTIZED_MESSAGE):
            src.array(QKV)


def test_gguf_big_endian_array_is_native(tmp_path):
    from gguf import GGUFEndian
    from test_formats_gguf import BIAS, NORM, _write

    p = tmp_path / "be.gguf"
    tensors = _write(p, GGUFEndian.BIG)
    with open_model(p) as src:
        for k in (NORM, BIAS):
            a = src.array(k)
            assert a.dtype.byteorder in ("=", "<", "|")
            np.testing.assert_array_equal(a, tensors[k])


def test_every_format_reads_its_arrays_where_torch_cannot_be_imported(tmp_path):
    """safetensors, a torch-zip pickle, GGUF and a diffusers folder, read in a process where ``import torch``
    fails; the bytes equal the reference loaders' (computed here, with torch)."""
    from test_formats_gguf import BIAS, NORM, _write
    from test_formats_no_torch import BLOCKER

    st = tmp_path / "m.safetensors"
    tensors = {k: v for k, v in _every_dtype().items() if k != "c64"}
    save_file(tensors, str(st))
    ck = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.arange(12.0).reshape(3, 4)[:, 1:], "b": torch.ones(3).bfloat16()}}, ck)
    gg = tmp_path / "m.gguf"
    gguf_tensors = _write(gg)
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    save_file({"decoder.conv_in.bias": torch.arange(4.0)}, str(folder / "diffusion_pytorch_model.safetensors"))

    want = {f"{st}:{k}": _bits(t) for k, t in tensors.items()}
    want.update({f"{ck}:a": _bits(torch.arange(12.0).reshape(3, 4)[:, 1:]), f"{ck}:b": _bits(torch.ones(3).bfloat16())})
    want.update({f"{gg}:{k}": gguf_tensors[k].tobytes() for k in (NORM, BIAS)})
    want[f"{folder}:decoder.conv_in.bias"] = _bits(torch.arange(4.0))  # a component folder: its own names

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    code = (
        "import sys, json, numpy as np\n"
        "from ckptlab.formats import open_model\n"
        "out = {}\n"
        "for spec in sys.argv[1:]:\n"
        "    path, key = spec.rsplit(':', 1)\n"
        "    with open_model(path) as src:\n"
        "        a = np.ascontiguousarray(src.array(key))\n"
        "        out[spec] = a.reshape(-1).view(np.uint8).tobytes().hex()\n"
        "print(json.dumps(out))\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(SRC)]))
    r = subprocess.run([sys.executable, "-c", code, *want], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)
    assert {k: bytes.fromhex(v) for k, v in got.items()} == want


def test_writer_takes_numpy_arrays_like_tensors(tmp_path):
    """The same tensors written as torch tensors and as numpy arrays (bf16/fp8 as ml_dtypes, a big-endian array,
    a strided view, 0-d, empty) give byte-identical files, which the reference loader reads back."""
    from ckptlab.formats.writer import write_safetensors

    tensors = _every_dtype()
    tensors["strided"] = torch.arange(20.0).reshape(4, 5)[:, ::2]
    arrays = {k: as_array(t) for k, t in tensors.items()}
    arrays["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    tensors["big_endian"] = torch.arange(6.0).reshape(2, 3)
    a, t = tmp_path / "a.safetensors", tmp_path / "t.safetensors"
    write_safetensors(a, arrays, {"k": "v"})
    write_safetensors(t, tensors, {"k": "v"})
    assert a.read_bytes() == t.read_bytes()
    ref = load_file(str(a))
    for k, v in tensors.items():
        assert ref[k].dtype == v.dtype and _bits(ref[k]) == _bits(v), k
