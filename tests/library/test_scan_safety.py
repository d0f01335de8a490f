"""Safety verdicts live in the catalog (issue 11 §2, issue 12 §1): ``scan`` stores ``check``'s verdict
for every file, also when a reader refuses the file, and never runs a payload.

The hostile files come from ``tests/hostile/corpus.py``: each payload would create its own canary file
if a real unpickler ran it. The oracle for every stored verdict is ``ckptlab.security.check`` called
directly on the file (``ckptlab check``), and the corpus' own expectation (``malicious``, or
``unsafe`` = suspicious or malicious); that the payloads are live is shown with CPython's own
``pickle.load`` in a throwaway subprocess.
"""

from __future__ import annotations

import json
import pickle
import sqlite3
import struct
import subprocess
import sys

import pytest
from fakes.library_files import tensors, write_st
from hostile.corpus import build_hostile
from test_scan_diffusers import pipeline

from ckptlab.library.catalog import Catalog
from ckptlab.library.report import build_inventory
from ckptlab.library.scanner import scan
from ckptlab.security import check

#: plain pickle streams (no torch container) whose payload CPython's unpickler runs on its own
LIVE = ("reduce_os_system", "proto0_eval", "inst_opcode", "long_text_then_payload", "builtins_exec")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cases = build_hostile(root / "models", root / "canary")
    return root, cases


def _no_canary(root) -> None:
    assert not any((root / "canary").iterdir()), "a payload ran"


@pytest.mark.parametrize("workers", [1, 2])  # > PARALLEL_MIN files: 2 reads them in worker processes
def test_scan_stores_the_verdict_of_every_hostile_file(corpus, tmp_path, workers):
    root, cases = corpus
    with Catalog(tmp_path / "c.db") as cat:
        s = scan([root / "models"], cat, workers=workers)
        recs = {r.path: r for r in cat.files()}
    _no_canary(root)
    assert len(cases) > 64
    for case in cases:
        rec = recs[str(case.path)]
        oracle = check(case.path).verdict
        assert rec.safety == oracle, (case.name, rec.safety, oracle)
        if case.expect == "malicious":
            assert rec.safety == "malicious", case.name
        else:
            assert rec.safety in ("suspicious", "malicious"), case.name
        # the verdict is the finding: a refused file is a pickle with its verdict, not an unreadable file
        # (a polyglot is recorded under the format its first bytes name, with the pickle's verdict)
        formats = ("pickle", "safetensors", "gguf") if "polyglot" in case.name else ("pickle",)
        assert rec.format in formats and rec.error is None, (case.name, rec.format, rec.error)
        assert rec.safety_detail["findings"], case.name
    verdicts = [check(p).verdict for p in (root / "models").iterdir() if p.suffix != ".txt"]
    assert (s.malicious, s.suspicious) == (verdicts.count("malicious"), verdicts.count("suspicious"))
    assert s.errors == 0, s.error_list


@pytest.mark.parametrize("name", LIVE)
def test_the_payloads_are_live_under_cpython_pickle(tmp_path, name):
    """The proof that the scan above met real payloads: CPython's ``pickle.load`` runs each one (in a
    throwaway subprocess, on a copy of the corpus with its own canary folder)."""
    cases = {c.name: c for c in build_hostile(tmp_path / "models", tmp_path / "canary")}
    case = cases[name]
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                    str(case.path)], capture_output=True, timeout=60, cwd=tmp_path)
    assert case.canary.exists(), f"{name}: the payload did not run under CPython's pickle"


