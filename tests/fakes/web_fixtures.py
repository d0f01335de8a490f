"""Fixtures of the web app's tests: the sample library scanned into a catalog (built once per test session and
copied per test that writes), and FastAPI test clients that speak as the app's own pages do (Host of the bound
address, same-origin Origin, the CSRF header). A pytest plugin that tests/conftest.py names in ``pytest_plugins``:
a second ``conftest.py`` under tests/web would shadow the root one for the suite's ``from conftest import SRC``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fakes.web import make_client


@pytest.fixture(scope="session")
def sample_library(tmp_path_factory) -> Path:
    """The demo's sample library (A1111 + ComfyUI layouts, real key names), scanned with hashes and fingerprints
    into ``<lib>/catalog.db``. Shared: tests that change files or the catalog use ``library_copy``."""
    import ckptlab
    from ckptlab.sample.build import build_library

    lib = tmp_path_factory.mktemp("web-sample") / "lib"
    reuse: dict = {}
    for layout in ("a1111", "comfyui"):
        build_library(lib / layout, layout, small=True, reuse=reuse)
    ckptlab.scan(lib, db=lib / "catalog.db", hash=True, fingerprint=True)
    return lib


@pytest.fixture
def library_copy(sample_library, tmp_path) -> Path:
    """A private copy of the sample library and its catalog, re-scanned so the catalog points at the copy."""
    import ckptlab

    lib = tmp_path / "lib"
    shutil.copytree(sample_library, lib, symlinks=True)
    (lib / "catalog.db").unlink()
    for extra in lib.glob("catalog.db-*"):
        extra.unlink()
    ckptlab.scan(lib, db=lib / "catalog.db", hash=True, fingerprint=True)
    return lib


@pytest.fixture
def catalog_copy(sample_library, tmp_path) -> Path:
    """A copy of the sample catalog file alone (its rows point at the shared library: for tests that change
    catalog rows, never files)."""
    from ckptlab.library.catalog import Catalog

    db = tmp_path / "catalog.db"
    with Catalog(sample_library / "catalog.db") as cat:
        cat.conn.execute(f"VACUUM INTO '{db}'")
    return db


@pytest.fixture
def client(sample_library):
    """A same-origin client of the app serving the shared sample catalog (read-only use)."""
    with make_client(sample_library / "catalog.db") as c:
        yield c


@pytest.fixture
def rw_client(library_copy):
    """A same-origin client of the app serving a private copy (tests that run jobs or change files)."""
    with make_client(library_copy / "catalog.db") as c:
        yield c


#: the small library the jobs tests run on: the sample's SD1 pickle checkpoint and a LyCORIS LoRA (A1111 layout)
JOBS_CKPT = "a1111/models/Stable-diffusion/v1-5-pruned.ckpt"
JOBS_LORA = "a1111/models/Lora/sd15_locon.safetensors"


@pytest.fixture
def jobs_library(sample_library, tmp_path) -> Path:
    """``JOBS_CKPT`` and ``JOBS_LORA`` copied into a private A1111 tree, catalogued without hashes (quicker than
    ``library_copy``'s full copy, and all a job test needs)."""
    import ckptlab

    lib = tmp_path / "lib"
    for rel in (JOBS_CKPT, JOBS_LORA):
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sample_library / rel, lib / rel)
    ckptlab.scan(lib / "a1111", db=lib / "catalog.db")
    return lib


@pytest.fixture
def no_stray_workers():
    """Every job worker a test started has ended when the test ends (killed if still running)."""
    import os
    import signal

    from ckptlab.web import jobs

    yield
    for pid, proc in list(jobs._children.items()):
        if proc.poll() is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(timeout=10)
    jobs._children.clear()
