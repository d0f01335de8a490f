"""Downloads against servers that lie or misbehave (issue 12 §3): an endless body, a body larger than
published, a file that changes between two requests (If-Range), links planted where the partial or
the final file will be. Loopback fakes only; every check compares with bytes the test itself holds."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from fakes.civitai_server import ENDLESS_SAFETY, FakeCivitai
from fakes.models import lora_bytes

from ckptlab.errors import NetworkError, OutputError, VerificationError
from ckptlab.hub import download as dl
from ckptlab.hub.civitai import CivitaiClient, pick_file
from ckptlab.hub.config import HubConfig
from ckptlab.hub.fetch import download as fetch_download
from ckptlab.hub.http import Requester

NAME = "detail_tweaker.safetensors"


@pytest.fixture
def fake():
    f = FakeCivitai().start()
    f.add_model(100, "Detail Tweaker", "LORA")
    f.data = lora_bytes(seed=1, dim=256)  # ~40 KB
    f.add_version(1000, 100, [(5000, NAME, f.data)])
    yield f
    f.stop()


def client(fake, **kw):
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=fake.token)
    return CivitaiClient(cfg, sleep=lambda s: None, backoff=0.0, interval=0.0, log=lambda m: None, **kw)


def plain(log=None):
    """A Requester as a plain-URL download uses it (no pacing, no waits), collecting its log lines."""
    return Requester(interval=0.0, backoff=0.0, sleep=lambda s: None, log=(log.append if log is not None else
                                                                            (lambda m: None)))


def storage_gets(fake):
    return [r for r in fake.requests if r.server == "storage" and r.path.startswith("/files/")]


# -- caps ------------------------------------------------------------------------------------------

def test_endless_body_stops_at_the_published_size_and_nothing_is_kept(fake, tmp_path):
    """CivitAI lists the file as ~40 KB; storage streams forever. Through the real CivitAI path
    (fetch.download, which passes the published size as the cap): cut off, deleted, one line."""
    fake.endless.add(5000)
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=fake.token)
    with client(fake) as c, pytest.raises(VerificationError) as ei:
        fetch_download("civitai:1000", dest=tmp_path, layout="flat", config=cfg, client=c, catalog=False)
    msg = str(ei.value)
    assert "more than the" in msg and "published" in msg and "deleted" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no .part, no .part.json
    # the client hung up long before the fake's safety stop (a client without a cap reads all of it)
    assert fake.sent[5000] < ENDLESS_SAFETY // 2


def test_endless_body_of_unknown_size_stops_at_the_free_space_margin(fake, tmp_path, monkeypatch):
    """A plain URL with no length and no published size: the disk (faked: 30 MiB free, shrinking as
    we write) decides; the partial is deleted, not left filling the disk."""
    fake.endless.add(5000)
    written = {"n": 0}
    real_write = dl._write_all

    def counting_write(fd, data, part):
        written["n"] += len(data)
        real_write(fd, data, part)

    class Usage:
        @property
        def free(self):
            return dl.FREE_SPACE_MARGIN + 30 * 1024 * 1024 - written["n"]

    monkeypatch.setattr(dl, "_write_all", counting_write)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage())
    monkeypatch.setattr(dl, "FREE_SPACE_EVERY", 1024 * 1024)
    with pytest.raises(OutputError) as ei:
        dl.transfer(plain(), f"{fake.storage_url}/files/5000", tmp_path, filename=NAME)
    assert "without saying how much" in str(ei.value) and "deleted" in str(ei.value)
    assert list(tmp_path.iterdir()) == []
    assert written["n"] <= 31 * 1024 * 1024


def test_body_longer_than_published_is_refused_before_writing(fake, tmp_path):
    fake.extra_bytes[5000] = b"\0" * 5_000_000  # Content-Length says ~5 MB, CivitAI lists ~40 KB
    with client(fake) as c:
        choice = pick_file(c.model_version(1000))
        with pytest.raises(VerificationError, match="more than the"):
            dl.transfer(c.http, c.download_url(choice), tmp_path, filename=choice.name, max_size=choice.size + 1024)
    assert list(tmp_path.iterdir()) == []


def test_hf_endless_body_stops_at_the_hub_size(tmp_path, monkeypatch):
    from fakes.hf_server import FakeHub

    from ckptlab.hub.huggingface import download as hf_download

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("CKPTLAB_HTTP_BACKOFF", "0")
    data = lora_bytes(seed=4)
    with FakeHub() as hub:
        hub.add_repo("org/repo", {"lora.safetensors": data})
        hub.endless.add("lora.safetensors")
        with pytest.raises(VerificationError):
            hf_download("org/repo", "lora.safetensors", dest_dir=tmp_path, endpoint=hub.endpoint)
        assert hub.sent["lora.safetensors"] < 32 * 1024 * 1024
    assert list(tmp_path.iterdir()) == []


# -- a file that changed between requests ----------------------------------------------------------

def _interrupted_first_run(fake, tmp_path, url):
    fake.drop_after[5000] = 10_000
    with pytest.raises(NetworkError, match="resume"):
        dl.transfer(plain(), url, tmp_path, filename=NAME, retries=0)
    part = tmp_path / (NAME + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 10_000 and part.read_bytes() == fake.data[:kept]
    stored = json.loads((tmp_path / (NAME + ".part.json")).read_text())
    assert stored["etag"] == '"' + hashlib.sha256(fake.data).hexdigest() + '"'
    assert url not in json.dumps(stored)  # the URL (a token may live in it) is not written, only its hash
    return kept


@pytest.mark.parametrize("server", ["honours If-Range", "ignores If-Range"])
def test_resume_after_the_remote_file_changed_restarts_from_zero(fake, tmp_path, server):
    """Run 1 stops after ~10 KB of version A; the server then holds version B (new ETag). Run 2
    must not splice A's prefix onto B's tail: the result is exactly B."""
    url = f"{fake.storage_url}/files/5000"
    _interrupted_first_run(fake, tmp_path, url)
    old_etag = '"' + hashlib.sha256(fake.data).hexdigest() + '"'
    new = lora_bytes(seed=9, dim=256)
    assert len(new) == len(fake.data) and new != fake.data  # same size: only the validators tell
    fake.blobs[5000] = new
    fake.mtime[5000] = "Tue, 02 Jan 2024 00:00:00 GMT"
    fake.ignore_if_range = server == "ignores If-Range"
    fake.requests.clear()
    log: list[str] = []
    res = dl.transfer(plain(log), url, tmp_path, filename=NAME)
    assert res.path.read_bytes() == new
    assert res.sha256 == hashlib.sha256(new).hexdigest()
    gets = storage_gets(fake)
    assert gets[0].headers["if-range"] == old_etag and gets[0].headers["range"].startswith("bytes=")
    if server == "ignores If-Range":  # 206 with another ETag: detected, then a plain request from 0
        assert "range" not in gets[1].headers and len(gets) == 2
        assert any("ETag changed" in m for m in log)
    else:  # 200 to the ranged request: the whole new file in that answer
        assert len(gets) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]


def test_file_replaced_during_the_run_is_not_spliced(fake, tmp_path):
    """The connection drops after 10 KB and the file is replaced before the reconnect: the ranged
    request carries If-Range with the first answer's ETag, gets the whole new file, and only that is
    published."""
    new = lora_bytes(seed=9, dim=256)
    fake.drop_after[5000] = 10_000
    fake.after_drop[5000] = new
    log: list[str] = []
    res = dl.transfer(plain(log), f"{fake.storage_url}/files/5000", tmp_path, filename=NAME)
    assert res.path.read_bytes() == new
    gets = storage_gets(fake)
    assert len(gets) == 2 and gets[1].headers["if-range"] == '"' + hashlib.sha256(fake.data).hexdigest() + '"'
    assert any("connection" in m.lower() and "attempt 1 of 6" in m for m in log)
    assert any("whole file instead of the rest" in m for m in log)


def test_complete_partial_under_if_range_is_verified_without_a_new_transfer(fake, tmp_path):
    url = f"{fake.storage_url}/files/5000"
    _interrupted_first_run(fake, tmp_path, url)
    (tmp_path / (NAME + ".part")).write_bytes(fake.data)  # every byte arrived, the rename did not happen
    fake.requests.clear()
    res = dl.transfer(plain(), url, tmp_path, filename=NAME)
    assert res.path.read_bytes() == fake.data
    (get,) = storage_gets(fake)  # answered 416: nothing was transferred again
    assert get.headers["range"] == f"bytes={len(fake.data)}-" and "if-range" in get.headers


def test_resume_of_an_unchanged_file_appends_under_if_range(fake, tmp_path):
    url = f"{fake.storage_url}/files/5000"
    kept = _interrupted_first_run(fake, tmp_path, url)
    fake.requests.clear()
    res = dl.transfer(plain(), url, tmp_path, filename=NAME)
    assert res.resumed_from == kept and res.path.read_bytes() == fake.data
    (get,) = storage_gets(fake)
    assert get.headers["range"] == f"bytes={kept}-"
    assert get.headers["if-range"] == '"' + hashlib.sha256(fake.data).hexdigest() + '"'


def test_an_etag_that_cannot_be_sent_back_is_not_used(fake, tmp_path):
    """A non-ASCII ETag (raw UTF-8 bytes) cannot go back in an If-Range header: Last-Modified is
    used instead, and the resume works (before: an internal error while building the request)."""
    fake.etag_raw[5000] = '"caf\u00e9"'.encode()
    url = f"{fake.storage_url}/files/5000"
    fake.drop_after[5000] = 10_000
    with pytest.raises(NetworkError, match="resume"):
        dl.transfer(plain(), url, tmp_path, filename=NAME, retries=0)
    stored = json.loads((tmp_path / (NAME + ".part.json")).read_text())
    assert stored["etag"] is None and stored["last_modified"] == "Mon, 01 Jan 2024 00:00:00 GMT"
    fake.requests.clear()
    res = dl.transfer(plain(), url, tmp_path, filename=NAME)
    assert res.path.read_bytes() == fake.data and res.resumed_from > 0
    assert storage_gets(fake)[0].headers["if-range"] == "Mon, 01 Jan 2024 00:00:00 GMT"


def test_partial_of_unknown_origin_without_a_hash_is_not_resumed(fake, tmp_path):
    """A .part with no stored validators and no published hash: nothing could tell a splice, so the
    download starts from 0 instead of trusting the prefix."""
    (tmp_path / (NAME + ".part")).write_bytes(b"\0" * 5000)
    res = dl.transfer(plain(), f"{fake.storage_url}/files/5000", tmp_path, filename=NAME)
    assert res.path.read_bytes() == fake.data and res.resumed_from == 0
    assert "range" not in storage_gets(fake)[0].headers


def test_stored_validators_for_another_url_are_ignored(fake, tmp_path):
    url = f"{fake.storage_url}/files/5000"
    _interrupted_first_run(fake, tmp_path, url)
    fake.requests.clear()
    res = dl.transfer(plain(), url + "?other=1", tmp_path, filename=NAME)  # same name, another source
    assert res.path.read_bytes() == fake.data and res.resumed_from == 0
    assert "range" not in storage_gets(fake)[0].headers


# -- links and special files where the partial or the final file goes ------------------------------

def test_symlinked_partial_is_refused_and_its_target_untouched(fake, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / (NAME + ".part")).symlink_to(outside)
    with client(fake) as c, pytest.raises(OutputError, match="symbolic link"):
        choice = pick_file(c.model_version(1000))
        dl.transfer(c.http, c.download_url(choice), lib, filename=choice.name, expected_sha256=choice.sha256)
    assert outside.read_bytes() == b"precious"
    assert (lib / (NAME + ".part")).is_symlink() and not (lib / NAME).exists()
    assert storage_gets(fake) == []  # refused before any byte was asked for


def test_dangling_symlink_as_partial_creates_nothing_outside(fake, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / (NAME + ".part")).symlink_to(tmp_path / "would-be-created")
    with pytest.raises(OutputError, match="symbolic link"):
        dl.transfer(plain(), f"{fake.storage_url}/files/5000", lib, filename=NAME)
    assert not (tmp_path / "would-be-created").exists()


def test_hard_linked_partial_is_refused(fake, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    lib = tmp_path / "lib"
    lib.mkdir()
    os.link(outside, lib / (NAME + ".part"))
    with pytest.raises(OutputError, match="hard links"):
        dl.transfer(plain(), f"{fake.storage_url}/files/5000", lib, filename=NAME)
    assert outside.read_bytes() == b"x" * 100


def test_fifo_as_partial_is_refused_without_blocking(fake, tmp_path):
    os.mkfifo(tmp_path / (NAME + ".part"))
    with pytest.raises(OutputError, match="not a regular file"):
        dl.transfer(plain(), f"{fake.storage_url}/files/5000", tmp_path, filename=NAME)


def test_symlink_at_the_final_name_is_never_followed(fake, tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / NAME).symlink_to(tmp_path / "planted-target")
    with pytest.raises(OutputError, match="already exists"):
        dl.transfer(plain(), f"{fake.storage_url}/files/5000", lib, filename=NAME)
    assert not (tmp_path / "planted-target").exists()
    assert (lib / NAME).is_symlink()


def test_publish_does_not_follow_a_link_planted_after_the_transfer(tmp_path):
    """The race: the final name appears as a (dangling) link between verification and rename."""
    part = tmp_path / "m.safetensors.part"
    part.write_bytes(b"verified bytes")
    target = tmp_path / "m.safetensors"
    target.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="appeared while downloading"):
        dl.publish(part, target)
    assert not (tmp_path / "elsewhere").exists() and part.read_bytes() == b"verified bytes"


# -- names the server chooses ----------------------------------------------------------------------

@pytest.mark.parametrize(("header", "expected"), [
    ('attachment; filename="evil\u202egnp.safetensors"'.encode(), "evilgnp.safetensors"),
    (b'attachment; filename="\x1b]0;title\x07x.safetensors"', "]0;titlex.safetensors"),
    (b"attachment; filename*=UTF-8''..%2F..%2F.bashrc%E2%80%AE", "bashrc"),
    (b'attachment; filename="..\\\\..\\\\windows\\\\evil.ckpt"', "evil.ckpt"),
])
def test_server_chosen_names_lose_controls_bidi_and_paths(fake, tmp_path, header, expected):
    fake.content_disposition[5000] = header
    res = dl.transfer(plain(), f"{fake.storage_url}/files/5000", tmp_path)
    assert res.path == tmp_path / expected and res.path.read_bytes() == fake.data


def test_civitai_file_name_with_traversal_and_override_stays_in_the_folder(fake, tmp_path):
    fake.versions[1000]["files"][0]["name"] = "../../x\u202e\u0007.safetensors"
    cfg = HubConfig(civitai_base_url=fake.api_url, civitai_token=fake.token)
    with client(fake) as c:
        res = fetch_download("civitai:1000", dest=tmp_path / "lib", layout="flat", config=cfg, client=c,
                             catalog=False)
    assert res.path == tmp_path / "lib" / "x.safetensors" and res.path.read_bytes() == fake.data


# -- numbers in headers and specs ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["bytes 0-1/" + "9" * 5000, "bytes \u00b2-3/10", "bytes 0-1/\u0663"])
def test_absurd_content_range_is_no_range_not_an_internal_error(value):
    assert dl._content_range(value) == (None, None)  # int() of 5000 digits or of '²' would raise


@pytest.mark.parametrize("spec", ["civitai:" + "9" * 5000, "civitai:\u00b2", "civitai:model/\u0663",
                                  "civitai:1@" + "2" * 100])
def test_absurd_ids_in_specs_are_usage_errors(spec, cli, tmp_path):
    r = cli("download", spec, "--dir", tmp_path)
    assert r.returncode == 2 and "bad CivitAI spec" in r.stderr and "Traceback" not in r.stderr
