"""Hostile and flaky servers are normal input: one error line, bounded time and memory, retries counted.

The loopback server (tests/fakes/http_range_server.py) logs what it received: the oracle for the request counts."""

from __future__ import annotations

import hashlib

import pytest
from fakes.http_range_server import serve
from fakes.library_files import tensors, write_st

from ckptlab import remote
from ckptlab.errors import CkptlabError
from ckptlab.hashes import hash_remote
from ckptlab.library.scanner import read_file_facts
from ckptlab.remote import reader
from ckptlab.remote.reader import READAHEAD, RemoteFile

pytestmark = pytest.mark.xdist_group("remote-io")


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(reader, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(reader, "MAX_TRIES", 4)
    monkeypatch.setattr(reader, "TIMEOUT", 2.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    p = tmp_path_factory.mktemp("hs") / "m.safetensors"
    return write_st(p, tensors("sd1_kohya_lora", seed=2))


@pytest.fixture
def server(model):
    servers = []

    def start(behaviour):
        s = serve({"m.safetensors": model}, {"m.safetensors": behaviour} if behaviour else None)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _one_line(e: CkptlabError, url: str) -> str:
    text = str(e)
    assert "\n" not in text and url in text, text
    return text


def test_ignored_range_is_refused(server, model, fast_retries):
    """200 + the whole body for a ranged GET: an error, and the body is not read past the first bytes."""
    srv = server("ignore_range")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e, remote.counting() as c:
        read_file_facts(url)
    assert "ignored the Range" in _one_line(e.value, url)
    assert c.bytes == 0 and c.requests == len(srv.hits()) == 1  # the refusal is remembered, not asked again


def test_short_body_is_a_truncated_reply(server, fast_retries):
    srv = server("short")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e:
        RemoteFile(url).pread(0, 100)
    assert "truncated" in _one_line(e.value, url) or "dropped" in str(e.value)


def test_more_bytes_than_asked_is_refused(server, fast_retries):
    srv = server("more")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e, remote.counting() as c:
        RemoteFile(url).pread(0, 100)
    assert "for a" in _one_line(e.value, url)
    assert c.bytes <= READAHEAD  # never more than asked is read


def test_endless_body_is_bounded(server, model, fast_retries):
    """A body that never ends (200, no length) for a hash's streamed GET: the object's size is read, then the
    stream is cut; memory stays at one piece."""
    srv = server("endless")
    url = srv.url("m.safetensors")
    size = model.stat().st_size
    with pytest.raises(CkptlabError) as e, remote.counting() as c:
        hash_remote(url, size=size)
    _one_line(e.value, url)
    assert c.bytes <= size


def test_endless_body_for_a_range_is_refused(server, fast_retries):
    srv = server("endless")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e, remote.counting() as c:
        RemoteFile(url).pread(0, 16)
    _one_line(e.value, url)
    assert c.bytes == 0


def test_stalled_server_times_out(server, model, fast_retries):
    """Headers, then silence: the socket timeout ends it (CKPTLAB_REMOTE_TIMEOUT, 2 s here)."""
    srv = server("stall")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e:
        hash_remote(url, size=model.stat().st_size)
    assert "timed out" in _one_line(e.value, url) or "no answer" in str(e.value)


def test_503_then_success_is_retried(server, model, fast_retries):
    srv = server("503x2")
    url = srv.url("m.safetensors")
    with remote.counting() as c:
        h = hash_remote(url)
    assert h.sha256 == hashlib.sha256(model.read_bytes()).hexdigest().upper()
    statuses = [x.status for x in srv.hits()]
    assert statuses[:2] == [503, 503] and statuses.count(503) == 2
    assert c.requests == len(statuses)  # the retries are counted


def test_503_forever_gives_up_with_one_line(server, fast_retries):
    srv = server("503")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e, remote.counting() as c:
        RemoteFile(url).pread(0, 16)
    assert "gave up after 4 tries" in _one_line(e.value, url) and "503" in str(e.value)
    assert c.requests == len(srv.hits()) == 4


def test_reset_connection_is_retried_then_one_line(server, fast_retries):
    srv = server("reset")
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e:
        RemoteFile(url).pread(0, 16)
    _one_line(e.value, url)
    assert len(srv.hits()) >= 2


@pytest.mark.parametrize(("behaviour", "words"), [("404", "not found"), ("403", "access denied")])
def test_missing_and_forbidden_name_the_url(server, fast_retries, behaviour, words):
    srv = server(behaviour)
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e:
        read_file_facts(url)
    assert words in _one_line(e.value, url)
    assert len(srv.hits()) <= 3  # no retry storm on a definite answer


def test_closed_port_is_one_line(fast_retries):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    url = f"http://127.0.0.1:{port}/m.safetensors"
    with pytest.raises(CkptlabError) as e:
        read_file_facts(url)
    assert "cannot connect" in _one_line(e.value, url)


def test_object_changed_since_listing_is_refused(server, model):
    srv = server(None)
    url = srv.url("m.safetensors")
    with pytest.raises(CkptlabError) as e:
        RemoteFile(url, size=model.stat().st_size + 10).pread(0, 16)
    assert "changed" in _one_line(e.value, url)


def test_a_stopped_server_on_a_reused_port_is_not_reached(model, fast_retries, monkeypatch):
    """The order dependency of ``test_ignored_range_is_refused`` made certain: a read leaves a kept-alive connection
    (one per thread and host:port, ``remote.reader``), its server stops, the next server is given the same port.
    The request must reach the new server (which ignores Range: refused), never the stopped one through a handler
    left on the old connection. Oracle: each server's own request log."""
    from fakes import http_range_server

    first = serve({"m.safetensors": model})
    url = first.url("m.safetensors")
    assert RemoteFile(url).pread(0, 16) == model.read_bytes()[:16]
    first.stop()

    port = first.port

    class SamePort(http_range_server.ThreadingHTTPServer):
        def __init__(self, address, handler):
            super().__init__((address[0], port), handler)

    monkeypatch.setattr(http_range_server, "ThreadingHTTPServer", SamePort)
    second = serve({"m.safetensors": model}, {"m.safetensors": "ignore_range"})
    try:
        assert second.url("m.safetensors") == url
        with pytest.raises(CkptlabError) as e:
            RemoteFile(url).pread(0, 16)
        assert "ignored the Range" in _one_line(e.value, url)
        assert len(first.hits()) == 1 and len(second.hits()) == 1
    finally:
        second.stop()
