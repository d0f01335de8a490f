"""A remote scan reads objects in place (ranged GETs); it stages (downloads the whole object to the worker's disk)
only where that is by design: a diffusers folder scanned with ``--fingerprint``, and ``CKPTLAB_REMOTE_STAGE=1``.
A reader that fails on an object — a bug included — gives that object's error row, re-read by the next scan, never
a silent full download that would hide the bug.

Oracles: the units each read was given (a spy on ``remote_scan._staged``: the read's own record of staging), the
local scan of the same files (rows), plain sqlite3 over the catalog."""

from __future__ import annotations

import sqlite3

import pytest
from fakes.remote_library import build_library, rows

from ckptlab.library import fingerprint as fpmod
from ckptlab.library import remote_scan
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan
from ckptlab.remote import is_remote

pytestmark = pytest.mark.xdist_group("remote-io")


@pytest.fixture
def staged(monkeypatch):
    """``[(url, direct, is a folder, need_fp)]`` of every unit read by this process's scan (the local thread pool
    runs ``read_task`` in this process, so the spy sees every read)."""
    calls = []
    real = remote_scan._staged

    def spy(u, tmp, direct):
        calls.append((u.url, direct, u.members is not None, u.need_fp))
        return real(u, tmp, direct)

    monkeypatch.setattr(remote_scan, "_staged", spy)
    return calls


def _downloaded(calls):
    return sorted((url, folder, need_fp) for url, direct, folder, need_fp in calls if not direct)


def test_scan_of_the_test_library_stages_only_the_diffusers_fingerprint(s3, staged, tmp_path):
    """Every format of the test library (safetensors, torch zip, legacy pickle, hostile pickles, garbage) is read
    in place with --hash --fingerprint; the one staged unit is the diffusers folder, whose fingerprint needs its
    files on disk. The rows are the local scan's."""
    lib = build_library(tmp_path / "lib", tmp_path / "canary")
    s3.put_tree("lib", lib)
    with Catalog(tmp_path / "local.db") as cat:
        scan([lib], cat, workers=1, hash=True, fingerprint=True)
    with Catalog(tmp_path / "remote.db") as cat:
        s = scan([s3.url("lib")], cat, hash=True, fingerprint=True, workers=2)
    assert s.files > 20 and staged
    assert _downloaded(staged) == [(s3.url("lib/models/diffusers/tiny-sd15"), True, True)]
    assert rows(tmp_path / "remote.db", strip=s3.url("lib")) == rows(tmp_path / "local.db", strip=str(lib))
    assert not list((tmp_path / "canary").glob("*")), "a payload ran"


def test_header_scan_stages_nothing(s3, staged, tmp_path):
    lib = build_library(tmp_path / "lib", tmp_path / "canary", hostile=False)
    s3.put_tree("lib", lib)
    with Catalog(tmp_path / "remote.db") as cat:
        scan([s3.url("lib")], cat, workers=2)
    assert len(staged) >= 9 and _downloaded(staged) == []


def test_forced_staging_stages_every_unit_and_gives_the_same_rows(s3, staged, tmp_path, monkeypatch):
    """CKPTLAB_REMOTE_STAGE=1 (the by-design fallback for a reader that cannot take URLs): every unit is staged, and
    the rows are still the local scan's."""
    lib = build_library(tmp_path / "lib", tmp_path / "canary", hostile=False)
    s3.put_tree("lib", lib)
    with Catalog(tmp_path / "local.db") as cat:
        scan([lib], cat, workers=1, hash=True)
    monkeypatch.setenv("CKPTLAB_REMOTE_STAGE", "1")
    with Catalog(tmp_path / "remote.db") as cat:
        scan([s3.url("lib")], cat, workers=2, hash=True)
    assert staged and all(not direct for _, direct, _, _ in staged)
    assert rows(tmp_path / "remote.db", strip=s3.url("lib")) == rows(tmp_path / "local.db", strip=str(lib))


def test_a_reader_bug_is_the_objects_error_row_not_a_download(s3, staged, tmp_path, monkeypatch):
    """A reader that raises an unexpected exception on URLs (what the legacy-pickle ``array`` bug did): the objects
    it touches get an error row naming the exception, counted in the summary, and nothing is staged; once the
    reader works, the next scan reads those objects again and the errors are gone."""
    lib = build_library(tmp_path / "lib", tmp_path / "canary", hostile=False)
    s3.put_tree("lib", lib)
    real = fpmod.fingerprint_file

    def buggy(path, progress=None):
        if is_remote(str(path)):
            raise AttributeError("'bytes' object has no attribute 'readonly'")
        return real(path, progress)

    monkeypatch.setattr(fpmod, "fingerprint_file", buggy)
    db = tmp_path / "remote.db"
    with Catalog(db) as cat:
        s = scan([s3.url("lib")], cat, workers=2, fingerprint=True)
    con = sqlite3.connect(db)
    errors = dict(con.execute("SELECT display, error FROM files WHERE error IS NOT NULL"))
    bugged = {u: e for u, e in errors.items() if "AttributeError" in e}
    # pickles (and a safetensors object the check did not call safe) are fingerprinted with ranged reads
    # (fingerprint_file); safe safetensors objects stream (stream_content, which calls it for nothing else)
    assert {u.rsplit("/", 1)[-1] for u in bugged} == {"old.ckpt", "legacy.pt", "broken.safetensors"}, errors
    assert all(e.startswith("cannot hash: AttributeError") and "\n" not in e for e in bugged.values())
    assert {e["path"] for e in s.error_list} >= set(bugged) and s.errors >= len(bugged)  # in the summary
    assert _downloaded(staged) == [(s3.url("lib/models/diffusers/tiny-sd15"), True, True)]
    con.close()

    monkeypatch.setattr(fpmod, "fingerprint_file", real)
    staged.clear()
    with Catalog(db) as cat:
        scan([s3.url("lib")], cat, workers=2, fingerprint=True)
    assert {u for u, *_ in staged} >= set(bugged)  # read again
    with Catalog(tmp_path / "local.db") as cat:  # the oracle: a local scan of the same files
        scan([lib], cat, workers=1, fingerprint=True)
    assert rows(db, strip=s3.url("lib")) == rows(tmp_path / "local.db", strip=str(lib))
    con = sqlite3.connect(db)
    assert not [e for (e,) in con.execute("SELECT error FROM files WHERE error IS NOT NULL") if "AttributeError" in e]
    for url in bugged:  # the fingerprint now stored is the local file's (plain sqlite3: content by stat key)
        row = con.execute("SELECT c.fingerprint FROM files f LEFT JOIN content c ON c.dev = f.dev AND c.ino = f.ino "
                          "AND c.size = f.size AND c.mtime_ns = f.mtime_ns WHERE f.display = ?", (url,)).fetchone()
        if not url.endswith("broken.safetensors"):
            assert row[0] == real(lib / url[len(s3.url("lib")) + 1:]).fingerprint, url
    con.close()
