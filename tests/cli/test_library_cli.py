"""The library commands as a user runs them (issue 11 §3, §5; issue 12 §4): a read-only catalog,
concurrent scans, terminal escapes, CSV injection, ``report -o``, ``hash`` of folders and globs,
``ls`` aliases / header / CivitAI column / search, ``show``'s human output, the scan progress."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SRC, run_cli
from fakes.library_files import linked_lora_library, sparse_library, tensors, touch_garbage, write_st

from ckptlab.library import ui_folders
from ckptlab.library.catalog import Catalog
from ckptlab.library.scanner import scan
from ckptlab.sample.build import write_model

ESC = "\x1b"


# -- a read-only catalog ------------------------------------------------------------------------------
def _make_read_only(path: Path):
    """Make ``path`` unwritable for this user: chmod 444, and for root (which ignores modes) the
    immutable attribute. Returns the undo function; skips the test where neither works."""
    mode = 0o555 if path.is_dir() else 0o444
    path.chmod(mode)
    if os.geteuid() != 0:
        return lambda: path.chmod(mode | 0o200)
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("root cannot make a read-only file here (no chattr +i)")
    return lambda: (subprocess.run([chattr, "-i", str(path)], capture_output=True), path.chmod(mode | 0o200))


@pytest.fixture
def ro_catalog(tmp_path):
    """A catalog (with one scanned model) that can be read but not written; its folder stays writable,
    so SQLite can make its -wal/-shm files: only the catalog file itself is read-only."""
    lib = tmp_path / "lib"
    model = write_st(lib / "x.safetensors", tensors("sd1_embedding", seed=3))
    db = tmp_path / "c.db"
    with Catalog(db) as cat:
        scan([lib], cat)
    undo = _make_read_only(db)
    try:
        yield tmp_path, db, model
    finally:
        undo()


def test_read_only_catalog_scan_is_one_clear_line(ro_catalog):
    base, db, _model = ro_catalog
    write_st(base / "lib" / "new.safetensors", tensors("sd1_embedding", seed=4))
    r = run_cli("scan", base / "lib", "--db", db)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: error: ") and "read-only" in lines[0], r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    # nothing was written, and the catalog still reads
    assert sqlite3.connect(db).execute("SELECT count(*) FROM files").fetchone()[0] == 1
    r = run_cli("ls", "--json", "--db", db)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "x.safetensors"


def test_read_only_catalog_hash_still_hashes(ro_catalog):
    """The catalog is only a cache for ``hash``: the hashes are printed, one warning says they were not kept."""
    _base, db, model = ro_catalog
    r = run_cli("hash", "--json", model, "--db", db)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest().upper()
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptlab: warning: ") and "read-only" in lines[0], r.stderr


def test_catalog_in_a_read_only_folder(tmp_path):
    """Where even opening fails (SQLite cannot make its -shm file): one line for scan, hashes still printed."""
    ro = tmp_path / "ro"
    model = write_st(tmp_path / "lib" / "x.safetensors", tensors("sd1_embedding", seed=5))
    with Catalog(ro / "c.db") as cat:
        scan([tmp_path / "lib"], cat)
    undo = _make_read_only(ro)
    try:
        r = run_cli("scan", tmp_path / "lib", "--db", ro / "c.db")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"ckptlab: error: {ro / 'c.db'}: cannot write the catalog: "), r.stderr
        r = run_cli("hash", "--json", model, "--db", ro / "c.db")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest().upper()
        assert r.stderr.startswith("ckptlab: warning: ") and r.stderr.endswith("hashes not cached\n"), r.stderr
    finally:
        undo()


# -- concurrent scans ------------------------------------------------------------------------------------------
def _library_of(root: Path, n: int) -> list[Path]:
    return [write_st(root / "models" / "Lora" / f"l{i:03d}.safetensors", tensors("sd1_embedding", seed=i))
            for i in range(n)]


def _popen_scan(lib, db, *extra):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "ckptlab", "scan", str(lib), "--db", str(db), "--json",
                             "--workers", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _check_catalog(db, files):
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    paths = sorted(os.fsdecode(p) for (p,) in raw.execute("SELECT path FROM files"))
    assert paths == sorted(str(f) for f in files)
    assert raw.execute("SELECT count(*) FROM files WHERE status != 'present' OR error IS NOT NULL").fetchone()[0] == 0


def test_three_concurrent_scans_all_succeed(tmp_path):
    files = _library_of(tmp_path / "lib", 60)
    db = tmp_path / "c.db"
    procs = [_popen_scan(tmp_path / "lib", db) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "UNIQUE" not in err and "internal error" not in err, err
        s = json.loads(out)
        assert s["status"] == "complete" and s["files"] == 60 and s["errors"] == 0
    summaries = [json.loads(o) for o, _ in outs]
    assert sum(s["new"] for s in summaries) == 60  # each file catalogued once, by whichever scan came first
    _check_catalog(db, files)


def test_a_scan_waits_for_the_running_one(tmp_path):
    """Deterministic: the test holds the scan lock (as a running scan does); three scans started meanwhile
    each say they wait, and all finish once it is released."""
    files = _library_of(tmp_path / "lib", 5)
    db = tmp_path / "c.db"
    with Catalog(db):
        pass
    fd = os.open(str(db) + ".scan-lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    procs = [_popen_scan(tmp_path / "lib", db) for _ in range(3)]
    try:
        waiting = [p.stderr.readline() for p in procs]  # each blocks until its scan has said it waits
    finally:
        os.close(fd)
    assert all(w.startswith("ckptlab: warning: another scan of this catalog is running") for w in waiting), waiting
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(json.loads(o)["new"] for o, _ in outs) == [0, 0, 5]
    _check_catalog(db, files)


# -- terminal escapes and CSV injection ---------------------------------------------------------------------------
def test_escapes_in_names_and_metadata_are_shown_not_sent(tmp_path, cli):
    lib = tmp_path / "lib"
    name = f"evil{ESC}]0;pwned\x07{ESC}[2J.safetensors"
    write_st(lib / name, tensors("sd1_embedding", seed=1))
    (lib / f"evil{ESC}]0;pwned\x07{ESC}[2J.civitai.info").write_text(json.dumps({
        "id": 7, "modelId": 70, "name": f"v1{ESC}[31m", "baseModel": "SD 1.5", "files": [],
        "model": {"name": f"Red{ESC}[2J", "type": "TextualInversion"}, "trainedWords": [f"word{ESC}[5m"]}))
    touch_garbage(lib / f"bad{ESC}[2J.ckpt")
    rlo = write_st(lib / "photo\u202egpj.safetensors", tensors("sd1_embedding", seed=2))  # a bidi override
    db = tmp_path / "c.db"
    r = cli("scan", str(lib), "--db", str(db))
    assert ESC not in r.stdout and ESC not in r.stderr
    assert "bad\\x1b[2J.ckpt" in r.stdout  # the error line names the file, visibly
    r = cli("ls", "--db", str(db))
    assert r.returncode == 0 and ESC not in r.stdout and "\x07" not in r.stdout
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J.safetensors" in r.stdout
    assert "Red\\x1b[2J / v1\\x1b[31m; SD 1.5; triggers: word\\x1b[5m" in r.stdout
    assert "\u202e" not in r.stdout and "photo\\u202egpj.safetensors" in r.stdout
    assert json.loads(cli("ls", "--json", "--search", "photo", "--db", str(db)).stdout)["path"] == str(rlo)
    for target in (lib / name,):
        out = cli("show", str(target), "--db", str(db)).stdout
        assert ESC not in out and "evil\\x1b]0;pwned" in out
    # JSON stays exact
    rows = {json.loads(x)["name"]: json.loads(x) for x in cli("ls", "--json", "--db", str(db)).stdout.splitlines()}
    assert name in rows and rows[name]["civitai"]["model_name"] == f"Red{ESC}[2J"
    table = cli("report", "--db", str(db)).stdout
    assert ESC not in table, [ln for ln in table.splitlines() if ESC in ln]
    assert "bad\\x1b[2J.ckpt" in table


def test_csv_cells_never_start_a_formula(tmp_path, cli):
    lib = tmp_path / "lib"
    names = ["=HYPERLINK(\"x\",\"a\").safetensors", "+cmd.safetensors", "-2+3.safetensors",
             "@SUM(1).safetensors", "plain.safetensors"]
    for i, n in enumerate(names):
        write_st(lib / n, tensors("sd1_embedding", seed=i))
    touch_garbage(lib / "=err.ckpt")
    db = tmp_path / "c.db"
    cli("scan", str(lib), "--db", str(db))
    text = cli("report", "--format", "csv", "--db", str(db)).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(names) + 1
    for row in rows:  # OWASP: no cell may start with = + - @ TAB CR
        for v in row.values():
            assert not v.startswith(("=", "+", "-", "@", "\t", "\r")), (row, v)
    got = {row["name"] for row in rows}
    assert got == {"'" + n if n[0] in "=+-@" else n for n in [*names, "=err.ckpt"]}
    assert all(row["size"].isdigit() for row in rows)  # numbers stay numbers


# -- report -o -----------------------------------------------------------------------------------------------------
def test_report_output_is_never_overwritten_silently(tmp_path, cli):
    write_st(tmp_path / "lib" / "a.safetensors", tensors("sd1_embedding", seed=1))
    db = tmp_path / "c.db"
    cli("scan", str(tmp_path / "lib"), "--db", str(db))
    out = tmp_path / "r.json"
    out.write_text("precious")
    r = cli("report", "--format", "json", "-o", str(out), "--db", str(db))
    assert r.returncode == 1 and out.read_text() == "precious"
    assert r.stderr == f"ckptlab: error: {out}: output already exists (use --overwrite to replace it)\n"
    r = cli("report", "--format", "json", "-o", str(out), "--overwrite", "--db", str(db))
    assert r.returncode == 0 and json.loads(out.read_text())["files"] == 1
    new = tmp_path / "sub" / "dir" / "r.csv"  # missing folders are made
    r = cli("report", "--format", "csv", "-o", str(new), "--db", str(db))
    assert r.returncode == 0 and new.read_text().startswith("path,name,")
    assert not [p for p in tmp_path.rglob(".r.*")]  # no temporary file left
    r = cli("report", "-o", str(tmp_path / "lib"), "--db", str(db))  # a folder
    assert r.returncode == 1 and "is a folder" in r.stderr


# -- hash: folders and globs --------------------------------------------------------------------------------------
def test_hash_accepts_folders_and_globs(tmp_path, cli):
    lib = tmp_path / "lib"
    a = write_st(lib / "a.safetensors", tensors("sd1_embedding", seed=1))
    b = write_st(lib / "sub" / "b.safetensors", tensors("sd1_embedding", seed=2))
    (lib / "notes.txt").write_text("not a model")
    want = {str(p): hashlib.sha256(p.read_bytes()).hexdigest().upper() for p in (a, b)}
    r = cli("hash", "--json", "--no-cache", str(lib))
    assert r.returncode == 0, r.stderr
    assert {json.loads(x)["path"]: json.loads(x)["sha256"] for x in r.stdout.splitlines()} == want
    r = cli("hash", "--json", "--no-cache", str(lib / "*.safetensors"))
    assert [json.loads(x)["path"] for x in r.stdout.splitlines()] == [str(a)]
    r = cli("hash", "--no-cache", str(tmp_path / "empty*"))
    assert r.returncode == 1 and r.stderr.startswith("ckptlab: error: ")
    r = cli("hash", "--no-cache", str(a))  # human output: upper case hex
    sha_line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("SHA256"))
    assert sha_line.split()[1] == want[str(a)]


# -- ls: aliases, header, CivitAI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aliased_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("aliases")
    sparse_library(root / "a1111", "a1111")
    sparse_library(root / "comfy", "comfyui")
    (root / "a1111" / "models" / "LyCORIS").mkdir(parents=True)
    for spec in ("sd1_loha", "sd1_lokr"):
        write_model(root / "a1111" / "models" / "LyCORIS" / f"{spec}.safetensors", spec, sparse=True)
    db = root / "c.db"
    with Catalog(db) as cat:
        scan([root], cat)
        kinds = {r.name: r.kind for r in cat.files()}
    assert kinds["sd1_loha.safetensors"] == "lycoris" and kinds["sd1_kohya_lora.safetensors"] == "lora"
    return db


def _names(cli, db, *args):
    r = cli("ls", "--json", "--db", str(db), *args)
    assert r.returncode == 0, r.stderr
    return sorted(json.loads(x)["name"] for x in r.stdout.splitlines())


@pytest.mark.parametrize("alias", ["lora", "loras", "Lora", "LORA", "LoCon"])
def test_kind_lora_aliases_include_lycoris(cli, aliased_db, alias):
    assert _names(cli, aliased_db, "--kind", alias) == sorted(
        ["sd1_kohya_lora.safetensors"] * 2 + ["sd1_loha.safetensors", "sd1_lokr.safetensors"])


@pytest.mark.parametrize(("alias", "kinds"), [
    ("checkpoints", {"checkpoint"}), ("Stable-diffusion", {"checkpoint"}), ("TextualInversion", {"embedding"}),
    ("embeddings", {"embedding"}), ("LyCORIS", {"lycoris"}), ("diffusion_models", {"unet"}), ("clip", {"text_encoder"}),
    ("ControlNet", {"controlnet"})])
def test_kind_folder_and_civitai_aliases(cli, aliased_db, alias, kinds):
    r = cli("ls", "--json", "--db", str(aliased_db), "--kind", alias)
    got = {json.loads(x)["kind"] for x in r.stdout.splitlines()}
    assert got == kinds


@pytest.mark.parametrize(("alias", "family"), [
    ("SD 1.5", "sd1"), ("sd15", "sd1"), ("sd1.5", "sd1"), ("SD 1.4", "sd1"), ("SDXL 1.0", "sdxl"), ("Pony", "sdxl"),
    ("Illustrious", "sdxl"), ("sdxl", "sdxl"), ("Flux.1 S", "flux"), ("Flux.1 D", "flux"), ("flux", "flux")])
def test_family_aliases(cli, aliased_db, alias, family):
    r = cli("ls", "--json", "--db", str(aliased_db), "--family", alias)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows and {x["family"] for x in rows} == {family}


def test_every_civitai_base_model_of_the_reference_resolves():
    """reference/hub.md §2.3 lists CivitAI's baseModel strings; each that names a family ckptlab knows resolves."""
    for name, fam in ui_folders.CIVITAI_BASE_MODELS.items():
        assert ui_folders.resolve_family(name) == (fam,)
        assert fam in ui_folders.family_ids(), fam
    assert ui_folders.resolve_family("Wan Video 2.2 I2V-A14B") == ("wan",)
    assert ui_folders.resolve_family("Flux.2 Klein 9B") == ("flux2",)
    assert ui_folders.resolve_family("SD 3.5 Large Turbo") == ("sd3",)


