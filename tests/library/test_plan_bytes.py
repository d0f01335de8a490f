"""``TransformResult.file_bytes_out``: the size every one-input transform plans for its output file is the
size of the file it then writes (the written file, measured by ``os.stat``, is the oracle), for
safetensors and pickle inputs, with and without files baked in. The disk plan bills with this number."""

from __future__ import annotations

import pytest
from fakes.library_files import half, pruned, tensors, write_ckpt, write_st

from ckptlab.ops.components import extract, replace
from ckptlab.ops.convert import convert
from ckptlab.ops.precision import convert_precision
from ckptlab.ops.prune import prune


@pytest.fixture
def files(tmp_path):
    sd = tensors("sd1_checkpoint", seed=3, ema=True, dim_cap=8)
    vae = {k: v for k, v in tensors("sd1_checkpoint", seed=4, dim_cap=8).items()
           if k.startswith("first_stage_model.")}
    return {"st": write_st(tmp_path / "m.safetensors", sd, {"modelspec.title": "kept metadata"}),
            "ckpt": write_ckpt(tmp_path / "m.ckpt", half(sd)),
            "pruned": write_st(tmp_path / "p.safetensors", pruned(sd)),
            "vae": write_st(tmp_path / "vae.safetensors", vae)}


CASES = {
    "prune": lambda f, o, dry: prune([f["st"]], ema="drop", outputs=[o], dry_run=dry),
    "prune-use-fp16": lambda f, o, dry: prune([f["st"]], ema="use", precision="fp16", outputs=[o], dry_run=dry),
    "prune-pickle": lambda f, o, dry: prune([f["ckpt"]], ema="drop", outputs=[o], dry_run=dry),
    "precision": lambda f, o, dry: convert_precision([f["pruned"]], "fp16", outputs=[o], dry_run=dry),
    "precision-pickle": lambda f, o, dry: convert_precision([f["ckpt"]], "bf16", outputs=[o], dry_run=dry),
    "convert": lambda f, o, dry: convert([f["ckpt"]], out=o, dry_run=dry),
    "extract": lambda f, o, dry: extract([f["st"]], "vae", out=o, dry_run=dry),
    "replace": lambda f, o, dry: replace([f["pruned"]], vae=f["vae"], out=o, dry_run=dry),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_file_size_is_the_written_size(files, tmp_path, case):
    out = tmp_path / "out" / f"{case}.safetensors"
    out.parent.mkdir()
    (planned,) = CASES[case](files, out, True)
    assert not out.exists() and planned.file_bytes_out > planned.bytes_out > 0
    (done,) = CASES[case](files, out, False)
    assert out.stat().st_size == planned.file_bytes_out == done.file_bytes_out
