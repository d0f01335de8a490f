"""Shared test plumbing: an isolated environment per test and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: the web app's fixtures (sample_library, library_copy, client, rw_client): a plugin module, not a second
#: conftest.py (two modules named ``conftest`` break the ``from conftest import SRC`` the tests use)
pytest_plugins = ("fakes.web_fixtures",)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's catalog, config or caches, or reaches the network."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("CKPTLAB_DB", str(home / "catalog.db"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ckptlab ARGS`` as a user would, in a subprocess, with this checkout's src."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(SRC) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.setdefault("COLUMNS", "200")
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "ckptlab", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd, input=input)


@pytest.fixture
def cli():
    return run_cli


def unwritable_folder():
    """A folder this process cannot create files in: chmod 555 for a normal user; as root (which
    ignores modes) a kernel filesystem mounted read-only to us."""
    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp(prefix="ckptlab-ro-"))
        folder.chmod(0o555)
        return folder, lambda: (folder.chmod(0o755), folder.rmdir())
    for cand in (Path("/sys/fs"), Path("/sys"), Path("/proc/self")):
        try:
            fd, name = tempfile.mkstemp(dir=cand)
        except OSError:
            return cand, lambda: None
        os.close(fd)
        os.unlink(name)
    pytest.skip("no unwritable folder available to root here")
