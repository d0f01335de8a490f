"""Every command that talks to CivitAI, against answers that break the API's shapes (issue 12 §4):
one ``ckptlab: error:`` line and a documented exit code, never a traceback or exit 70. Also a
redirect loop, a refused connection (fail fast, no retries), retries said on stderr, terminal
escapes from the server shown escaped, and ``--db`` on every hub command (issue 11 §5)."""

from __future__ import annotations

import json
import socket

import pytest
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes

from ckptlab.errors import ResponseShapeError
from ckptlab.hub.civitai import parse_model, parse_version, parse_version_list
from ckptlab.library.catalog import Catalog

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_IN_FIELD = b'{"id": 1000, "images": [{"meta": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}]}"

# (label, raw body of GET /api/v1/model-versions/1000)
HOSTILE_VERSIONS = [
    ("id is a string", b'{"id": "abc", "modelId": 100}'),
    ("model is a string", b'{"id": 1000, "modelId": 100, "model": "LORA"}'),
    ("a list", b"[1, 2, 3]"),
    ("null", b"null"),
    ("100k-deep nesting", DEEP),
    ("100k-deep inside a field", DEEP_IN_FIELD),
    ("65-deep nesting", b'{"id": 1000, "x": ' + b"[" * 70 + b"]" * 70 + b"}"),
    ("files is a string", b'{"id": 1000, "modelId": 100, "files": "x"}'),
    ("file entry is a number", b'{"id": 1000, "modelId": 100, "files": [7]}'),
    ("sizeKB infinite", b'{"id": 1000, "modelId": 100, "files": [{"id": 1, "name": "a.safetensors", '
                        b'"sizeKB": 1e999}]}'),
    ("hash is a list", b'{"id": 1000, "modelId": 100, "files": [{"id": 1, "hashes": {"SHA256": []}}]}'),
    ("id too large", b'{"id": 123456789012345678901234567890, "modelId": 100}'),
    ("id is NaN", b'{"id": NaN}'),
    ("modelId negative", b'{"id": 1000, "modelId": -5}'),
    ("trainedWords has a number", b'{"id": 1000, "trainedWords": ["a", 1]}'),
    ("not JSON", b"<html>Cloudflare</html>"),
    ("empty body", b""),
    ("id is true", b'{"id": true}'),
]


@pytest.fixture
def world(tmp_path):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.data = lora_bytes(seed=1)
    fake.add_version(1000, 100, [(5000, "detail.safetensors", fake.data)])
    env = {"CKPTLAB_CIVITAI_URL": fake.api_url, "CIVITAI_API_TOKEN": fake.token, "CKPTLAB_HTTP_BACKOFF": "0"}
    yield fake, tmp_path, env
    fake.stop()


