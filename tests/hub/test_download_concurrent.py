"""Two ``ckptlab download`` processes on one file (issue 12 §3): the second one is told the file is
already being downloaded and touches nothing; the first one finishes and verifies. Real processes,
the loopback fake holding the first transfer open until the second has finished (no timing)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import SRC
from fakes.civitai_server import FakeCivitai
from fakes.models import lora_bytes

NAME = "detail_tweaker.safetensors"


@pytest.fixture
def world(tmp_path):
    fake = FakeCivitai().start()
    fake.add_model(100, "Detail Tweaker", "LORA")
    fake.data = lora_bytes(seed=1, dim=512)
    fake.add_version(1000, 100, [(5000, NAME, fake.data)])
    env = dict(os.environ)
    env.update({"CKPTLAB_CIVITAI_URL": fake.api_url, "CIVITAI_API_TOKEN": fake.token, "CKPTLAB_HTTP_BACKOFF": "0",
                "PYTHONPATH": str(SRC) + os.pathsep + env.get("PYTHONPATH", ""), "COLUMNS": "200"})
    yield fake, tmp_path / "lib", env
    if fake.hold is not None:
        fake.hold.set()
    fake.stop()


def _wait_for(cond, what: str, proc=None, limit: float = 120.0) -> None:
    """Wait for a state (not a timed assertion: the limit only turns a hang into a failure)."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"first download ended early ({proc.returncode}) while waiting for {what}: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.05)


def _cmd(root):
    return [sys.executable, "-m", "ckptlab", "download", "civitai:1000", "--dir", str(root), "--layout", "flat",
            "--no-catalog"]


def test_second_process_is_told_and_the_first_finishes(world):
    fake, root, env = world
    fake.hold = threading.Event()
    part = root / (NAME + ".part")
    first = subprocess.Popen(_cmd(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first process holds the partial's lock from before its first storage request; the fake
        # holds the answer, so the partial is still empty (the case where the loser used to delete it)
        _wait_for(lambda: any(r.server == "storage" and r.path.startswith("/files/") for r in fake.requests),
                  "the first transfer to start", first)
        assert part.exists() and part.stat().st_size == 0
        inode = part.stat().st_ino
        second = subprocess.run(_cmd(root), env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ")
        assert "already being downloaded" in lines[0] and "Traceback" not in second.stderr
        assert part.exists() and part.stat().st_ino == inode  # the winner's partial is untouched
        storage = [r for r in fake.requests if r.server == "storage" and r.path.startswith("/files/")]
        assert len(storage) == 1  # the loser never asked storage for a byte
    finally:
        fake.hold.set()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (root / NAME).read_bytes() == fake.data
    assert hashlib.sha256((root / NAME).read_bytes()).hexdigest() == hashlib.sha256(fake.data).hexdigest()
    assert sorted(p.name for p in root.iterdir()) == [NAME]  # no .part, no .part.json left


def test_a_later_run_after_the_winner_finished_reports_the_file_as_there(world):
    fake, root, env = world
    first = subprocess.run(_cmd(root), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(_cmd(root), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already there" in again.stdout
    assert sorted(p.name for p in root.iterdir()) == [NAME]