def test_new_kinds_need_no_code(tmp_path):
    """Kinds are data: ipadapter / t2i_adapter (and any kind a catalog holds) resolve."""
    assert ui_folders.resolve_kind("ipadapter") == ("ipadapter",)
    assert ui_folders.resolve_kind("t2i_adapter") == ("t2i_adapter",)
    assert ui_folders.resolve_kind("T2I-Adapter") == ("t2i_adapter",)
    assert ui_folders.resolve_kind("motion_module", known=["motion_module"]) == ("motion_module",)


@pytest.mark.parametrize(("opt", "value", "listed"), [("--kind", "lorra", "checkpoint, clip_vision, controlnet"),
                                                     ("--family", "SD 9", "auraflow")])
def test_unknown_kind_or_family_lists_the_valid_ones(cli, aliased_db, opt, value, listed):
    r = cli("ls", "--db", str(aliased_db), opt, value)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckptlab: error: unknown {opt[2:]} {value!r}: use one of ")
    assert listed in lines[0] and "lora" in lines[0] if opt == "--kind" else "sdxl" in lines[0]


def test_ls_header_and_civitai_column_and_search(tmp_path, cli):
    db, a, b, sha_a = linked_lora_library(tmp_path)
    r = cli("ls", "--db", str(db))
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SIZE", "KIND/FAMILY", "FORMAT", "SAFETY", "AUTOV2", "PATH", "[CIVITAI]"]
    row = next(ln for ln in lines if ln.endswith("]") and str(a) in ln)
    assert row.endswith(f"{a}  [Detail Tweaker / v1.0 (fixed); SD 1.5; triggers: detailed, sharp]")
    assert sha_a[:10] in row  # AutoV2, upper case as CivitAI shows it
    for needle in ("tweaker", "SD 1.5", "sharp", "v1.0 (FIXED)"):
        assert _names(cli, db, "--search", needle) == ["detail-fp16.safetensors", "detail.safetensors"], needle
    assert _names(cli, db, "--search", "no such words") == []
    # identification finds no family for these tiny LoRAs; the linked base model ("SD 1.5") stands in
    with Catalog(db) as cat:
        assert {r.family for r in cat.files()} == {None}
    assert _names(cli, db, "--family", "SD 1.5") == ["detail-fp16.safetensors", "detail.safetensors"]
    assert _names(cli, db, "--family", "sdxl") == []
    row = json.loads(cli("ls", "--json", "--db", str(db), "--search", "detailed").stdout.splitlines()[0])
    assert row["civitai"] == {"model_name": "Detail Tweaker", "version_name": "v1.0 (fixed)", "base_model": "SD 1.5",
                              "trigger_words": ["detailed", "sharp"], "source": "link"}