def one_error_line(r, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize(("label", "body"), HOSTILE_VERSIONS, ids=[h[0] for h in HOSTILE_VERSIONS])
def test_hostile_version_json_is_one_line_for_info_and_download(world, cli, label, body):
    fake, tmp, env = world
    fake.raw_api["/api/v1/model-versions/1000"] = body
    line = one_error_line(cli("civitai", "info", "civitai:version/1000", env=env), 1)
    assert "CivitAI model version 1000" in line and len(line) < 400
    line = one_error_line(cli("download", "civitai:version/1000", "--dir", tmp / "lib", env=env), 1)
    assert "CivitAI model version 1000" in line
    assert not (tmp / "lib").exists() or not any((tmp / "lib").rglob("*.safetensors*"))


@pytest.mark.parametrize("body", [b'{"id": 100, "modelVersions": "x"}', b'{"id": 100, "modelVersions": [{"id": "1"}]}',
                                  b'{"id": 100, "tags": {"a": 1}}', b'{"id": 100, "creator": "bob"}', b"[]", DEEP])
def test_hostile_model_json_is_one_line(world, cli, body):
    fake, tmp, env = world
    fake.raw_api["/api/v1/models/100"] = body
    one_error_line(cli("civitai", "info", "civitai:model/100", env=env), 1)
    one_error_line(cli("download", "civitai:model/100", "--dir", tmp / "lib", env=env), 1)


@pytest.mark.parametrize("body", [b'{"id": 1}', b"null", b'[{"id": "x"}]', b"[" * 50_000])
def test_hostile_bulk_answer_is_an_error_row_in_link(world, cli, body):
    """``civitai link`` reports per file: the bad bulk answer is an ``error`` row and exit 1."""
    fake, tmp, env = world
    f = tmp / "detail.safetensors"
    f.write_bytes(fake.data)
    fake.raw_api["/api/v1/model-versions/by-hash"] = body
    r = cli("civitai", "link", f, "--json", env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    (row,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert row["status"] == "error"
    assert any(x in row["message"] for x in ("unexpected answer", "did not answer JSON", "nests"))


def test_parsers_name_the_field_and_accept_the_real_shapes(world):
    fake, _, _ = world
    v = json.loads(json.dumps(fake.versions[1000]))
    assert parse_version(v, "x") is v
    assert parse_version_list([v, v], "x") == [v, v]
    m = fake.model_object(100)
    assert parse_model(m, "x") is m
    v["files"][0]["hashes"]["SHA256"] = 5
    with pytest.raises(ResponseShapeError, match=r"version\.files\[0\]\.hashes\.SHA256 is a number, expected a string"):
        parse_version(v, "x")
    with pytest.raises(ResponseShapeError, match=r"version\.model is a string, expected an object"):
        parse_version({"id": 1, "model": "LORA"}, "x")


def test_redirect_loop_is_one_line(world, cli):
    fake, tmp, env = world
    fake.redirect_loop = True
    line = one_error_line(cli("download", "civitai:1000", "--dir", tmp / "lib", env=env), 1)
    assert "more than 8 redirects" in line
    assert not any((tmp / "lib").rglob("*.part")) if (tmp / "lib").exists() else True


def test_hf_redirect_loop_is_one_line(tmp_path, cli):
    from fakes.hf_server import FakeHub

    with FakeHub() as hub:
        hub.add_repo("org/repo", {"lora.safetensors": lora_bytes(seed=2)})
        hub.redirect_loop = True
        r = cli("download", "hf:org/repo/lora.safetensors", "--dir", tmp_path, "--layout", "flat", "--no-catalog",
                env={"HF_ENDPOINT": hub.endpoint, "CKPTLAB_HTTP_BACKOFF": "0", "HF_HUB_OFFLINE": ""})
    one_error_line(r, 1)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused at once
    return port


@pytest.mark.parametrize("args", [("civitai", "info", "civitai:1000"), ("download", "civitai:1000")])
def test_refused_connection_fails_fast_without_retries(tmp_path, cli, args):
    """Backoff left at its default (1 s, 2 s, ... 31 s in all): a refused connection is not retried,
    so no retry line is printed and the error says what happened."""
    env = {"CKPTLAB_CIVITAI_URL": f"http://127.0.0.1:{_closed_port()}", "CIVITAI_API_TOKEN": "t"}
    r = cli(*args, "--dir", tmp_path, env=env) if args[0] == "download" else cli(*args, env=env)
    line = one_error_line(r, 1)
    assert "Connection refused" in line and "retrying" not in r.stderr


def test_each_retry_is_said_on_stderr(world, cli):
    fake, tmp, env = world
    fake.script["/api/v1/model-versions/1000"] = [(503, {}), (502, {})]
    r = cli("civitai", "info", "civitai:version/1000", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "ckptlab: warning: CivitAI model version 1000: HTTP 503; attempt 1 of 6 failed, retrying in 0 s",
        "ckptlab: warning: CivitAI model version 1000: HTTP 502; attempt 2 of 6 failed, retrying in 0 s",
    ]


def test_terminal_escapes_from_the_server_are_shown_escaped(world, cli):
    fake, tmp, env = world
    fake.versions[1000]["name"] = "v1\x1b[2J\u202e"
    fake.models[100]["name"] = "Evil\x1b]0;pwned\x07"
    fake.versions[1000]["model"]["name"] = fake.models[100]["name"]
    r = cli("civitai", "info", "civitai:version/1000", env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout and "\x07" not in r.stdout
    assert "Evil\\x1b]0;pwned\\x07 / v1\\x1b[2J\\u202e" in r.stdout


def test_db_option_on_download_link_show_and_info(world, cli):
    """``--db`` chooses the catalog; the default one ($CKPTLAB_DB) is never created."""
    fake, tmp, env = world
    import os

    default_db = os.environ["CKPTLAB_DB"]
    db = tmp / "mine.db"
    r = cli("download", "civitai:1000", "--dir", tmp / "lib", "--layout", "flat", "--db", db, env=env)
    assert r.returncode == 0, r.stderr
    path = tmp / "lib" / "detail.safetensors"
    with Catalog(db) as cat:
        assert cat.get_by_path(path) is not None
    show = cli("civitai", "show", path, "--json", "--db", db, env=env)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["link"]["version_id"] == 1000
    link = cli("civitai", "link", path, "--json", "--db", db, env=env)
    assert link.returncode == 0 and json.loads(link.stdout)["status"] == "already"
    info = cli("civitai", "info", "civitai:version/1000", "--json", "--db", db, env=env)
    assert json.loads(info.stdout)["files"][0]["local_paths"] == [str(path)]
    assert not os.path.exists(default_db)
    # and CKPTLAB_DB is honoured the same way when --db is not given
    env2 = {**env, "CKPTLAB_DB": str(db)}
    assert cli("civitai", "show", path, "--json", env=env2).returncode == 0
