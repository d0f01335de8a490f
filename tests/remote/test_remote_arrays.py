"""Every format's tensors read over a URL are the local tensors, and so is the fingerprint made from them.

Oracle: the local code path on the file the object was uploaded from (``open_model(path).array``), compared with
numpy equality (values, dtype, shape), and torch's own view of the tensors it saved (``torch.save``/``save_file``).
Both transports: S3 (moto) and http (the loopback range server)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes.http_range_server import serve
from fakes.library_files import tensors, write_ckpt, write_st

from ckptlab.formats import detect_format, open_model
from ckptlab.library.fingerprint import fingerprint_file, stream_content

pytestmark = pytest.mark.xdist_group("remote-io")


def _with_views(sd: dict) -> dict:
    """Storages shared between keys, a view at an offset and a transposed (non-contiguous) view: what a pickle
    stores as one record read by several tensors (a legacy file's "view" backing, a zip record's offset)."""
    sd = dict(sd)
    w = next(k for k, v in sd.items() if v.ndim == 4 and v.shape[0] > 1)
    base = torch.randn(4 * sd[w].numel(), generator=torch.Generator().manual_seed(7))
    sd[w] = base[sd[w].numel():2 * sd[w].numel()].view(sd[w].shape)  # a view at an element offset
    sq = next(k for k, v in sd.items() if k != w and v.ndim == 4 and v.shape[0] > 1 and v.shape[0] == v.shape[1])
    sd[sq] = sd[sq].clone().transpose(0, 1)  # non-contiguous: the pickle records its strides
    return sd


def _legacy(path, sd):
    torch.save({"state_dict": sd, "epoch": 3}, str(path), _use_new_zipfile_serialization=False)
    return path


def _upper_records(path, src):
    """``src`` (a torch zip) with its records named ``archive/DATA/N``: torch finds records without case
    (miniz), so this loads; the remote reader then reads these records' local headers with the pickle's (their name
    is not the usual ``data/N``) and keeps them as stored records of the object."""
    data = src.read_bytes()
    assert data.count(b"/data/") >= 2
    path.write_bytes(data.replace(b"/data/", b"/DATA/"))
    return path


def _gguf(path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "flux")
    w.add_string("general.name", "flux1-dev-test")
    w.add_tensor("double_blocks.0.img_attn.norm.key_norm.scale", np.linspace(-2, 2, 128, dtype=np.float32))
    w.add_tensor("img_in.weight", np.arange(256 * 64, dtype=np.float16).reshape(256, 64))  # > one read-ahead block
    w.add_tensor("time_in.in_layer.bias", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real key names; dim_cap 64 so some tensors are larger than the read-ahead block (a ranged GET of their own)
    and others share it."""
    root = tmp_path_factory.mktemp("arrays")
    vae = _with_views(tensors("sd1_vae", seed=9, dim_cap=64))
    lora = tensors("sd1_kohya_lora", seed=3)
    return {
        "vae.safetensors": write_st(root / "vae.safetensors", tensors("sd1_vae", seed=2, dim_cap=64)),
        "lora-fp16.safetensors": write_st(root / "lora-fp16.safetensors",
                                          {k: v.half() for k, v in lora.items()}),
        "vae.ckpt": write_ckpt(root / "vae.ckpt", vae),  # torch zip (stored records)
        "lora.ckpt": write_ckpt(root / "lora.ckpt", lora),  # torch zip, small records (read with the header)
        "upper.ckpt": _upper_records(root / "upper.ckpt", write_ckpt(root / "src.ckpt", lora)),
        "legacy-vae.pt": _legacy(root / "legacy-vae.pt", vae),  # pre-1.6 torch: records inside the pickle stream
        "legacy-lora.pt": _legacy(root / "legacy-lora.pt", {k: v.half() for k, v in lora.items()}),
        "flux-F16.gguf": _gguf(root / "flux-F16.gguf"),
    }


@pytest.fixture(scope="module")
def http_urls(files):
    srv = serve({name: path for name, path in files.items()})
    yield {name: srv.url(name) for name in files}
    srv.stop()


def _assert_same_arrays(url, path) -> int:
    with open_model(str(path)) as local, open_model(url) as remote:
        assert remote.infos() == local.infos()
        for key in local.infos():
            a, b = local.array(key), remote.array(key)
            assert b.dtype == a.dtype and b.shape == a.shape, key
            assert np.array_equal(a, b, equal_nan=True), key
        return len(local.infos())


def _formats(files):
    return {detect_format(str(p)) for p in files.values()}


def test_arrays_over_s3_equal_the_local_arrays(s3, files):
    assert _formats(files) == {"safetensors", "pickle", "gguf"}
    for name, path in files.items():
        assert _assert_same_arrays(s3.put(f"m/{name}", path), path) > 0, name


def test_arrays_over_http_equal_the_local_arrays(http_urls, files):
    for name, path in files.items():
        assert _assert_same_arrays(http_urls[name], path) > 0, name


def test_local_arrays_are_what_torch_saved(files):
    """The oracle above is itself right: the local reader gives the values torch saved (views included)."""
    sd = torch.load(str(files["legacy-vae.pt"]), weights_only=True)["state_dict"]
    with open_model(str(files["legacy-vae.pt"])) as src:
        for key, t in sd.items():
            assert np.array_equal(src.array(key), t.numpy()), key
    for name in ("vae.ckpt", "upper.ckpt"):
        sd = torch.load(str(files[name]), weights_only=True)["state_dict"]
        with open_model(str(files[name])) as src:
            for key, t in sd.items():
                assert np.array_equal(src.array(key), t.numpy()), key


@pytest.mark.parametrize("transport", ["s3", "http"])
def test_fingerprint_over_a_url_is_the_local_fingerprint(request, files, transport):
    """``fingerprint_file(url)`` (ranged reads, one tensor at a time) and ``stream_content(url)`` (one streamed GET
    for safetensors) of every format: the local fingerprint, bf16 form included."""
    if transport == "s3":
        s3 = request.getfixturevalue("s3")
        urls = {name: s3.put(f"fp/{name}", path) for name, path in files.items()}
    else:
        urls = request.getfixturevalue("http_urls")
    for name, path in files.items():
        local = fingerprint_file(str(path))
        assert local.n_tensors > 0, name
        assert fingerprint_file(urls[name]) == local, name
        _, streamed = stream_content(urls[name], hash=False)
        assert streamed == local, name
        _, streamed = stream_content(urls[name], hash=True)
        assert streamed == local, name
