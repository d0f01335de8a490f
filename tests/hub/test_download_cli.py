"""``ckptlab download`` through the real CLI: CivitAI (version/model ids), plain URLs, hf:,
folders per layout, resume, refusal of corrupted files, cataloguing and linking afterwards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes, sd1_checkpoint_bytes

from ckptlab.errors import SpecError
from ckptlab.hub.destination import target_folder
from ckptlab.hub.fetch import SourceSpec, parse_spec
from ckptlab.library.catalog import Catalog


@pytest.fixture
def world(tmp_path):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.add_model(200, "Tiny SD1", "Checkpoint")
    fake.lora = lora_bytes(seed=1, dim=512)  # ~33 KB
    fake.ckpt = sd1_checkpoint_bytes(seed=2)
    fake.add_version(1000, 100, [(5000, "detail_tweaker.safetensors", fake.lora)])
    fake.add_version(2000, 200, [(6000, "tinySD1_v10.safetensors", fake.ckpt)])
    env = {"CKPTLAB_CIVITAI_URL": fake.api_url, "CIVITAI_API_TOKEN": fake.token, "CKPTLAB_HTTP_BACKOFF": "0"}
    yield fake, tmp_path / "webui", env
    fake.stop()


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_civitai_version_into_a1111_folders_then_catalogued_and_linked(world, cli):
    fake, root, env = world
    r = cli("download", "civitai:1000", "civitai:2000", "--dir", root, "--layout", "a1111", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = jsonl(r.stdout)
    lora = root / "models" / "Lora" / "detail_tweaker.safetensors"
    ckpt = root / "models" / "Stable-diffusion" / "tinySD1_v10.safetensors"
    assert [Path(x["path"]) for x in rows] == [lora, ckpt]
    assert lora.read_bytes() == fake.lora and ckpt.read_bytes() == fake.ckpt
    assert rows[0]["sha256"] == hashlib.sha256(fake.lora).hexdigest() == rows[0]["expected_sha256"]
    assert rows[0]["extra"]["version_id"] == 1000 and rows[0]["extra"]["linked_version"] == 1000
    with Catalog(os.environ["CKPTLAB_DB"]) as cat:
        rec = cat.get_by_path(lora)
        assert rec is not None and rec.kind == "lora"
        assert rec.sha256 == hashlib.sha256(fake.lora).hexdigest().upper()
    show = jsonl(cli("civitai", "show", lora, "--json", env=env).stdout)[0]
    assert show["link"]["matched_by"] == "download" and show["latest"]["id"] == 1000
    assert [p.name for p in (root / "models" / "Lora").iterdir()] == ["detail_tweaker.safetensors"]


def test_model_id_takes_the_newest_version_into_comfyui_layout(world, cli):
    fake, root, env = world
    fake.add_version(1001, 100, [(5001, "detail_tweaker_v2.safetensors", lora_bytes(seed=3))], name="v2.0")
    (root / "models" / "checkpoints").mkdir(parents=True)  # auto layout: ComfyUI
    r = cli("download", "civitai:100", "--dir", root, "--write-sidecars", env=env)
    assert r.returncode == 0, r.stderr
    target = root / "models" / "loras" / "detail_tweaker_v2.safetensors"
    assert target.exists() and "sha256 verified" in r.stdout
    assert (root / "models" / "loras" / "detail_tweaker_v2.civitai.info").exists()
    assert (root / "models" / "loras" / "detail_tweaker_v2.preview.png").exists()


def test_drop_mid_file_resumes_and_partial_from_earlier_run_is_continued(world, cli):
    fake, root, env = world
    fake.drop_after[5000] = 10_000
    r = cli("download", "civitai:1000", "--dir", root, "--layout", "flat", env=env)
    assert r.returncode == 0, r.stderr
    assert (root / "detail_tweaker.safetensors").read_bytes() == fake.lora
    gets = [q for q in fake.requests if q.server == "storage"]
    assert len(gets) == 2 and gets[1].headers["range"].startswith("bytes=")

    # an earlier, interrupted run left 20,000 good bytes behind
    (root / "detail_tweaker.safetensors").unlink()
    (root / "detail_tweaker.safetensors.part").write_bytes(fake.lora[:20_000])
    fake.requests.clear()
    r = cli("download", "civitai:1000", "--dir", root, "--layout", "flat", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["resumed_from"] == 20_000
    assert [q.headers.get("range") for q in fake.requests if q.server == "storage"] == ["bytes=20000-"]
    assert (root / "detail_tweaker.safetensors").read_bytes() == fake.lora
    assert not (root / "detail_tweaker.safetensors.part").exists()


def test_corrupted_download_refused_nothing_under_final_name(world, cli):
    fake, root, env = world
    fake.corrupt.add(5000)
    r = cli("download", "civitai:1000", "--dir", root, "--layout", "a1111", env=env)
    assert r.returncode != 0
    assert "SHA256 mismatch" in r.stderr and "Traceback" not in r.stderr
    folder = root / "models" / "Lora"
    assert not (folder / "detail_tweaker.safetensors").exists()
    assert not folder.exists() or list(folder.iterdir()) == []
    with Catalog(os.environ["CKPTLAB_DB"]) as cat:
        assert cat.files() == []


def test_missing_token_and_unknown_version_are_clear_errors(world, cli):
    fake, root, env = world
    r = cli("download", "civitai:1000", "--dir", root, env={**env, "CIVITAI_API_TOKEN": ""})
    assert r.returncode == 1 and "401" in r.stderr and "CIVITAI_API_TOKEN" in r.stderr
    r = cli("download", "civitai:4242", "--dir", root, env=env)
    assert r.returncode == 1 and "404" in r.stderr
    r = cli("download", "civitai:abc", "--dir", root, env=env)
    assert r.returncode == 2 and "bad CivitAI spec" in r.stderr


def test_plain_url_uses_content_disposition_and_gets_linked(world, cli):
    fake, root, env = world
    fake.content_disposition[6000] = "attachment; filename*=UTF-8''tiny%20%C3%A9.safetensors"
    url = f"{fake.storage_url}/files/6000?X-Amz-Signature=abc"
    r = cli("download", url, "--dir", root, "--type", "checkpoint", "--layout", "a1111", "--json", env=env)
    assert r.returncode == 0, r.stderr
    row = jsonl(r.stdout)[0]
    target = root / "models" / "Stable-diffusion" / "tiny é.safetensors"
    assert Path(row["path"]) == target and target.read_bytes() == fake.ckpt
    assert row["url"].endswith("/files/6000")  # no query string (presigned URLs) in the output
    assert row["extra"]["civitai"] == "linked" and row["extra"]["linked_version"] == 2000
    storage = [q for q in fake.requests if q.server == "storage"]
    assert all("authorization" not in q.headers for q in storage)
    # the same plain URL again: nothing published to compare with, and the message says exactly that
    r = cli("download", url, "--dir", root, "--type", "checkpoint", "--layout", "a1111", env=env)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "publishes no hash" in r.stderr and "is not the file" not in r.stderr
    assert target.read_bytes() == fake.ckpt


def test_hf_download_dispatch(world, cli):
    from fakes.hf_server import FakeHub

    fake, root, env = world
    data = sd1_checkpoint_bytes(seed=5)
    hub = FakeHub()
    hub.add_repo("org/tiny", {"tiny.safetensors": data}, lfs={"tiny.safetensors"})
    with hub.start():
        r = cli("download", "hf:org/tiny/tiny.safetensors", "--dir", root, "--layout", "flat", "--json",
                env={**env, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr
    row = jsonl(r.stdout)[0]
    assert Path(row["path"]).read_bytes() == data and row["sha256"] == hashlib.sha256(data).hexdigest()
    with Catalog(os.environ["CKPTLAB_DB"]) as cat:
        assert cat.get_by_path(row["path"]) is not None


def test_token_never_written_by_downloads(world, cli):
    fake, root, env = world
    assert cli("download", "civitai:1000", "civitai:2000", "--dir", root, "--write-sidecars", env=env).returncode == 0
    fake.corrupt.add(5000)
    cli("download", "civitai:1000", "--dir", root / "other", env=env)
    token = fake.token.encode()
    n = 0
    for base in (root, Path(os.environ["HOME"])):
        for dirpath, _d, names in os.walk(base):
            for name in names:
                n += 1
                assert token not in (Path(dirpath) / name).read_bytes(), name
    assert n >= 5


@pytest.mark.parametrize("text, spec", [
    ("civitai:123", SourceSpec("civitai", ambiguous_id=123)),
    ("civitai:version/123", SourceSpec("civitai", version_id=123)),
    ("civitai:model/7", SourceSpec("civitai", model_id=7)),
    ("civitai:7@123", SourceSpec("civitai", model_id=7, version_id=123)),
    ("urn:air:sdxl:checkpoint:civitai:827184@2514310", SourceSpec("civitai", model_id=827184, version_id=2514310)),
    ("https://civitai.com/models/7?modelVersionId=123", SourceSpec("civitai", model_id=7, version_id=123)),
    ("https://civitai.com/api/download/models/123", SourceSpec("civitai", version_id=123)),
    ("hf:org/repo/sub/file.safetensors@main", SourceSpec("hf", repo_id="org/repo", filename="sub/file.safetensors",
                                                   revision="main")),
    ("https://huggingface.co/org/repo/blob/main/a.safetensors", SourceSpec("hf", repo_id="org/repo",
                                                                     filename="a.safetensors", revision="main")),
    ("https://example.com/x.safetensors", SourceSpec("url", url="https://example.com/x.safetensors")),
])
def test_parse_spec(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize("bad", ["civitai:", "hf:org/repo", "ftp://x", "model.safetensors"])
def test_parse_spec_rejects(bad):
    with pytest.raises(SpecError):
        parse_spec(bad)


def test_target_folders(tmp_path):
    assert target_folder(tmp_path, "a1111", "TextualInversion") == tmp_path / "embeddings"
    assert target_folder(tmp_path, "comfyui", "TextualInversion") == tmp_path / "models/embeddings"
    assert target_folder(tmp_path, "comfyui", "Checkpoint", "VAE") == tmp_path / "models/vae"
    assert target_folder(tmp_path, "comfyui", "Checkpoint", "Diffusion Model") == tmp_path / "models/diffusion_models"
    assert target_folder(tmp_path, "a1111", "LoCon") == tmp_path / "models/Lora"
    assert target_folder(tmp_path, "auto", "LORA") == tmp_path  # nothing there yet: flat
    (tmp_path / "models" / "Lora").mkdir(parents=True)
    assert target_folder(tmp_path, "auto", "LORA") == tmp_path / "models/Lora"


@pytest.mark.parametrize("sources", [["civitai:1000"], ["civitai:1000", "civitai:2000"]], ids=["one", "parallel"])
def test_ctrl_c_leaves_only_the_partial_and_the_next_run_resumes(world, sources):
    import signal
    import subprocess
    import sys
    import time

    from conftest import SRC

    fake, root, env = world
    fake.throttle = 0.1  # 8 KiB per 0.1 s: the 33 KB LoRA takes about 0.5 s
    full_env = {**os.environ, **env, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen([sys.executable, "-m", "ckptlab", "download", *sources, "--dir", str(root), "--layout",
                          "flat"], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = root / "detail_tweaker.safetensors.part"
    deadline = time.time() + 60
    while time.time() < deadline and not (part.exists() and part.stat().st_size > 0):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (root / "detail_tweaker.safetensors").exists() and not (root / "tinySD1_v10.safetensors").exists()
    kept = part.stat().st_size
    assert 0 < kept < len(fake.lora) and part.read_bytes() == fake.lora[:kept]
    fake.throttle = 0.0
    fake.requests.clear()
    r = subprocess.run([sys.executable, "-m", "ckptlab", "download", "civitai:1000", "--dir", str(root), "--layout",
                        "flat", "--json"], env=full_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["resumed_from"] == kept
    assert (root / "detail_tweaker.safetensors").read_bytes() == fake.lora


def test_parallel_downloads_are_capped(world, cli):
    fake, root, env = world
    for i in range(4):
        fake.add_version(3000 + i, 100, [(7000 + i, f"style{i}.safetensors", lora_bytes(seed=10 + i, dim=2048))])
    fake.rendezvous = 2  # storage waits until two transfers are active: they overlap whatever the timing
    srcs = [f"civitai:{3000 + i}" for i in range(4)]
    r = cli("download", *srcs, "--dir", root, "--layout", "flat", "--jobs", "2", "--no-catalog", env=env)
    assert r.returncode == 0, r.stderr
    assert fake.max_active_files == 2
    assert sorted(p.name for p in root.iterdir()) == [f"style{i}.safetensors" for i in range(4)]
    fake.max_active_files = 0
    fake.rendezvous = 4  # the first four meet; were five allowed at once, the fifth would join them
    r = cli("download", *srcs, "civitai:1000", "--dir", root / "b", "--layout", "flat", "--jobs", "9", "--no-catalog",
            env=env)
    assert r.returncode == 0, r.stderr
    assert fake.max_active_files == 4  # --jobs is capped at 4 (five sources)
    assert len(list((root / "b").iterdir())) == 5


def test_broken_catalog_does_not_undo_a_verified_download(world, cli, tmp_path):
    fake, root, env = world
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"this is not sqlite" * 100)
    r = cli("download", "civitai:1000", "--dir", root, "--layout", "flat", env={**env, "CKPTLAB_DB": str(bad)})
    assert r.returncode == 0, r.stderr
    assert (root / "detail_tweaker.safetensors").read_bytes() == fake.lora
    assert "warning: downloaded and verified, but not catalogued" in r.stderr


def test_url_and_hf_files_are_placed_by_identified_kind(world, cli):
    from fakes.hf_server import FakeHub

    fake, root, env = world
    (root / "models" / "Stable-diffusion").mkdir(parents=True)  # an A1111 install: auto layout
    def url(fid, name):  # presigned-style URLs: the name arrives as Content-Disposition
        return f"{fake.storage_url}/files/{fid}?response-content-disposition=attachment%3B%20filename%3D%22{name}%22"

    lora_url = url(5000, "detail_tweaker.safetensors")
    r = cli("download", lora_url, url(6000, "tinySD1_v10.safetensors"), "--dir", root, "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = jsonl(r.stdout)
    assert [Path(x["path"]) for x in rows] == [root / "models" / "Lora" / "detail_tweaker.safetensors",
                                              root / "models" / "Stable-diffusion" / "tinySD1_v10.safetensors"]
    assert [x["extra"]["identified_kind"] for x in rows] == ["lora", "checkpoint"]
    assert not (root / "models" / ".ckptlab-incoming").exists()
    # the same URL again: verified against the file already in place, no duplicate left behind
    r = cli("download", lora_url, "--dir", root, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert jsonl(r.stdout)[0]["skipped"] is True
    assert sorted(p.name for p in (root / "models" / "Lora").iterdir()) == ["detail_tweaker.safetensors"]

    hub = FakeHub()
    hub.add_repo("org/tiny", {"lora.safetensors": lora_bytes(seed=8)}, lfs={"lora.safetensors"})
    with hub.start():
        r = cli("download", "hf:org/tiny/lora.safetensors", "--dir", root, "--json",
                env={**env, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"})
    assert r.returncode == 0, r.stderr
    assert Path(jsonl(r.stdout)[0]["path"]) == root / "models" / "Lora" / "lora.safetensors"


@pytest.mark.parametrize("bad", ["http://", "https:///x.safetensors", "http://:8080/x", "http://host:99999/x",
                                 "https://exa\x01mple.com/x"])
def test_parse_spec_rejects_urls_that_name_no_usable_host(bad):
    with pytest.raises(SpecError, match="bad URL"):
        parse_spec(bad)


def test_url_without_host_fails_at_once_and_nothing_is_fetched(world, cli):
    """A spec that can never work is a usage error before any request: no retries, no transfer of the
    good sources given with it."""
    fake, root, env = world
    r = cli("download", "http://", "--dir", root, env={**env, "CKPTLAB_HTTP_BACKOFF": "5"})
    assert r.returncode == 2, r.stderr
    assert "needs a host" in r.stderr and "attempts" not in r.stderr and "Traceback" not in r.stderr
    r = cli("download", "civitai:1000", "http://", "--dir", root, "--layout", "flat", env=env)
    assert r.returncode == 2, r.stderr
    assert not list(root.rglob("*.safetensors")), "a good source was fetched before the bad spec was refused"


def test_civitai_base_url_without_host_fails_at_once(tmp_path, cli):
    r = cli("download", "civitai:1000", "--dir", tmp_path, "--base-url", "http://:8080",
            env={"CKPTLAB_HTTP_BACKOFF": "5"})
    assert r.returncode == 2, r.stderr
    assert "needs a host" in r.stderr and "attempts" not in r.stderr and "Traceback" not in r.stderr
    r = cli("civitai", "info", "civitai:1000", "--base-url", "https://:443", env={"CKPTLAB_HTTP_BACKOFF": "5"})
    assert r.returncode == 2 and "needs a host" in r.stderr, r.stderr


def test_several_sources_exit_with_the_worst_failure(world, cli):
    """Exit 3 means only ``check``'s "suspicious" (docs/cli-errors.md); several sources with a failure exit with
    the highest failure code (1 for a version CivitAI does not have; it was 3) and the good source is still
    downloaded. A malformed spec among them is a usage error before anything is fetched."""
    fake, root, env = world
    r = cli("download", "civitai:1000", "civitai:999999", "--dir", root, "--layout", "flat", env=env)
    assert r.returncode == 1, r.stderr
    assert (root / "detail_tweaker.safetensors").read_bytes() == fake.lora
    errors = [x for x in r.stderr.splitlines() if x.startswith("ckptlab: error:")]
    assert len(errors) == 1 and "civitai:999999" in errors[0]
    r = cli("download", "civitai:2000", "civitai:-1", "--dir", root, "--layout", "flat", env=env)
    assert r.returncode == 2, r.stderr
    assert "civitai:-1" in r.stderr and not (root / "tinySD1_v10.safetensors").exists()
