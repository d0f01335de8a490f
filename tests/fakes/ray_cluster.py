"""A real local Ray cluster for the distributed scan tests (a pytest plugin, listed in ``tests/conftest.py``).

``ray_cluster`` (session): ``ray start --head --block`` bound to 127.0.0.1 on a free port, two CPUs (two
workers), a short private ``--temp-dir``, no dashboard or usage stats, in a process group of its own, with the
moto server's variables set so its workers reach the test S3 server, and this checkout's ``src`` on their
``PYTHONPATH``. ``.address`` is what ``ckptlab scan --ray`` takes. Teardown stops only this cluster's
processes (its process group, then any process left below the head; never ``ray stop``, which would stop
every cluster on the machine, other test workers' included). Mark tests that use it
``@pytest.mark.xdist_group("ray")`` so one xdist worker runs them all on one cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class RayCluster:
    address: str
    proc: subprocess.Popen
    temp_dir: str

    def pids(self) -> set[int]:
        """Every live process of this cluster: the head's process group and its descendants."""
        return _group(os.getpgid(self.proc.pid)) | _descendants(self.proc.pid) if self.proc.poll() is None \
            else _descendants(self.proc.pid)

    def task_workers(self, name: str) -> list[int]:
        """Pids of this cluster's workers now running a task of function ``name`` (Ray titles a worker
        process ``ray::<function>`` while it runs one)."""
        out = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(f"ray::{name}"):
                out.append(pid)
        return out


def _ppids() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    out[int(d)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _descendants(root: int) -> set[int]:
    ppids = _ppids()
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in ppids.items() if pp in frontier and p not in out}
        out |= frontier
    return out


def _group(pgid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid:
                    out.add(int(d))
            except OSError:
                pass
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_cluster(env: dict[str, str], timeout: float = 90) -> RayCluster:
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("the ray package is not installed (requirements-dev.txt)")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    full_env = {**os.environ, **env, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "RAY_USAGE_STATS_ENABLED": "0"}
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=false",
         "--object-store-memory=100000000", "--block"],
        env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cluster = RayCluster(address=f"127.0.0.1:{port}", proc=proc, temp_dir=temp_dir)
    deadline = time.monotonic() + timeout
    while True:  # the GCS port answers, and a raylet has written its socket
        ready = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                ready = any(p.name.startswith("raylet") for p in Path(temp_dir).rglob("sockets/*"))
        except OSError:
            pass
        if ready:
            return cluster
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_ray_cluster(cluster)
            raise RuntimeError(f"ray start did not come up on {cluster.address}")
        time.sleep(0.3)


def stop_ray_cluster(cluster: RayCluster) -> None:
    pids = cluster.pids()
    with_group = cluster.proc.poll() is None
    if with_group:
        try:
            os.killpg(os.getpgid(cluster.proc.pid), signal.SIGTERM)
        except OSError:
            pass
        try:
            cluster.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)
    for pid in pids | _descendants(cluster.proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        cluster.proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    cluster = start_ray_cluster(s3_server.env)
    try:
        yield cluster
    finally:
        stop_ray_cluster(cluster)
