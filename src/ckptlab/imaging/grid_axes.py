"""The axes of ``ckptlab grid``: ``--x AXIS=V1,V2,...`` parsed the way A1111's X/Y/Z plot reads its values.

Values are a CSV list (quotes allowed, ``"a, b"`` is one value); numeric axes also take A1111's ranges:
``1-5`` (1,2,3,4,5), ``1-5 (+2)`` (1,3,5), ``10-5 (-3)`` (10,7), ``1-10 [5]`` (5 values evenly spaced, integers
truncated as A1111's ``np.linspace(...).astype(int)``), and the same with decimals for float axes
(``0-1 [5]``, ``0.25-1 (+0.25)``; float results rounded to 10 decimals so ``0.1`` steps read as written).
Nothing here imports torch or Pillow.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field

from ckptlab.errors import UsageError

#: axis name -> (value type, cost, label, help). Cost orders the loops: the costliest axis is iterated
#: outermost so each model / merge / VAE loads once (A1111's ``AxisOption.cost``).
AXES: dict[str, tuple[str, float, str, str]] = {
    "model": ("text", 3.0, "Model", "model files or catalog hashes"),
    "merge": ("float", 2.0, "Merge", "a parameter of the --merge recipe: merge:alpha=0,0.5,1 (or alpha=...)"),
    "vae": ("text", 1.0, "VAE", "VAE files (none: the model's own)"),
    "lora": ("float", 0.5, "LoRA", "strength of every --lora (lora:NAME=... for one)"),
    "seed": ("int", 0.0, "Seed", "seeds (-1: random)"),
    "steps": ("int", 0.0, "Steps", "sampling steps"),
    "cfg": ("float", 0.0, "CFG", "CFG scale"),
    "sampler": ("text", 0.0, "Sampler", "A1111 sampler names"),
    "schedule": ("text", 0.0, "Schedule", "schedule types"),
    "clip-skip": ("int", 0.0, "Clip skip", "A1111's Clip skip"),
    "size": ("text", 0.0, "Size", "WIDTHxHEIGHT"),
    "prompt": ("text", 0.0, "Prompt S/R", "search/replace: the first value is replaced by each value"),
}
ALIASES = {"checkpoint": "model", "cfg-scale": "cfg", "clip_skip": "clip-skip", "clipskip": "clip-skip",
           "prompt-sr": "prompt", "prompt_sr": "prompt", "scheduler": "schedule", "schedule-type": "schedule"}
MAX_VALUES = 1000

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
RE_RANGE = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]\s*\d+)\s*\))?\s*")
RE_RANGE_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*")
RE_RANGE_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*([+-]\s*(?:\d+(?:\.\d*)?|\.\d+))\s*\))?\s*")
RE_RANGE_COUNT_FLOAT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[\s*(\d+)\s*\]\s*")


@dataclass
class Axis:
    """One axis: its kind (a key of ``AXES``), the parameter it names (``lora:NAME``'s NAME, ``merge:alpha``'s
    alpha), its values (typed) and how each value is labelled."""

    kind: str
    values: list
    param: str | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def cost(self) -> float:
        return AXES[self.kind][1]

    @property
    def title(self) -> str:
        base = AXES[self.kind][2]
        if self.kind == "merge":
            return str(self.param)
        if self.kind == "lora" and self.param:
            return f"LoRA {self.param}"
        return base

    def label(self, i: int) -> str:
        if self.kind == "prompt":
            return self.texts[i]
        return f"{self.title}: {self.texts[i]}"


def usage_axes() -> str:
    return ", ".join(AXES)


def split_values(text: str, where: str) -> list[str]:
    """A1111's value list: CSV with quotes, blanks dropped; empty -> ``UsageError``."""
    try:
        rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    except csv.Error as e:
        raise UsageError(f"{where}: cannot read the values ({e})") from None
    vals = [v.strip() for row in rows for v in row if v.strip()]
    if not vals:
        raise UsageError(f"{where}: no values (write AXIS=V1,V2,...)")
    return vals


def _num(text: str, kind: str):
    return int(text.replace(" ", "")) if kind == "int" else float(text.replace(" ", ""))


def _rounded(x: float) -> float:
    r = round(float(x), 10)
    return 0.0 if r == 0 else r


def expand_ints(vals: list[str], where: str) -> list[int]:
    """Integers and A1111 integer ranges (``1-5``, ``1-5 (+2)``, ``10-5 (-3)``, ``1-10 [5]``)."""
    out: list[int] = []
    for v in vals:
        m = RE_RANGE.fullmatch(v)
        mc = RE_RANGE_COUNT.fullmatch(v)
        if m:
            start, end = _num(m.group(1), "int"), _num(m.group(2), "int")
            step = _num(m.group(3), "int") if m.group(3) else 1
            if step == 0:
                raise UsageError(f"{where}: {v!r}: the step cannot be 0")
            stop = end + 1 if step > 0 else end - 1
            got = list(range(start, stop, step))
            if not got:
                raise UsageError(f"{where}: {v!r} is an empty range (a step of the wrong sign?)")
            out.extend(got)
        elif mc:
            start, end, n = _num(mc.group(1), "int"), _num(mc.group(2), "int"), int(mc.group(3))
            out.extend(int(x) for x in _linspace(start, end, n, v, where))
        else:
            try:
                out.append(_num(v, "int"))
            except ValueError:
                raise UsageError(f"{where}: {v!r} is not a whole number or a range like 1-5, 1-5 (+2), "
                                 "1-10 [5]") from None
        _check_len(out, where)
    return out


