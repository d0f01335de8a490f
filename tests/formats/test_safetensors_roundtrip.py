"""Round trips against the reference ``safetensors`` library: what it writes we read identically
(values, dtypes, shapes, metadata), and what we write it loads with equal tensors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptlab.formats import open_model
from ckptlab.formats.dtypes import DTYPES, from_torch, to_torch
from ckptlab.formats.safetensors import SafetensorsSource
from ckptlab.formats.writer import write_safetensors


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((str(dtype), tuple(shape))) % 2**31)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float32) * 3
        return t.to(dtype)
    lo, hi = (0, 250) if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else (-120, 120)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


ALL_DTYPES = [to_torch(d) for d in DTYPES]
SHAPES = [(), (0,), (3, 0, 2), (7,), (4, 3, 3, 2)]


def _family_state() -> dict[str, torch.Tensor]:
    """Every dtype x shape under real SD1 key names (index-suffixed to stay unique)."""
    out = {}
    base = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.quant_conv.weight",
    ]
    for i, dt in enumerate(ALL_DTYPES):
        for j, shape in enumerate(SHAPES):
            out[f"{base[j]}.{i}"] = _sample(dt, shape)
    return out


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # bit-level comparison: NaN-safe and valid for every dtype (fp8 has no arithmetic ops)
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == \
        bytes(b.contiguous().reshape(-1).view(torch.uint8).numpy())


def test_files_written_by_safetensors_are_read_identically(tmp_path):
    state = _family_state()
    meta = {"modelspec.architecture": "stable-diffusion-v1", "ss_tag_frequency": '{"a": {"b": 1}}', "ü": "ß"}
    p = tmp_path / "lib.safetensors"
    save_file(state, str(p), metadata=meta)
    with open_model(p) as src:
        assert isinstance(src, SafetensorsSource)
        assert src.metadata == meta
        assert set(src.keys()) == set(state)
        for k, t in state.items():
            info = src.info(k)
            assert info.dtype == from_torch(t.dtype)
            assert info.shape == tuple(t.shape)
            assert info.nbytes == t.numel() * t.element_size()
            got = src.get(k)
            assert _equal(got, t), k


def test_files_we_write_load_in_safetensors_with_equal_tensors(tmp_path):
    state = _family_state()
    meta = {"ckptlab.operation": "test", "modelspec.title": "round trip ✓"}
    p = tmp_path / "ours.safetensors"
    write_safetensors(p, state, meta)
    loaded = load_file(str(p))
    assert set(loaded) == set(state)
    for k, t in state.items():
        assert _equal(loaded[k], t), k
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        assert f.metadata() == meta
        assert list(f.keys()) == sorted(state)  # library sorts; the header order is ours
    with SafetensorsSource(p) as src:
        assert src.keys() == list(state)  # we keep the order we planned


def test_our_output_bytes_match_the_library_for_the_same_tensors(tmp_path):
    """Same tensors in the library's canonical order: the data buffers are byte-identical."""
    state = {k: v for k, v in sorted(_family_state().items())}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, state)
    save_file(state, str(theirs))
    a, b = SafetensorsSource(ours), SafetensorsSource(theirs)
    for k in state:
        assert bytes(a.raw_bytes(k)) == bytes(b.raw_bytes(k))
    a.close()
    b.close()


def test_tensors_are_mmap_backed_and_never_write_through(tmp_path):
    p = tmp_path / "m.safetensors"
    t = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    save_file({"model.diffusion_model.out.2.weight": t}, str(p))
    before = p.read_bytes()
    src = SafetensorsSource(p)
    got = src.get("model.diffusion_model.out.2.weight")
    got.mul_(0)  # a private copy-on-write page; the input file must not change
    assert p.read_bytes() == before
    del got
    src.close()
    with SafetensorsSource(p) as again:
        assert torch.equal(again.get("model.diffusion_model.out.2.weight"), t)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F8_E4M3", "BOOL", "U64", "I8"])
def test_single_dtype_file_header_values(tmp_path, dtype):
    t = _sample(to_torch(dtype), (5, 2))
    p = tmp_path / f"{dtype}.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": t}, str(p))
    with SafetensorsSource(p) as src:
        (k,) = src.keys()
        assert src.info(k).dtype == dtype
        assert _equal(src.get(k), t)


def test_concurrent_reads_from_threads(tmp_path):
    """Worker threads (merge/convert) may share one source: every tensor comes back intact."""
    from concurrent.futures import ThreadPoolExecutor

    state = {f"model.diffusion_model.input_blocks.{i}.0.weight": torch.randn(64, 32) for i in range(64)}
    p = tmp_path / "threads.safetensors"
    save_file(state, str(p))
    src = SafetensorsSource(p)
    with ThreadPoolExecutor(8) as ex:
        got = dict(zip(state, ex.map(lambda k: src.get(k).clone(), state), strict=True))
    assert all(torch.equal(got[k], v) for k, v in state.items())
    src.close()