def test_ls_civitai_from_a_sidecar(tmp_path, cli):
    lib = tmp_path / "lib"
    write_st(lib / "x.safetensors", tensors("sd1_embedding", seed=1))
    (lib / "x.civitai.info").write_text(json.dumps({
        "id": 9, "modelId": 90, "name": "v2", "baseModel": "SDXL 1.0", "files": [],
        "model": {"name": "Sidecar Named", "type": "TextualInversion"}, "trainedWords": ["zzword"]}))
    db = tmp_path / "c.db"
    cli("scan", str(lib), "--db", str(db))
    assert "[Sidecar Named / v2; SDXL 1.0; triggers: zzword]" in cli("ls", "--db", str(db)).stdout
    assert _names(cli, db, "--search", "zzword") == ["x.safetensors"]


# -- show: human sizes, indented lists, upper-case hashes ---------------------------------------------------------------
def test_show_human_output(tmp_path, cli):
    db, a, _b, sha_a = linked_lora_library(tmp_path)
    out = cli("show", str(a), "--db", str(db)).stdout
    size = a.stat().st_size
    assert f"  size: {size / 1024:.1f} KiB ({size:,} bytes)\n" in out
    assert f"    SHA256  {sha_a}\n" in out
    assert "  dtypes:\n    F32: " in out
    assert "  safety: safe\n" in out
    assert cli("scan", "--fingerprint", str(a.parent), "--db", str(db)).returncode == 0
    out = cli("show", str(a), "--db", str(db)).stdout
    fp = json.loads(cli("ls", "--json", "--search", str(a), "--db", str(db)).stdout)["fingerprint"]
    assert f"  fingerprint: {fp.upper()}\n" in out  # hashes upper case wherever a person reads them


