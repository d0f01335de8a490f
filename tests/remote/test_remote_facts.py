"""Remote objects give exactly the facts and verdicts of the same bytes on local disk.

Oracle: the local code path (``read_file_facts``/``check`` on the file the object was uploaded from) and boto3's own
view of the bucket; real-layout files (tests/fakes), the hostile corpus (tests/hostile) and a GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fakes.library_files import tensors, write_ckpt, write_st
from hostile.corpus import build_hostile

from ckptlab.errors import CkptlabError
from ckptlab.jsonable import to_jsonable
from ckptlab.library.scanner import read_file_facts
from ckptlab.remote import RemoteEntry
from ckptlab.security import check

pytestmark = pytest.mark.xdist_group("remote-io")


def _facts(path):
    """read_file_facts, or the error line and the facts it carried (the comparison covers failures too)."""
    try:
        return {"ok": read_file_facts(path)}
    except CkptlabError as e:
        return {"error": e.message, "partial": getattr(e, "partial_facts", None)}


def _check(path):
    r = check(path)
    return {"format": r.format, "verdict": r.verdict, "container": r.container, "globals": r.globals,
            "findings": [to_jsonable(f) for f in r.findings]}


def _same(result, path) -> str:
    """``result`` as JSON with its own path (a URL or a file path) written ``<path>``: paths aside, equal."""
    return json.dumps(result, sort_keys=True, default=str).replace(json.dumps(str(path))[1:-1], "<path>")


def _legacy_pickle(path: Path, sd) -> Path:
    import torch

    torch.save({"state_dict": sd, "epoch": 3}, str(path), _use_new_zipfile_serialization=False)
    return path


def _gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "flux")
    w.add_string("general.name", "flux1-dev-test")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(20000)])  # a header longer than one block
    w.add_tensor("double_blocks.0.img_attn.norm.key_norm.scale", np.ones(128, np.float32))
    w.add_tensor("img_in.weight", np.arange(64 * 16, dtype=np.float16).reshape(64, 16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    """Real key names, small shapes: every kind the catalog tells apart."""
    root = tmp_path_factory.mktemp("real")
    sd1 = tensors("sd1_checkpoint", seed=1)
    files = {
        "sd15.safetensors": write_st(root / "sd15.safetensors", sd1),
        "sdxl.safetensors": write_st(root / "sdxl.safetensors", tensors("sdxl_checkpoint", seed=5)),
        "vae.safetensors": write_st(root / "vae.safetensors", tensors("sd1_vae", seed=2)),
        "kohya.safetensors": write_st(root / "kohya.safetensors", tensors("sd1_kohya_lora", seed=3),
                                      {"ss_network_module": "networks.lora", "ss_tag_frequency":
                                       json.dumps({"10_mychar": {"mychar": 12, "smile": 3}}),
                                       "ss_output_name": "mychar"}),
        "loha.safetensors": write_st(root / "loha.safetensors", tensors("sd1_loha", seed=3),
                                     {"ss_network_module": "lycoris.kohya"}),
        "embedding.safetensors": write_st(root / "embedding.safetensors", tensors("sd1_embedding", seed=4)),
        "sd15.ckpt": write_ckpt(root / "sd15.ckpt", sd1),
        "legacy.pt": _legacy_pickle(root / "legacy.pt", tensors("sd1_vae", seed=9)),
        "flux-Q8_0.gguf": _gguf(root / "flux-Q8_0.gguf"),
    }
    return files


def test_real_files_give_the_local_facts(s3, real_files):
    for name, path in real_files.items():
        url = s3.put(f"models/{name}", path)
        local, remote = _facts(str(path)), _facts(url)
        assert "ok" in local, (name, local)
        assert _same(remote, url) == _same(local, path), name
        assert _same(_check(url), url) == _same(_check(str(path)), path), name


def test_entry_with_listed_size_gives_the_same_facts(s3, real_files):
    """A RemoteEntry (size from the listing) reads the same facts; its size is boto3's."""
    path = real_files["kohya.safetensors"]
    url = s3.put("l/kohya.safetensors", path)
    bucket, key = url[5:].split("/", 1)
    size = s3.server.client().head_object(Bucket=bucket, Key=key)["ContentLength"]
    assert size == path.stat().st_size
    assert _same(read_file_facts(RemoteEntry(url, size)), url) == _same(read_file_facts(str(path)), path)


def test_hostile_corpus_gives_the_local_verdicts(s3, tmp_path):
    """Every hostile file: the same facts and check verdict from S3 as from disk, and no payload runs."""
    cases = build_hostile(tmp_path / "files", tmp_path / "canary")
    assert len(cases) >= 30
    mismatches = []
    for c in cases:
        url = s3.put(f"hostile/{c.path.name}", c.path)
        if _same(_facts(url), url) != _same(_facts(str(c.path)), c.path):
            mismatches.append(("facts", c.name))
        if _same(_check(url), url) != _same(_check(str(c.path)), c.path):
            mismatches.append(("check", c.name))
    assert mismatches == []
    assert not list((tmp_path / "canary").iterdir()), "a payload ran"


LIVE = r"""
import pickle, sys
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as fh:
            pickle.load(fh)
    except BaseException:
        pass
"""


def test_hostile_payloads_are_live_under_plain_pickle(tmp_path):
    """The oracle for the hostile objects used above: plain ``pickle.load`` in a throwaway process runs at least
    some of their payloads (their canaries appear), so a remote verdict of 'safe' would have been a real miss."""
    cases = build_hostile(tmp_path / "files", tmp_path / "canary")
    plain = [c for c in cases if not c.path.suffix == ".safetensors"]
    subprocess.run([sys.executable, "-c", LIVE, *[str(c.path) for c in plain]], cwd=tmp_path, timeout=300,
                   capture_output=True)
    assert len(list((tmp_path / "canary").iterdir())) >= 10


def test_missing_object_is_one_line(s3):
    with pytest.raises(CkptlabError) as e:
        read_file_facts(s3.url("nope/missing.safetensors"))
    assert "\n" not in str(e.value) and "missing.safetensors" in str(e.value)
    r = check(s3.url("nope/missing.ckpt"))
    assert r.verdict == "corrupt" and "not found" in r.findings[0].detail


def test_no_such_bucket_is_one_line(s3):
    with pytest.raises(CkptlabError) as e:
        read_file_facts("s3://no-such-bucket-ckptlab-test/x.safetensors")
    assert "\n" not in str(e.value) and "no-such-bucket-ckptlab-test" in str(e.value)


def test_tmp_helpers_leave_nothing():
    with tempfile.TemporaryDirectory() as d:
        assert not list(Path(d).iterdir())
