"""How values reach a person's eyes: one size formatter (IEC units), one way to make untrusted
text (file names, metadata, server answers) safe for a terminal, and one cap on message length.

Anything that came from a file or a server may hold terminal escapes (``ESC [ 2 J``), carriage
returns that overwrite a line, or Unicode bidi overrides that reorder what is read. ``printable``
renders each such character visibly (``\\x1b``, ``\\u202e``) so what is printed is what is there."""

from __future__ import annotations

import json
import unicodedata

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

#: Error and warning lines are capped so a hostile value cannot print megabytes.
MAX_LINE_CHARS = 1000

# Unicode format characters that reorder or hide text (bidi embeddings/overrides/isolates, zero-width
# joiners are harmless and kept); category "Cf" covers them all, and we escape every Cf except ZWJ/ZWNJ.
_KEEP_CF = {"\u200c", "\u200d"}


def human_size(n: int | float | None, *, precision: int = 1) -> str:
    """``n`` bytes in IEC units: ``512 B``, ``1.5 KiB``, ``6.46 GiB`` (``precision`` decimals above bytes).
    Negative values keep their sign; ``None`` is the empty string."""
    if n is None:
        return ""
    sign = "-" if n < 0 else ""
    x = float(abs(n))
    for unit in _UNITS:
        if x < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(x)} B"
            return f"{sign}{x:.{precision}f} {unit}"
        x /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _escape_char(ch: str) -> str:
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def is_unsafe_char(ch: str) -> bool:
    """Control characters (C0, DEL, C1) and invisible format characters such as bidi overrides."""
    o = ord(ch)
    if o < 0x20 or 0x7F <= o < 0xA0:
        return True
    if o < 0x200B:
        return False
    cat = unicodedata.category(ch)
    return (cat == "Cf" and ch not in _KEEP_CF) or cat in ("Zl", "Zp")


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control or bidi character rendered as a visible escape (``\\x1b``,
    ``\\u202e``). Backslashes are kept as they are: the goal is a terminal that shows, not a round trip."""
    s = text if isinstance(text, str) else str(text)
    if not any(is_unsafe_char(c) for c in s):
        return s
    return "".join(c if (keep_newlines and c == "\n") or not is_unsafe_char(c) else _escape_char(c) for c in s)


def strip_unsafe(text: str) -> str:
    """``text`` without control or bidi characters (for names that become files on disk)."""
    return "".join(c for c in text if not is_unsafe_char(c))


def short_text(value: object, limit: int = 200, *, indent: int | None = None, empty: str | None = None) -> str | None:
    """An untrusted value (a name from a record, a sidecar, a header: a list or a number where a string belongs)
    as display text: a string as it is, anything else as JSON (``indent`` for structures), cut to ``limit``
    characters with the number left out (``cap``); ``empty`` for None or the empty string. The one helper for
    this (index, model, safety and lineage pages); escaping for HTML or a terminal is the caller's."""
    if value is None or value == "":
        return empty
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, indent=indent, default=str)
        except (ValueError, TypeError, RecursionError):
            text = repr(value)
    return cap(text, limit)


def cap(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    return f"{text[:limit]}… [{cut} more characters]"


def cap_total(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` cut so that the result, the "… [N more characters]" note included, has at most ``limit``
    characters (``cap`` keeps ``limit`` characters and then adds the note)."""
    if len(text) <= limit:
        return text
    keep = limit
    for _ in range(4):  # the note's length depends on N, which depends on how much is kept
        note = f"… [{len(text) - keep} more characters]"
        if keep + len(note) <= limit:
            return text[:keep] + note
        keep = max(0, limit - len(note))
    return text[:limit]  # a limit shorter than the note itself


def whole_line(prefix: str, text: object, limit: int = MAX_LINE_CHARS) -> str:
    """``prefix`` + ``text`` as one printable line of at most ``limit`` characters in total."""
    return cap_total(printable(prefix + (text if isinstance(text, str) else str(text))), limit)


def one_line(text: object, limit: int = MAX_LINE_CHARS) -> str:
    """A message safe to print as one line: control characters made visible, newlines included, capped."""
    return cap(printable(text), limit)
