"""Hugging Face downloads against a loopback fake Hub (tests/fakes/hf_server.py): verified against
the LFS ETag (SHA-256, checked here with hashlib), nothing under the final name unless verified,
HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE honoured, the token never written to any file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from ckptlab.errors import (
    AuthError,
    CkptlabError,
    NetworkError,
    NotFoundError,
    OutputError,
    VerificationError,
)
from ckptlab.formats.writer import write_safetensors
from ckptlab.hub.download import DownloadResult
from ckptlab.hub.huggingface import STAGING, download, local_name
from tests.fakes.hf_server import FakeHub, git_blob_id

REPO = "stabilityai/sdxl-vae"
TOKEN = "hf_SECRETtoken0123456789abcdefghijklmno"


def _vae_bytes(tmp_path: Path) -> bytes:
    """A real-layout SDXL VAE (diffusers key names, small shapes)."""
    p = tmp_path / "src.safetensors"
    g = torch.Generator().manual_seed(1)
    write_safetensors(p, {
        "encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
        "encoder.conv_in.bias": torch.randn(8, generator=g),
        "decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g),
        "quant_conv.weight": torch.randn(8, 8, 1, 1, generator=g),
    }, {"modelspec.architecture": "stable-diffusion-xl-v1-base/vae"})
    data = p.read_bytes()
    p.unlink()
    return data


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("CKPTLAB_HTTP_BACKOFF", "0")  # retries without waiting
    data = _vae_bytes(tmp_path)
    fake = FakeHub()
    fake.add_repo(REPO, {"sdxl_vae.safetensors": data, "config.json": b'{"_class_name": "AutoencoderKL"}',
                         "vae/diffusion_pytorch_model.safetensors": data})
    with fake:
        yield fake, data


def _all_files(*roots: Path):
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                yield Path(dirpath) / n


def test_downloads_and_verifies_an_lfs_file(hub, tmp_path):
    fake, data = hub
    lib = tmp_path / "models" / "VAE"
    seen = []

    def progress(advance=0, *, total=None, description=None):
        seen.append((advance, total))

    res = download(REPO, "sdxl_vae.safetensors", dest_dir=lib, endpoint=fake.endpoint, progress=progress)
    assert isinstance(res, DownloadResult)
    assert res.path == lib / "sdxl_vae.safetensors"
    assert res.path.read_bytes() == data
    assert res.sha256 == res.expected_sha256 == hashlib.sha256(data).hexdigest()
    assert res.hashes.sha256 == res.sha256.upper()  # the transfer's in-stream hashes come along
    assert res.size == len(data) and res.source == "hf" and not res.skipped
    assert res.extra["commit"] == fake.repos[REPO].commit
    assert sorted(p.name for p in lib.iterdir()) == ["sdxl_vae.safetensors"]  # staging removed
    assert sum(a for a, _ in seen) == len(data) and (0, len(data)) in seen
    # the HEAD went to the hub, the bytes came from storage (the redirect)
    assert [(r.origin, r.method) for r in fake.requests if r.origin == "storage"] == [("storage", "GET")]
    assert any(r.origin == "hub" and r.method == "HEAD" for r in fake.requests)


def test_second_run_is_a_verified_skip(hub, tmp_path):
    fake, data = hub
    download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    fake.requests.clear()
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.skipped and res.sha256 == hashlib.sha256(data).hexdigest()
    assert not [r for r in fake.requests if r.origin == "storage"]


def test_existing_different_file_is_not_replaced(hub, tmp_path):
    fake, _ = hub
    (tmp_path / "sdxl_vae.safetensors").write_bytes(b"mine")
    with pytest.raises(OutputError, match="already exists"):
        download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert (tmp_path / "sdxl_vae.safetensors").read_bytes() == b"mine"


def test_wrong_hash_is_refused_and_nothing_is_left(hub, tmp_path):
    fake, _ = hub
    fake.corrupt.add("sdxl_vae.safetensors")
    with pytest.raises(VerificationError, match="SHA256 mismatch") as ei:
        download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # no final file, no staging, no partial


def test_small_git_file_is_verified_by_its_blob_id(hub, tmp_path):
    fake, _ = hub
    res = download(REPO, "config.json", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert json.loads(res.path.read_text()) == {"_class_name": "AutoencoderKL"}
    assert git_blob_id(res.path.read_bytes()) == hashlib.sha1(
        b"blob %d\0" % res.size + res.path.read_bytes()).hexdigest()
    assert res.expected_sha256 is None and res.sha256 == hashlib.sha256(res.path.read_bytes()).hexdigest()
    again = download(REPO, "config.json", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert again.skipped and again.sha256 == res.sha256
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="already exists"):
        download(REPO, "config.json", dest_dir=tmp_path, endpoint=fake.endpoint)


def test_git_file_with_wrong_content_is_refused(hub, tmp_path, monkeypatch):
    """A non-LFS file whose bytes do not match its git blob id (the fake publishes another id)."""
    import tests.fakes.hf_server as hs

    fake, _ = hub
    fake.repos[REPO].files["model_index.json"] = b'{"_class_name": "StableDiffusionXLPipeline"}'
    monkeypatch.setattr(hs, "git_blob_id", lambda data, real=hs.git_blob_id: real(data + b" "))
    with pytest.raises(VerificationError, match="git blob id mismatch"):
        download(REPO, "model_index.json", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert list(tmp_path.iterdir()) == []


def test_generic_diffusers_names_get_the_repo_in_front(hub, tmp_path):
    fake, data = hub
    res = download(REPO, "vae/diffusion_pytorch_model.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.path.name == "sdxl-vae-vae-diffusion_pytorch_model.safetensors"
    assert res.path.read_bytes() == data
    assert local_name("org/x", "sd_xl_base_1.0.safetensors") == "sd_xl_base_1.0.safetensors"


def test_revision_pins_and_bad_revision(hub, tmp_path):
    fake, data = hub
    commit = fake.repos[REPO].commit
    res = download(REPO, "sdxl_vae.safetensors", commit, dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.extra["commit"] == commit and res.path.read_bytes() == data
    with pytest.raises(NotFoundError, match="revision not found"):
        download(REPO, "sdxl_vae.safetensors", "v9.9", dest_dir=tmp_path / "b", endpoint=fake.endpoint)


def test_missing_repo_and_file_are_clear_errors(hub, tmp_path):
    fake, _ = hub
    with pytest.raises(NotFoundError, match="repository not found"):
        download("nobody/nothing", "x.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    with pytest.raises(NotFoundError, match="file not found"):
        download(REPO, "nope.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    for repo, fname in [("../etc", "x"), ("a/b", "../x"), ("a/b", "/abs"), ("", "x"), ("a/b", "")]:
        with pytest.raises(CkptlabError):
            download(repo, fname, dest_dir=tmp_path, endpoint="http://127.0.0.1:9")


def test_hf_endpoint_env_is_honoured(hub, tmp_path, monkeypatch):
    fake, data = hub
    monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path)
    assert res.path.read_bytes() == data and res.extra["endpoint"] == fake.endpoint


def test_offline_env_makes_no_request(hub, tmp_path, monkeypatch):
    fake, data = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE"):
        download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert fake.requests == []
    (tmp_path / "sdxl_vae.safetensors").write_bytes(data)  # already in the library: returned as is
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.skipped and res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.hashes.sha256 == res.sha256.upper() and res.hashes.size == len(data)  # for the catalog
    assert fake.requests == []


def test_token_from_env_is_sent_to_the_hub_only_and_never_written(hub, tmp_path, monkeypatch):
    fake, data = hub
    fake.require_token = TOKEN
    with pytest.raises(AuthError):
        download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path / "a", endpoint=fake.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake.requests.clear()
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path / "lib", endpoint=fake.endpoint)
    assert res.path.read_bytes() == data
    hub_auth = {r.headers.get("authorization") for r in fake.requests if r.origin == "hub"}
    assert hub_auth == {f"Bearer {TOKEN}"}
    assert all("authorization" not in r.headers for r in fake.requests if r.origin == "storage")
    assert TOKEN not in json.dumps(res.extra) + res.url
    home = Path(os.environ["HOME"])
    for f in _all_files(tmp_path, home):
        assert TOKEN.encode() not in f.read_bytes(), f


def test_explicit_token_argument(hub, tmp_path):
    fake, data = hub
    fake.require_token = TOKEN
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint, token=TOKEN)
    assert res.path.read_bytes() == data


def test_dropped_connection_is_resumed(hub, tmp_path):
    fake, data = hub
    fake.drop_after["sdxl_vae.safetensors"] = len(data) // 2
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.path.read_bytes() == data and res.sha256 == hashlib.sha256(data).hexdigest()
    ranges = [r.headers.get("range") for r in fake.requests if r.origin == "storage"]
    assert ranges == [None, f"bytes={len(data) // 2}-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl_vae.safetensors"]


def test_failed_run_keeps_its_part_and_the_next_run_resumes(hub, tmp_path):
    """Retries exhausted: a one-line NetworkError, nothing under the final name, the bytes so far in
    ``<name>.part``; the next run continues from there with a Range request."""
    fake, data = hub
    fake.drop_after["sdxl_vae.safetensors"] = [1100] + [10] * 10  # then almost no progress per attempt
    with pytest.raises(NetworkError, match="run the same command again") as ei:
        download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert "\n" not in str(ei.value)
    part = tmp_path / "sdxl_vae.safetensors.part"
    # the partial, and beside it the validators it was fetched under (for If-Range next time)
    assert sorted(p.name for p in tmp_path.iterdir()) == [part.name, part.name + ".json"]
    kept = part.stat().st_size
    assert kept >= 1100 and part.read_bytes() == data[:kept]
    fake.drop_after.clear()
    fake.requests.clear()
    res = download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path, endpoint=fake.endpoint)
    assert res.path.read_bytes() == data and res.resumed_from == kept
    assert [r.headers.get("range") for r in fake.requests if r.origin == "storage"] == [f"bytes={kept}-"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdxl_vae.safetensors"]


def test_not_a_hub_endpoint(tmp_path):
    """A server that does not speak the Hub's headers: refused, nothing written."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Plain(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(NetworkError):
            download(REPO, "sdxl_vae.safetensors", dest_dir=tmp_path,
                     endpoint=f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
        srv.server_close()
    assert list(tmp_path.iterdir()) == []
    assert STAGING  # the staging folder name is hidden (starts with a dot)
    assert STAGING.startswith(".")
