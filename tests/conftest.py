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
pytest_plugins = ("fakes.web_fixtures", "fakes.s3_server", "fakes.ray_cluster")


def _threads_per_worker() -> None:
    """Under ``pytest -n N`` each worker gets its share of the cores for torch's intra-op threads (and so do the
    CLI subprocesses it starts, through OMP_NUM_THREADS). By default every worker uses all cores: with -n 2 on
    2 cores that is 4 threads spinning on 2 cores, and the small tensors these tests use ran 2-3x slower.
    Set before torch is imported (torch reads OMP_NUM_THREADS once); a user's own setting wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ["OMP_NUM_THREADS"] = threads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(threads))


_threads_per_worker()


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


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``ckptlab ARGS`` through the same entry point (``ckptlab.cli.main.main``: parsing, dispatch, exit codes, the
    one-line errors) in this process, stdout and stderr captured. For tests about what a command does, not about the
    process (start-up, imports, signals): it saves the torch/diffusers import a subprocess pays each time. Every
    command keeps at least one test through ``run_cli``, the real subprocess."""
    import contextlib
    import io

    from ckptlab.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["ckptlab", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli_in_process(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # as run_cli
    return run_cli_in_process


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
