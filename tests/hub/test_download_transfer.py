"""The resumable, verified transfer against the loopback fake CivitAI + storage servers."""

from __future__ import annotations

import hashlib
from collections import namedtuple

import pytest
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes

from ckptlab.errors import AuthError, OutputError, VerificationError
from ckptlab.hub import download as dl
from ckptlab.hub.civitai import CivitaiClient, pick_file
from ckptlab.hub.config import HubConfig


@pytest.fixture
def fake():
    f = FakeCivitai().start()
    f.add_model(100, "Detail Tweaker", "LORA")
    data = lora_bytes(seed=1, dim=256)  # ~40 KB
    f.add_version(1000, 100, [(5000, "detail_tweaker.safetensors", data)])
    f.data = data
    yield f
    f.stop()


def client(fake, token=True, **kw):
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=fake.token if token else None)
    return CivitaiClient(cfg, sleep=lambda s: None, backoff=0.0, interval=0.0, **kw)


def fetch(c, fake, tmp_path, **kw):
    choice = pick_file(c.model_version(1000))
    return dl.transfer(c.http, c.download_url(choice), tmp_path, filename=choice.name,
                       expected_sha256=choice.sha256, source="civitai", **kw)


def storage_gets(fake):
    return [r for r in fake.requests if r.server == "storage" and r.path.startswith("/files/")]


def test_download_follows_redirect_without_forwarding_token(fake, tmp_path):
    with client(fake) as c:
        res = fetch(c, fake, tmp_path)
    assert res.path == tmp_path / "detail_tweaker.safetensors"
    assert res.path.read_bytes() == fake.data
    assert res.sha256 == hashlib.sha256(fake.data).hexdigest()
    assert not (tmp_path / "detail_tweaker.safetensors.part").exists()
    api = [r for r in fake.requests if r.server == "api" and r.path.startswith("/api/download/")]
    assert api[0].headers["authorization"] == f"Bearer {fake.token}"
    assert api[0].headers["user-agent"].startswith("ckptlab/")
    assert all("authorization" not in r.headers for r in storage_gets(fake))
    assert storage_gets(fake)[0].headers["user-agent"].startswith("ckptlab/")


def test_download_without_token_is_a_clear_auth_error(fake, tmp_path):
    with client(fake, token=False) as c, pytest.raises(AuthError) as ei:
        fetch(c, fake, tmp_path)
    assert "401" in str(ei.value) and "CIVITAI_API_TOKEN" in str(ei.value)
    assert "\n" not in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_drop_mid_file_is_resumed_with_range_in_the_same_run(fake, tmp_path):
    fake.drop_after[5000] = 10_000
    with client(fake) as c:
        res = fetch(c, fake, tmp_path)
    assert res.path.read_bytes() == fake.data
    gets = storage_gets(fake)
    assert len(gets) == 2 and "range" not in gets[0].headers
    # the second request continued where the first one stopped (some bytes may still be in flight)
    start = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 10_000


def test_drop_with_no_retries_keeps_partial_then_next_run_resumes(fake, tmp_path):
    fake.drop_after[5000] = 10_000
    with client(fake) as c:
        with pytest.raises(Exception) as ei:
            fetch(c, fake, tmp_path, retries=0)
        assert "resume" in str(ei.value)
        part = tmp_path / "detail_tweaker.safetensors.part"
        assert not (tmp_path / "detail_tweaker.safetensors").exists()
        kept = part.stat().st_size
        assert 0 < kept <= 10_000 and part.read_bytes() == fake.data[:kept]
        res = fetch(c, fake, tmp_path)
    assert res.resumed_from == kept
    assert res.path.read_bytes() == fake.data
    assert storage_gets(fake)[-1].headers["range"] == f"bytes={kept}-"


def test_corrupted_download_is_refused_and_nothing_kept(fake, tmp_path):
    fake.corrupt.add(5000)
    with client(fake) as c, pytest.raises(VerificationError) as ei:
        fetch(c, fake, tmp_path)
    assert "SHA256 mismatch" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_complete_partial_gets_416_and_is_just_renamed(fake, tmp_path):
    (tmp_path / "detail_tweaker.safetensors.part").write_bytes(fake.data)
    with client(fake) as c:
        res = fetch(c, fake, tmp_path)
    assert res.path.read_bytes() == fake.data
    assert storage_gets(fake)[0].headers["range"] == f"bytes={len(fake.data)}-"


def test_partial_longer_than_file_restarts(fake, tmp_path):
    (tmp_path / "detail_tweaker.safetensors.part").write_bytes(fake.data + b"junk")
    with client(fake) as c:
        res = fetch(c, fake, tmp_path)
    assert res.path.read_bytes() == fake.data


