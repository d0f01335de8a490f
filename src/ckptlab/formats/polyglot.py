"""Polyglots: a safetensors or GGUF file whose bytes also read as a pickle that ``torch.load`` would run.

Shared by ``open_model`` (which refuses such a file) and ``check`` (which rates it malicious), so the two can
never disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptlab.formats.pickle_vm import MALICIOUS, Finding

_IMPORTABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def polyglot_findings(p: Path) -> list[Finding]:
    """What ``torch.load`` would run in a file that is not a zip: it reads it as a pickle from byte 0
    (after a tar attempt), whatever its name or its safetensors header. Returns ``malicious`` findings for
    the dangerous globals that reading imports (names that could really be imported: a safetensors
    header read as opcodes breaks within a few bytes, and random tensor bytes never spell an import)."""
    from ckptlab.formats import pickle_symbols as sym
    from ckptlab.formats.pickle_archive import scan

    s = scan(p, writable=False)
    try:
        bad = sorted(q for q, cat in s.globals.items() if cat == sym.DANGEROUS and _IMPORTABLE.fullmatch(q))
        if not bad:
            return []
        detail = next((f.detail for f in s.findings if f.kind == "global_dangerous"), ", ".join(bad[:3]))
        return [Finding("polyglot", MALICIOUS, "the file is also a pickle (torch.load reads it from byte 0) that "
                        f"imports {', '.join(bad[:3])}: {detail}", f"{p.name}(as a pickle)")]
    finally:
        s.root = None
        s.close()
