"""``SafetensorsWriter``: atomic placement (kill, crash, full disk, read-only folder), ordering and
plan checks, byte-identical repeat runs, and output the reference library reads."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import unwritable_folder
from safetensors.torch import load_file

from ckptlab.errors import OutputError
from ckptlab.formats import writer
from ckptlab.formats.base import TensorInfo
from ckptlab.formats.writer import SafetensorsWriter, build_header, write_safetensors

SRC = Path(__file__).resolve().parents[2] / "src"

PLAN = {
    "first_stage_model.encoder.conv_in.weight": TensorInfo("F32", (128, 3, 3, 3)),
    "first_stage_model.encoder.conv_in.bias": TensorInfo("F32", (128,)),
    "model.diffusion_model.time_embed.0.weight": TensorInfo("F16", (1280, 320)),
}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(i.shape, generator=g).to(torch.float16 if i.dtype == "F16" else torch.float32)
            for k, i in PLAN.items()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_plan_and_metadata_readable_by_safetensors(tmp_path):
    out = tmp_path / "model.safetensors"
    ts = _tensors()
    with SafetensorsWriter(out, PLAN, {"ckptlab.operation": "convert"}) as w:
        for k, t in ts.items():
            w.write(k, t)
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[k], ts[k]) for k in ts)
    assert _leftovers(tmp_path) == ["model.safetensors"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o644 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_header_is_planned_before_data_and_buffer_is_aligned():
    h = build_header(PLAN, {"a": "b"})
    n = int.from_bytes(h[:8], "little")
    assert len(h) == 8 + n and len(h) % 8 == 0
    with pytest.raises(TypeError):
        build_header(PLAN, {"a": 1})
    with pytest.raises(ValueError):
        build_header({"__metadata__": TensorInfo("F32", (1,))}, None)


def test_repeated_runs_give_identical_bytes(tmp_path):
    digests = set()
    for i in range(3):
        out = tmp_path / f"run{i}.safetensors"
        write_safetensors(out, _tensors(), {"modelspec.title": "x", "ckptlab.recipe": '{"alpha": 0.5}'})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        write_safetensors(out, _tensors())
    assert out.read_bytes() == b"precious"
    write_safetensors(out, _tensors(), overwrite=True)
    assert set(load_file(str(out))) == set(PLAN)
    assert _leftovers(tmp_path) == ["m.safetensors"]


def test_output_that_appears_while_writing_is_not_replaced(tmp_path):
    out = tmp_path / "m.safetensors"
    w = SafetensorsWriter(out, PLAN).open()
    for k, t in _tensors().items():
        w.write(k, t)
    out.write_bytes(b"someone else")
    with pytest.raises(OutputError, match="appeared while writing"):
        w.commit()
    assert out.read_bytes() == b"someone else"
    assert _leftovers(tmp_path) == ["m.safetensors"]


@pytest.mark.parametrize("mistake", ["out_of_order", "wrong_dtype", "wrong_shape", "missing", "extra",
                                     "raw_wrong_size"])
def test_plan_violations_raise_and_leave_nothing(tmp_path, mistake):
    out = tmp_path / "m.safetensors"
    ts = _tensors()
    keys = list(PLAN)
    with pytest.raises((ValueError, RuntimeError)):
        with SafetensorsWriter(out, PLAN) as w:
            if mistake == "out_of_order":
                w.write(keys[1], ts[keys[1]])
            elif mistake == "wrong_dtype":
                w.write(keys[0], ts[keys[0]].half())
            elif mistake == "wrong_shape":
                w.write(keys[0], ts[keys[0]].reshape(3, 128, 3, 3))
            elif mistake == "missing":
                w.write(keys[0], ts[keys[0]])
            elif mistake == "extra":
                for k in keys:
                    w.write(k, ts[k])
                w.write("model.diffusion_model.out.0.weight", ts[keys[1]])
            elif mistake == "raw_wrong_size":
                w.write_raw(keys[0], b"\0" * 12)
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_write_raw_zero_copy_path(tmp_path):
    out = tmp_path / "m.safetensors"
    ts = _tensors()
    with SafetensorsWriter(out, PLAN) as w:
        for k, t in ts.items():
            w.write_raw(k, t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[k], ts[k]) for k in ts)


def test_exception_inside_block_removes_temp(tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(out, PLAN) as w:
            w.write(next(iter(PLAN)), _tensors()[next(iter(PLAN))])
            raise KeyboardInterrupt
    assert _leftovers(tmp_path) == []


def test_missing_output_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_safetensors(tmp_path / "nope" / "m.safetensors", _tensors())


# -- the writer in a child process: kill, full disk, read-only folder ------------------------------

CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    import torch
    from ckptlab.errors import OutputError
    from ckptlab.formats.base import TensorInfo
    from ckptlab.formats.writer import SafetensorsWriter
    mode, out = sys.argv[1], sys.argv[2]
    n = 64
    plan = {f"model.diffusion_model.input_blocks.{i}.0.weight": TensorInfo("F32", (256, 1024)) for i in range(n)}
    t = torch.ones(256, 1024)
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 * 2**20, 3 * 2**20))
    try:
        with SafetensorsWriter(out, plan) as w:
            for i, k in enumerate(plan):
                w.write(k, t)
                if mode == "kill" and i == n // 2:
                    print("HALFWAY", flush=True)
                    time.sleep(60)
    except OutputError as e:
        print("OUTPUTERROR", e, flush=True)
        sys.exit(3)
    print("DONE", flush=True)
""")