def test_server_ignoring_range_restarts_from_zero(fake, tmp_path):
    fake.ignore_range = True
    (tmp_path / "detail_tweaker.safetensors.part").write_bytes(b"\0" * 500)  # wrong prefix: must be discarded
    with client(fake) as c:
        res = fetch(c, fake, tmp_path)
    assert res.path.read_bytes() == fake.data


def test_wrong_partial_prefix_is_caught_by_the_hash(fake, tmp_path):
    (tmp_path / "detail_tweaker.safetensors.part").write_bytes(b"\0" * 500)
    with client(fake) as c, pytest.raises(VerificationError):
        fetch(c, fake, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_identical_target_is_skipped_and_different_one_refused(fake, tmp_path):
    target = tmp_path / "detail_tweaker.safetensors"
    target.write_bytes(fake.data)
    with client(fake) as c:
        assert fetch(c, fake, tmp_path).skipped
        target.write_bytes(b"something else")
        with pytest.raises(OutputError):
            fetch(c, fake, tmp_path)
    assert target.read_bytes() == b"something else"
    assert storage_gets(fake) == []


def test_429_then_success_honours_retry_after(fake, tmp_path):
    slept = []
    fake.script["/api/v1/model-versions/1000"] = [(429, {"Retry-After": "7"}), (503, {})]
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=fake.token)
    with CivitaiClient(cfg, sleep=slept.append, backoff=0.5, interval=0.0) as c:
        v = c.model_version(1000)
    assert v["id"] == 1000
    assert slept == [7.0, 1.0]  # Retry-After, then exponential backoff 0.5 * 2**1


def test_not_enough_free_space_refuses_before_writing(fake, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with client(fake) as c, pytest.raises(OutputError) as ei:
        fetch(c, fake, tmp_path)
    assert "free space" in str(ei.value)
    assert not (tmp_path / "detail_tweaker.safetensors").exists()


@pytest.mark.parametrize("header, expected", [
    ('attachment; filename="detail.safetensors"', "detail.safetensors"),
    ("attachment; filename*=UTF-8''caf%C3%A9%20lora.safetensors; filename=\"cafe.safetensors\"", "café lora.safetensors"),
    ('attachment; filename="caf\u00c3\u00a9.safetensors"', "café.safetensors"),  # UTF-8 decoded as latin-1
    ('attachment; filename="caf\u00e9.safetensors"'.encode(), "café.safetensors"),  # raw UTF-8 bytes
    ('attachment; filename="../../etc/passwd"', "passwd"),
    ('attachment; filename="..\\\\evil.ckpt"', "evil.ckpt"),
    ('attachment; filename="..."', None),
    ("inline", None),
])
def test_content_disposition_filename(header, expected):
    assert dl.content_disposition_filename(header) == expected


def test_name_from_content_disposition_when_not_given(fake, tmp_path):
    fake.content_disposition[5000] = 'attachment; filename="caf\u00e9 tweak.safetensors"'.encode()
    with client(fake) as c:
        choice = pick_file(c.model_version(1000))
        res = dl.transfer(c.http, c.download_url(choice), tmp_path, expected_sha256=choice.sha256)
    assert res.path.name == "café tweak.safetensors"
    assert res.path.read_bytes() == fake.data


def test_progress_reports_total_and_every_byte_once_even_when_resumed(fake, tmp_path):
    kept = 12_345
    (tmp_path / "detail_tweaker.safetensors.part").write_bytes(fake.data[:kept])
    fake.drop_after[5000] = 7_000  # and one drop in the middle of the rest
    totals, advanced = [], []

    def progress(advance=0, *, total=None, description=None):
        if total is not None:
            totals.append(total)
        advanced.append(advance)

    with client(fake) as c:
        res = fetch(c, fake, tmp_path, progress=progress)
    assert res.resumed_from == kept
    assert set(totals) == {len(fake.data)}
    assert sum(advanced) == len(fake.data)  # the resumed prefix counts once, re-sent bytes are not double-counted


def test_write_error_is_one_line_and_keeps_the_partial(fake, tmp_path, monkeypatch):
    real_write = dl.os.write
    written = [0]

    def failing_write(fd, data):
        if written[0] >= 8_000:
            raise OSError(28, "No space left on device")
        n = real_write(fd, data[:4096])
        written[0] += n
        return n

    monkeypatch.setattr(dl.os, "write", failing_write)
    with client(fake) as c, pytest.raises(OutputError) as ei:
        fetch(c, fake, tmp_path)
    assert "No space left on device" in str(ei.value) and "resume" in str(ei.value)
    part = tmp_path / "detail_tweaker.safetensors.part"
    assert part.read_bytes() == fake.data[:8_192]  # two 4 KiB writes made it
    assert not (tmp_path / "detail_tweaker.safetensors").exists()
