"""`ckptlab ... | head -1`: the reader closing stdout early is not a failure. It exited 1 silently (typer turns
an OSError(EPIPE) into sys.exit(1), rich's console raises SystemExit(1)); it must end quietly with exit 0 and
no "Exception ignored" message. A real pipe, closed by the reading end after one line."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import SRC


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Enough files that the output is far larger than a pipe's buffer (64 KiB): the writer must hit EPIPE."""
    d = tmp_path_factory.mktemp("many")
    for i in range(1500):
        save_file({"x": np.full((2,), i, dtype=np.float32)}, str(d / f"m{i:05d}_{'n' * 60}.safetensors"))
    return d


def _head_1(*args) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "ckptlab", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    first = p.stdout.readline().decode()
    p.stdout.close()  # what `head -1` does after its line
    err = p.stderr.read().decode()
    return p.wait(timeout=300), first, err


@pytest.mark.parametrize("cmd", [["hash"], ["check"], ["hash", "--json"], ["ls"], ["ls", "--json"]])
def test_closing_the_pipe_after_one_line_ends_quietly_with_exit_0(many, tmp_path, cmd):
    if cmd[0] == "ls":
        db = tmp_path / "c.db"
        env = dict(os.environ, PYTHONPATH=str(SRC))
        subprocess.run([sys.executable, "-m", "ckptlab", "scan", "--db", str(db), str(many)], env=env,
                       check=True, capture_output=True)
        rc, first, err = _head_1(*cmd, "--db", db)
    else:
        rc, first, err = _head_1(*cmd, many)
    assert first.strip(), "the first line was written"
    assert rc == 0, (rc, err)
    assert err == ""
