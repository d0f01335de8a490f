"""A real S3-compatible server on loopback for the remote tests: moto in server mode (``python -m moto.server``),
started by the tests themselves in a subprocess, one per test process (xdist worker), on a free port.

Fixtures (a pytest plugin, listed in ``tests/conftest.py``'s ``pytest_plugins``):

- ``s3_server`` (session): the running server: ``.endpoint``, ``.env`` (the AWS variables that point botocore,
  s3fs and every ckptlab subprocess at it), ``.client()`` (boto3), ``.bucket(name)`` (a fresh bucket),
  ``.put(bucket, key, data_or_path)``, ``.requests()`` (moto's own request log is not used: counting requests is
  ckptlab's ``remote`` stats' job, checked against the server in the remote tests).
- ``s3`` (function): the same server with its variables set in this test's environment (``monkeypatch``), and an
  empty bucket named after the test: ``s3.bucket_name``, ``s3.url(key)`` -> ``s3://bucket/key``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    env: dict[str, str] = field(default_factory=dict)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, name: str | None = None, *, versioned: bool = False) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        c = self.client()
        c.create_bucket(Bucket=name)
        if versioned:
            c.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def put(self, bucket: str, key: str, data: bytes | str | os.PathLike) -> None:
        c = self.client()
        if isinstance(data, (bytes, bytearray, memoryview)):
            c.put_object(Bucket=bucket, Key=key, Body=bytes(data))
        else:
            c.upload_file(os.fspath(data), bucket, key)  # multipart above 8 MiB, as real uploads are

    def put_tree(self, bucket: str, prefix: str, folder: str | os.PathLike) -> list[str]:
        """Upload every file under ``folder`` to ``prefix/<relative path>``; the keys, sorted."""
        keys = []
        folder = Path(folder)
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                key = f"{prefix.strip('/')}/{p.relative_to(folder).as_posix()}".lstrip("/")
                self.put(bucket, key, p)
                keys.append(key)
        return keys


def start_s3_server(timeout: float = 60) -> S3Server:
    port = free_port()
    log = open(os.devnull, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    return S3Server(endpoint=endpoint, proc=proc, env=env)


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="the remote tests need moto[server] (requirements-dev.txt)")
    server = start_s3_server()
    try:
        yield server
    finally:
        server.proc.terminate()
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@dataclass
class S3Bucket:
    server: S3Server
    bucket_name: str

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket_name}/{key.lstrip('/')}"

    def put(self, key: str, data) -> str:
        self.server.put(self.bucket_name, key, data)
        return self.url(key)

    def put_tree(self, prefix: str, folder) -> list[str]:
        return [self.url(k) for k in self.server.put_tree(self.bucket_name, prefix, folder)]


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return S3Bucket(s3_server, s3_server.bucket(f"{name}-{uuid.uuid4().hex[:8]}"))
