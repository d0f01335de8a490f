"""One error hierarchy and one exit-code table (``ckptlab.errors``), checked on the source.

- every ``CkptlabError`` subclass is defined in ``errors.py``; any other exception class in ``src`` is one
  of the internal control-flow ones that ``errors.py``'s docstring names;
- every exit code the error classes or the CLI use is in ``errors.EXIT_CODES``;
- docs/cli-errors.md's exit-code table lists the same codes with the same meanings.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import SRC

from ckptlab import errors

PKG = SRC / "ckptlab"
DOC = Path(__file__).resolve().parents[1] / "docs" / "cli-errors.md"

#: exception classes that never reach the user (each caught in its own module); errors.py's docstring names them
INTERNAL = {"_Broken", "_Limit", "_Reject", "_HeaderJSONError", "JSONDepthError", "HashCancelled", "Stopped",
            "StdoutClosed"}
EXCEPTION_ROOTS = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError", "KeyError", "TypeError"}


def _classes():
    """``(module path, class name, [base names])`` for every class in src."""
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "?"
                         for b in node.bases]
                yield path, node.name, bases


def _descendants(roots: set[str]) -> dict[str, Path]:
    """Classes (by name) that derive, in src, from one of ``roots``, and where each is defined."""
    classes = list(_classes())
    found: dict[str, Path] = {}
    grew = True
    while grew:
        grew = False
        for path, name, bases in classes:
            if name not in found and any(b in roots or b in found for b in bases):
                found[name] = path
                grew = True
    return found


def test_every_ckptlab_error_lives_in_errors_py():
    subclasses = _descendants({"CkptlabError"})
    assert len(subclasses) > 20  # the walk sees them (today 30)
    elsewhere = {n: str(p.relative_to(SRC)) for n, p in subclasses.items() if p != PKG / "errors.py"}
    assert not elsewhere, f"define these in ckptlab/errors.py and import them from there: {elsewhere}"


def test_other_exceptions_are_the_internal_ones_errors_py_names():
    exceptions = _descendants(EXCEPTION_ROOTS)
    others = {n for n, p in exceptions.items() if p != PKG / "errors.py"}
    assert others == INTERNAL, "a new exception class outside errors.py: is it internal (then list it here " \
                               "and in errors.py's docstring) or user-facing (then move it to errors.py)?"
    for name in INTERNAL:
        assert name in errors.__doc__, name


def test_error_classes_map_to_the_table():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.CkptlabError)]
    assert len(classes) > 20
    for cls in classes:
        assert cls.exit_code in errors.EXIT_CODES, cls
        if issubclass(cls, errors.UsageError):
            assert cls.exit_code == errors.EXIT_USAGE, cls
    # the usage errors the modules used to define each with `exit_code = 2`
    for name in ("BadChoiceError", "UnknownChoiceError", "SpecError", "RecipeError", "MethodError", "BlockSpecError"):
        assert getattr(errors, name).exit_code == 2, name
    assert errors.UnsafeFileError.exit_code == 4 and errors.DownloadCancelled.exit_code == 130
    assert errors.NotInCatalogError.exit_code == 1  # code 3 means only check's "suspicious"
    assert errors.CkptlabError.exit_code == 1 and errors.BusyError.exit_code == 1


def test_the_table_has_one_meaning_per_code():
    assert len(set(errors.EXIT_CODES.values())) == len(errors.EXIT_CODES)
    constants = {v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert constants == set(errors.EXIT_CODES)
    assert {0, 1, 2, 70, 130} <= set(errors.EXIT_CODES)


def _exit_codes_in(path: Path) -> set[tuple[int, int]]:
    """``(line, code)`` for each literal exit code: ``exit_code = N``, ``Exit(N)``/``sys.exit(N)``/``SystemExit(N)``,
    ``rv = N``/``worst = N``, ``max(worst, N)``, ``getattr(e, "exit_code", N)``."""
    out: set[tuple[int, int]] = set()

    def lit(node):  # a literal, or one of errors.py's named codes (EXIT_INTERNAL ...)
        if isinstance(node, ast.Name) and node.id.startswith("EXIT_"):
            return getattr(errors, node.id, None)
        return node.value if isinstance(node, ast.Constant) and type(node.value) is int else None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("exit_code", "rv", "worst", "code") and lit(node.value) is not None:
            out.add((node.lineno, lit(node.value)))
        elif isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            args = node.args
            if fn in ("Exit", "exit", "SystemExit") and args and lit(args[0]) is not None:
                out.add((node.lineno, lit(args[0])))
            elif fn == "max" and len(args) == 2 and isinstance(args[0], ast.Name) and args[0].id == "worst" \
                    and lit(args[1]) is not None:
                out.add((node.lineno, lit(args[1])))
            elif fn == "getattr" and len(args) == 3 and isinstance(args[1], ast.Constant) \
                    and args[1].value == "exit_code" and lit(args[2]) is not None:
                out.add((node.lineno, lit(args[2])))
    return out


def test_every_exit_code_used_is_in_the_table():
    used: dict[int, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        if path.parent.name == "sample" and path.name == "__main__.py":  # `python -m ckptlab.sample`, not the CLI
            continue
        for line, code in _exit_codes_in(path):
            used.setdefault(code, []).append(f"{path.relative_to(SRC)}:{line}")
    from ckptlab.security import VERDICT_EXIT_CODES

    for verdict, code in VERDICT_EXIT_CODES.items():
        used.setdefault(code, []).append(f"security.VERDICT_EXIT_CODES[{verdict!r}]")
    assert {1, 2, 5, 70, 130} <= set(used), used  # the walk finds the CLI's codes
    unknown = {c: where for c, where in used.items() if c not in errors.EXIT_CODES}
    assert not unknown, f"exit codes missing from errors.EXIT_CODES: {unknown}"


def test_the_walk_sees_each_kind_of_exit(tmp_path):
    """The source walk above would notice a new code, whichever way it is written."""
    p = tmp_path / "m.py"
    p.write_text("import sys, typer\nclass E(X):\n    exit_code = 9\n"
                 "def f(e):\n    rv = 11\n    worst = max(worst, 12)\n    rv = getattr(e, 'exit_code', 13)\n"
                 "    raise typer.Exit(14)\n    sys.exit(15)\n    raise SystemExit(16)\n    typer.Exit(code)\n")
    assert {c for _, c in _exit_codes_in(p)} == {9, 11, 12, 13, 14, 15, 16}


def _doc_table() -> dict[int, str]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Exit codes"):]
    section = section[:section.index("\n## ", 3)]
    rows = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\|\s*(\d+)\s*\|(.*)\|", line.strip())
        if m:
            assert int(m.group(1)) not in rows, line
            rows[int(m.group(1))] = m.group(2).strip()
    return rows


def test_docs_table_matches_errors_py():
    rows = _doc_table()
    assert set(rows) == set(errors.EXIT_CODES), "docs/cli-errors.md's exit codes differ from errors.EXIT_CODES"
    for code, meaning in errors.EXIT_CODES.items():
        cell = rows[code]
        m = re.match(r"\*\*(.+?)\*\*", cell)
        assert m and m.group(1) == meaning, f"exit {code}: the doc says {cell[:60]!r}, errors.py {meaning!r}"


@pytest.mark.parametrize("code", [3, 4, 5])
def test_check_verdict_codes_are_the_tables(code):
    """``check``'s codes are the table's suspicious / unsafe / unreadable, not numbers of their own."""
    from ckptlab.security import VERDICT_EXIT_CODES

    verdict = {v: k for k, v in VERDICT_EXIT_CODES.items()}[code]
    assert errors.EXIT_CODES[code].split()[0] in {"suspicious": "suspicious", "malicious": "unsafe",
                                                  "corrupt": "unreadable"}[verdict]