def test_cli_scan_warns_and_ls_unsafe_lists_what_is_not_safe(corpus, tmp_path, cli):
    root, _cases = corpus
    lib = tmp_path / "lib"
    good = write_st(lib / "good.safetensors", tensors("sd1_embedding", seed=1))
    for p in (root / "models").iterdir():
        (lib / p.name).write_bytes(p.read_bytes())
    db = tmp_path / "c.db"
    r = cli("scan", str(lib), "--db", str(db), "--workers", "1")
    _no_canary(root)
    assert r.returncode == 0, r.stderr
    verdicts = {p.name: check(p).verdict for p in lib.iterdir() if p.suffix != ".txt"}
    n_mal = sum(v == "malicious" for v in verdicts.values())
    n_sus = sum(v == "suspicious" for v in verdicts.values())
    assert r.stderr.splitlines() == [
        f"ckptlab: warning: {n_mal} malicious and {n_sus} suspicious file(s) in the scanned folders; never load "
        "them with torch.load (list: ckptlab ls --unsafe)"]
    rows = [json.loads(x) for x in cli("ls", "--json", "--db", str(db)).stdout.splitlines()]
    assert {x["name"]: x["safety"] for x in rows} == verdicts
    unsafe = [json.loads(x) for x in cli("ls", "--unsafe", "--json", "--db", str(db)).stdout.splitlines()]
    assert sorted(x["name"] for x in unsafe) == sorted(n for n, v in verdicts.items() if v != "safe")
    assert good.name not in {x["name"] for x in unsafe}
    text = cli("ls", "--unsafe", "--db", str(db)).stdout.splitlines()
    assert text[0].split()[:5] == ["SIZE", "KIND/FAMILY", "FORMAT", "SAFETY", "AUTOV2"]
    assert all(" malicious " in ln or " suspicious " in ln for ln in text[1:]) and len(text) == len(unsafe) + 1
    # the report shows every pickle with its verdict, and a section of files that are not safe
    inv = json.loads(cli("report", "--format", "json", "--db", str(db)).stdout)
    assert {p["path"].rsplit("/", 1)[1]: p["safety"] for p in inv["pickles"]} == {
        n: v for n, v in verdicts.items() if n != good.name and not n.startswith(("safetensors_polyglot", "gguf_polyglot"))}
    assert len(inv["unsafe"]) == n_mal + n_sus
    table = cli("report", "--db", str(db)).stdout
    assert "Not safe" in table and "unchecked" not in table
    # a re-scan reads nothing again and still warns
    r = cli("scan", str(lib), "--db", str(db), "--json")
    assert json.loads(r.stdout)["unchanged"] == len(verdicts) and "malicious" in r.stderr


def test_protocol_0_and_1_pickles_are_pickles_with_a_verdict(tmp_path):
    """Streams CPython's pickler writes at protocols 0 and 1 start with any opcode (``V``, ``K``...), not
    only the ones ``detect_format`` knows: they are still pickles, checked and in the Pickles table."""
    lib = tmp_path / "lib"
    lib.mkdir()
    objs = {"p0_text.ckpt": ("text", 0), "p0_dict.pt": ({"w": [1.0, 2.0]}, 0), "p1_int.pt": (7, 1),
            "p1_list.bin": ([1, 2], 1)}
    for name, (obj, proto) in objs.items():
        data = pickle.dumps(obj, protocol=proto)
        assert pickle.loads(data) == obj  # the oracle: CPython reads it as a pickle
        (lib / name).write_bytes(data)
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat)
        recs = {r.name: r for r in cat.files()}
        inv = build_inventory(cat)
    for name in objs:
        assert recs[name].format == "pickle" and recs[name].safety == "safe", (name, recs[name])
    assert sorted(p["path"].rsplit("/", 1)[1] for p in inv.pickles) == sorted(objs)
    assert all(p["safety"] == "safe" for p in inv.pickles)


def test_rows_without_a_verdict_are_checked_on_the_next_scan(tmp_path, corpus):
    root, cases = corpus
    lib = tmp_path / "lib"
    good = write_st(lib / "good.safetensors", tensors("sd1_embedding", seed=2))
    evil = lib / "evil.ckpt"
    evil.write_bytes(next(c for c in cases if c.name == "zip_injected").path.read_bytes())
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat)
        assert cat.get_by_path(evil).safety == "malicious" and cat.get_by_path(good).safety == "safe"
    raw = sqlite3.connect(tmp_path / "c.db")  # a catalog from a version that left verdicts out
    raw.execute("UPDATE files SET safety = NULL, safety_detail = NULL")
    raw.commit()
    raw.close()
    with Catalog(tmp_path / "c.db") as cat:
        assert len(cat.files(unsafe=True)) == 2  # unrated is not safe
        s = scan([lib], cat)
        assert (s.changed, s.malicious) == (2, 1)
        assert cat.get_by_path(evil).safety == "malicious" and cat.get_by_path(good).safety == "safe"
        assert [r.path for r in cat.files(unsafe=True)] == [str(evil)]
    _no_canary(root)


def test_diffusers_folder_gets_the_worst_verdict_of_its_files(tmp_path, corpus):
    root, cases = corpus
    folder = pipeline(tmp_path / "lib" / "sd15-diffusers")
    with Catalog(tmp_path / "c.db") as cat:
        scan([tmp_path / "lib"], cat)
        assert cat.get_by_path(folder).safety == "safe"
        hostile = next(c for c in cases if c.name == "zip_injected").path
        (folder / "text_encoder" / "pytorch_model.bin").write_bytes(hostile.read_bytes())
        scan([tmp_path / "lib"], cat)
        rec = cat.get_by_path(folder)
    assert rec.format == "diffusers" and rec.safety == "malicious" == check(hostile).verdict
    assert list(rec.safety_detail["files"]) == ["text_encoder/pytorch_model.bin"]
    _no_canary(root)


