"""The merge engine and methods on small real-layout files: every method against a formula computed
here (numpy, float64), chunking, determinism across thread counts, dtype rules."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptlab.merging import merge
from ckptlab.sample.build import write_model


@pytest.fixture(scope="session")
def sd1(tmp_path_factory):
    """Three SD1.5 checkpoints (real key layout, small widths), fp32, different seeds."""
    d = tmp_path_factory.mktemp("sd1")
    return [write_model(d / f"{n}.safetensors", "sd1_checkpoint", dtype="F32", seed=s)
            for n, s in (("a", 1), ("b", 2), ("c", 3))]


def _sha(p) -> str:
    return hashlib.sha256(open(p, "rb").read()).hexdigest()


def _np(d):
    return {k: v.double().numpy() for k, v in d.items() if v.is_floating_point()}


def _run(method, files, tmp_path, name="out.safetensors", **kw):
    out = tmp_path / name
    params = {k: kw.pop(k) for k in ("alpha", "beta", "gamma", "density") if k in kw}
    merge(method, files, out, params=params, **kw)
    return out


def _close(got, want, key):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=key)


ELEMENTWISE = {
    "weighted_sum": (dict(alpha=0.3), lambda a, b, c: a * 0.7 + b * 0.3),
    "add_difference": (dict(alpha=0.8), lambda a, b, c: a + (b - c) * 0.8),
    "triple_sum": (dict(alpha=0.2, beta=0.5), lambda a, b, c: a * 0.3 + b * 0.2 + c * 0.5),
    "sum_twice": (dict(alpha=0.4, beta=0.25), lambda a, b, c: (a * 0.6 + b * 0.4) * 0.75 + c * 0.25),
    "train_difference": (dict(alpha=0.5), lambda a, b, c: a + (b - c) * 1.8 * 0.5 * np.divide(
        np.abs(b - a), np.abs(b - a) + np.abs(b - c), out=np.zeros_like(a), where=(np.abs(b - a) + np.abs(b - c)) != 0)),
    "subtract": (dict(alpha=1.0), lambda a, b, c: a - b),
}


@pytest.mark.parametrize("method", sorted(ELEMENTWISE))
def test_elementwise_methods_match_formula(method, sd1, tmp_path):
    params, f = ELEMENTWISE[method]
    n_in = 2 if method in ("weighted_sum", "subtract") else 3
    out = _run(method, sd1[:n_in], tmp_path, **params)
    a, b, c = (_np(load_file(p)) for p in sd1)
    o = load_file(out)
    floats = [k for k in a if k in o]
    assert len(floats) > 1000
    for k in floats:
        _close(o[k].double().numpy(), f(a[k], b[k], c[k]), k)


def _ties_oracle(base, models, density, alpha):
    deltas = []
    for m in models:
        d = m - base
        k = max(int((1 - density) * d.size), 1)
        thresh = np.sort(np.abs(d).ravel())[k - 1]
        deltas.append(np.where(np.abs(d) >= thresh, d, 0.0))
    deltas = np.stack(deltas)
    sign = np.sign(deltas.sum(0))
    agree = (np.sign(deltas) == sign) & (deltas != 0)
    merged = (deltas * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return base + alpha * merged


def _slerp_oracle(a, b, t):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    au, bu = a / na, b / nb
    dot = np.clip((au * bu).sum(), -1, 1)
    om = np.arccos(dot)
    res = (np.sin((1 - t) * om) * au + np.sin(t * om) * bu) / np.sin(om)
    return res * ((1 - t) * na + t * nb)


def _cosine_oracle(a, b, alpha):
    an = a / np.maximum(np.linalg.norm(a, axis=0, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=0, keepdims=True), 1e-12)
    sim = (an * bn).sum(0) / np.maximum(np.linalg.norm(an, axis=0) * np.linalg.norm(bn, axis=0), 1e-8)
    k = 1 - np.clip(sim - alpha, 0, 1)
    return a + k * (b - a)


def _extract_oracle(base, b, c, alpha, beta, gamma):
    d1, d2 = b - base, c - base
    cos = (d1 * d2).sum(-1) / np.maximum(np.linalg.norm(d1, axis=-1) * np.linalg.norm(d2, axis=-1), 1e-8)
    s = ((np.clip(cos, -1, 1)[..., None] + 1) / 2) ** gamma
    return (d1 + alpha * (d2 - d1)) * (s + beta * ((1 - s) - s))


SAMPLE_KEYS = [
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.middle_block.0.in_layers.2.weight",
    "model.diffusion_model.output_blocks.5.0.out_layers.3.bias",
    "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight",
    "first_stage_model.decoder.up.1.block.0.conv1.weight",
]


@pytest.mark.parametrize("method", ["ties", "slerp", "add_cosine", "extract"])
def test_whole_tensor_methods_match_formula(method, sd1, tmp_path):
    a, b, c = (_np(load_file(p)) for p in sd1)
    if method == "ties":
        out = _run("ties", sd1, tmp_path, alpha=0.9, density=0.3)
        want = {k: _ties_oracle(a[k], [b[k], c[k]], 0.3, 0.9) for k in SAMPLE_KEYS}
    elif method == "slerp":
        out = _run("slerp", sd1[:2], tmp_path, alpha=0.35)
        want = {k: _slerp_oracle(a[k], b[k], 0.35) for k in SAMPLE_KEYS}
    elif method == "add_cosine":
        out = _run("add_cosine", sd1[:2], tmp_path, alpha=0.01)
        want = {k: _cosine_oracle(a[k], b[k], 0.01) for k in SAMPLE_KEYS}
    else:
        out = _run("extract", sd1, tmp_path, alpha=0.3, beta=0.2, gamma=2.0)
        want = {k: _extract_oracle(a[k], b[k], c[k], 0.3, 0.2, 2.0) for k in SAMPLE_KEYS}
    o = load_file(out)
    for k in SAMPLE_KEYS:
        _close(o[k].double().numpy(), want[k], k)


def test_dare_drops_and_rescales(sd1, tmp_path):
    out = _run("dare", sd1[:2], tmp_path, alpha=1.0, density=0.25, seed=7)
    a, b, _ = (_np(load_file(p)) for p in sd1)
    o = _np(load_file(out))
    kept = total = 0
    for k in SAMPLE_KEYS:
        d = o[k] - a[k]
        full = (b[k] - a[k]) / 0.25
        is_kept = np.isclose(d, full, rtol=1e-4, atol=1e-5)
        is_dropped = np.abs(d) <= 1e-6
        assert np.all(is_kept | is_dropped), k  # every element: dropped, or the rescaled difference
        kept += int((is_kept & ~is_dropped).sum())
        total += d.size
    assert 0.2 < kept / total < 0.3
    # seeded: same seed -> same bytes, other seed -> other mask
    again = _run("dare", sd1[:2], tmp_path, name="again.safetensors", alpha=1.0, density=0.25, seed=7)
    other = _run("dare", sd1[:2], tmp_path, name="other.safetensors", alpha=1.0, density=0.25, seed=8)
    assert _sha(out) == _sha(again) != _sha(other)


def test_chunked_compute_equals_whole_tensor(sd1, tmp_path, monkeypatch):
    from ckptlab.merging import graph

    whole = _run("add_difference", sd1, tmp_path, name="whole.safetensors", alpha=0.7, dtype="fp16")
    monkeypatch.setattr(graph, "CHUNK_ELEMS", 1000)
    chunked = _run("add_difference", sd1, tmp_path, name="chunked.safetensors", alpha=0.7, dtype="fp16")
    assert _sha(whole) == _sha(chunked)


@pytest.mark.parametrize("method", ["ties", "slerp", "add_cosine", "extract", "dare"])
def test_pieced_methods_match_formula_and_whole_tensor(method, sd1, tmp_path, monkeypatch):
    """With pieces of 1000 elements every sample tensor is computed piece by piece (ties: exact trim
    thresholds by radix select; slerp: norms accumulated per piece; add_cosine by columns, extract by
    rows; dare: a mask per piece). Results still follow the formulas; ties (exact thresholds) and extract
    (row-wise) are bit-identical to the whole-tensor computation."""
    from ckptlab.merging import graph, methods

    a, b, c = (_np(load_file(p)) for p in sd1)
    kw = {"ties": dict(alpha=0.9, density=0.3), "slerp": dict(alpha=0.35), "add_cosine": dict(alpha=0.01),
          "extract": dict(alpha=0.3, beta=0.2, gamma=2.0), "dare": dict(alpha=1.0, density=0.25, seed=5)}[method]
    files = sd1[:2] if method in ("slerp", "add_cosine", "dare") else sd1
    whole = load_file(_run(method, files, tmp_path, name="whole.safetensors", **dict(kw)))
    monkeypatch.setattr(graph, "CHUNK_ELEMS", 1000)
    monkeypatch.setattr(methods, "KTH_WHOLE_MAX", 0)  # ties: the radix select for every pieced tensor
    out = load_file(_run(method, files, tmp_path, name="pieces.safetensors", **dict(kw)))
    big = [k for k in SAMPLE_KEYS if out[k].numel() > 1000]
    assert len(big) >= 3
    for k in big:
        o = out[k].double().numpy()
        if method == "ties":
            _close(o, _ties_oracle(a[k], [b[k], c[k]], 0.3, 0.9), k)
        elif method == "slerp":
            _close(o, _slerp_oracle(a[k], b[k], 0.35), k)
        elif method == "add_cosine":
            _close(o, _cosine_oracle(a[k], b[k], 0.01), k)
        elif method == "extract":
            _close(o, _extract_oracle(a[k], b[k], c[k], 0.3, 0.2, 2.0), k)
        else:  # dare: every element dropped or rescaled, about density of them kept
            d = o - a[k]
            full = (b[k] - a[k]) / 0.25
            kept = np.isclose(d, full, rtol=1e-4, atol=1e-5)
            assert np.all(kept | (np.abs(d) <= 1e-6)), k
            assert 0.15 < kept.mean() < 0.35, k
        if method in ("ties", "extract"):  # add_cosine's column sums may vectorize in another order
            assert torch.equal(out[k], whole[k]), k


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_radix_select_equals_kthvalue(dtype):
    from ckptlab.merging.methods import _radix_kth_abs

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    base = torch.randn(5000, generator=g).to(dt)
    other = base + torch.randn(5000, generator=g).to(dt) * (torch.rand(5000, generator=g) > 0.3).to(dt)
    other[:50] = base[:50]          # exact zeros in the difference
    other[50:60] = base[50:60] + 1  # duplicates
    d = (other - base).abs()

    def pieces():
        for i in range(0, 5000, 700):
            yield [base[i:i + 700], other[i:i + 700]]

    for k in (1, 2, 49, 50, 51, 1234, 2500, 4999, 5000):
        assert _radix_kth_abs(pieces, 1, k) == float(d.kthvalue(k).values), k


def test_blocks_left_out_of_a_density_string_keep_the_default(sd1, tmp_path):
    """`--density IN=0.5`: IN blocks keep half of each task vector, every other block the default 0.2 (0 is
    not a density, so unnamed blocks do not get 0 as they do for alpha)."""
    a, b, c = (_np(load_file(p)) for p in sd1)
    o = _np(load_file(_run("ties", sd1, tmp_path, alpha=1.0, density="IN=0.5")))
    for k, dens in (("model.diffusion_model.input_blocks.1.1.proj_in.weight", 0.5),
                    ("model.diffusion_model.output_blocks.5.0.out_layers.3.weight", 0.2),
                    ("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight", 0.2)):
        _close(o[k], _ties_oracle(a[k], [b[k], c[k]], dens, 1.0), k)


def test_bytes_do_not_depend_on_threads(sd1, tmp_path):
    import ckptlab.merging.engine as engine

    outs = []
    for threads in (1, 2, 4):
        p = tmp_path / f"t{threads}.safetensors"
        merge("dare", sd1, p, params={"alpha": "GRAD_A", "density": 0.5}, seed=3, threads=threads)
        outs.append(_sha(p))
    p = tmp_path / "tiny_budget.safetensors"
    old = engine.DEFAULT_BUDGET
    try:
        engine.DEFAULT_BUDGET = 1  # one key in flight at a time
        merge("dare", sd1, p, params={"alpha": "GRAD_A", "density": 0.5}, seed=3, threads=3)
    finally:
        engine.DEFAULT_BUDGET = old
    outs.append(_sha(p))
    assert len(set(outs)) == 1


def test_block_weights_apply_per_block(sd1, tmp_path):
    out = _run("weighted_sum", sd1[:2], tmp_path, alpha="BASE=0.1,IN=0.2,M00=0.6,OUT=0.9")
    a, b, _ = (_np(load_file(p)) for p in sd1)
    o = _np(load_file(out))
    expect = {
        "model.diffusion_model.time_embed.0.weight": 0.2,  # time_embed -> IN00
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": 0.2,
        "model.diffusion_model.middle_block.1.norm.weight": 0.6,
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": 0.9,
        "model.diffusion_model.out.2.weight": 0.9,
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": 0.1,
        "first_stage_model.encoder.conv_in.weight": 0.1,
    }
    for k, al in expect.items():
        _close(o[k], a[k] * (1 - al) + b[k] * al, k)


def test_output_dtype_follows_a_and_dtype_option(tmp_path):
    a = write_model(tmp_path / "a.safetensors", "sd1_checkpoint", dtype="BF16", seed=1)
    b = write_model(tmp_path / "b.safetensors", "sd1_checkpoint", dtype="F16", seed=2)
    out = _run("weighted_sum", [a, b], tmp_path, alpha=0.5)
    with safe_open(out, "pt") as f:
        k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        t = f.get_tensor(k)
        assert str(t.dtype) == "torch.bfloat16"  # never bf16 -> fp16 silently
        ta, tb = load_file(a)[k].float(), load_file(b)[k].float()
        assert t.equal((ta * 0.5 + tb * 0.5).bfloat16())
    out16 = _run("weighted_sum", [a, b], tmp_path, name="o16.safetensors", alpha=0.5, dtype="fp16")
    with safe_open(out16, "pt") as f:
        assert str(f.get_tensor(k).dtype) == "torch.float16"


def test_inputs_are_never_modified(sd1, tmp_path):
    before = [_sha(p) for p in sd1]
    _run("train_difference", sd1, tmp_path, alpha=1.0)
    assert [_sha(p) for p in sd1] == before


def test_progress_reports_every_output_byte(sd1, tmp_path):
    calls = []

    def progress(advance=0, *, total=None, description=None):
        calls.append((advance, total, description))

    out = tmp_path / "p.safetensors"
    merge("weighted_sum", sd1[:2], out, progress=progress)
    totals = [t for _, t, _ in calls if t is not None]
    raw = out.read_bytes()
    data = len(raw) - 8 - int.from_bytes(raw[:8], "little")  # file size minus the header
    assert totals == [data] and sum(a for a, _, _ in calls) == data
