"""Objects in object storage are never acted on by local-file code: ``plan-space`` gives them no step (as a
duplicate, as a kept copy, as a transform) and says so once; ``apply-plan`` refuses a step naming a URL; a local
file is never removed or linked in favour of an object. Deduplicating objects is reported by ``dupes``."""

from __future__ import annotations

import json
import shutil

import pytest
from fakes.library_files import pruned, tensors, write_ckpt, write_st

from ckptlab.library.apply_plan import apply_plan
from ckptlab.library.catalog import Catalog
from ckptlab.library.dupes import REMOTE_NOTE, find_dupes, plan_space
from ckptlab.library.plan import PLAN_FORMAT, PLAN_VERSION
from ckptlab.library.scanner import scan
from ckptlab.remote import REMOTE_DEV, RemoteEntry, is_remote, remote_stat_key


def _upload(cat: Catalog, like: str, url: str, fmt: str | None = None) -> int:
    """A row for an object holding the same content as the catalogued local file ``like`` (what a remote scan
    of an upload of it writes): ``dev = REMOTE_DEV``, the URL as its path, the same hashes and fingerprints."""
    rec = cat.get_by_path(like)
    dev, ino, size, mtime_ns = remote_stat_key(RemoteEntry(url, rec.size, etag="e" + str(abs(hash(url)))[:8],
                                                           last_modified=1.7e9))
    with cat.transaction():
        cur = cat.conn.execute(
            "INSERT INTO files(path, display, name, root, dev, ino, size, mtime_ns, is_link, format, kind, family, "
            "n_tensors, tensor_bytes, ema_bytes, fp32_bytes, dtypes, safety, status, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, 'safe', 'present', 1, 1)",
            (url.encode(), url, url.rsplit("/", 1)[-1], "s3://bucket", dev, ino, size, mtime_ns, fmt or rec.format,
             rec.kind, rec.family, rec.n_tensors, rec.tensor_bytes, rec.ema_bytes, rec.fp32_bytes,
             json.dumps(rec.dtypes)))
        cat.conn.execute(
            "INSERT INTO content(dev, ino, size, mtime_ns, sha256, autov2, fingerprint, components, fingerprint_bf16, "
            "components_bf16) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (dev, ino, size, mtime_ns, rec.sha256, rec.hashes.autov2, rec.fingerprint, json.dumps(rec.components),
             rec.fingerprint_bf16, json.dumps(rec.components_bf16)))
    return cur.lastrowid


@pytest.fixture
def mixed(tmp_path):
    """Local files, and objects in a bucket holding the same models: an upload of a UI model (the local copy
    is kept), and a safetensors upload of a local pickle in Downloads (the object ranks first)."""
    ui = tmp_path / "webui" / "models" / "Stable-diffusion"
    dl = tmp_path / "Downloads"
    ui.mkdir(parents=True)
    dl.mkdir()
    a = write_st(ui / "a.safetensors", pruned(tensors("sd1_checkpoint", seed=21)))
    b = write_ckpt(dl / "b.ckpt", pruned(tensors("sd1_checkpoint", seed=22)))
    c = write_st(dl / "c.safetensors", pruned(tensors("sd1_checkpoint", seed=23)))
    shutil.copy2(c, dl / "c-copy.safetensors")  # a purely local group: still planned
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([tmp_path / "webui", dl], cat, hash=True, fingerprint=True, workers=1)
        assert cat.get_by_path(b).safety == "safe"
        ra = _upload(cat, str(a), "s3://bucket/uploads/models/a.safetensors")
        rb = _upload(cat, str(b), "s3://bucket/uploads/b.safetensors", fmt="safetensors")
    return {"db": db, "a": str(a), "b": str(b), "c": str(c), "ra": ra, "rb": rb, "root": tmp_path}


def test_objects_are_reported_never_planned(mixed):
    with Catalog(mixed["db"]) as cat:
        groups = find_dupes(cat).groups
        plan = plan_space(cat)
    by_keep = {g.keep: g for g in groups}
    ga = by_keep[mixed["a"]]  # the local UI copy is kept; the object is reported with what it would save
    obj = next(c for c in ga.copies if c.id == mixed["ra"])
    assert (obj.action, obj.note, obj.bytes_freed, obj.in_ui) == ("leave", REMOTE_NOTE, obj.size, False)
    gb = by_keep["s3://bucket/uploads/b.safetensors"]  # the object ranks first (safetensors over a pickle)
    local_b = next(c for c in gb.copies if c.path == mixed["b"])
    assert local_b.action == "leave" and "object storage" in local_b.note and local_b.bytes_freed == 0
    named = {v for s in plan.steps for v in (s.path, s.keep, s.link_path, s.output) if v}
    assert not any(is_remote(v) for v in named)
    assert mixed["b"] not in {s.path for s in plan.steps if s.action != "transform"}
    assert any(s.action == "delete_duplicate" for s in plan.steps)  # the local group is still planned
    notes = [n for n in plan.notes if "objects in object storage left out" in n]
    assert notes == ["2 objects in object storage left out: a disk plan acts on local files only (1 of them are "
                     "duplicate copies; ckptlab dupes and ckptlab report show what deduplicating them would save)"]
    assert any(n.startswith(mixed["b"] + ": left as it is") for n in plan.notes)


def test_apply_plan_refuses_a_step_naming_an_object(mixed, tmp_path):
    keep = mixed["c"]
    size = (mixed["root"] / "Downloads" / "c-copy.safetensors").stat().st_size
    steps = [{"action": "delete_duplicate", "path": "s3://bucket/uploads/b.safetensors", "size": size,
              "bytes_freed": size, "sha256": "AA", "keep": keep, "keep_size": size, "keep_sha256": "AA",
              "match": "sha256"},
             {"action": "delete_duplicate", "path": str(mixed["root"] / "Downloads" / "c-copy.safetensors"),
              "size": size, "bytes_freed": size, "sha256": "AA", "keep": "gs://bucket/c.safetensors",
              "keep_size": size, "keep_sha256": "AA", "match": "sha256"}]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, "catalog": str(mixed["db"]),
                                "steps": steps}))
    before = sorted(p.name for p in (mixed["root"] / "Downloads").iterdir())
    results = apply_plan(plan)
    assert [r.status for r in results] == ["failed", "failed"]
    assert "s3://bucket/uploads/b.safetensors is an object in object storage" in results[0].message
    assert "gs://bucket/c.safetensors is an object in object storage" in results[1].message
    assert sorted(p.name for p in (mixed["root"] / "Downloads").iterdir()) == before


def test_cli_plan_space_and_apply_plan(mixed, tmp_path, cli):
    out = tmp_path / "p.json"
    r = cli("plan-space", "-o", str(out), "--db", str(mixed["db"]))
    assert r.returncode == 0 and "objects in object storage left out" in r.stdout
    saved = json.loads(out.read_text())
    assert not any(is_remote(s.get(k)) for s in saved["steps"] for k in ("path", "keep", "link_path", "output"))
    saved["steps"][0]["path"] = "https://example.invalid/x.safetensors"
    out.write_text(json.dumps(saved))
    r = cli("apply-plan", str(out), "--dry-run", "--db", str(mixed["db"]))
    assert r.returncode == 1 and "object storage" in r.stderr and "Traceback" not in r.stderr
    with Catalog(mixed["db"]) as cat:
        assert cat.conn.execute("SELECT count(*) FROM files WHERE dev = ?", (REMOTE_DEV,)).fetchone()[0] == 2
