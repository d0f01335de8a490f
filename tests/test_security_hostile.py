"""The hostile corpus (tests/hostile/corpus.py): every file gets a non-safe verdict, is refused by
open_model/convert, and its payload never runs (its canary file never appears)."""

from __future__ import annotations

import json
import pickletools
import tempfile
from pathlib import Path

import pytest
from hostile.corpus import build_hostile

from ckptlab.errors import CkptlabError, UnsafeFileError, UnsupportedFormatError
from ckptlab.formats import open_model
from ckptlab.ops.convert import convert
from ckptlab.security import EXIT_CODES, check

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
        if c.stream is None:
            continue
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
    assert r.returncode == EXIT_CODES["malicious"] == 4, r.stderr
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
