"""The package's layering, checked on the source: every ``ckptlab`` import points down (or sideways within a
layer), and no module imports another module's private (``_``-prefixed) names.

The layers, lowest first, are the README's architecture drawing; a new subpackage must be placed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SRC

PKG = SRC / "ckptlab"

#: lowest first; a module may import from its own layer or any layer below it
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"version", "errors", "display", "atomic", "checksum", "jsonable", "progress"}),
    ("object storage", {"remote"}),
    ("formats", {"formats"}),
    ("checks and hashes", {"security", "integrity", "hashes"}),
    ("families", {"arch"}),
    ("sample files", {"sample"}),
    ("transforms", {"ops"}),
    ("LoRA", {"lora"}),
    ("merge", {"merging"}),
    ("library", {"library"}),
    ("hub", {"hub"}),
    ("imaging", {"imaging"}),
    ("public API", {"api", ""}),
    ("web app", {"web"}),
    ("CLI", {"cli", "__main__"}),
]
RANK = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """``ckptlab.ops.stream`` -> ``ops``; ``ckptlab`` -> ``""`` (the package root: the public API)."""
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else ""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """``(line, imported module, names)`` for every absolute ``ckptlab`` import, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "ckptlab":
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ckptlab":
                    yield node.lineno, alias.name, []


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(_module_name(p)) for p in _sources()}
    assert parts - set(RANK) == set(), "place new modules in LAYERS"


def test_no_relative_imports():
    rel = [f"{p.relative_to(SRC)}:{n.lineno}" for p in _sources() for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.ImportFrom) and n.level]
    assert rel == []


def test_imports_point_down():
    upward = []
    for path in _sources():
        mod = _module_name(path)
        here = RANK[_part(mod)]
        for line, target, names in _imports(path):
            targets = [target]
            if target == "ckptlab" or target.count(".") == 1 and (PKG / target.split(".")[1]).is_dir():
                # ``from ckptlab import hashes`` / ``from ckptlab.library import catalog``: the names may be modules
                targets = [f"{target}.{n}" for n in names if (PKG.joinpath(*target.split(".")[1:], n)).exists()
                           or (PKG.joinpath(*target.split(".")[1:], n + ".py")).exists()] or [target]
            for t in targets:
                there = RANK.get(_part(t))
                if there is not None and there > here:
                    upward.append(f"{path.relative_to(SRC)}:{line} ({LAYERS[here][0]}) imports {t} "
                                  f"({LAYERS[there][0]})")
    assert upward == []


def test_no_module_imports_another_modules_private_names():
    private = []
    for path in _sources():
        mod = _module_name(path)
        for line, target, names in _imports(path):
            if target == mod:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    private.append(f"{path.relative_to(SRC)}:{line} imports {n} from {target}")
    assert private == []