# -- scan progress ----------------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.advanced, self.total, self.descriptions = 0, None, []

    def __call__(self, advance=0, *, total=None, description=None):
        self.advanced += advance
        if total is not None:
            self.total = total
        if description is not None:
            self.descriptions.append(description)


@pytest.mark.parametrize("hash", [False, True])
def test_scan_progress_counts_files_and_bytes_of_all_files(tmp_path, hash):
    files = _library_of(tmp_path / "lib", 6)
    size = sum(os.path.getsize(p) for p in files)  # the oracle: what the file system says
    with Catalog(tmp_path / "c.db") as cat:
        scan([files[0]], cat)  # one file already catalogued: it counts as done at once
        rec = Recorder()
        scan([tmp_path / "lib"], cat, progress=rec, hash=hash)
    reading = [d for d in rec.descriptions if d.startswith("reading")]
    assert reading[0] == "reading 1/6 files" and reading[-1] == "reading 6/6 files"
    hashed = size if hash else 0  # every file is hashed (none was before)
    assert rec.total == rec.advanced == size + hashed
    if hash:
        assert [d for d in rec.descriptions if d.startswith("hashing")][-1] == "hashing 6/6 files"


def test_ls_survives_hostile_sidecar_values(tmp_path, cli):
    """A Stability Matrix sidecar whose names are a list and a number, trigger words mixed types."""
    lib = tmp_path / "lib"
    write_st(lib / "x.safetensors", tensors("sd1_embedding", seed=1))
    (lib / "x.cm-info.json").write_text(json.dumps({
        "ModelId": 1, "ModelName": ["a", "b"], "VersionId": 2, "VersionName": 7, "BaseModel": {"x": 1},
        "TrainedWords": ["w1", 2, None]}))
    db = tmp_path / "c.db"
    assert cli("scan", str(lib), "--db", str(db)).returncode == 0
    r = cli("ls", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert '[["a", "b"] / 7; {"x": 1}; triggers: w1, 2, None]' in r.stdout
    assert _names(cli, db, "--search", "w1") == ["x.safetensors"]
    assert cli("ls", "--family", "sd1", "--db", str(db)).returncode == 0


def test_hash_goes_on_past_a_bad_file(tmp_path, cli):
    lib = tmp_path / "lib"
    a = write_st(lib / "a.safetensors", tensors("sd1_embedding", seed=1))
    os.mkfifo(lib / "b.safetensors")  # would block a reader
    c = write_st(lib / "c.safetensors", tensors("sd1_embedding", seed=2))
    r = cli("hash", "--json", "--no-cache", str(lib), timeout=60)
    assert r.returncode == 1
    assert [json.loads(x)["sha256"] for x in r.stdout.splitlines()] == [
        hashlib.sha256(p.read_bytes()).hexdigest().upper() for p in (a, c)]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ckptlab: error: {lib / 'b.safetensors'}: "), r.stderr


def test_report_output_that_is_not_a_regular_file(tmp_path, cli):
    os.mkfifo(tmp_path / "pipe")
    r = cli("report", "-o", str(tmp_path / "pipe"), "--overwrite", timeout=60)
    assert r.returncode == 1 and "is not a regular file" in r.stderr
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)  # not replaced
