"""The index follows the catalog: a change made the way the CLI makes it (``ckptlab.scan`` after adding,
removing or renaming a file; ``hub.store.put_link`` with its records; a re-hash; a recorded preview; a new
verdict) is seen by the next ``search``, with no rescan by the web app and no call into it by the CLI."""

from __future__ import annotations

import shutil

import ckptlab
from ckptlab.hashes import Hashes
from ckptlab.hub import store
from ckptlab.library import previews
from ckptlab.library.catalog import Catalog
from ckptlab.web import index
from ckptlab.web.query import Filters, search


def names(cat, **f) -> list[str]:
    return [c.file_name for c in search(cat, Filters(per_page=240, **f)).cards]


def card(cat, file_id: int):
    return next(c for c in search(cat, Filters(per_page=240)).cards if c.id == file_id)


def test_scan_after_adding_removing_and_renaming_files_is_seen(library_copy, cli):
    db = library_copy / "catalog.db"
    lora = library_copy / "a1111" / "models" / "Lora"
    with Catalog(db) as cat:
        before = search(cat, Filters()).total
        assert names(cat, q="brandnew") == []
        old_id = cat.get_by_path(lora / "sd15_locon.safetensors").id
        shutil.copyfile(lora / "sd15_loha.safetensors", lora / "brandnew_loha.safetensors")
        (lora / "sdxl_detail_lora.safetensors").unlink()
        (lora / "sd15_locon.safetensors").rename(lora / "renamed_locon.safetensors")
        ckptlab.scan(library_copy, db=db, hash=True)  # the library API the CLI calls, in this process
        assert names(cat, q="brandnew") == ["brandnew_loha.safetensors"]
        assert names(cat, q="sdxl_detail") == ["sdxl_detail_lora.safetensors"]  # the ComfyUI copy only
        assert names(cat, q="renamed") == ["renamed_locon.safetensors"]
        assert card(cat, old_id).file_name == "renamed_locon.safetensors"  # a move keeps its row
        assert search(cat, Filters()).total == before  # +1 new, -1 gone, the rename is a move
        loha = [c for c in search(cat, Filters(q="loha", per_page=240)).cards]
        assert {c.duplicates for c in loha} == {len(loha) - 1} and len(loha) == 3  # the copy joined the group
        # and a scan by another process (the CLI itself) is seen too
        (lora / "renamed_locon.safetensors").unlink()
        r = cli("scan", str(library_copy), "--db", str(db))
        assert r.returncode == 0, r.stderr
        assert names(cat, q="renamed") == []


def test_links_records_rehash_previews_and_verdicts_are_seen(library_copy):
    db = library_copy / "catalog.db"
    with Catalog(db) as cat:
        rec = cat.get_by_path(library_copy / "a1111" / "models" / "Lora" / "sdxl_detail_lora.safetensors")
        twins = [r.id for r in cat.find_by_sha256(rec.sha256)]
        assert card(cat, rec.id).linked is False and card(cat, rec.id).name == "sdxl_detail_lora"
        store.store_record(cat, "version", 7001, {"id": 7001, "modelId": 700, "name": "v1", "baseModel": "Pony",
                                                  "trainedWords": ["hubword"], "model": {"name": "Hub Detail"}})
        store.put_link(cat, rec.sha256, 7001, 700, matched_by="sha256")
        c = card(cat, rec.id)
        assert (c.linked, c.name, c.version_name, c.base_model, c.update_available) == (True, "Hub Detail", "v1",
                                                                                       "Pony", False)
        assert sorted(x.id for x in search(cat, Filters(q="hubword")).cards) == sorted(twins)
        # the model record arrives later and shows a newer version: an update is available
        store.store_record(cat, "model", 700, {"id": 700, "name": "Hub Detail", "tags": ["HubTag"],
                                               "modelVersions": [{"id": 7002}, {"id": 7001}]})
        assert card(cat, rec.id).update_available and card(cat, rec.id).tags == ("HubTag",)
        assert rec.id in [x.id for x in search(cat, Filters(tag=("hubtag",), updates=True)).cards]
        # a re-hash that gives another file the same bytes: both are now duplicates of each other
        other = cat.get_by_path(library_copy / "a1111" / "embeddings" / "bad-hands.pt")
        assert card(cat, other.id).duplicates == 1  # its ComfyUI copy
        with cat.transaction():
            cat.put_hashes(other.stat_key, Hashes(**{**rec.hashes.__dict__, "size": other.size}))
        assert card(cat, other.id).duplicates == len(twins)
        assert card(cat, rec.id).duplicates == len(twins)
        assert card(cat, other.id).linked  # the link is by content
        # a preview `ckptlab preview` recorded, and a new verdict from `check`
        assert not card(cat, other.id).has_preview
        previews.record_preview(cat, other.path, library_copy / "p.png", seed=1)
        assert card(cat, other.id).has_preview
        with cat.transaction() as conn:
            conn.execute("UPDATE files SET safety = 'malicious' WHERE id = ?", (other.id,))
        assert [x.id for x in search(cat, Filters(safety=("malicious",))).cards] == [other.id]


def test_a_rescan_that_changes_nothing_marks_nothing(library_copy):
    db = library_copy / "catalog.db"
    with Catalog(db) as cat:
        search(cat, Filters())
        assert index.pending(cat) == 0
        gen = index.generation(cat)
        ckptlab.scan(library_copy, db=db, hash=True)
        assert index.pending(cat) == 0  # every row's last_seen changed, nothing the index shows did
        search(cat, Filters())
        assert index.generation(cat) == gen