def _st_raw(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_verdicts_equal_check(tmp_path):
    """``.safetensors``/``.sft`` files get their verdict from the header the scan parses anyway; the oracle
    is ``check`` on each file: valid files of several kinds, and headers that are broken each their own way."""
    lib = tmp_path / "lib"
    good = [write_st(lib / f"{spec}.safetensors", tensors(spec, seed=i))
            for i, spec in enumerate(("sd1_embedding", "sd1_kohya_lora", "sd1_vae"))]
    full = good[0].read_bytes()
    bad = {
        "truncated.safetensors": full[:-5],
        "bad_json.safetensors": _st_raw(b"{not json"),
        "dtype_list.sft": _st_raw({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        "offsets_past_end.safetensors": _st_raw({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                                                b"\0" * 4),
        "shape_mismatch.sft": _st_raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4),
        "negative_shape.safetensors": _st_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                                              b"\0" * 4),
    }
    for name, data in bad.items():
        (lib / name).write_bytes(data)
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat)
        recs = {r.name: r for r in cat.files()}
    assert len(recs) == len(good) + len(bad)
    for name, rec in recs.items():
        try:
            oracle = check(lib / name)
        except Exception:  # noqa: BLE001 - a parser bug (a dtype list raised TypeError): scan says unchecked
            assert rec.safety == "unchecked" and rec.error.startswith("unreadable: "), (name, rec.safety)
            continue
        assert (rec.safety, rec.format) == (oracle.verdict, "safetensors"), name
        assert [f["kind"] for f in rec.safety_detail["findings"]] == [f.kind for f in oracle.issues], name
    assert {n for n, r in recs.items() if r.safety == "safe"} == {p.name for p in good}
    assert all(recs[n].safety in ("corrupt", "unchecked") and recs[n].error for n in bad)


def test_a_reader_refusal_is_never_stored_as_safe(tmp_path, monkeypatch):
    """Should ``check`` and the pickle reader ever disagree, the reader's refusal wins over ``safe``."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "x.ckpt").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))

    from ckptlab.errors import UnsafeFileError
    from ckptlab.formats import pickle as pickle_reader

    def refuse(self, path, **kw):
        raise UnsafeFileError("refused: malicious pickle content (test)", path)

    monkeypatch.setattr(pickle_reader.PickleSource, "__init__", refuse)
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat, workers=1)
        rec = cat.get_by_path(lib / "x.ckpt")
    assert check(lib / "x.ckpt").verdict == "safe"
    assert rec.safety == "suspicious" and rec.error is None
    assert rec.safety_detail["reader_refused"] == "refused: malicious pickle content (test)"


def test_report_not_safe_lists_the_same_files_as_ls_unsafe(tmp_path, cli):
    """A corrupt file is not safe either: the report's "Not safe" section and ``ls --unsafe`` agree."""
    lib = tmp_path / "lib"
    write_st(lib / "good.safetensors", tensors("sd1_embedding", seed=1))
    bad = write_st(lib / "cut.safetensors", tensors("sd1_embedding", seed=2))
    bad.write_bytes(bad.read_bytes()[:-7])  # truncated: check calls it corrupt
    db = tmp_path / "c.db"
    assert cli("scan", lib, "--db", db).returncode == 0
    from ckptlab.security import check

    assert check(bad).verdict == "corrupt"
    unsafe = {json.loads(x)["name"] for x in cli("ls", "--unsafe", "--json", "--db", db).stdout.splitlines()}
    inv = json.loads(cli("report", "--format", "json", "--db", db).stdout)
    assert unsafe == {u["path"].rsplit("/", 1)[1] for u in inv["unsafe"]} == {"cut.safetensors"}


def test_a_safetensors_named_polyglot_gets_checks_verdict(corpus, tmp_path):
    """scan rates .safetensors files from the header it already parsed; the pickle hidden in a valid
    safetensors file (payload in a U8 tensor's bytes, past the header) must still be ``malicious``."""
    root, cases = corpus
    lib = tmp_path / "lib"
    lib.mkdir()
    for case in cases:
        if case.name.startswith("safetensors_polyglot"):
            (lib / f"{case.name}.safetensors").write_bytes(case.path.read_bytes())
    assert len(list(lib.iterdir())) >= 2
    with Catalog(tmp_path / "c.db") as cat:
        scan([lib], cat, workers=1)
        recs = {r.path: r for r in cat.files()}
    _no_canary(root)
    for p in lib.iterdir():
        assert recs[str(p)].safety == check(p).verdict == "malicious", p.name