def expand_floats(vals: list[str], where: str) -> list[float]:
    """Numbers and A1111 float ranges (``0-1 (+0.25)``, ``1-0 (-0.5)``, ``0-1 [5]``)."""
    out: list[float] = []
    for v in vals:
        m = RE_RANGE_FLOAT.fullmatch(v)
        mc = RE_RANGE_COUNT_FLOAT.fullmatch(v)
        if mc:
            start, end, n = _num(mc.group(1), "float"), _num(mc.group(2), "float"), int(mc.group(3))
            out.extend(_rounded(x) for x in _linspace(start, end, n, v, where))
        elif m and m.group(3) is None and _plain_number(v):
            out.append(_num(v, "float"))
        elif m:
            start, end = _num(m.group(1), "float"), _num(m.group(2), "float")
            step = _num(m.group(3), "float") if m.group(3) else 1.0
            if step == 0:
                raise UsageError(f"{where}: {v!r}: the step cannot be 0")
            # A1111: np.arange(start, end + step, step); the end counts when it is reached (within rounding)
            n = math.floor((end - start) / step + 1e-9) + 1
            if n <= 0:
                raise UsageError(f"{where}: {v!r} is an empty range (a step of the wrong sign?)")
            if n > MAX_VALUES:
                raise UsageError(f"{where}: {v!r} makes {n} values (at most {MAX_VALUES})")
            out.extend(_rounded(start + i * step) for i in range(n))
        else:
            try:
                x = float(v)
            except ValueError:
                raise UsageError(f"{where}: {v!r} is not a number or a range like 0-1 (+0.25), 0-1 [5]") from None
            out.append(x)
        if any(not math.isfinite(x) for x in out):
            raise UsageError(f"{where}: {v!r}: values must be finite numbers")
        _check_len(out, where)
    return out


def _plain_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _linspace(start: float, end: float, n: int, v: str, where: str) -> list[float]:
    if n < 1:
        raise UsageError(f"{where}: {v!r}: the count in [N] must be at least 1")
    if n > MAX_VALUES:
        raise UsageError(f"{where}: {v!r} makes {n} values (at most {MAX_VALUES})")
    if n == 1:
        return [float(start)]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def _check_len(out: list, where: str) -> None:
    if len(out) > MAX_VALUES:
        raise UsageError(f"{where}: more than {MAX_VALUES} values")


def _fmt(x) -> str:
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else repr(x)
    return str(x)


def parse_axis(text: str, flag: str = "--x", *, merge_params: tuple[str, ...] = ()) -> Axis:
    """``AXIS=V1,V2,...`` -> ``Axis``. ``AXIS``: a name of ``AXES``, ``lora:NAME``, ``merge:PARAM`` (or
    ``merge:STEP.PARAM``), or a bare parameter name of the --merge recipe (``merge_params``, e.g. ``alpha``)."""
    name, sep, vals = str(text).partition("=")
    name = name.strip()
    where = f"{flag} {text}"
    if not sep or not name:
        raise UsageError(f"{flag} {text!r}: write AXIS=V1,V2,... (axes: {usage_axes()})")
    kind, _, param = name.partition(":")
    kind = ALIASES.get(kind.lower(), kind.lower())
    if not _ and kind not in AXES and name in merge_params:
        kind, param = "merge", name
    if kind not in AXES:
        hint = f"; merge parameters: {', '.join(merge_params)}" if merge_params else ""
        raise UsageError(f"{flag}: unknown axis {name!r} (axes: {usage_axes()}, lora:NAME, merge:PARAM{hint})")
    if param and kind not in ("lora", "merge"):
        raise UsageError(f"{flag}: the {kind} axis takes no :NAME (only lora:NAME and merge:PARAM do)")
    if kind == "merge" and not param:
        raise UsageError(f"{flag} {text!r}: name the swept parameter of the --merge recipe, e.g. merge:alpha=0,0.5,1")
    raw = split_values(vals, where)
    typ = AXES[kind][0]
    if typ == "int":
        values: list = expand_ints(raw, where)
    elif typ == "float":
        values = expand_floats(raw, where)
    else:
        values = list(raw)
    if kind == "prompt" and len(values) < 1:
        raise UsageError(f"{where}: give the text to search for, then its replacements")
    return Axis(kind, values, param or None, [_fmt(v) for v in values])
