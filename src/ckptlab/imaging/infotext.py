"""A1111's "parameters" infotext: written exactly as A1111 1.10 writes it, read back without losing quoted values.

Layout (``processing.create_infotext``): the prompt (may hold newlines), a ``Negative prompt:`` line when there is
one (may continue over more lines), then ONE line of ``Key: value`` pairs joined with ``", "`` in A1111's order. A
value holding ``,`` ``:`` or a newline is written as a JSON string (``infotext_utils.quote``); a value equal to its
key is written bare (a flag); ``None`` values are left out.

Reading follows A1111's ``parse_generation_parameters``: the LAST line is the parameter line when A1111's own
``re_param`` finds at least three ``Key: value`` pairs in it (so a prompt line that happens to say ``Steps: 3,
Seed: 4, Size: 5`` stays prompt unless it is the last line), the lines before it are the prompt up to the line that
starts with ``Negative prompt:``, each line stripped as A1111 strips it. On top of A1111:

- ``{...}``/``[...]`` values (``Hashes: {...}``, ``Civitai resources: [...]``, ``Civitai metadata: {...}``) are read
  whole, with balanced brackets and strings respected, and decoded as JSON (depth-limited);
- bare words (flags) are kept, mapped to themselves;
- one-line texts (``prompt Negative prompt: ... Steps: 20, ...`` on one line, written by some tools and older
  builds) are split at the last ``Steps:`` whose tail is a parameter list, as CivitAI's reader does;
- ``\\r\\n`` and ``\\r`` line ends are read as ``\\n``.

Common parsers split the parameter line on ``,`` and lose every quoted value (sd-parsers, sd-prompt-reader); this
reader never does.
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

#: A1111's own parameter regex (``infotext_utils.re_param_code``): used to decide which line holds the parameters,
#: exactly as A1111 decides it
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
#: a key as we read it: A1111's key characters plus ``+ . ( ) '`` that extensions use ("Hires CFG Scale (hr)")
_KEY = re.compile(r"\s*(\w[\w \-/+.()']*?):\s*")
#: an extra-network tag in a prompt (A1111's ``extra_networks.re_extra_net``)
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
#: the longest text parsed (a hostile file's megabytes of infotext are cut here, not parsed slowly)
MAX_TEXT = 1 << 20


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
class ExtraNetwork:
    """One ``<kind:name[:weight[:...]]>`` tag of a prompt (``lora``, ``lyco``, ``hypernet``...)."""

    kind: str
    name: str
    weight: float | None
    text: str


@dataclass
class Infotext:
    """A parsed infotext: prompt, negative prompt and parameters (values as written, JSON strings unquoted;
    ``{...}``/``[...]`` values decoded as JSON where they are valid JSON; flags map to themselves)."""

    prompt: str = ""
    negative: str = ""
    params: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(self.params.get("Size", "")))
        return (int(m[1]), int(m[2])) if m else None

    @property
    def flags(self) -> list[str]:
        return [k for k, v in self.params.items() if v == k]

    def extra_networks(self) -> list[ExtraNetwork]:
        """The ``<lora:name:w>`` (and ``<lyco:...>``, ``<hypernet:...>``) tags of the prompt, as A1111 reads
        them: the name is the first ``:``-separated argument, the weight the second (1 when absent)."""
        return extra_networks(self.prompt)


def extra_networks(prompt: str) -> list[ExtraNetwork]:
    """Extra-network tags in ``prompt`` (A1111's ``re_extra_net``; ``<lora:name>`` means weight 1)."""
    out = []
    for m in RE_EXTRA_NET.finditer(str(prompt)[:MAX_TEXT]):
        args = m[2].split(":")
        w: float | None = 1.0
        if len(args) > 1:
            try:
                w = float(args[1])
            except ValueError:
                w = None
        out.append(ExtraNetwork(m[1].lower(), args[0].strip(), w, m[0]))
    return out


def _string_end(line: str, i: int) -> int:
    """Index just past the JSON string starting at ``line[i] == '"'`` (the line's end when it never closes)."""
    j = i + 1
    while j < len(line):
        c = line[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return len(line)


def _bracket_end(line: str, i: int) -> int:
    """Index just past the balanced ``{...}``/``[...]`` starting at ``i`` (strings inside respected)."""
    depth, j = 0, i
    while j < len(line):
        c = line[j]
        if c == '"':
            j = _string_end(line, j)
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(line)


def _at_separator(line: str, j: int) -> bool:
    """Whether only spaces stand between ``j`` and the next ``,`` or the end of the line."""
    while j < len(line) and line[j] in " \t":
        j += 1
    return j >= len(line) or line[j] == ","


def _plain_end(line: str, i: int) -> int:
    j = line.find(",", i)
    return len(line) if j < 0 else j


def _value(line: str, start: int, budget: list[int]) -> tuple[object, int]:
    """The value starting at ``start`` and the index just past it: a JSON string (A1111's quote), a JSON
    object/array, else the text up to the next ``,`` (as A1111's ``[^,]*``). ``budget``: characters the
    ``{...}``/``[...]`` scans may still read on this line; a hostile line of unclosed brackets, each scanned to the
    end, would otherwise take quadratic time (then the rest are read as plain values)."""
    from ckptlab.jsonable import loads_limited

    bracket = start < len(line) and line[start] in "{[" and budget[0] > 0
    if start < len(line) and (line[start] == '"' or bracket):
        end = _string_end(line, start) if line[start] == '"' else _bracket_end(line, start)
        if bracket:
            budget[0] -= end - start
        if _at_separator(line, end):
            raw = line[start:end]
            try:
                return loads_limited(raw), end
            except ValueError:
                if line[start] == '"' and raw.endswith('"') and len(raw) >= 2:  # not JSON, but quoted
                    return raw[1:-1], end
    end = _plain_end(line, start)
    return line[start:end].strip(), end


def parse_params(line: str) -> dict:
    """``Key: value, Key: value, ...`` -> dict; a bare word (a flag) maps to itself. Later keys replace earlier
    ones, as in A1111."""
    out: dict = {}
    i, n = 0, len(line)
    budget = [4 * n + (1 << 16)]
    while i < n:
        while i < n and line[i] in ", \t":
            i += 1
        if i >= n:
            break
        m = _KEY.match(line, i)
        if m and (m.end(1) >= len(line) or line[m.end(1)] == ":"):
            value, end = _value(line, m.end(), budget)
            out[m[1].strip()] = value
            i = end
            continue
        end = _plain_end(line, i)  # no key: a flag word, or text no reader can tie to a key (skipped)
        word = line[i:end].strip()
        if word and ":" not in word:
            out[word] = word
        i = end
    return out


_RUN = re.compile(r"[\w \-/]+")  # the character class of RE_PARAM's key
_WORD = re.compile(r"\w")
_SPACE = re.compile(r"\s*")


def a1111_params(line: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``RE_PARAM.findall(line)`` (A1111's own reading of a parameter line), computed in linear time: the regex
    itself retries its key at every position of a long run of word characters without a colon, which takes
    minutes on a hostile megabyte (and A1111 runs it on every last line). ``limit``: stop after that many pairs.

    Why this is the same: a key is ``\\w[\\w \\-/]+`` then ``:``; ``:`` is not in that class, so a match's key
    always runs to the end of a maximal class run that a ``:`` follows, and starts at the run's first word
    character at or after the search position (a key needs 2 characters). The value is a JSON-ish quoted string
    when one closes right before ``,`` or the end, else everything up to the next ``,``. The tests compare this
    with the regex on random and hostile lines."""
    out: list[tuple[str, str]] = []
    n, pos = len(line), 0
    for run in _RUN.finditer(line):
        start, end = run.span()
        if end <= pos or end >= n or line[end] != ":":
            continue
        w = _WORD.search(line, max(start, pos), end)
        if w is None or w.start() > end - 2:
            continue
        v = _SPACE.match(line, end + 1).end()
        value, stop = None, -1
        if v < n and line[v] == '"':
            j = v + 1
            while j < n and line[j] != '"':
                if line[j] == "\\":
                    if j + 1 >= n:
                        break
                    j += 2
                else:
                    j += 1
            if j < n and line[j] == '"' and j > v + 1 and (j + 1 == n or line[j + 1] == ","):
                value, stop = line[v:j + 1], j + 1
        if value is None:
            c = line.find(",", v)
            stop = n if c < 0 else c
            value = line[v:stop]
        out.append((line[w.start():end], value))
        pos = stop + 1 if stop < n else n
        if limit is not None and len(out) >= limit:
            break
    return out


def _is_param_line(line: str) -> bool:
    return len(a1111_params(line, limit=3)) >= 3


def _split_one_line(line: str) -> tuple[str, str] | None:
    """A one-line text (``prompt ... Steps: 20, Sampler: ...``): (text before, parameter tail) split at the last
    ``Steps: <n>`` whose tail is a parameter list, or None."""
    for m in list(re.finditer(r"(?<!,)\s(Steps: \d)", line))[-8:][::-1]:  # the last few: bounded work
        tail = line[m.start(1):]
        if _is_param_line(tail):
            return line[:m.start(1)].rstrip(" ,"), tail
    return None


def parse_infotext(text: str) -> Infotext:
    """Parse A1111/Forge infotext (any line endings), as A1111's ``parse_generation_parameters`` reads it (see
    the module's notes for what we read beyond it). Text without a parameter line is all prompt."""
    text = str(text)[:MAX_TEXT].replace("\r\n", "\n").replace("\r", "\n").strip()
    *lines, last = text.split("\n")
    params: dict = {}
    split = _split_one_line(last) if not lines and not re.match(r"\s*Steps: ", last) else None
    if split is None and _is_param_line(last):
        params = parse_params(last)
    else:
        if split is not None:
            before, tail = split
            params = parse_params(tail)
            if not lines and "Negative prompt:" in before and not before.startswith("Negative prompt:"):
                head, _, neg = before.partition("Negative prompt:")  # "prompt Negative prompt: negative Steps:.."
                lines += [head, "Negative prompt:" + neg]
            elif before:
                lines.append(before)
        else:
            lines.append(last)
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for ln in lines:
        ln = ln.strip()
        if ln.startswith("Negative prompt:"):  # A1111 strips the label from every such line
            target = negative_lines
            ln = ln[len("Negative prompt:"):].strip()
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
