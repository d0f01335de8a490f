"""The hostile corpus (tests/hostile/corpus.py): every file gets a non-safe verdict, is refused by
open_model/convert, and its payload never runs (its canary file never appears)."""

from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hostile.corpus import build_hostile

from ckptlab.errors import CkptlabError, UnsafeFileError, UnsupportedFormatError
from ckptlab.formats import open_model
from ckptlab.ops.convert import convert
from ckptlab.security import VERDICT_EXIT_CODES, check

with tempfile.TemporaryDirectory() as _d:
    NAMES = [c.name for c in build_hostile(Path(_d) / "f", Path(_d) / "c")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    cases = {c.name: c for c in build_hostile(root / "files", root / "canary")}
    yield root, cases
    assert not list((root / "canary").iterdir()), "a payload ran"


@pytest.fixture
def case(corpus, request):
    root, cases = corpus
    c = cases[request.param]
    yield c
    assert not c.canary.exists(), f"payload of {c.name} ran"
    assert not list((root / "canary").iterdir())


def test_corpus_covers_at_least_30_techniques(corpus):
    _, cases = corpus
    assert len(cases) >= 30
    assert len({c.canary for c in cases.values()}) == len(cases)
    assert len({c.technique for c in cases.values()}) == len(cases)


def _globals_seen_by_pickletools(stream: bytes) -> set[str]:
    """Independent disassembly: GLOBAL/INST operands, and STACK_GLOBAL's two string operands."""
    seen, strings, memo = set(), [], {}
    for op, arg, _pos in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            seen.add(arg)
        elif isinstance(arg, str) and op.name not in ("GET", "PUT"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET"):
            strings.append(memo.get(arg))
        if op.name == "STACK_GLOBAL":
            seen.add(f"{strings[-2]} {strings[-1]}")
    return seen


def test_payload_streams_are_real_pickles(corpus):
    """pickletools (a static disassembler, nothing is loaded) reads each payload to STOP and sees its globals."""
    _, cases = corpus
    checked = 0
    for c in cases.values():
        if c.stream is None or c.live:
            continue  # round-two streams hide behind what pickletools rejects too; their oracle is liveness
        ops = list(pickletools.genops(c.stream))
        assert ops[-1][0].name == "STOP", c.name
        seen = _globals_seen_by_pickletools(c.stream)
        for want in c.shows:
            assert want in seen, (c.name, want, seen)
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_verdict_is_never_safe(case):
    r = check(case.path)
    assert r.verdict != "safe"
    if case.expect == "malicious":
        assert r.verdict == "malicious", [f.detail for f in r.issues]
    else:
        assert r.verdict in ("suspicious", "malicious")
    assert r.issues and all(f.detail for f in r.issues)


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_deep_check_reads_hostile_files_without_harm(case):
    """--deep reads every storage record of what the scan let through: never executes, never raises, never
    makes a hostile file look safer."""
    shallow = check(case.path)
    deep = check(case.path, deep=True)
    assert deep.verdict == shallow.verdict or (shallow.verdict, deep.verdict) == ("safe", "corrupt")
    assert deep.verdict != "safe"


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_open_model_never_executes(case):
    """Opening refuses malicious files; a suspicious one opens as inert data only."""
    try:
        src = open_model(case.path)
    except (UnsafeFileError, UnsupportedFormatError):  # refused, or not even recognised as a model (tar, 7z)
        return
    except CkptlabError:
        assert case.expect != "malicious"
        return
    assert case.expect != "malicious", "a malicious file was opened"
    with src:
        assert src.verdict == "suspicious"
        for k in src.keys():
            try:
                src.get(k)
            except CkptlabError:
                pass


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_convert_refuses_without_output(case, tmp_path):
    with pytest.raises(CkptlabError):
        convert([case.path], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", NAMES, indirect=True)
def test_convert_allow_suspicious_never_runs_payload(case, tmp_path):
    """Even with --allow-suspicious, malicious stays refused and nothing executes."""
    try:
        results = convert([case.path], out_dir=tmp_path, allow_suspicious=True)
    except CkptlabError:
        assert list(tmp_path.iterdir()) == []
        return
    assert case.expect != "malicious"
    assert all(r.warnings for r in results)  # says what was ignored


def test_cli_check_reports_every_file_as_json(corpus, cli):
    root, cases = corpus
    r = cli("check", root / "files", "--json")
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == VERDICT_EXIT_CODES["malicious"] == 4, r.stderr
    verdicts = {Path(x["path"]).stem: x["verdict"] for x in lines}
    for name, c in cases.items():
        if c.path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
            assert verdicts[name] in ("malicious", "suspicious"), name
    mal = next(x for x in lines if Path(x["path"]).stem == "dotted_stack_global")
    assert any("os.system" in f["detail"] and f["location"] for f in mal["findings"])
    assert "Traceback" not in r.stderr
    assert not list((root / "canary").iterdir())


def test_cli_check_exit_code_for_suspicious_only(corpus, cli):
    _, cases = corpus
    r = cli("check", cases["prefix_module"].path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "suspicious" in r.stdout and "torch_evil_models.payload" in r.stdout


def test_cli_convert_refuses_malicious(corpus, cli, tmp_path):
    _, cases = corpus
    out = tmp_path / "x.safetensors"
    r = cli("convert", cases["polyglot_ckpt"].path, "-o", out)
    assert r.returncode == 4
    assert r.stderr.startswith("ckptlab: error:") and "malicious" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    r = cli("convert", cases["ext_code"].path, "-o", out)
    assert r.returncode == 4 and "--allow-suspicious" in r.stderr
    assert not cases["polyglot_ckpt"].canary.exists() and not cases["ext_code"].canary.exists()


def test_cli_inspect_refuses_malicious(corpus, cli):
    _, cases = corpus
    r = cli("inspect", cases["zip_injected"].path)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "malicious" in r.stderr
    assert not cases["zip_injected"].canary.exists()


def test_frame_divergence_reports_the_hidden_global(corpus):
    """The in-memory reading sees only bytes; the file-object reading sees os.system: both are reported."""
    _, cases = corpus
    r = check(cases["frame_divergence"].path)
    kinds = {f.kind for f in r.issues}
    assert "frame_violation" in kinds
    assert any("os.system" in f.detail and "file-read" in f.location for f in r.issues)


def test_findings_carry_member_and_offset(corpus):
    _, cases = corpus
    r = check(cases["zip_second_root"].path)
    f = next(f for f in r.issues if f.kind == "global_dangerous")
    assert f.location.startswith("other/data.pkl@")
    offset = int(f.location.rsplit("@", 1)[1])
    data = cases["zip_second_root"].path.read_bytes()
    member = data[data.index(b"\x80\x02cos\nsystem"):]
    assert member[offset:offset + 1] == b"c"  # the GLOBAL opcode itself


# -- liveness: every payload really runs outside ckptlab ----------------------------------------------------

#: live only under torch.load (a torch container around the pickle)
TORCH_ONLY = {"legacy_object_payload", "legacy_sysinfo_payload", "legacy_keys_payload", "legacy_tensor_plus_payload",
              "zip_injected", "zip_dotted", "zip_bad_crc", "zip_name_mismatch", "zip_duplicate_first", "zip_deflated",
              "setitem_on_tensor"}
#: cases whose canary does not appear under plain pickle.load nor torch.load(weights_only=False): they test
#: a construct that is hostile on its own (a lie, a probe, a wrapper) or a reader other than torch's
NOT_LIVE = {
    "dotted_proto2": "CPython 3.11 resolves dotted names only from protocol 4",
    "newobj_popen": "NEWOBJ calls Popen.__new__, which starts nothing",
    "timeit_stmt": "timeit.timeit refuses setup=None",
    "ext_code": "no extension code is registered in a fresh interpreter",
    "prefix_module": "the module does not exist (probes prefix allowlists)",
    "frame_divergence": "CPython 3.11 reads frames the in-memory way here",
    "frame_too_long": "CPython checks that a frame's bytes exist: the lie is flagged on its own",
    "memo_keyerror": "the stream breaks before REDUCE (the dangerous global alone is flagged)",
    "polyglot_clean_pickle": "torch reads the harmless leading pickle; the zip is for zip-first readers",
    "zip_prepended": "torch's reader rejects the shifted directory; other readers do not",
    "zip_encrypted_flag": "miniz refuses the encryption flag; lax readers do not",
    "zip_duplicate_last": "torch reads the first copy here (the copy read is not defined)",
    "zip_second_root": "torch reads only the first root",
    "zip_txt_member": "torch never unpickles a .txt member; scanners that skip it are the target",
    "torchscript_constants": "torch.load refuses TorchScript archives it cannot map",
    "storage_size_lie": "a memory-corruption pattern, not a canary payload",
    "view_past_storage": "a memory-corruption pattern, not a canary payload",
    "build_on_global": "BUILD on a function fails; mutating a class is the hostile part",
    "legacy_tar_pickle": "its storages member lacks the storage_views pickle torch reads next",
    "archive_7z": "torch cannot read 7z; 7z-aware loaders are the target",
}

LIVE_ORACLE = r"""
import json, pickle, sys
mode, paths = json.loads(sys.stdin.read())
for path in paths:
    try:
        if mode == "torch":
            import torch
            torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as fh:
                pickle.load(fh)
    except BaseException:
        pass
"""


def _live_under(mode: str, root: Path) -> dict[str, bool]:
    cases = build_hostile(root / "files", root / "canary")
    env = {**os.environ, "PYTHONINTMAXSTRDIGITS": "0"}  # a setting a victim may have: it only widens what loads
    r = subprocess.run([sys.executable, "-c", LIVE_ORACLE], input=json.dumps([mode, [str(c.path) for c in cases]]),
                       capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return {c.name: c.canary.exists() for c in cases}


def test_every_payload_is_live_outside_ckptlab(tmp_path):
    """The oracle for the corpus itself: each payload creates its canary under plain pickle.load or
    torch.load(weights_only=False), in a throwaway process (never this one)."""
    under_pickle = _live_under("pickle", tmp_path / "pickle")
    under_torch = _live_under("torch", tmp_path / "torch")
    with tempfile.TemporaryDirectory() as d:
        declared = {c.name: c.live for c in build_hostile(Path(d) / "f", Path(d) / "c")}
    for name, live in declared.items():
        mode = live or ("torch" if name in TORCH_ONLY else "" if name in NOT_LIVE else "pickle")
        if mode == "pickle":
            assert under_pickle[name], f"{name}: payload does not run under pickle.load"
        elif mode == "torch":
            assert under_torch[name], f"{name}: payload does not run under torch.load"
        else:
            assert not under_pickle[name] and not under_torch[name], f"{name} is live: take it off NOT_LIVE"


ROUND_TWO_CLI = ["mark_pop_payload", "int_hex_payload", "long_bin_payload", "zip_int_hex", "zip_data_pkl_case",
                 "safetensors_polyglot_ckpt", "safetensors_polyglot_valid", "tar_v7_storages", "tar_storages_K",
                 "tar_storages_proto4", "marks_100001_payload", "memo_5m_payload", "load_from_bytes_x3", "gguf_polyglot", "magic_mock_any"]


@pytest.mark.parametrize("name", ROUND_TWO_CLI)
def test_round_two_cases_through_every_command(corpus, cli, tmp_path, name):
    """check says malicious; inspect, convert (even --allow-suspicious) and merge refuse with one error line;
    the canary never appears."""
    _, cases = corpus
    c = cases[name]
    r = cli("check", c.path, "--json")
    assert r.returncode == 4 and json.loads(r.stdout)["verdict"] == "malicious", r.stdout
    for args in (["inspect", c.path], ["convert", c.path, "--allow-suspicious", "--out-dir", tmp_path],
                 ["merge", "weighted_sum", c.path, c.path, "-o", tmp_path / "m.safetensors"]):
        r = cli(*args)
        assert r.returncode != 0, (args, r.stdout)
        assert r.stderr.startswith("ckptlab: error:") and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not list(tmp_path.iterdir())
    assert not c.canary.exists()
