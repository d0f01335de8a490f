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
