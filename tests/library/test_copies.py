"""library.copies: the component-fingerprint table the triggers keep equals the JSON in ``content`` (plain Python
over the rows is the oracle), through inserts, re-fingerprinting, moves and deletes, and per-component lookups
find the files that share a component."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from fakes.sample_files import make_model

import ckptlab
from ckptlab.library import copies
from ckptlab.library.catalog import Catalog


def _oracle(db: Path) -> set[tuple]:
    con = sqlite3.connect(db)
    out = set()
    for dev, ino, size, mt, comps, bf16 in con.execute(
            "SELECT dev, ino, size, mtime_ns, components, components_bf16 FROM content"):
        for text, rounding in ((comps, "fp16"), (bf16, "bf16")):
            for k, v in (json.loads(text) if text else {}).items():
                out.add((dev, ino, size, mt, k, rounding, v))
    return out


def _table(db: Path) -> set[tuple]:
    con = sqlite3.connect(db)
    rows = con.execute("SELECT dev, ino, size, mtime_ns, component, rounding, fp FROM component_fps").fetchall()
    assert len(rows) == len(set(rows))  # no stale duplicates
    return set(rows)


def test_table_follows_content_through_every_write(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint", dtype="F32")
    make_model(lib / "vae.safetensors", "sd1_vae", dtype="F32")
    db = tmp_path / "c.db"
    ckptlab.scan(lib, db=db, hash=True)  # a catalog made before fingerprints: the migration fills nothing yet
    Catalog(db).close()  # copies is imported: the component is migrated
    assert _table(db) == set() == _oracle(db)
    ckptlab.scan(lib, db=db, fingerprint=True)  # the insert/update triggers
    assert _table(db) == _oracle(db) and len(_oracle(db)) >= 6
    a.write_bytes(a.read_bytes())  # same content, new mtime: a new content row
    ckptlab.scan(lib, db=db, fingerprint=True)
    assert _table(db) == _oracle(db)
    with Catalog(db) as cat, cat.transaction() as conn:  # a REPLACE's implicit delete fires no trigger
        conn.execute("INSERT OR REPLACE INTO content(dev, ino, size, mtime_ns, components) SELECT dev, ino, size, "
                     "mtime_ns, '{\"vae\": \"ff\"}' FROM content WHERE components IS NOT NULL LIMIT 1")
    assert _table(db) == _oracle(db)
    with Catalog(db) as cat, cat.transaction() as conn:
        conn.execute("DELETE FROM content WHERE components LIKE '%\"unet\"%'")
    assert _table(db) == _oracle(db)


def test_migration_fills_from_existing_rows(tmp_path):
    """A catalog fingerprinted before this module existed: the migration copies what is there."""
    import subprocess
    import sys

    lib = tmp_path / "lib"
    lib.mkdir()
    make_model(lib / "a.safetensors", "sd1_checkpoint")
    db = tmp_path / "c.db"
    src = Path(__file__).resolve().parents[2] / "src"
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); import ckptlab; "
                    f"ckptlab.scan({str(lib)!r}, db={str(db)!r}, fingerprint=True)"], check=True)
    assert sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master WHERE name = 'component_fps'"
                                       ).fetchone()[0] == 0
    Catalog(db).close()
    assert _table(db) == _oracle(db) and _oracle(db)


def test_same_component_finds_the_extracted_vae(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    a = make_model(lib / "a.safetensors", "sd1_checkpoint")
    vae = Path(ckptlab.extract(a, "vae", out_dir=lib / "x")[0].output)
    b = make_model(lib / "b.safetensors", "sd1_checkpoint", seed=5)
    db = tmp_path / "c.db"
    ckptlab.scan(lib, db=db, hash=True, fingerprint=True)
    with Catalog(db) as cat:
        ra, rv, rb = cat.get_by_path(a), cat.get_by_path(vae), cat.get_by_path(b)
        got = copies.same_component(cat, ra)
        assert {k: [e["path"] for e in v] for k, v in got.items()} == {"vae": [str(vae)]}
        assert {k: [e["path"] for e in v] for k, v in copies.same_component(cat, rv).items()} == {"vae": [str(a)]}
        assert copies.same_component(cat, rb) == {}
