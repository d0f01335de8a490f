"""``ckptlab inspect/check/hash URL`` print what the same commands print for the local file (paths aside)."""

from __future__ import annotations

import json

import pytest
from fakes.http_range_server import serve
from fakes.library_files import tensors, write_ckpt, write_st
from hostile.corpus import build_hostile

pytestmark = pytest.mark.xdist_group("remote-io")


def _same(out: str, path) -> str:
    return out.replace(json.dumps(str(path))[1:-1], "<path>")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cases = {c.name: c for c in build_hostile(root / "hostile", root / "canary")}
    out = {
        "sd15.safetensors": write_st(root / "sd15.safetensors", tensors("sd1_checkpoint", seed=1)),
        "lora.safetensors": write_st(root / "lora.safetensors", tensors("sd1_kohya_lora", seed=3),
                                     {"ss_network_module": "networks.lora"}),
        "sd15.ckpt": write_ckpt(root / "sd15.ckpt", tensors("sd1_checkpoint", seed=1)),
        "sd2.safetensors": write_st(root / "sd2.safetensors", tensors("sd2_checkpoint", seed=4)),  # --heuristics reads
        "zip_injected.ckpt": cases["zip_injected"].path,
        "polyglot.safetensors": cases["safetensors_polyglot_valid"].path,
    }
    yield out
    assert not list((root / "canary").iterdir()), "a payload ran"


@pytest.mark.parametrize("command", [["inspect", "--json"], ["inspect", "--json", "--heuristics"], ["check", "--json"],
                                     ["hash", "--json", "--no-cache"]])
def test_commands_on_s3_urls_print_the_local_output(s3, s3_server, cli, files, command):
    urls = {name: s3.put(f"m/{path.name}", path) for name, path in files.items()}  # same names
    for name, path in files.items():
        local = cli(*command, path)
        remote = cli(*command, urls[name], env=s3_server.env)
        assert remote.returncode == local.returncode, (name, remote.stderr, local.stderr)
        assert _same(remote.stdout, urls[name]) == _same(local.stdout, path), name
        assert _same(remote.stderr, urls[name]) == _same(local.stderr, path), name


def test_check_on_an_https_like_url(cli, files):
    """The http(s) transport through the CLI: the same verdict lines as the local file."""
    srv = serve({path.name: path for path in files.values()})
    try:
        for name, path in files.items():
            url = srv.url(path.name)
            local = cli("check", "--json", path)
            remote = cli("check", "--json", url)
            assert remote.returncode == local.returncode
            assert _same(remote.stdout, url) == _same(local.stdout, path), name
    finally:
        srv.stop()


def test_without_the_remote_extra_a_url_is_one_line(tmp_path):
    """fsspec missing (blocked in a fresh interpreter): ``inspect s3://...`` is one line naming the extra; an http
    URL needs no extra at all (the standard library reads it)."""
    import subprocess
    import sys

    from conftest import SRC

    code = ("import sys; sys.modules['fsspec'] = None; sys.modules['s3fs'] = None\n"
            "from ckptlab.cli.main import main\nsys.argv = ['ckptlab', 'inspect', 's3://bucket/m.safetensors']\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'ckptlab[remote]'" in lines[0], r.stderr


@pytest.mark.parametrize("command", ["inspect", "check", "hash"])
@pytest.mark.parametrize("url", ["https://[::1/x.safetensors", "https://user:hunter2@example.org:99999/x.ckpt"])
def test_a_malformed_url_is_one_usage_line_without_its_password(cli, command, url):
    """urllib's parser refuses these (an unclosed IPv6 bracket, a port above 65535): before, the ValueError surfaced
    as an internal error (exit 70)."""
    r = cli(command, url)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "not a valid URL" in lines[0], r.stderr
    assert "hunter2" not in r.stderr + r.stdout and "Traceback" not in r.stderr
