"""scan: both layouts, extra_model_paths.yaml, incremental rescans, moves, missing files,
robustness (denied access, symlink loops, broken links, truncated/garbage, non-UTF-8 names, files
changing during the scan, Ctrl-C)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys

import pytest
from fakes.library_files import (
    SPARSE,
    a1111_library,
    sparse_library,
    stat_key,
    tensors,
    touch_garbage,
    write_st,
)

from ckptlab.library import scanner
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan

# -- an audit hook: counts real opens of model files, and can deny access to chosen paths -------
_AUDIT: dict = {"opens": None, "deny": set()}
_MODEL_EXT = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _hook(event, args):
    if event not in ("open", "os.scandir") or not args:
        return
    p = args[0]
    if not isinstance(p, (str, bytes, os.PathLike)):
        return
    p = os.fsdecode(p)
    if p in _AUDIT["deny"]:
        raise PermissionError(13, "Permission denied", p)
    if event == "open" and _AUDIT["opens"] is not None and p.endswith(_MODEL_EXT):
        _AUDIT["opens"].append(p)


sys.addaudithook(_hook)


@pytest.fixture
def audit():
    _AUDIT["opens"] = []
    _AUDIT["deny"] = set()
    yield _AUDIT
    _AUDIT["opens"] = None
    _AUDIT["deny"] = set()


@pytest.fixture
def cat(tmp_path):
    with Catalog(tmp_path / "catalog.db") as c:
        yield c


@pytest.mark.parametrize("layout", ["a1111", "comfyui"])
def test_layouts_record_kind_family_and_folder(tmp_path, cat, layout):
    files = sparse_library(tmp_path / layout, layout)
    s = scan([tmp_path / layout], cat)
    assert (s.files, s.new, s.errors) == (len(files), len(files), 0)
    got = {r.name: r for r in cat.files()}
    expect = {"sd1_checkpoint": ("checkpoint", "sd1"), "sdxl_checkpoint": ("checkpoint", "sdxl"),
              "sd1_vae": ("vae", "sd1"), "sd1_kohya_lora": ("lora", "sd1"), "sd1_embedding": ("embedding", "sd1"),
              "sd1_controlnet": ("controlnet", "sd1"), "clip_l": ("text_encoder", None),
              "flux_schnell": ("unet", "flux")}
    for spec in files:
        r = got[f"{spec}.safetensors"]
        assert (r.kind, r.family) == expect[spec], spec
        assert r.size == files[spec].stat().st_size and r.format == "safetensors"
        assert r.folder == SPARSE[spec][0 if layout == "a1111" else 1].split("/")[1 if "/" in SPARSE[spec][0 if layout == "a1111" else 1] else 0]
        assert r.n_tensors and r.tensor_bytes
    assert got["sdxl_checkpoint.safetensors"].info["family"] == "sdxl"


def test_extra_model_paths_yaml(tmp_path, cat):
    a1111 = tmp_path / "webui"
    sparse_library(a1111, "a1111")
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "extra_model_paths.yaml").write_text(
        "a111:\n    base_path: ../webui\n    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n        models/Lora\n        models/LyCORIS\n    vae: models/VAE\n    embeddings: embeddings\n"
        "    controlnet: models/ControlNet\n")
    s = scan([], cat, extra_model_paths=comfy / "extra_model_paths.yaml")
    names = {r.name: r.folder for r in cat.files()}
    assert names == {"sd1_checkpoint.safetensors": "checkpoints", "sdxl_checkpoint.safetensors": "checkpoints",
                     "sd1_vae.safetensors": "vae", "sd1_kohya_lora.safetensors": "loras",
                     "sd1_embedding.safetensors": "embeddings", "sd1_controlnet.safetensors": "controlnet"}
    # models/LyCORIS does not exist: reported, not fatal
    assert any("LyCORIS" in e["path"] for e in s.error_list)


def test_rescan_reads_nothing_unchanged(tmp_path, cat, audit):
    lib = a1111_library(tmp_path / "lib")
    s1 = scan([tmp_path / "lib"], cat, hash=True, fingerprint=True)
    assert s1.new == len(lib) and s1.hashed == len(lib)
    assert len(audit["opens"]) >= len(lib)
    audit["opens"].clear()
    s2 = scan([tmp_path / "lib"], cat, hash=True, fingerprint=True)
    assert (s2.new, s2.changed, s2.unchanged, s2.hashed, s2.fingerprinted) == (0, 0, len(lib), 0, 0)
    assert audit["opens"] == []  # not one model file was opened


def test_changed_file_is_reread_and_rehashed(tmp_path, cat):
    lib = a1111_library(tmp_path / "lib")
    scan([tmp_path / "lib"], cat, hash=True)
    old = cat.get_by_path(lib["vae"])
    write_st(lib["vae"], tensors("sd1_vae", seed=99))
    os.utime(lib["vae"], ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    s = scan([tmp_path / "lib"], cat, hash=True)
    assert (s.changed, s.hashed) == (1, 1)
    new = cat.get_by_path(lib["vae"])
    assert new.id == old.id and new.sha256 != old.sha256


def test_move_keeps_row_and_hashes_without_reading(tmp_path, cat, audit):
    lib = a1111_library(tmp_path / "lib")
    scan([tmp_path / "lib"], cat, hash=True, fingerprint=True)
    before = cat.get_by_path(lib["lora"])
    dst = tmp_path / "lib" / "models" / "Lora" / "renamed.safetensors"
    os.rename(lib["lora"], dst)
    audit["opens"].clear()
    s = scan([tmp_path / "lib"], cat, hash=True, fingerprint=True)
    assert (s.moved, s.new, s.missing, s.hashed) == (1, 0, 0, 0)
    assert audit["opens"] == []
    after = cat.get_by_path(dst)
    assert after.id == before.id and after.hashes == before.hashes and after.fingerprint == before.fingerprint
    assert after.kind == before.kind and after.first_seen == before.first_seen
    assert cat.get_by_path(lib["lora"]) is None


def test_deleted_file_is_marked_missing_not_forgotten(tmp_path, cat, cli):
    lib = a1111_library(tmp_path / "lib")
    scan([tmp_path / "lib"], cat, hash=True)
    sha = cat.get_by_path(lib["embedding"]).sha256
    lib["embedding"].unlink()
    s = scan([tmp_path / "lib"], cat)
    assert s.missing == 1
    rec = cat.get_by_path(lib["embedding"])
    assert rec.status == "missing" and rec.sha256 == sha
    assert lib["embedding"].name not in {r.name for r in cat.files()}
    r = cli("ls", "--missing", "--json", "--db", str(cat.path))
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == [lib["embedding"].name]
    # scanning another root does not mark files of this root missing
    (tmp_path / "other").mkdir()
    assert scan([tmp_path / "other"], cat).missing == 0


def test_robustness_each_problem_is_an_error_on_its_file(tmp_path, cat, audit):
    root = tmp_path / "lib"
    lib = a1111_library(root)
    sd = root / "models" / "Stable-diffusion"
    # truncated safetensors: header claims more than the file holds
    data = lib["checkpoint"].read_bytes()
    (sd / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    touch_garbage(sd / "garbage.ckpt")
    touch_garbage(sd / "empty.safetensors", b"")
    # non-UTF-8 file name (a valid model)
    bad_name = os.fsdecode(b"caf\xe9-model.safetensors")
    write_st(sd / bad_name, tensors("sd1_vae", seed=11))
    # symlink loop and a broken link
    os.symlink(root / "models", root / "models" / "loop")
    os.symlink(root / "nowhere.safetensors", sd / "broken.safetensors")
    # a folder and a file that cannot be read
    locked = root / "models" / "Lora" / "locked"
    locked.mkdir()
    write_st(locked / "x.safetensors", tensors("sd1_vae", seed=12))
    denied = write_st(sd / "denied.safetensors", tensors("sd1_vae", seed=13))
    audit["deny"] |= {str(locked), str(denied)}

    s = scan([root], cat, hash=True)
    assert s.status == "complete"
    recs = {r.name: r for r in cat.files()}
    assert "truncated" in recs["truncated.safetensors"].error or "past the end" in recs["truncated.safetensors"].error
    assert recs["garbage.ckpt"].error and recs["empty.safetensors"].error
    assert recs["broken.safetensors"].error == "broken symlink"
    assert "Permission denied" in recs["denied.safetensors"].error
    good = recs["caf\ufffd-model.safetensors"]
    assert good.error is None and good.kind == "vae" and good.sha256
    assert cat.get_by_path(sd / bad_name).id == good.id
    errs = " ".join(e["path"] + " " + e["error"] for e in s.error_list)
    assert "cannot list folder" in errs and "symlink loop" in errs
    for name in ("sd15.safetensors", "vae-ft-mse.safetensors", "detailer.safetensors", "easyneg.safetensors"):
        assert recs[name].error is None and recs[name].sha256
    # the loop was not followed: every real file appears once
    assert sum(1 for r in cat.files() if r.name == "detailer.safetensors") == 1


def test_file_changing_during_scan(tmp_path, cat, monkeypatch):
    lib = a1111_library(tmp_path / "lib")
    real = scanner.read_file_facts

    def growing(path, hint=None):
        out = real(path, hint)
        if path.endswith("vae-ft-mse.safetensors"):
            with open(path, "ab") as fh:
                fh.write(b"\0" * 16)
        return out

    monkeypatch.setattr(scanner, "read_file_facts", growing)
    s = scan([tmp_path / "lib"], cat, hash=True)
    rec = cat.get_by_path(lib["vae"])
    assert "changed during the scan" in rec.error and rec.sha256 is None
    assert s.status == "complete" and cat.get_by_path(lib["lora"]).error is None
    monkeypatch.setattr(scanner, "read_file_facts", real)
    scan([tmp_path / "lib"], cat)  # the next scan re-reads it (errors are retried)
    assert "does not match the header" in cat.get_by_path(lib["vae"]).error  # now malformed (trailing bytes)


def test_ctrl_c_leaves_a_consistent_catalog(tmp_path, cat, monkeypatch):
    root = tmp_path / "lib"
    for i in range(7):
        write_st(root / "models" / "Lora" / f"l{i}.safetensors", tensors("sd1_embedding", seed=i))
    monkeypatch.setattr(scanner, "BATCH", 3)
    real, calls = scanner.read_file_facts, []

    def interrupt(path, hint=None):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, hint)

    monkeypatch.setattr(scanner, "read_file_facts", interrupt)
    with pytest.raises(KeyboardInterrupt):
        scan([root], cat)
    raw = sqlite3.connect(cat.path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert raw.execute("SELECT count(*) FROM files").fetchone()[0] == 3  # the first whole batch
    assert raw.execute("SELECT status FROM scans").fetchall() == [("interrupted",)]
    monkeypatch.setattr(scanner, "read_file_facts", real)
    s = scan([root], cat)
    assert (s.new, s.unchanged, s.status) == (4, 3, "complete")


def test_hardlink_and_symlink_are_one_physical_file(tmp_path, cat):
    lib = a1111_library(tmp_path / "lib")
    os.link(lib["vae"], tmp_path / "lib" / "models" / "VAE" / "hard.safetensors")
    os.symlink(lib["vae"], tmp_path / "lib" / "models" / "VAE" / "soft.safetensors")
    scan([tmp_path / "lib"], cat, hash=True)
    recs = {r.name: r for r in cat.files()}
    assert recs["soft.safetensors"].is_link and recs["soft.safetensors"].stat_key == stat_key(lib["vae"])
    from ckptlab.library.dupes import find_dupes

    assert find_dupes(cat).groups == []


def test_cli_scan_json_and_ls_filters(tmp_path, cli):
    sparse_library(tmp_path / "c", "comfyui")
    db = tmp_path / "c.db"
    r = cli("scan", str(tmp_path / "c"), "--json", "--db", str(db))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["files"] == 8 and summary["new"] == 8 and summary["status"] == "complete"
    r = cli("ls", "--kind", "checkpoint", "--sort", "size", "--json", "--db", str(db))
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["name"] for x in rows] == ["sdxl_checkpoint.safetensors", "sd1_checkpoint.safetensors"]
    r = cli("ls", "--family", "flux", "--json", "--db", str(db))
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["flux_schnell.safetensors"]
    r = cli("ls", "--search", "kohya", "--json", "--db", str(db))
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["sd1_kohya_lora.safetensors"]
    r = cli("ls", "--db", str(db))
    assert r.returncode == 0 and "flux_schnell.safetensors" in r.stdout
    # a root that is not there: one error line and exit 1, the other roots still scanned
    write_st(tmp_path / "other" / "x.safetensors", tensors("sd1_embedding", seed=9))
    r = cli("scan", str(tmp_path / "nope"), str(tmp_path / "other"), "--db", str(db))
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"ckptlab: error: {tmp_path / 'nope'}: cannot access this folder (not scanned)"]
    assert "cannot access" in r.stdout  # and in the summary's error list
    with Catalog(db) as c:
        assert c.get_by_path(tmp_path / "other" / "x.safetensors") is not None


def test_worker_processes_record_the_same_rows(tmp_path, monkeypatch):
    sparse_library(tmp_path / "lib", "comfyui")
    touch_garbage(tmp_path / "lib" / "models" / "loras" / "junk.safetensors")
    (tmp_path / "lib" / "models" / "loras" / "sd1_kohya_lora.civitai.info").write_text(
        '{"id": 5, "modelId": 4, "files": []}')
    rows = []
    for workers in (1, 2):
        monkeypatch.setattr(scanner, "PARALLEL_MIN", 1)
        with Catalog(tmp_path / f"c{workers}.db") as c:
            scan([tmp_path / "lib"], c, workers=workers)
            rows.append([(r.path, r.kind, r.family, r.n_tensors, r.tensor_bytes, r.error,
                          r.sidecars and r.sidecars.get("civitai")) for r in c.files(sort="path")])
    assert rows[0] == rows[1] and len(rows[0]) == 9
    assert [r[0].rsplit("/", 1)[1] for r in rows[0] if r[5]] == ["junk.safetensors"]
    assert [r[6] for r in rows[1] if r[6]] == [{"model_id": 4, "version_id": 5, "from": "sd1_kohya_lora.civitai.info"}]


def test_file_changing_while_hashed_is_an_error_on_its_row(tmp_path, cat, monkeypatch):
    lib = a1111_library(tmp_path / "lib")
    from ckptlab import hashes

    real = hashes.hash_file

    def grow_then_hash(path, progress=None):
        if str(path).endswith("detailer.safetensors"):
            with open(path, "ab") as fh:
                fh.write(b"\0" * 8)
        return real(path, progress)

    monkeypatch.setattr(hashes, "hash_file", grow_then_hash)
    s = scan([tmp_path / "lib"], cat, hash=True)
    rec = cat.get_by_path(lib["lora"])
    assert "changed during the scan" in rec.error and rec.sha256 is None
    assert any(e["path"].endswith("detailer.safetensors") for e in s.error_list)
    assert cat.get_by_path(lib["vae"]).sha256 and cat.get_by_path(lib["vae"]).error is None


def test_unlistable_folder_or_root_does_not_mark_files_missing(tmp_path, cat, audit):
    lib = a1111_library(tmp_path / "lib")
    scan([tmp_path / "lib"], cat)
    lora_dir = str(lib["lora"].parent)
    audit["deny"].add(lora_dir)
    s = scan([tmp_path / "lib"], cat)
    assert s.missing == 0 and cat.get_by_path(lib["lora"]).status == "present"
    audit["deny"].clear()
    os.rename(tmp_path / "lib", tmp_path / "unmounted")  # the whole root vanished (drive not mounted)
    s = scan([tmp_path / "lib"], cat)
    assert s.missing == 0 and "cannot access" in s.error_list[0]["error"]


def test_cli_strict_exit_code_and_nothing_to_scan(tmp_path, cli):
    touch_garbage(tmp_path / "lib" / "models" / "Lora" / "junk.safetensors")
    db = str(tmp_path / "c.db")
    r = cli("scan", str(tmp_path / "lib"), "--strict", "--db", db)
    assert r.returncode == 5 and "junk.safetensors" in r.stdout
    r = cli("scan", "--db", db)
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error: nothing to scan")


def test_header_only_scan_does_not_import_torch(tmp_path):
    import subprocess

    sparse_library(tmp_path / "lib", "a1111")
    code = ("import sys; from ckptlab.library.catalog import Catalog; from ckptlab.library.scanner import scan; "
            f"s = scan([{str(tmp_path / 'lib')!r}], Catalog({str(tmp_path / 'c.db')!r}), workers=1); "
            "assert s.new == 6 and s.errors == 0, s; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
