"""Remote objects give exactly the facts and verdicts of the same bytes on local disk.

Oracle: the local code path (``read_file_facts``/``check`` on the file the object was uploaded from) and boto3's own
view of the bucket; real-layout files (tests/fakes), the hostile corpus (tests/hostile) and a GGUF file."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_diffusers_prefix_gives_the_local_facts(s3, tmp_path):
    """A diffusers pipeline uploaded under a prefix: inspect's identification, check's per-file verdicts and the
    catalog facts equal the local folder's (paths aside)."""
    from ckptlab.arch.identify import identify
    from ckptlab.ops.diffusers_io import to_diffusers

    src = write_st(tmp_path / "sd15.safetensors", tensors("sd1_checkpoint", seed=1))
    folder = tmp_path / "pipe"
    to_diffusers(src, folder)
    urls = s3.put_tree("pipes/pipe", folder)
    assert any(u.endswith("model_index.json") for u in urls)
    url = s3.url("pipes/pipe")
    for u in (url, url + "/"):
        assert _same(_facts(u), u) == _same(_facts(str(folder)), folder)
        assert _same(to_jsonable(identify(u)), u) == _same(to_jsonable(identify(str(folder))), folder)
    from ckptlab.security import check_many

    remote = sorted((r.path[len(url) + 1:], r.verdict) for r in check_many([url]))
    local = sorted((str(r.path.relative_to(folder)), r.verdict) for r in check_many([folder]))
    assert remote == local and len(local) >= 3


def test_listed_etag_and_version_are_read(s3, real_files):
    """A RemoteEntry's ETag guards the read (an object replaced since the listing is an error, never other bytes);
    a version id reads that version. Oracle: boto3's own head_object / list_object_versions."""
    a, b = real_files["vae.safetensors"], real_files["embedding.safetensors"]
    url = s3.put("v/m.safetensors", a)
    bucket, key = url[5:].split("/", 1)
    head = s3.server.client().head_object(Bucket=bucket, Key=key)
    entry = RemoteEntry(url, head["ContentLength"], etag=head["ETag"].strip('"'))
    assert _same(read_file_facts(entry), url) == _same(read_file_facts(str(a)), a)
    s3.put("v/m.safetensors", b)  # replaced after the listing
    with pytest.raises(CkptlabError) as e:
        read_file_facts(RemoteEntry(url, head["ContentLength"], etag=head["ETag"].strip('"')))
    assert "changed" in str(e.value) and "\n" not in str(e.value)


def test_version_id_reads_that_version(s3_server, monkeypatch, real_files):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.bucket("versioned-remote-io", versioned=True)
    a, b = real_files["vae.safetensors"], real_files["embedding.safetensors"]
    s3_server.put(bucket, "m.safetensors", a)
    s3_server.put(bucket, "m.safetensors", b)
    versions = s3_server.client().list_object_versions(Bucket=bucket, Prefix="m.safetensors")["Versions"]
    old = next(v for v in versions if not v["IsLatest"])
    url = f"s3://{bucket}/m.safetensors"
    entry = RemoteEntry(url, old["Size"], etag=old["ETag"].strip('"'), version_id=old["VersionId"])
    assert _same(read_file_facts(entry), url) == _same(read_file_facts(str(a)), a)
    assert _same(read_file_facts(f"{url}?versionId={old['VersionId']}"), f"{url}?versionId={old['VersionId']}") == \
        _same(read_file_facts(str(a)), a)
    assert _same(read_file_facts(url), url) == _same(read_file_facts(str(b)), b)


def test_deep_check_gives_the_local_findings(s3, real_files, tmp_path):
    """check --deep on a URL (every tensor record read, CRCs and NaN/Inf): the local findings, including a damaged
    record's CRC and a NaN."""
    import numpy as np

    sd = tensors("sd1_vae", seed=2)
    key = next(iter(sd))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    files = {**{k: real_files[k] for k in ("sd15.ckpt", "legacy.pt", "vae.safetensors")},
             "nan.safetensors": write_st(tmp_path / "nan.safetensors", sd),
             "nan.ckpt": write_ckpt(tmp_path / "nan.ckpt", sd)}
    damaged = tmp_path / "damaged.ckpt"
    data = bytearray(real_files["sd15.ckpt"].read_bytes())
    data[-(len(data) // 3)] ^= 0xFF  # a byte inside a tensor record
    damaged.write_bytes(bytes(data))
    files["damaged.ckpt"] = damaged
    verdicts = set()
    for name, path in files.items():
        url = s3.put(f"deep/{path.name}", path)
        local, remote_ = check(str(path), deep=True), check(url, deep=True)
        assert _same(_check_result(remote_), url) == _same(_check_result(local), path), name
        verdicts.add(local.verdict)
    assert verdicts >= {"safe", "corrupt"}
    assert np.isnan(sd[key].numpy()).any()


def _check_result(r):
    return {"format": r.format, "verdict": r.verdict, "container": r.container, "globals": r.globals,
            "findings": [to_jsonable(f) for f in r.findings]}


def test_broken_objects_give_the_local_errors(s3, real_files, tmp_path):
    """Empty, garbage and truncated objects, over S3 and over http: the local error lines and verdicts."""
    from fakes.http_range_server import serve

    good = real_files["sd15.safetensors"].read_bytes()
    broken = {"empty.safetensors": b"", "empty.ckpt": b"", "garbage.ckpt": b"\xff" + bytes(range(256)) * 8,
              "trunc.safetensors": good[:len(good) // 2], "trunc.ckpt": real_files["sd15.ckpt"].read_bytes()[:5000]}
    paths = {}
    for name, data in broken.items():
        paths[name] = tmp_path / name
        paths[name].write_bytes(data)
    srv = serve(dict(paths))
    try:
        for name, path in paths.items():
            local_f, local_c = _same(_facts(str(path)), path), _same(_check(str(path)), path)
            for url in (s3.put(f"broken/{name}", path), srv.url(name)):
                assert _same(_facts(url), url) == local_f, (name, url)
                assert _same(_check(url), url) == local_c, (name, url)
    finally:
        srv.stop()
