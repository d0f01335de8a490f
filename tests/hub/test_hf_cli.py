"""``ckptlab download hf:...`` through the real CLI against the loopback fake Hub: the hub helper's
command reaches ``hub.huggingface.download`` and the file lands verified in the library."""

from __future__ import annotations

import hashlib
import json

from tests.fakes.hf_server import FakeHub

REPO = "stabilityai/sdxl-vae"


def test_cli_download_hf(tmp_path, cli):
    data = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "  # an empty but valid safetensors file
    with FakeHub() as fake:
        fake.add_repo(REPO, {"sdxl_vae.safetensors": data, "broken.safetensors": data})
        fake.corrupt.add("broken.safetensors")  # storage serves bytes that do not match the LFS ETag
        env = {"HF_ENDPOINT": fake.endpoint, "HF_HUB_OFFLINE": "0"}
        lib = tmp_path / "lib"
        r = cli("download", f"hf:{REPO}/sdxl_vae.safetensors", "--dir", lib, "--layout", "flat", "--no-catalog",
                "--json", env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[0])
        assert out["source"] == "hf" and out["sha256"] == hashlib.sha256(data).hexdigest()
        assert (lib / "sdxl_vae.safetensors").read_bytes() == data

        r = cli("download", f"hf:{REPO}/broken.safetensors", "--dir", lib, "--layout", "flat", "--no-catalog",
                env=env)
        assert r.returncode != 0
        assert "SHA256 mismatch" in r.stderr and "Traceback" not in r.stderr
        assert not (lib / "broken.safetensors").exists()

        r = cli("download", f"hf:{REPO}/sdxl_vae.safetensors", "--dir", tmp_path / "off", "--layout", "flat",
                "--no-catalog", env={**env, "HF_HUB_OFFLINE": "1"})
        assert r.returncode != 0 and "HF_HUB_OFFLINE" in r.stderr


def test_cli_uses_the_stored_login_token(tmp_path, cli):
    """A token saved by ``hf auth login`` ($HF_HOME/token) opens a gated repo; HF_HUB_DISABLE_IMPLICIT_TOKEN
    turns that off. The token appears in no file we write."""
    import os
    from pathlib import Path

    token = "hf_storedLoginToken0123456789abcdefghij"
    hf_home = Path(os.environ["HF_HOME"])
    hf_home.mkdir(parents=True, exist_ok=True)
    (hf_home / "token").write_text(token)
    data = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    with FakeHub() as fake:
        fake.add_repo(REPO, {"gated.safetensors": data})
        fake.require_token = token
        env = {"HF_ENDPOINT": fake.endpoint, "HF_HUB_OFFLINE": "0", "CKPTLAB_HTTP_BACKOFF": "0"}
        lib = tmp_path / "lib"
        r = cli("download", f"hf:{REPO}/gated.safetensors", "--dir", lib, "--layout", "flat", "--no-catalog",
                env={**env, "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1"})
        assert r.returncode != 0 and not (lib / "gated.safetensors").exists()
        r = cli("download", f"hf:{REPO}/gated.safetensors", "--dir", lib, "--layout", "flat", "--no-catalog", env=env)
        assert r.returncode == 0, r.stderr
        assert (lib / "gated.safetensors").read_bytes() == data
        assert {x.headers.get("authorization") for x in fake.requests if x.origin == "hub"} >= {f"Bearer {token}"}
        assert all("authorization" not in x.headers for x in fake.requests if x.origin == "storage")
    for f in lib.rglob("*"):
        assert not f.is_file() or token.encode() not in f.read_bytes()
