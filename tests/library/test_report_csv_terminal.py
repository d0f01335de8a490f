"""`report --format csv` on a terminal printed raw ESC bytes from file names (the table and HTML escape them).
On a terminal (stdout isatty, a real pty here) control characters are shown visibly; with -o or a pipe the
CSV keeps the exact values. The oracle is Python's csv module reading the output back."""

from __future__ import annotations

import csv
import io
import os
import pty
import subprocess
import sys

import pytest

from ckptlab.sample.build import write_model
from tests.conftest import SRC

EVIL = "red\x1b[31mname\u202e"


@pytest.fixture(scope="module")
def lib(tmp_path_factory, ):
    from tests.conftest import run_cli

    d = tmp_path_factory.mktemp("csvterm")
    models = d / "models"
    models.mkdir()
    write_model(models / f"{EVIL}.safetensors", "sd1_checkpoint", dtype="F32", seed=1)
    db = d / "c.db"
    r = run_cli("scan", "--fingerprint", "--db", db, models)
    assert r.returncode == 0, r.stderr
    return db


def _names(text: str) -> list[str]:
    return [row["name"] for row in csv.DictReader(io.StringIO(text))]


def test_csv_to_a_file_keeps_exact_values(lib, cli, tmp_path):
    out = tmp_path / "r.csv"
    assert cli("report", "--format", "csv", "--db", lib, "-o", out).returncode == 0
    assert _names(out.read_text(encoding="utf-8")) == [f"{EVIL}.safetensors"]


def test_csv_to_a_pipe_keeps_exact_values(lib, cli):
    r = cli("report", "--format", "csv", "--db", lib)
    assert r.returncode == 0, r.stderr
    assert _names(r.stdout) == [f"{EVIL}.safetensors"]


def test_csv_on_a_terminal_shows_control_characters(lib):
    main, secondary = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(SRC), COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "ckptlab", "report", "--format", "csv", "--db", str(lib)],
                         stdout=secondary, stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert p.wait(timeout=120) == 0, p.stderr.read()
    text = b"".join(chunks).decode("utf-8").replace("\r\n", "\n")
    assert "\x1b" not in text and "\u202e" not in text
    assert _names(text) == ["red\\x1b[31mname\\u202e.safetensors"]


def test_csv_fingerprint_column_is_upper_case(lib, cli):
    r = cli("report", "--format", "csv", "--db", lib)
    (row,) = list(csv.DictReader(io.StringIO(r.stdout)))
    fp = row["fingerprint"]
    assert fp and fp == fp.upper() and int(fp, 16) >= 0, fp
