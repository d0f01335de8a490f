"""Safety verdicts for model files: ``check(path) -> CheckResult``.

- ``safe``: only allowlisted data (pickles), or a valid safetensors/GGUF header.
- ``suspicious``: unknown globals or structural oddities; nothing known to execute code.
- ``malicious``: a global or construct that executes code or reaches the OS, or a structural
  attack (parser differentials, polyglots, storage size lies...). Counted even when the stream
  breaks afterwards.
- ``corrupt``: the file cannot be parsed (and nothing worse was seen before the break).

Pickles are read by ckptlab's own data-only machine (``formats.pickle_vm``); nothing is imported
or executed. No torch import on this path.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import EXIT_CORRUPT, EXIT_OK, EXIT_SUSPICIOUS, EXIT_UNSAFE
from ckptlab.formats.pickle_vm import CORRUPT, INFO, MALICIOUS, SUSPICIOUS, Finding
from ckptlab.formats.polyglot import polyglot_findings
from ckptlab.remote import RemoteURL, as_path

SAFE = "safe"
VERDICTS = (SAFE, SUSPICIOUS, MALICIOUS, CORRUPT)
#: ``ckptlab check`` exit status for the worst verdict among its files (meanings: ``errors.EXIT_CODES``)
VERDICT_EXIT_CODES = {SAFE: EXIT_OK, SUSPICIOUS: EXIT_SUSPICIOUS, MALICIOUS: EXIT_UNSAFE, CORRUPT: EXIT_CORRUPT}
_RANK = {SAFE: 0, CORRUPT: 1, SUSPICIOUS: 2, MALICIOUS: 3}

__all__ = ["CheckResult", "VERDICT_EXIT_CODES", "Finding", "check", "check_many", "polyglot_findings", "worst_verdict"]


@dataclass
class CheckResult:
    """``check``'s verdict on one file, with the findings behind it (the ``check --json`` record)."""

    path: Path
    format: str  # safetensors | pickle | gguf | unknown
    verdict: str
    container: str = ""  # torch-zip | torch-legacy | pickle | torchscript (pickles)
    findings: list[Finding] = field(default_factory=list)
    globals: list[str] = field(default_factory=list)

    @property
    def issues(self) -> list[Finding]:
        """Findings that affect the verdict (everything but informational ones)."""
        return [f for f in self.findings if f.severity != INFO]


def worst_verdict(verdicts) -> str:
    return max(verdicts, key=lambda v: _RANK[v], default=SAFE)


def check_many(paths, *, deep: bool = False) -> Iterator[CheckResult]:
    """``check`` each path; a folder (a diffusers model) is checked file by file."""
    from ckptlab.formats import MODEL_SUFFIXES

    for p in map(as_path, paths):
        if type(p) is RemoteURL:
            yield from _check_remote_many(p, deep)
            continue
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES)
            if not files:
                yield CheckResult(p, "unknown", CORRUPT, findings=[Finding("no_model_files", CORRUPT,
                                                                           "folder holds no model files")])
            for f in files:
                yield check(f, deep=deep)
        else:
            yield check(p, deep=deep)


def _check_remote_many(p, deep: bool) -> Iterator[CheckResult]:
    """A remote URL: one object, or a diffusers prefix checked object by object (as a folder is file by file)."""
    from ckptlab.errors import CkptlabError
    from ckptlab.formats import MODEL_SUFFIXES, detect_format
    from ckptlab.remote.reader import list_prefix, session

    with session():
        try:
            folder = detect_format(p) == "diffusers"
        except CkptlabError:
            folder = False
        if not folder:
            yield check(p, deep=deep)
            return
        try:
            files = sorted(u for u, _ in list_prefix(p) if u.lower().endswith(MODEL_SUFFIXES))
        except CkptlabError as e:
            yield CheckResult(p, "unknown", CORRUPT, findings=[Finding("unreadable", CORRUPT, e.message)])
            return
    if not files:
        yield CheckResult(p, "unknown", CORRUPT, findings=[Finding("no_model_files", CORRUPT,
                                                                   "folder holds no model files")])
    for f in files:
        yield check(f, deep=deep)