def _child(mode: str, out: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, str(out)], stdout=subprocess.PIPE, text=True,
                            env=env, **kw)


def test_sigkill_mid_write_never_leaves_a_file_under_the_final_name(tmp_path):
    out = tmp_path / "merged.safetensors"
    proc = _child("kill", out)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        temps = [p for p in tmp_path.iterdir() if p.name != out.name]
        assert len(temps) == 1 and temps[0].stat().st_size > 2**20  # data really was being written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".merged.safetensors.") and left[0].endswith(".tmp")


def test_full_disk_gives_output_error_and_no_file(tmp_path):
    out = tmp_path / "big.safetensors"
    proc = _child("fsize", out)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, stdout
    assert "OUTPUTERROR" in stdout and str(out) in stdout and "write failed" in stdout
    assert _leftovers(tmp_path) == []


def test_read_only_folder_gives_output_error_and_no_file():
    folder, cleanup = unwritable_folder()
    try:
        before = set(folder.iterdir())
        out = folder / "ckptlab-test-output.safetensors"
        with pytest.raises(OutputError, match="cannot create a file in") as ei:
            write_safetensors(out, _tensors())
        assert str(out) in str(ei.value)
        assert not out.exists() and set(folder.iterdir()) == before
    finally:
        cleanup()


def test_no_whole_model_buffer(tmp_path, monkeypatch):
    """Bytes reach the file as tensors are written: what is not on disk yet never exceeds the staging buffer."""
    monkeypatch.setattr(writer, "STAGE", 4 * writer.BLOCK)
    out = tmp_path / "m.safetensors"
    ts = _tensors()
    lag = []
    with SafetensorsWriter(out, PLAN) as w:
        for k, t in ts.items():
            w.write(k, t)
            lag.append(w.bytes_written - os.path.getsize(w._tmp))
    assert all(0 <= x < writer.STAGE for x in lag), lag
    assert max(lag) > 0  # it is staged, and the test would see a whole-model buffer


def test_non_contiguous_and_sliced_tensors_are_written_by_value(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"model.diffusion_model.out.0.weight": base.t(),          # transposed view
               "model.diffusion_model.out.0.bias": base[:, 1],          # strided slice
               "model.diffusion_model.out.2.weight": base[1:3, 2:5]}    # offset window
    out = write_safetensors(tmp_path / "views.safetensors", tensors)
    loaded = load_file(str(out))
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v.contiguous()), k
