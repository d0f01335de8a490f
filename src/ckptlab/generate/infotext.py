"""A1111's "parameters" infotext: written exactly as A1111 1.10 writes it, read back without losing quoted values.

Layout: the prompt (may hold newlines), a ``Negative prompt:`` line when there is one, then one line of
``Key: value`` pairs joined with ``", "`` in A1111's order. A value holding ``,`` ``:`` or a newline is written as
a JSON string (``infotext_utils.quote``). Our reader parses JSON strings, and the ``{...}``/``[...]`` values that
CivitAI and its helpers add (``Hashes: {...}``, ``Civitai resources: [...]``) as JSON, where common parsers split on
``,`` and lose them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

#: A1111's order of the generation parameters (``processing.create_infotext``), ours a subset
ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
         "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
         "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight",
         "Clip skip", "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling")
#: written after the extra parameters (``Lora hashes``, ``TI hashes``, ``Refiner``...)
LAST = ("Version", "User")
#: keys a parameter line holds (sd-parsers' test: at least 3 of them)
_MARKERS = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Schedule type", "ENSD")
_KEY = re.compile(r"\s*(\w[\w \-/+.()]*?):\s*")


def quote(text) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quoted when the text holds ``,`` newline or ``:``."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def format_infotext(prompt: str, negative: str, params: dict) -> str:
    """The infotext of one image. ``params``: generation parameters by A1111 name (``None`` values dropped; a
    value equal to its key written bare, as A1111 writes flags); known keys go in A1111's order, the rest after
    them in the given order, ``Version`` last."""
    known = [k for k in ORDER if k in params]
    extra = [k for k in params if k not in ORDER and k not in LAST]
    last = [k for k in LAST if k in params]
    parts = []
    for k in known + extra + last:
        v = params[k]
        if v is None:
            continue
        parts.append(k if v == k else f"{k}: {quote(_fmt(v))}")
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_line}\n{', '.join(parts)}".strip()


@dataclass
class Infotext:
    """A parsed infotext: prompt, negative prompt and parameters (values as written, JSON strings unquoted;
    ``{...}``/``[...]`` values parsed as JSON where they are valid JSON)."""

    prompt: str = ""
    negative: str = ""
    params: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(self.params.get("Size", "")))
        return (int(m[1]), int(m[2])) if m else None


def _value_end(line: str, i: int) -> int:
    """Index just past the value starting at ``i``: a JSON string, a balanced ``{}``/``[]`` (strings inside
    respected), else up to the next ``,``."""
    if i < len(line) and line[i] == '"':
        j = i + 1
        while j < len(line):
            if line[j] == "\\":
                j += 2
                continue
            if line[j] == '"':
                return j + 1
            j += 1
        return len(line)
    if i < len(line) and line[i] in "{[":
        depth, j, in_str = 0, i, False
        while j < len(line):
            c = line[j]
            if in_str:
                if c == "\\":
                    j += 1
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return len(line)
    j = line.find(",", i)
    return len(line) if j < 0 else j


def parse_params(line: str) -> dict:
    """``Key: value, Key: value, ...`` -> dict; a bare word (a flag) maps to itself."""
    out: dict = {}
    i = 0
    while i < len(line):
        m = _KEY.match(line, i)
        if not m:
            j = line.find(",", i)
            j = len(line) if j < 0 else j
            word = line[i:j].strip()
            if word:
                out[word] = word
            i = j + 1
            continue
        key, start = m.group(1).strip(), m.end()
        end = _value_end(line, start)
        raw = line[start:end].strip()
        value: object = raw
        if raw.startswith('"'):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw.strip('"')
        elif raw.startswith(("{", "[")):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        out[key] = value
        i = end
        while i < len(line) and line[i] in ", ":
            i += 1
    return out


def _is_param_line(line: str) -> bool:
    return sum(1 for k in _MARKERS if re.search(rf"(^|, ){re.escape(k)}: ", line)) >= 3


def parse_infotext(text: str) -> Infotext:
    """Parse A1111/Forge infotext (any line endings). The parameter line is the last line holding at least
    three of Steps/Sampler/CFG scale/Seed/Size/Schedule type/ENSD; lines before it are the prompt up to the
    ``Negative prompt:`` line. Text without a parameter line is all prompt."""
    lines = str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    params: dict = {}
    for idx in range(len(lines) - 1, -1, -1):
        if _is_param_line(lines[idx]):
            params = parse_params(lines[idx])
            lines = lines[:idx]
            break
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for ln in lines:
        if ln.startswith("Negative prompt:"):
            target = negative_lines
            ln = ln[len("Negative prompt:"):].lstrip()
        target.append(ln)
    return Infotext("\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), params)


def split_hashes(value) -> dict[str, str]:
    """``"name: hash, name: hash"`` (``Lora hashes``/``TI hashes``) -> ``{name: hash}``."""
    out: dict[str, str] = {}
    for part in str(value or "").split(","):
        name, sep, h = part.rpartition(":")
        if sep and name.strip() and h.strip():
            out[name.strip()] = h.strip()
    return out


def join_hashes(pairs: dict[str, str]) -> str:
    """``{name: hash}`` -> ``"name: hash, name: hash"`` (``:`` and ``,`` dropped from names, as A1111 does)."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in pairs.items())
