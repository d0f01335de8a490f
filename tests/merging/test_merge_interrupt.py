"""Ctrl-C / errors in the writer stop the compute pool promptly: running keys stop at their next chunk,
queued keys never start, no temp file is left, and a worker never holds the exit up by importing torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from ckptlab.merging import merge
from ckptlab.merging import methods as methods_mod

KEYS = [f"model.diffusion_model.input_blocks.{i}.1.proj_in.weight" for i in (1, 2, 4, 5, 7, 8)]


@pytest.fixture
def pair(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        save_file({k: torch.randn(256, 64, generator=g) for k in KEYS}, str(d / f"m{seed}.safetensors"))
        paths.append(d / f"m{seed}.safetensors")
    return paths


def test_interrupt_stops_running_keys_between_chunks(pair, tmp_path, monkeypatch):
    """Each key is 256 one-row chunks. The writer is interrupted at its first written key: without a stop
    flag the keys already running in the pool compute all their chunks (hundreds more calls)."""
    import ckptlab.merging.graph as graph

    monkeypatch.setattr(graph, "CHUNK_ELEMS", 64)  # one row per chunk
    calls = {"n": 0, "at_stop": None}
    lock = threading.Lock()
    real = methods_mod.METHODS["weighted_sum"]

    def counting(xs, p, ctx):
        with lock:
            calls["n"] += 1
        time.sleep(0.001)  # a real chunk takes a while too (and lets the writer's thread run)
        return real.fn(xs, p, ctx)

    monkeypatch.setitem(methods_mod.METHODS, "weighted_sum", dataclasses.replace(real, fn=counting))

    def progress(advance=0, *, total=None, description=None):
        if advance:
            with lock:
                calls["at_stop"] = calls["n"]
            raise KeyboardInterrupt

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        merge("weighted_sum", pair, out_dir / "m.safetensors", threads=2, progress=progress)
    after = calls["n"] - calls["at_stop"]
    assert after <= 8, f"{after} chunk computations after the interrupt"
    assert calls["n"] < 256 * len(KEYS)
    assert list(out_dir.iterdir()) == [], "a temp or partial output was left"


def test_torch_is_imported_by_the_caller_not_a_worker(pair, tmp_path):
    """A worker importing torch (seconds) is waited for at exit: the first import happens in the caller."""
    code = f"""
import sys, threading
seen = []
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Finder())
from ckptlab.merging import merge
assert "torch" not in sys.modules
merge("weighted_sum", [{str(pair[0])!r}, {str(pair[1])!r}], {str(tmp_path / "o.safetensors")!r}, threads=2)
print(seen)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['MainThread']", r.stdout
