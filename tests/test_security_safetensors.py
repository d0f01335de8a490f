"""``check`` on safetensors: valid files are safe, every hostile header (the strict parser's case
list, tests/formats/test_safetensors_parser.py) is ``corrupt`` with the parser's one-line reason, and
``ckptlab check`` exits 5 without a traceback. A safetensors file that is also a pickle is malicious."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from test_safetensors_parser import BAD

from ckptlab.formats.writer import write_safetensors
from ckptlab.security import check


@pytest.mark.parametrize("name", sorted(BAD))
def test_hostile_header_is_corrupt_with_its_reason(tmp_path, name):
    data, fragment = BAD[name]
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(data)
    r = check(p)
    assert r.verdict == "corrupt"
    assert r.format in ("safetensors", "pickle")  # a too-short file cannot even claim a format
    if r.format == "safetensors":
        assert fragment in r.issues[0].detail and "\n" not in r.issues[0].detail


def test_cli_check_on_bad_headers(tmp_path, cli):
    for name in ("length_past_eof", "offsets_overlap", "json_garbage", "metadata_int_value"):
        (tmp_path / f"{name}.safetensors").write_bytes(BAD[name][0])
    write_safetensors(tmp_path / "good.safetensors", {"model.diffusion_model.out.2.weight": torch.ones(2, 2)})
    r = cli("check", tmp_path, "--json")
    recs = {json.loads(x)["path"].rsplit("/", 1)[1]: json.loads(x) for x in r.stdout.splitlines()}
    assert r.returncode == 5 and "Traceback" not in r.stderr
    assert recs["good.safetensors"]["verdict"] == "safe"
    assert {v["verdict"] for k, v in recs.items() if k != "good.safetensors"} == {"corrupt"}
    assert cli("check", tmp_path / "good.safetensors").returncode == 0


def test_length_bytes_that_spell_a_trivial_pickle_stay_safe(tmp_path):
    """Header length 0x2e4e starts the file with b'N.' - a complete pickle (None) for torch.load,
    but with no global it cannot do anything: no false alarm on such a valid file."""
    body = json.dumps({"__metadata__": {"x": "y"}}).encode()
    body += b" " * (0x2E4E - len(body))
    p = tmp_path / "n_stop.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    assert p.read_bytes()[:2] == b"N."
    assert check(p).verdict == "safe"
