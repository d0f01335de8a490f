"""The CivitAI client and HTTP plumbing against the loopback fake: bulk batching, pacing, backoff,
token sources, error mapping."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os

import pytest
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes

from ckptlab.errors import AuthError, ConfigError, InvalidHashError, NotFoundError, OutputError
from ckptlab.hub import download as dl
from ckptlab.hub.civitai import CivitaiClient, latest_version, pick_file
from ckptlab.hub.config import HubConfig, load_hub_config
from ckptlab.hub.http import Pacer, backoff_delay, redact, retry_after_seconds


@pytest.fixture
def fake():
    f = FakeCivitai().start()
    f.add_model(100, "Detail Tweaker", "LORA")
    f.data = lora_bytes(seed=1)
    f.add_version(1000, 100, [(5000, "detail.safetensors", f.data)])
    yield f
    f.stop()


def client(fake, token=None, **kw):
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=token)
    return CivitaiClient(cfg, sleep=lambda s: None, backoff=0.0, interval=0.0, **kw)


def test_bulk_lookup_batches_of_100(fake):
    real = hashlib.sha256(fake.data).hexdigest()
    others = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(149)]
    with client(fake) as c:
        found = c.versions_by_sha256(others[:120] + [real.upper()] + others[120:])
    assert list(found) == [real] and found[real]["id"] == 1000
    batches = [json.loads(r.body) for r in fake.requests if r.method == "POST"]
    assert [len(b) for b in batches] == [100, 50]
    assert real.upper() in batches[0] + batches[1]


def test_single_lookup_any_hash_type_and_404(fake):
    with client(fake) as c:
        v3 = fake.versions[1000]["files"][0]["hashes"]["AutoV3"]
        assert c.version_by_hash(v3.lower())["id"] == 1000
        assert c.version_by_hash("0123456789") is None
        with pytest.raises(InvalidHashError):
            c.version_by_hash("not-a-hash")
        with pytest.raises(NotFoundError) as ei:
            c.model(999)
    assert "404" in str(ei.value) and "No model with id 999" in str(ei.value)


def test_model_object_newest_version_and_file_choice(fake):
    fake.add_version(1001, 100, [(5001, "a.safetensors", b"x" * 10), (5002, "b.safetensors", b"y" * 10)], name="v2")
    with client(fake) as c:
        v = latest_version(c.model(100))
        assert v["id"] == 1001 and v["modelId"] == 100
        assert pick_file(v).name == "a.safetensors"
        choice = pick_file(v, file_id=5002)
        assert c.download_url(choice).endswith("/api/download/models/1001?fileId=5002")
        assert choice.sha256 == hashlib.sha256(b"y" * 10).hexdigest()


def test_login_redirect_is_an_auth_error(fake):
    fake.script["/api/v1/models/100"] = [(307, {"Location": "/login?reason=download-auth&returnUrl=/x"})]
    with client(fake) as c, pytest.raises(AuthError) as ei:
        c.model(100)
    assert "CIVITAI_API_TOKEN" in str(ei.value)


def test_403_early_access_message(fake):
    fake.script["/api/v1/models/100"] = [(403, {})]
    with client(fake) as c, pytest.raises(AuthError) as ei:
        c.model(100)
    assert "403" in str(ei.value) and "no access" in str(ei.value)


def test_5xx_gives_up_after_retries_with_one_line(fake):
    fake.down = True
    slept = []
    cfg = HubConfig(civitai_base_url=fake.api_url)
    with CivitaiClient(cfg, sleep=slept.append, backoff=1.0, retries=3, interval=0.0) as c, pytest.raises(Exception) as ei:
        c.model(100)
    assert slept == [1.0, 2.0, 4.0]
    assert "503" in str(ei.value) and "\n" not in str(ei.value)


def test_backoff_and_retry_after_parsing():
    assert [backoff_delay(i, 1.0, 30.0, None) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(0, 1.0, 30.0, 120.0) == 30.0
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert retry_after_seconds("soon") is None


def test_pacer_spaces_requests():
    now = [100.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 3))
        now[0] += s

    p = Pacer(0.25, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        p.wait()
    assert slept == [0.25, 0.25, 0.25]


def test_token_from_config_file_env_wins_and_is_hidden(tmp_path, monkeypatch):
    conf = tmp_path / "config.toml"
    conf.write_text('[civitai]\ntoken = "from-file"\nbase_url = "http://127.0.0.1:9/"\n[download]\nlayout = "comfyui"\n'
                    "max_concurrent = 99\n")
    monkeypatch.setenv("CKPTLAB_CONFIG", str(conf))
    cfg = load_hub_config()
    assert cfg.civitai_token == "from-file" and cfg.civitai_base_url == "http://127.0.0.1:9"
    assert cfg.layout == "comfyui" and cfg.max_concurrent == 4  # capped
    assert "from-file" not in repr(cfg) and "from-file" not in json.dumps(cfg.to_dict(), default=str)
    monkeypatch.setenv("CIVITAI_API_TOKEN", "from-env")
    assert load_hub_config().civitai_token == "from-env"
    conf.write_text("[civitai\n")
    with pytest.raises(ConfigError):
        load_hub_config()


def test_token_only_to_the_api_origin(fake, tmp_path):
    with client(fake, token=fake.token) as c:
        c.model_version(1000)
        res = dl.transfer(c.http, c.download_url(pick_file(c.model_version(1000))), tmp_path,
                          expected_sha256=hashlib.sha256(fake.data).hexdigest())
    assert res.path.name == "detail.safetensors"
    for r in fake.requests:
        assert (r.headers.get("authorization") == f"Bearer {fake.token}") == (r.server == "api")


def test_second_downloader_of_the_same_file_is_refused(fake, tmp_path):
    part = tmp_path / "detail.safetensors.part"
    fd = os.open(part, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with client(fake, token=fake.token) as c, pytest.raises(OutputError) as ei:
            dl.transfer(c.http, c.download_url(pick_file(c.model_version(1000))), tmp_path, filename="detail.safetensors")
        assert "another ckptlab" in str(ei.value)
    finally:
        os.close(fd)


def test_redact_drops_query_and_userinfo():
    assert redact("https://u:p@host:8443/a/b?X-Amz-Signature=s&token=t") == "https://host:8443/a/b"


def test_info_before_download_cli(fake, cli):
    env = {"CKPTLAB_CIVITAI_URL": fake.api_url}
    r = cli("civitai", "info", "civitai:1000", "--json", env=env)  # public endpoints: no token needed
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["model_name"], info["version_name"], info["type"], info["base_model"]) == \
        ("Detail Tweaker", "v1.0", "LORA", "SD 1.5")
    assert info["creator"] == "tester" and info["downloads"] == 10 and info["thumbs_up"] == 3
    assert info["license"] == {"allowCommercialUse": ["Image"], "allowDerivatives": True, "allowNoCredit": True,
                               "allowDifferentLicense": True}
    assert info["files"][0]["sha256"] == hashlib.sha256(fake.data).hexdigest()
    assert info["files"][0]["size_bytes"] == len(fake.data)
    assert info["trained_words"] == ["trigger word"] and info["images"][0]["nsfw_level"] == 1
    r = cli("civitai", "info", "civitai:model/100", env=env)
    assert r.returncode == 0 and "Detail Tweaker / v1.0" in r.stdout and "trigger words: trigger word" in r.stdout
    assert [q for q in fake.requests if q.path.startswith("/api/download")] == []  # nothing downloaded
    r = cli("civitai", "info", "hf:a/b/c.safetensors", env=env)
    assert r.returncode == 2 and "not a CivitAI source" in r.stderr
