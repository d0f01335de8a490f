"""Peer agreement: weighted_sum and add_difference equal sd-mecha's output tensor for tensor
(fp32 merge dtype, fp16 output). Skipped when sd-mecha (dev extra) is not installed."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from ckptlab.merging import merge
from ckptlab.sample.build import write_model

sd_mecha = pytest.importorskip("sd_mecha")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("peer")
    return [write_model(d / f"{n}.safetensors", "sd1_checkpoint", dtype="F16", seed=s)
            for n, s in (("a", 21), ("b", 22), ("c", 23))]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["weighted_sum", "add_difference"])
def test_equal_to_sd_mecha(method, sd1, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TQDM_DISABLE", "1")

    a, b, c = sd1
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "mecha.safetensors"
    ma, mb, mc = (sd_mecha.model(str(p), config="sd1-ldm") for p in sd1)
    if method == "weighted_sum":
        merge(method, [a, b], ours, params={"alpha": 0.3}, dtype="fp16")
        recipe = sd_mecha.weighted_sum(ma, mb, alpha=0.3)
    else:
        merge(method, [a, b, c], ours, params={"alpha": 0.7}, dtype="fp16")
        recipe = sd_mecha.add_difference(ma, mb, mc, alpha=0.7)
    sd_mecha.merge(recipe, output=str(theirs), merge_device="cpu", merge_dtype=torch.float32,
                   output_device="cpu", output_dtype=torch.float16, threads=0)
    x, y = load_file(ours), load_file(theirs)
    y.pop("__metadata__", None)
    # sd-mecha also casts integer tensors (position_ids) to the output dtype; ckptlab keeps them int64
    common = [k for k in y if k in x and x[k].is_floating_point()]
    assert len(common) >= 1100
    for k in common:
        assert x[k].dtype == y[k].dtype == torch.float16, k
        assert x[k].equal(y[k]), (k, (x[k] != y[k]).sum().item(), x[k].numel())
