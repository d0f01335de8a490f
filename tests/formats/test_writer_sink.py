"""``FileSink``: the staged, direct-I/O byte sink under ``SafetensorsWriter``. Oracle: the same byte
pieces joined in memory; the sink must reproduce them exactly in both modes, across staging-buffer
boundaries, with header patches landing on disk or in the stage, and when direct I/O is refused."""

from __future__ import annotations

import errno
import os
import random

import pytest

from ckptlab.formats import writer
from ckptlab.formats.writer import BLOCK, FileSink


def _pieces(seed: int, n: int = 60) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 7, 512, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK + 5, 9 * BLOCK + 1]) for _ in range(n)]
    return [rng.randbytes(s) for s in sizes]


def _fs_takes_direct_io(folder) -> bool:
    """Independent probe: open a file with O_DIRECT and write one aligned block."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return False
    p = folder / "probe"
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        block = mmap.mmap(-1, BLOCK)
        return os.pwrite(fd, block, 0) == BLOCK
    except OSError:
        return False
    finally:
        os.close(fd)
        p.unlink()


def _write(path, pieces, patches=(), **kw) -> FileSink:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sink = FileSink(fd, stage=4 * BLOCK, **kw)
        for i, piece in enumerate(pieces):
            sink.write(piece)
            for at, (offset, data) in patches:
                if at == i:
                    sink.patch(offset, data)
        sink.finish()
        sink.close()
    finally:
        os.close(fd)
    return sink


def _expected(pieces, patches=()) -> bytes:
    whole = bytearray(b"".join(pieces))
    for _, (offset, data) in sorted(patches, key=lambda p: p[0]):  # in the order they were made
        whole[offset:offset + len(data)] = data
    return bytes(whole)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_equal_the_joined_pieces(tmp_path, direct, seed):
    pieces = _pieces(seed)
    out = tmp_path / "out.bin"
    _write(out, pieces, direct=direct)
    assert out.read_bytes() == _expected(pieces)


@pytest.mark.parametrize("direct", [True, False])
def test_patches_on_disk_in_stage_and_across_the_boundary(tmp_path, direct):
    pieces = [bytes([i % 251]) * (BLOCK + 17 * i) for i in range(40)]
    total = sum(map(len, pieces))
    patches = [
        (39, (0, b"H" * 300)),                      # the header, long flushed
        (39, (BLOCK - 5, b"x" * 10)),               # across a block boundary on disk
        (39, (total - 20 - len(pieces[39]), b"y" * 40)),  # end of piece 38 into 39 (flushed / staged)
        (10, (5, b"early")),                        # while still writing
    ]
    out = tmp_path / "p.bin"
    _write(out, pieces, patches, direct=direct)
    assert out.read_bytes() == _expected(pieces, patches)


def test_direct_io_stays_on_where_the_filesystem_takes_it(tmp_path):
    if not _fs_takes_direct_io(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    sink = _write(tmp_path / "d.bin", _pieces(3), direct=True)
    assert sink.direct  # never fell back silently


def test_refused_direct_io_falls_back_to_normal_writes(tmp_path, monkeypatch):
    import fcntl

    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    pieces = _pieces(4)
    out = tmp_path / "f.bin"
    sink = _write(out, pieces, [(len(pieces) - 1, (3, b"patch"))], direct=True)
    assert not sink.direct
    assert out.read_bytes() == _expected(pieces, [(0, (3, b"patch"))])
    if hasattr(os, "O_DIRECT") and _fs_takes_direct_io(tmp_path):
        assert refused  # the direct path was really tried first


@pytest.mark.parametrize("value", ["0", "off"])
def test_environment_switch_turns_direct_io_off(tmp_path, monkeypatch, value):
    monkeypatch.setenv("CKPTLAB_DIRECT_IO", value)
    sink = _write(tmp_path / "e.bin", _pieces(5))
    assert not sink.direct


def test_writer_uses_direct_io_by_default(tmp_path):
    if not _fs_takes_direct_io(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    import torch

    from ckptlab.formats.base import TensorInfo

    plan = {"model.diffusion_model.out.2.weight": TensorInfo("F32", (4, 320, 3, 3))}
    with writer.SafetensorsWriter(tmp_path / "m.safetensors", plan) as w:
        w.write("model.diffusion_model.out.2.weight", torch.ones(4, 320, 3, 3))
        assert w.direct


def test_without_pwrite_as_on_windows(tmp_path, monkeypatch):
    """Windows has no os.pwrite (nor O_DIRECT): the sink seeks and writes, patches included."""
    monkeypatch.delattr(os, "pwrite")
    pieces = [bytes([i]) * (3 * BLOCK + i) for i in range(12)]
    patches = [(11, (2, b"header")), (11, (sum(map(len, pieces)) - 4, b"tail"))]
    out = tmp_path / "w.bin"
    _write(out, pieces, patches, direct=False)
    assert out.read_bytes() == _expected(pieces, patches)
