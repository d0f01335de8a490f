"""Existing tests, run unchanged against a PostgreSQL catalog: the hub's link records (``civitai link`` through
the fake CivitAI, the catalog named by ``$CKPTLAB_DB``) and ``ckptlab images`` (its links shown by ``show`` and
``ls``, ``--db`` a URL). The test bodies and their oracles are the originals, loaded from their files; only the
catalog they are given differs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("test_pg_existing")  # one module per worker: its module fixtures built once
TESTS = Path(__file__).resolve().parents[1]


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, TESTS / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HUB = _load("hub/test_civitai_link.py", "_pg_hub_link_cases")
IMAGES = _load("imaging/test_images_cli.py", "_pg_images_cli_cases")

world = HUB.world  # the fake CivitAI and its library (the original fixture)
lib = IMAGES.lib


@pytest.fixture
def on_postgres(pg_url, monkeypatch):
    """The default catalog (``$CKPTLAB_DB``, which every CLI subprocess inherits) is a fresh PostgreSQL database."""
    monkeypatch.setenv("CKPTLAB_DB", pg_url)
    return pg_url


@pytest.mark.parametrize("name", [
    "test_link_sha256_autov3_inherited_and_miss",
    "test_never_regress_on_outage_404_and_revisions_on_change",
    "test_link_without_paths_covers_the_catalog",
    "test_copy_added_later_inherits_from_a_file_linked_in_an_earlier_run",
    "test_bf16_copy_inherits_the_link_of_its_fp32_source",
])
def test_hub_links_on_postgres(name, on_postgres, world, cli):
    getattr(HUB, name)(world, cli)
    from ckptlab.library.catalog import Catalog

    with Catalog(on_postgres) as cat:  # the records went to PostgreSQL, not to a file
        assert cat.postgres and cat.conn.execute("SELECT count(*) FROM civitai_links").fetchone()[0] > 0


@pytest.fixture
def setup(lib, pg_url, tmp_path):
    """The original ``setup`` with the catalog in PostgreSQL: the library scanned there, the same images."""
    from ckptlab.library.catalog import Catalog
    from ckptlab.library.scanner import scan

    root, _db = lib
    with Catalog(pg_url) as cat:
        scan([root], cat, hash=True)
    imgs = tmp_path / "imgs"
    h10 = IMAGES.sha(root / "v15.safetensors")[:10]
    IMAGES.save_png(imgs / "a.png", parameters=IMAGES.text_for(h10))
    IMAGES.save_png(imgs / "sub" / "b.png", parameters=IMAGES.text_for(h10))
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v15.safetensors"}}}
    IMAGES.save_png(imgs / "sub" / "c.PNG", prompt=json.dumps(graph))
    (imgs / "notes.txt").write_text("not an image")
    IMAGES.save_png(imgs / ".hidden" / "h.png", parameters=IMAGES.text_for(h10))
    os.symlink(imgs, imgs / "sub" / "loop")
    yield root, pg_url, imgs
    shutil.rmtree(imgs, ignore_errors=True)


@pytest.mark.parametrize("name", ["test_folder_report", "test_json_lines", "test_missing",
                                  "test_bad_files_are_one_line_each_and_the_rest_goes_on",
                                  "test_links_recorded_and_shown"])
def test_images_on_postgres(name, setup, cli):
    getattr(IMAGES, name)(cli, setup)
