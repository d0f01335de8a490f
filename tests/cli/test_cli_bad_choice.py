"""A value outside an option's fixed set is a usage error (docs/cli-errors.md): exit 2 and one line that lists
the valid values. `ls --sort`, `report --format`, `precision --to/--only` and `prune --precision` exited 1."""

from __future__ import annotations

import pytest

from ckptlab.sample.build import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("choice") / "m.safetensors", "sd1_checkpoint", dtype="F32", seed=1)


@pytest.mark.parametrize("argv, valid", [
    (["ls", "--sort", "bogus"], "size, name, mtime, path"),
    (["report", "--format", "pdf"], "table, json, csv, html"),
    (["precision", "{m}", "--to", "int8"], "fp16, bf16, fp32, fp8_e4m3fn"),
    (["precision", "{m}", "--to", "fp16", "--only", "bogus"], "unet, vae, te"),
    (["prune", "{m}", "--precision", "int8"], "fp16, bf16, fp32, fp8_e4m3fn"),
    (["prune", "{m}", "--ema", "maybe"], "'keep', 'drop', 'use'"),
    (["extract", "{m}", "-c", "wings"], "unet, vae"),
    (["dupes", "--link", "wings"], "auto, hard, sym, none"),
    (["plan-space", "--link", "wings"], "auto, hard, sym, none"),
    (["download", "civitai:1000", "--layout", "wings"], "auto, a1111, comfyui or flat"),
])
def test_a_bad_choice_is_a_usage_error_listing_the_valid_values(cli, model, tmp_path, argv, valid):
    (tmp_path / "db").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    db = tmp_path / "db" / "c.db"
    if argv[0] in ("ls", "report", "dupes", "plan-space"):
        assert cli("scan", "--db", db, model.parent).returncode == 0
        argv = [*argv, "--db", db]
    elif argv[0] == "download":  # refused before any request: nothing listens on this port
        argv = [*argv, "--dir", out]
    else:
        argv = [*argv, "--out-dir", out]
    r = cli(*[str(a).replace("{m}", str(model)) for a in argv])
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ") and valid in lines[0], r.stderr
    assert list(out.iterdir()) == []