def check(path: str | Path, *, deep: bool = False) -> CheckResult:
    """Scan one file without executing anything and return its verdict and findings. ``deep``: also read
    every tensor byte (``ckptlab.integrity``: zip record CRCs, NaN/Inf values). ``path`` may be a remote URL
    (``s3://``, ``https://``...): the same verdict from ranged reads (``ckptlab.remote``)."""
    p = as_path(path)
    if type(p) is RemoteURL:
        from ckptlab.remote.reader import session

        with session():
            return _check(p, deep, remote=True)
    return _check(p, deep)


def _check(p, deep: bool, remote: bool = False) -> CheckResult:
    if remote:
        from ckptlab.errors import CkptlabError
        from ckptlab.formats import detect_format
        from ckptlab.remote.reader import open_remote

        try:
            if detect_format(p) == "diffusers":
                return CheckResult(p, "unknown", CORRUPT, findings=[Finding("not_a_file", CORRUPT, "is a folder")])
        except CkptlabError:
            pass
        try:
            head = open_remote(p).pread(0, 16)
        except CkptlabError as e:
            return CheckResult(p, "unknown", CORRUPT, findings=[Finding("unreadable", CORRUPT,
                                                                        f"cannot open: {e.message}")])
        return _check_head(p, head, deep)
    if p.is_dir():
        return CheckResult(p, "unknown", CORRUPT, findings=[Finding("not_a_file", CORRUPT, "is a folder")])
    from ckptlab.errors import CkptlabError
    from ckptlab.formats import require_regular_file

    try:
        require_regular_file(p)  # a FIFO would block, /dev/zero never end
    except CkptlabError as e:
        return CheckResult(p, "unknown", CORRUPT, findings=[Finding("not_a_file", CORRUPT, e.message)])
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        return CheckResult(p, "unknown", CORRUPT, findings=[Finding("unreadable", CORRUPT, f"cannot open: {e.strerror or e}")])
    return _check_head(p, head, deep)


def _check_head(p, head: bytes, deep: bool) -> CheckResult:
    fmt = _sniff(p, head)
    if fmt == "safetensors":
        r = _check_safetensors(p)
        if deep and r.verdict == SAFE:
            from ckptlab.integrity import safetensors_findings

            _add(r, safetensors_findings(p))
        return r
    if fmt == "gguf":
        return _check_gguf(p)
    from ckptlab.formats.pickle_archive import scan

    s = scan(p)
    try:
        r = CheckResult(p, "pickle", s.verdict, s.container, list(s.findings), sorted(s.globals))
        if deep and s.verdict != MALICIOUS:
            from ckptlab.integrity import pickle_findings

            _add(r, pickle_findings(s))
        return r
    finally:
        s.root = None
        s.close()


def _add(r: CheckResult, findings: list[Finding]) -> None:
    r.findings.extend(findings)
    r.verdict = worst_verdict([r.verdict, *(f.severity for f in findings)])


def _sniff(p: Path, head: bytes) -> str:
    from ckptlab.errors import CkptlabError
    from ckptlab.formats import detect_format

    try:
        fmt = detect_format(p)
    except CkptlabError:
        return "pickle"  # let the pickle scanner say what it is (7z, tar, junk...)
    return fmt if fmt in ("safetensors", "gguf") else "pickle"


def _check_safetensors(p: Path) -> CheckResult:
    from ckptlab.errors import CkptlabError
    from ckptlab.formats.safetensors import read_header

    polyglot = polyglot_findings(p)
    try:
        read_header(p)
    except CkptlabError as e:
        findings = [Finding("bad_header", CORRUPT, e.message), *polyglot]
        return CheckResult(p, "safetensors", worst_verdict(f.severity for f in findings), findings=findings)
    return CheckResult(p, "safetensors", MALICIOUS if polyglot else SAFE, findings=polyglot)


def _check_gguf(p: Path) -> CheckResult:
    from ckptlab.errors import CkptlabError

    polyglot = polyglot_findings(p)  # "GGUF" reads as BINFLOAT: the rest of the file may be a pickle
    try:
        from ckptlab.formats import open_model

        open_model(p).close()
    except CkptlabError as e:
        findings = [*polyglot, Finding("bad_header", CORRUPT, e.message)]
        return CheckResult(p, "gguf", worst_verdict(f.severity for f in findings), findings=findings)
    return CheckResult(p, "gguf", MALICIOUS if polyglot else SAFE, findings=polyglot)
