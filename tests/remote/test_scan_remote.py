"""``scan s3://bucket/prefix`` against moto: the rows equal a local scan's of the same files (the oracle), the
incremental rule, missing objects, sidecars, throttling."""

from __future__ import annotations

import pytest
from fakes.remote_library import build_library, rows

from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    return build_library(root / "lib", root / "canary")


def _local(library, db, **kw):
    with Catalog(db) as cat:
        s = scan([library], cat, workers=1, **kw)
    return s, rows(db, strip=str(library))


def test_remote_rows_equal_the_local_scan(s3, library, tmp_path):
    s3.put_tree("lib", library)
    s_local, local = _local(library, tmp_path / "local.db", hash=True, fingerprint=True)
    with Catalog(tmp_path / "remote.db") as cat:
        s = scan([s3.url("lib")], cat, hash=True, fingerprint=True)
    remote = rows(tmp_path / "remote.db", strip=s3.url("lib"))
    assert sorted(remote) == sorted(local)
    for k in local:
        assert remote[k] == local[k], k
    assert s.files == s_local.files and s.new == len(local)
