"""A data-only pickle machine: it reads the opcodes of a pickle stream and builds plain values.

It never imports, resolves or calls anything named by the file. Globals become ``Global``
symbols (classified in ``pickle_symbols``); only a handful of allowlisted symbols are *evaluated*
by functions of our own (tensor rebuilds, OrderedDict, ``_codecs.encode``...). Every other call
becomes an inert ``Call`` record. Opcodes are read exactly as CPython's C unpickler reads them
(frames are only a prefetch hint there), and every FRAME boundary an opcode crosses is reported:
that is the parser-differential trick used to hide payloads from Python-level scanners.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from ckptlab.formats import pickle_symbols as sym

# severities, most serious first
MALICIOUS, SUSPICIOUS, CORRUPT, INFO = "malicious", "suspicious", "corrupt", "info"

MAX_OPS = 50_000_000
MAX_MEMO = 5_000_000  # stored entries (indexes may be sparse and large, as in CPython's memo array)
MAX_STACK = 5_000_000
MAX_MARKS = 5_000_000
MAX_STRING = 512 * 1024 * 1024
MAX_LONG_BYTES = MAX_STRING  # CPython reads a LONG4 of any length the stream holds
MAX_NESTED_DEPTH = 32  # _load_from_bytes payloads inside payloads; deeper ones are refused, never skipped
BYTES_BY_REF = 1024 * 1024  # bytes operands at least this long are kept as references into the buffer


@dataclass
class Finding:
    kind: str
    severity: str
    detail: str
    location: str = ""


@dataclass(eq=False)
class Global:
    module: Any
    name: Any
    category: str
    reason: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return f"<global {self.qualname}>"


@dataclass(eq=False)
class Call:
    """An inert record of ``func(*args)``: nothing was called."""

    func: Any
    args: Any
    state: Any = None
    items: list = field(default_factory=list)

    @property
    def qualname(self) -> str:
        return self.func.qualname if isinstance(self.func, Global) else "<dynamic>"


@dataclass(eq=False)
class BytesRef:
    """A long bytes operand, kept as a range of the stream's buffer (no copy)."""

    buf: Any
    start: int
    length: int

    def view(self):
        return self.buf[self.start:self.start + self.length]


@dataclass(eq=False)
class DtypeTag:
    dtype: str | None  # safetensors name
    name: str


@dataclass(eq=False)
class StorageRef:
    """A storage named by a persistent id; the container binds it to bytes after parsing."""

    key: str
    dtype: str | None  # safetensors name, None when ckptlab cannot represent it
    storage_type: str
    numel: int
    #: set by the container: ("file", offset, crc32) | ("view", memoryview, offset) | ("deflate", ZipEntry)
    backing: Any = None
    byteswap: bool = False
    valid: bool = True


@dataclass(eq=False)
class TensorRef:
    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ----------------------------------------------------------------------------------------------
# Text operands, parsed as Modules/_pickle.c parses them (not as Lib/pickle.py does: the two differ,
# and torch.load runs the C unpickler). A text line there is a NUL-terminated copy that keeps its
# newline, so an operand ends at its first NUL byte for the C number parsers.

_SPACE = b" \t\n\v\f\r"
_FLOAT_RE = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INF_NAN_RE = re.compile(rb"[+-]?(?:inf(?:inity)?|nan)", re.IGNORECASE)


_DECIMAL_RE = re.compile(rb"[ \t\n\v\f\r]*[+-]?(?:0(?:_?0)*|[1-9](?:_?[0-9])*)[ \t\n\v\f\r]*")


@dataclass(eq=False)
class BigNumber:
    """A decimal integer longer than this interpreter converts (``sys.get_int_max_str_digits``): CPython
    reads it where that limit is lifted (``PYTHONINTMAXSTRDIGITS=0``), so it is read, not refused."""

    digits: int


def _base0(s: bytes):
    try:
        return int(s, 0)
    except ValueError:
        if _DECIMAL_RE.fullmatch(s):
            return BigNumber(sum(c in b"0123456789" for c in s))
        raise


def _cstr(line: bytes) -> bytes:
    """``line`` (newline included) as the C parsers see it: up to its first NUL."""
    i = line.find(b"\0")
    return line if i < 0 else line[:i]


def _strtol(s: bytes) -> tuple[int, int]:
    """glibc ``strtol(s, &end, 0)`` over the C string ``s``: (value, end index); end 0 = no digits.
    Overflow is not clamped (the caller falls back to PyLong_FromString, which gives the same value)."""
    i, n = 0, len(s)
    while i < n and s[i:i + 1] in _SPACE:
        i += 1
    neg = False
    if i < n and s[i:i + 1] in b"+-":
        neg = s[i:i + 1] == b"-"
        i += 1
    base, digits = 10, b"0123456789"
    if s[i:i + 1] == b"0":
        if s[i + 1:i + 2] in (b"x", b"X") and s[i + 2:i + 3] and s[i + 2:i + 3] in b"0123456789abcdefABCDEF":
            base, digits, i = 16, b"0123456789abcdefABCDEF", i + 2
        elif s[i + 1:i + 2] in (b"b", b"B") and s[i + 2:i + 3] in (b"0", b"1"):
            base, digits, i = 2, b"01", i + 2  # C23 strtol (glibc >= 2.38 with _GNU_SOURCE, as CPython builds)
        else:
            base, digits = 8, b"01234567"
    j = i
    while j < n and s[j:j + 1] in digits:
        j += 1
    if j == i:
        return 0, 0
    v = int(s[i:j], base)
    return (-v if neg else v), j


def parse_int_operand(line: bytes):
    """The INT opcode's operand (``line`` without its newline) as ``load_int`` reads it: strtol base 0,
    else PyLong_FromString base 0; ``00``/``01`` (any two characters that strtol reads as 0 or 1) are
    False/True. Raises ValueError where CPython raises."""
    if not line:
        raise ValueError("empty INT operand")
    s = _cstr(line + b"\n")
    try:
        x, end = _strtol(s)
    except ValueError:
        x, end = 0, 0
    if end and (end == len(s) or s[end:end + 1] == b"\n") and -(1 << 63) <= x < (1 << 63):
        if len(line) == 2 and x in (0, 1):
            return bool(x)
        return x
    return _base0(s)  # PyLong_FromString(s, NULL, 0): whitespace, underscores, 0x/0o/0b


def parse_long_operand(line: bytes) -> int:
    """The LONG opcode's operand as ``load_long`` reads it: one trailing ``L`` dropped, base 0."""
    if not line:
        raise ValueError("empty LONG operand")
    if line.endswith(b"L"):
        line = line[:-1]
    return _base0(_cstr(line))


def parse_float_operand(line: bytes) -> float:
    """The FLOAT opcode's operand as ``load_float`` reads it (PyOS_string_to_double): no leading
    whitespace or underscores, inf/nan words, an overflow is an error, and the text must end at the
    newline or a NUL."""
    if not line:
        raise ValueError("empty FLOAT operand")
    s = _cstr(line)
    m = _FLOAT_RE.match(s)
    if m is not None:
        v = float(m.group())
        if math.isinf(v):
            raise ValueError("FLOAT operand overflows")
    else:
        m = _INF_NAN_RE.match(s)
        if m is None:
            raise ValueError("bad FLOAT operand")
        v = float(m.group())
    if m.end() != len(s):
        raise ValueError("bad FLOAT operand")
    return v


def parse_memo_operand(line: bytes) -> int:
    """GET/PUT operands: PyLong_FromString base 10 over the C string."""
    if not line:
        raise ValueError("empty memo operand")
    return int(_cstr(line), 10)


class _Broken(Exception):
    """The stream cannot be read further (what a real unpickler would raise on)."""


class _Limit(Exception):
    """A resource limit was hit."""


_MARK = object()


def _signed_int(b) -> int:
    return int.from_bytes(b, "little", signed=True)


class PickleVM:
    """Run one pickle stream from ``buf[start:]``.

    ``resolver`` handles persistent ids and nested ``_load_from_bytes`` payloads (the container
    knows what a storage key means); ``location`` prefixes every finding (zip member, file).
    After ``run()``: ``result`` (or None), ``end`` (offset after STOP), ``findings``,
    ``globals`` (qualname -> category), ``complete`` (STOP reached).
    """

    def __init__(self, buf, start: int = 0, *, location: str = "", resolver=None, depth: int = 0,
                 end: int | None = None, discard_frames: bool = False):
        self.buf = buf
        self.start = start
        #: read frames as the C unpickler does over a file object whose frame was read exactly: an
        #: operand that does not fit in the rest of the frame is read from *after* the frame
        self.discard_frames = discard_frames
        self.pos = start
        self.limit = len(buf) if end is None else end
        self.location = location
        self.resolver = resolver
        self.depth = depth
        self.findings: list[Finding] = []
        self.globals: dict[str, str] = {}
        self.result: Any = None
        self.complete = False
        self.proto = 0
        self._seen: set[tuple[str, str]] = set()

    # -- findings -----------------------------------------------------------------------------
    def note(self, kind: str, severity: str, detail: str, offset: int | None = None) -> None:
        key = (kind, detail)
        if key in self._seen:
            return
        self._seen.add(key)
        where = self.location if offset is None else f"{self.location}@{offset}"
        self.findings.append(Finding(kind, severity, detail, where))

    def symbol(self, module, name, offset: int) -> Global:
        category, reason = sym.classify(module, name)
        g = Global(module, name, category, reason)
        qn = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else repr((module, name))
        self.globals.setdefault(qn, category)
        severity = {sym.DANGEROUS: MALICIOUS, sym.UNKNOWN: SUSPICIOUS}.get(category, INFO)
        self.note(f"global_{category}", severity, f"{qn}: {reason}", offset)
        return dtype_of_global(g) or g

    # -- raw reads ----------------------------------------------------------------------------
    def _skip_frame_rest(self, n: int) -> None:
        fe = self._frame_end
        if self.discard_frames and fe is not None and self.pos < fe < self.pos + n:
            self.pos = fe
            self._frame_end = None

    def _take(self, n: int):
        self._skip_frame_rest(n)
        if n < 0 or self.pos + n > self.limit:
            raise _Broken(f"stream ends inside an operand (needs {n} bytes at offset {self.pos})")
        s = self.pos
        self.pos += n
        self._check_frame(s, self.pos)
        return self.buf[s:self.pos]

    def _find_newline(self, s: int) -> int:
        """Offset of the next newline at or after ``s`` (-1 if none), searched in growing chunks."""
        p, chunk = s, 1 << 16
        while p < self.limit:
            stop = min(self.limit, p + chunk)
            j = bytes(self.buf[p:stop]).find(b"\n")
            if j >= 0:
                return p + j
            if stop - s > MAX_STRING:
                raise _Limit(f"text operand longer than {MAX_STRING} bytes")
            p, chunk = stop, min(chunk * 2, 1 << 24)
        return -1

    def _line(self) -> bytes:
        s = self.pos
        i = self._find_newline(s)
        fe = self._frame_end
        if self.discard_frames and fe is not None and s < fe and (i < 0 or i >= fe):
            self.pos = s = fe
            self._frame_end = None
            i = self._find_newline(s)
        if i < 0:
            raise _Broken(f"text operand without newline at offset {s}")
        self.pos = i + 1
        self._check_frame(s, self.pos)
        return bytes(self.buf[s:i])

    def _u(self, n: int) -> int:
        return int.from_bytes(self._take(n), "little")

    def _check_frame(self, start: int, end: int) -> None:
        if self._frame_end is not None and start < self._frame_end < end:
            self.note("frame_violation", MALICIOUS,
                      f"an operand crosses the end of its FRAME ({self._frame_end}); scanners that honour "
                      "frames read a different stream than the unpickler", start)

    def _fits(self, n: int) -> None:
        """An operand longer than what is left of the stream is a truncation (what CPython reports), not
        a resource limit."""
        if n > self.limit - self.pos:
            raise _Broken(f"stream ends inside a {n}-byte operand")

    def _bytes_value(self, n: int):
        self._fits(n)
        if n > MAX_STRING:
            raise _Limit(f"{n}-byte operand exceeds the {MAX_STRING}-byte limit")
        if n >= BYTES_BY_REF:
            self._skip_frame_rest(n)
            if self.pos + n > self.limit:
                raise _Broken(f"stream ends inside a {n}-byte operand")
            ref = BytesRef(self.buf, self.pos, n)
            self._check_frame(self.pos, self.pos + n)
            self.pos += n
            return ref
        return bytes(self._take(n))

    def _text(self, n: int) -> str:
        self._fits(n)
        if n > MAX_STRING:
            raise _Limit(f"{n}-byte string exceeds the {MAX_STRING}-byte limit")
        try:
            return bytes(self._take(n)).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise _Broken(f"invalid UTF-8 in a string operand: {e.reason}") from None

    @staticmethod
    def _py2str(b: bytes):
        # torch.load passes encoding='utf-8' to the unpickler for Python 2 strings
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return b

    # -- stack helpers ------------------------------------------------------------------------
    # One object stack and a stack of MARK positions, as in Modules/_pickle.c: the "fence" is the
    # position of the innermost MARK; nothing below it can be popped except by the opcodes that
    # consume a MARK.
    def _fence(self) -> int:
        return self.marks[-1] if self.marks else 0

    def _pop(self):
        if len(self.stack) <= self._fence():
            raise _Broken("stack underflow")
        return self.stack.pop()

    def _top(self):
        if len(self.stack) <= self._fence():
            raise _Broken("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list:
        if not self.marks:
            raise _Broken("could not find MARK")
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def _push(self, v) -> None:
        if len(self.stack) >= MAX_STACK:
            raise _Limit("stack size limit")
        self.stack.append(v)

    def _memo_put(self, idx: int, v) -> None:
        if idx < 0:
            raise _Broken("negative memo index")
        # CPython sizes its memo array to twice the index (a 4G index asks for 64 GB and fails there);
        # a sparse dict reads every index it could store, so no index is refused here
        if idx not in self.memo and len(self.memo) >= MAX_MEMO:
            raise _Limit(f"memo exceeds {MAX_MEMO} entries")
        self.memo[idx] = v

    def _memo_get(self, idx: int):
        try:
            return self.memo[idx]
        except KeyError:
            raise _Broken(f"memo key {idx} was never stored") from None

    # -- run ----------------------------------------------------------------------------------
    def run(self) -> PickleVM:
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict = {}
        self._frame_end: int | None = None
        ops = 0
        at = self.pos
        try:
            while True:
                if self.pos >= self.limit:
                    raise _Broken("stream ends before STOP")
                ops += 1
                if ops > MAX_OPS:
                    raise _Limit(f"more than {MAX_OPS} opcodes")
                at = self.pos
                if self._frame_end is not None and at >= self._frame_end:
                    self._frame_end = None
                op = self.buf[at]
                self.pos += 1
                if self._dispatch(op, at):
                    break
            self.complete = True
        except _Broken as e:
            self.note("broken_stream", CORRUPT, f"pickle cannot be read: {e}", at)
        except _Limit as e:
            self.note("resource_limit", SUSPICIOUS, f"resource limit: {e}", at)
            self._skim_rest(at)
        except RecursionError:
            self.note("resource_limit", SUSPICIOUS, "resource limit: nesting too deep", at)
            self._skim_rest(at)
        finally:
            self.end = self.pos
            # drop the working state (it may hold many references)
            self.stack = []
            self.marks = []
            self.memo = {}
        if not self.discard_frames and any(f.kind == "frame_violation" for f in self.findings):
            # the stream reads differently from a file than from memory: report what the other reading sees
            other = PickleVM(self.buf, self.start, location=self.location + "(file-read)", depth=self.depth,
                             end=self.limit, discard_frames=True).run()
            self.findings += [f for f in other.findings if f.severity in (MALICIOUS, SUSPICIOUS)]
            for k, v in other.globals.items():
                self.globals.setdefault(k, v)
        return self

    def _skim_rest(self, at: int) -> None:
        """After a resource limit the values are lost, but the names the rest of the stream imports are
        not: list them (as pickletools would) so a payload behind the limit is still rated."""
        for off, module, name in skim_globals(self.buf, at, self.limit):
            category, reason = sym.classify(module, name)
            severity = {sym.DANGEROUS: MALICIOUS, sym.UNKNOWN: SUSPICIOUS}.get(category, INFO)
            qn = f"{module}.{name}"
            self.globals.setdefault(qn, category)
            self.note(f"global_{category}", severity, f"{qn}: {reason} (found past the resource limit)", off)

    def _dispatch(self, op: int, at: int) -> bool:  # noqa: C901 - one branch per opcode
        c = chr(op)
        push = self._push
        if c == "\x80":  # PROTO
            self.proto = self._u(1)
            if self.proto > 5:
                raise _Broken(f"unsupported pickle protocol {self.proto}")
        elif c == "\x95":  # FRAME
            n = self._u(8)
            if self._frame_end is not None and at < self._frame_end:
                self.note("frame_violation", MALICIOUS, "a FRAME starts before the previous frame ended", at)
            if self.pos + n > self.limit:
                self.note("frame_violation", MALICIOUS, f"FRAME declares {n} bytes, past the end of the stream", at)
            self._frame_end = self.pos + n
        elif c == ".":  # STOP
            self.result = self._pop()
            return True
        elif c == "(":
            if len(self.marks) >= MAX_MARKS:
                raise _Limit(f"more than {MAX_MARKS} open MARKs")
            self.marks.append(len(self.stack))
        elif c == "N":
            push(None)
        elif c == "\x88":
            push(True)
        elif c == "\x89":
            push(False)
        elif c == "I":  # INT
            push(self._num(parse_int_operand, self._line()))
        elif c == "J":
            push(_signed_int(self._take(4)))
        elif c == "K":
            push(self._u(1))
        elif c == "M":
            push(self._u(2))
        elif c == "L":  # LONG
            push(self._num(parse_long_operand, self._line()))
        elif c == "\x8a":  # LONG1
            push(_signed_int(self._take(self._u(1))))
        elif c == "\x8b":  # LONG4
            n = _signed_int(self._take(4))
            if n < 0:
                raise _Broken("LONG pickle has negative byte count")
            self._fits(n)
            if n > MAX_LONG_BYTES:
                raise _Limit(f"LONG4 of {n} bytes")
            push(_signed_int(self._take(n)))
        elif c == "F":
            push(self._num(parse_float_operand, self._line()))
        elif c == "G":
            push(struct.unpack(">d", self._take(8))[0])
        elif c == "S":  # STRING (quoted, escaped)
            line = self._line()
            if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
                raise _Broken("the STRING opcode argument must be quoted")
            import codecs

            try:
                push(self._py2str(codecs.escape_decode(line[1:-1])[0]))
            except ValueError:
                raise _Broken("bad escape in STRING operand") from None
        elif c == "T":  # BINSTRING: the C unpickler reads its length unsigned
            n = self._u(4)
            self._fits(n)
            if n > MAX_STRING:
                raise _Limit(f"{n}-byte string exceeds the {MAX_STRING}-byte limit")
            push(self._py2str(bytes(self._take(n))))
        elif c == "U":
            push(self._py2str(bytes(self._take(self._u(1)))))
        elif c == "V":  # UNICODE (raw-unicode-escape)
            try:
                push(self._line().decode("raw-unicode-escape"))
            except UnicodeDecodeError:
                raise _Broken("bad UNICODE operand") from None
        elif c == "X":
            push(self._text(self._u(4)))
        elif c == "\x8c":
            push(self._text(self._u(1)))
        elif c == "\x8d":
            push(self._text(self._u(8)))
        elif c == "B":
            push(self._bytes_value(self._u(4)))
        elif c == "C":
            push(self._bytes_value(self._u(1)))
        elif c == "\x8e":
            push(self._bytes_value(self._u(8)))
        elif c == "\x96":  # BYTEARRAY8
            push(self._bytes_value(self._u(8)))
        elif c in "\x97\x98":  # NEXT_BUFFER / READONLY_BUFFER
            if c == "\x97":
                raise _Broken("out-of-band buffer (protocol 5) without buffers")
        elif c == "]":
            push([])
        elif c == "}":
            push({})
        elif c == ")":
            push(())
        elif c == "\x8f":
            push(set())
        elif c == "l":
            push(self._pop_mark())
        elif c == "t":
            push(tuple(self._pop_mark()))
        elif c == "d":
            items = self._pop_mark()
            if len(items) % 2:
                raise _Broken("odd number of items for DICT")
            d: dict = {}
            for k, v in zip(items[::2], items[1::2], strict=True):
                self._setitem(d, k, v)
            push(d)
        elif c == "\x85":
            push((self._pop(),))
        elif c == "\x86":
            b, a = self._pop(), self._pop()
            push((a, b))
        elif c == "\x87":
            z, b, a = self._pop(), self._pop(), self._pop()
            push((a, b, z))
        elif c == "a":
            v = self._pop()
            self._append(self._top(), [v], at)
        elif c == "e":
            items = self._pop_mark()
            self._append(self._top(), items, at)
        elif c == "s":
            v, k = self._pop(), self._pop()
            self._setitem(self._top(), k, v, at)
        elif c == "u":
            items = self._pop_mark()
            target = self._top()
            if len(items) % 2:
                raise _Broken("odd number of items for SETITEMS")
            for k, v in zip(items[::2], items[1::2], strict=True):
                self._setitem(target, k, v, at)
        elif c == "\x90":  # ADDITEMS
            items = self._pop_mark()
            target = self._top()
            if not items:
                pass  # load_additems: nothing to add is a no-op on any object
            elif isinstance(target, set):
                for v in items:
                    target.add(self._hashable(v))
            elif isinstance(target, Call):
                target.items.extend(items)
            elif isinstance(target, Global):
                self._mutates_global(target, "ADDITEMS", at)
            else:
                raise _Broken(f"ADDITEMS on a {type(target).__name__}")
        elif c == "\x91":  # FROZENSET
            push(frozenset(self._hashable(v) for v in self._pop_mark()))
        elif c == "0":  # POP: right after a MARK it pops the MARK (load_pop)
            if self.marks and self.marks[-1] == len(self.stack):
                self.marks.pop()
            else:
                self._pop()
        elif c == "1":
            self._pop_mark()
        elif c == "2":
            push(self._top())
        elif c == "p":
            line = self._line()
            top = self._top()
            self._memo_put(self._num(parse_memo_operand, line), top)
        elif c == "q":
            self._memo_put(self._u(1), self._top())
        elif c == "r":
            self._memo_put(self._u(4), self._top())
        elif c == "\x94":  # MEMOIZE
            self._memo_put(len(self.memo), self._top())
        elif c == "g":
            push(self._memo_get(self._num(parse_memo_operand, self._line())))
        elif c == "h":
            push(self._memo_get(self._u(1)))
        elif c == "j":
            push(self._memo_get(self._u(4)))
        elif c == "c":  # GLOBAL
            module = self._name_line("utf-8")
            name = self._name_line("utf-8")
            push(self.symbol(module, name, at))
        elif c == "\x93":  # STACK_GLOBAL
            name, module = self._pop(), self._pop()
            push(self.symbol(module, name, at))
        elif c == "i":  # INST
            if not self.marks:
                raise _Broken("could not find MARK")
            module = self._name_line("ascii")
            name = self._name_line("ascii")
            g = self.symbol(module, name, at)
            push(self._call(g, tuple(self._pop_mark()), at))
        elif c == "o":  # OBJ
            items = self._pop_mark()
            if not items:
                raise _Broken("OBJ without a class")
            push(self._call(items[0], tuple(items[1:]), at))
        elif c == "\x81":  # NEWOBJ
            args, cls = self._pop(), self._pop()
            push(self._call(cls, args, at, new=True))
        elif c == "\x92":  # NEWOBJ_EX
            kwargs, args, cls = self._pop(), self._pop(), self._pop()
            if kwargs:
                push(Call(cls, args, state=kwargs))
            else:
                push(self._call(cls, args, at, new=True))
        elif c == "R":  # REDUCE
            args, func = self._pop(), self._pop()
            push(self._call(func, args, at))
        elif c == "b":  # BUILD
            state = self._pop()
            self._build(self._top(), state, at)
        elif c == "P":  # PERSID
            if self.resolver is None or not getattr(self.resolver, "pids", True):
                raise _Broken("persistent id in a plain pickle")
            try:
                pid = self._line().decode("ascii")
            except UnicodeDecodeError:
                raise _Broken("persistent IDs in protocol 0 must be ASCII strings") from None
            push(self._persistent(pid, at))
        elif c == "Q":
            push(self._persistent(self._pop(), at))
        elif c in "\x82\x83\x84":  # EXT1/2/4
            code = self._u({"\x82": 1, "\x83": 2, "\x84": 4}[c])
            self.note("extension_code", SUSPICIOUS, f"copyreg extension code {code} (resolves a global by number)", at)
            push(Call(Global("copyreg", f"extension_{code}", sym.UNKNOWN, "extension registry"), ()))
        else:
            raise _Broken(f"unknown opcode 0x{op:02x}")
        return False

    # -- semantics ----------------------------------------------------------------------------
    @staticmethod
    def _num(parse, line: bytes):
        try:
            return parse(line)
        except ValueError as e:
            raise _Broken(f"bad numeric operand ({e})") from None

    def _name_line(self, encoding: str) -> str:
        """A GLOBAL/INST operand line: non-empty, strictly decoded (UTF-8 for GLOBAL, ASCII for INST)."""
        line = self._line()
        if not line:
            raise _Broken("empty module or class name")
        try:
            return line.decode(encoding)
        except UnicodeDecodeError:
            raise _Broken(f"module or class name is not {encoding}") from None

    @staticmethod
    def _hashable(v):
        try:
            hash(v)
        except TypeError:
            raise _Broken("unhashable value used as a key or set member") from None
        return v

    def _mutates_global(self, target: Global, op: str, at: int | None) -> None:
        self.note("mutates_global", MALICIOUS,
                  f"{op} on the global {target.qualname} (changes a module-level object)", at)

    def _uncertain(self, op: str, target, at: int | None) -> None:
        """An operation whose outcome depends on a type ckptlab only approximates (a bytearray is kept as
        bytes): reading goes on, and the file cannot be rated safe."""
        self.note("uncertain_operation", CORRUPT, f"{op} on a {type(target).__name__} value", at)

    def _setitem(self, target, k, v, at: int | None = None) -> None:
        if isinstance(target, dict):
            target[self._hashable(k)] = v
        elif isinstance(target, Call):
            target.items.append((k, v))
        elif isinstance(target, (TensorRef, StorageRef)):
            # CVE-2026-24747: SETITEM on a tensor wrote out of bounds in torch < 2.10
            self.note("setitem_on_tensor", MALICIOUS, "SETITEM on a tensor (memory-corruption exploit pattern)")
        elif isinstance(target, Global):
            self._mutates_global(target, "SETITEM", at)
        elif isinstance(target, list) and type(k) in (int, bool) and -len(target) <= k < len(target):
            target[k] = v  # list.__setitem__ with an index in range
        elif isinstance(target, (bytes, BytesRef)):
            self._uncertain("SETITEM", target, at)
        else:
            raise _Broken(f"SETITEM on a {type(target).__name__}")

    def _append(self, target, items, at: int | None = None) -> None:
        if not items:
            return  # do_append: nothing to append is a no-op on any object
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, Call):
            target.items.extend(items)
        elif isinstance(target, (TensorRef, StorageRef)):
            self.note("append_on_tensor", MALICIOUS, "APPEND on a tensor (memory-corruption exploit pattern)")
        elif isinstance(target, Global):
            self._mutates_global(target, "APPEND", at)
        elif isinstance(target, (bytes, BytesRef)):
            self._uncertain("APPEND", target, at)
        else:
            raise _Broken(f"APPEND on a {type(target).__name__}")

    def _build(self, target, state, at: int) -> None:
        if isinstance(target, Call):
            target.state = state
        elif isinstance(target, DtypeTag | dict):
            pass  # numpy dtype state / OrderedDict ``_metadata``: nothing to keep
        elif isinstance(target, (TensorRef, StorageRef)):
            self.note("build_on_tensor", SUSPICIOUS, "BUILD on a tensor sets attributes torch would not", at)
        elif isinstance(target, Global):
            self.note("build_on_global", MALICIOUS, f"BUILD on the global {target.qualname} (modifies a class)", at)
        else:
            self.note("build_on_value", SUSPICIOUS, f"BUILD on a {type(target).__name__}", at)

    def _persistent(self, pid, at: int):
        if self.resolver is None or not getattr(self.resolver, "pids", True):
            raise _Broken("persistent id in a plain pickle")
        return self.resolver.persistent_load(self, pid, at)

    def _call(self, func, args, at: int, new: bool = False):
        if not isinstance(func, Global):
            if isinstance(func, Call) or func is None or isinstance(func, (str, bytes, int, float)):
                self.note("dynamic_call", SUSPICIOUS, "call of a value that is not a global (callable built at load time)",
                          at)
            return Call(func, args)
        if not isinstance(args, tuple):
            if isinstance(args, (Call, Global)):  # may be a tuple at load time: keep the call inert
                return Call(func, args)
            raise _Broken("call arguments are not a tuple")
        if func.category != sym.TENSOR and func.category != sym.BENIGN:
            return Call(func, args)
        impl = _IMPLS.get(sym.normalize(func.module, func.name))
        if impl is None:
            return Call(func, args)
        try:
            return impl(self, args, at)
        except _Reject as e:
            self.note("bad_data_call", SUSPICIOUS, f"{func.qualname}: {e}", at)
            return Call(func, args)


class _Reject(Exception):
    """An allowlisted symbol called with arguments it never gets in a benign file."""


# ----------------------------------------------------------------------------------------------
# Our own implementations of allowlisted symbols. They only build values from values.

def _ints(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(type(x) is int for x in v):
        raise _Reject(f"{what} is not a tuple of integers")
    return tuple(v)


def _rebuild(vm: PickleVM, storage, offset, size, stride, dtype: str | None = None, at: int = 0):
    if not isinstance(storage, StorageRef):
        raise _Reject("first argument is not a storage")
    if type(offset) is not int:
        raise _Reject("storage offset is not an integer")
    size = _ints(size, "size")
    stride = _ints(stride, "stride")
    if len(size) != len(stride):
        raise _Reject(f"size {size} and stride {stride} differ in length")
    if offset < 0 or any(x < 0 for x in size + stride):
        raise _Reject("negative offset, size or stride")
    if len(size) > 64:
        raise _Reject("more than 64 dimensions")
    st_dtype = storage.dtype
    numel = storage.numel
    if dtype is not None:  # _rebuild_tensor_v3 over an untyped (byte) storage
        from ckptlab.formats.dtypes import itemsize

        isz = itemsize(dtype)
        if storage.storage_type != "UntypedStorage" or numel % isz:
            raise _Reject("typed rebuild over a storage of another type or size")
        numel //= isz
        st_dtype = dtype
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= numel:
        vm.note("view_out_of_bounds", SUSPICIOUS,
                f"tensor view (offset {offset}, size {size}, stride {stride}) reaches past its storage of "
                f"{numel} elements", at)
        storage.valid = False
    if math.prod(size) > max(numel, 1) * 64 or math.prod(size) > 1 << 40:
        vm.note("view_too_large", SUSPICIOUS, f"tensor view of {math.prod(size)} elements over a storage of {numel}",
                at)
        storage.valid = False
    return TensorRef(storage, offset, size, stride, st_dtype)


def _i_rebuild_v1(vm, a, at):
    if len(a) != 4:
        raise _Reject(f"{len(a)} arguments")
    return _rebuild(vm, *a, at=at)


def _i_rebuild_v2(vm, a, at):
    if len(a) not in (6, 7):
        raise _Reject(f"{len(a)} arguments")
    return _rebuild(vm, *a[:4], at=at)


def _i_rebuild_v3(vm, a, at):
    if len(a) not in (7, 8) or not isinstance(a[6], DtypeTag) or a[6].dtype is None:
        raise _Reject("unexpected arguments")
    return _rebuild(vm, *a[:4], dtype=a[6].dtype, at=at)


def _i_parameter(vm, a, at):
    if not a or not isinstance(a[0], TensorRef):
        raise _Reject("data is not a tensor")
    return a[0]


def _i_from_type_v2(vm, a, at):
    if len(a) != 4 or not isinstance(a[0], Global) or not isinstance(a[2], tuple):
        raise _Reject("unexpected arguments")
    return vm._call(a[0], a[2], at)


def _i_ordereddict(vm, a, at):
    if not a:
        return {}
    if len(a) == 1 and isinstance(a[0], (list, tuple)):
        d = {}
        for item in a[0]:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise _Reject("items are not pairs")
            d[vm._hashable(item[0])] = item[1]
        return d
    raise _Reject("unexpected arguments")


def _i_set(vm, a, at):
    if not a:
        return set()
    if len(a) == 1 and isinstance(a[0], (list, tuple, set, frozenset)):
        return {vm._hashable(v) for v in a[0]}
    raise _Reject("unexpected arguments")


def _i_frozenset(vm, a, at):
    return frozenset(_i_set(vm, a, at))


def _i_bytearray(vm, a, at):
    if not a:
        return b""
    if len(a) == 1 and isinstance(a[0], (bytes, BytesRef)):
        return a[0]
    if len(a) == 2 and isinstance(a[0], str):
        return _i_encode(vm, a, at)
    raise _Reject("unexpected arguments")


def _i_bytes(vm, a, at):
    if not a:
        return b""
    if len(a) == 1 and isinstance(a[0], list) and all(type(x) is int and 0 <= x < 256 for x in a[0]):
        return bytes(a[0])
    return _i_bytearray(vm, a, at)


def _i_complex(vm, a, at):
    if len(a) in (1, 2) and all(type(x) in (int, float) for x in a):
        return complex(*a)
    raise _Reject("unexpected arguments")


def _i_encode(vm, a, at):
    if len(a) == 2 and isinstance(a[0], str) and a[1] in ("latin1", "latin-1", "iso-8859-1"):
        try:
            return a[0].encode("latin1")
        except UnicodeEncodeError:
            raise _Reject("string is not latin-1") from None
    if len(a) == 1 and isinstance(a[0], str):
        return a[0].encode("utf-8", "surrogatepass")
    raise _Reject("unexpected encoding arguments")


def _i_size(vm, a, at):
    if len(a) == 1:
        return _ints(a[0], "torch.Size")
    if not a:
        return ()
    raise _Reject("unexpected arguments")


def _i_device(vm, a, at):
    if len(a) == 1 and isinstance(a[0], str):
        return a[0]
    if len(a) == 2 and isinstance(a[0], str) and type(a[1]) is int:
        return f"{a[0]}:{a[1]}"
    raise _Reject("unexpected arguments")


def _i_load_from_bytes(vm, a, at):
    if len(a) != 1 or not isinstance(a[0], (bytes, BytesRef)):
        raise _Reject("argument is not bytes")
    if vm.resolver is None or vm.depth >= MAX_NESTED_DEPTH:
        vm.note("nested_depth", SUSPICIOUS, "nested torch payload deeper than the limit", at)
        return Call(Global("torch.storage", "_load_from_bytes", sym.TENSOR, "nested"), a)
    return vm.resolver.load_from_bytes(vm, a[0], at)


_NUMPY_SIMPLE = {
    "f8": "<d", "f4": "<f", "f2": "<e", "i8": "<q", "i4": "<i", "i2": "<h", "i1": "<b",
    "u8": "<Q", "u4": "<I", "u2": "<H", "u1": "<B", "b1": "<?",
}


def _i_np_dtype(vm, a, at):
    if a and isinstance(a[0], str):
        return DtypeTag(None, a[0])
    raise _Reject("unexpected arguments")


def _i_np_scalar(vm, a, at):
    # numpy.core.multiarray.scalar(dtype, raw bytes): decode simple numeric scalars, else keep inert
    if len(a) == 2 and isinstance(a[0], DtypeTag) and isinstance(a[1], bytes):
        fmt = _NUMPY_SIMPLE.get(a[0].name)
        if fmt and struct.calcsize(fmt) == len(a[1]):
            return struct.unpack(fmt, a[1])[0]
    return Call(Global("numpy.core.multiarray", "scalar", sym.BENIGN, "numpy scalar"), a)


_IMPLS = {
    ("torch._utils", "_rebuild_tensor"): _i_rebuild_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _i_rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _i_rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _i_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _i_parameter,
    ("torch.nn.parameter", "Parameter"): _i_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _i_from_type_v2,
    ("collections", "OrderedDict"): _i_ordereddict,
    ("builtins", "set"): _i_set,
    ("builtins", "frozenset"): _i_frozenset,
    ("builtins", "bytearray"): _i_bytearray,
    ("builtins", "bytes"): _i_bytes,
    ("builtins", "complex"): _i_complex,
    ("_codecs", "encode"): _i_encode,
    ("torch", "Size"): _i_size,
    ("torch", "device"): _i_device,
    ("torch.storage", "_load_from_bytes"): _i_load_from_bytes,
    ("numpy", "dtype"): _i_np_dtype,
    ("numpy.core.multiarray", "scalar"): _i_np_scalar,
    ("numpy._core.multiarray", "scalar"): _i_np_scalar,
}


def storage_type_of(g) -> tuple[str, str | None] | None:
    """``(storage class name, dtype)`` if ``g`` is a ``torch.<X>Storage`` global, else None."""
    if isinstance(g, Global) and g.category == sym.TENSOR and isinstance(g.name, str):
        if g.module in ("torch", "torch.storage") and g.name in sym.STORAGE_DTYPES:
            if g.module == "torch.storage" and g.name != "UntypedStorage":
                return None
            return g.name, sym.STORAGE_DTYPES[g.name]
    return None


def dtype_of_global(g) -> DtypeTag | None:
    if isinstance(g, Global) and g.module == "torch" and g.name in sym.TORCH_DTYPES:
        return DtypeTag(sym.TORCH_DTYPES[g.name], g.name)
    return None


# ----------------------------------------------------------------------------------------------
# A value-free walk over opcodes (used past a resource limit): GLOBAL/INST operands, and the two
# string operands STACK_GLOBAL most likely took (the last two strings pushed or fetched from the memo).

_FIXED = {"K": 1, "M": 2, "J": 4, "G": 8, "h": 1, "j": 4, "q": 1, "r": 4, "\x80": 1, "\x82": 1, "\x83": 2,
          "\x84": 4, "\x95": 8}
_COUNTED = {"\x8a": 1, "T": 4, "U": 1, "X": 4, "B": 4, "C": 1, "\x8c": 1, "\x8d": 8, "\x8e": 8, "\x96": 8,
            "\x8b": 4}
_STRINGS = set("TUX\x8c\x8dSV")
_NOARG = set("(.0123NR)]}abdelostu\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94\x97\x98Q")
MAX_SKIM_GLOBALS = 1000


def skim_globals(buf, start: int, limit: int) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    strs: list = []
    memo: dict = {}
    pos = start

    def line(p: int) -> tuple[bytes, int]:
        j = bytes(buf[p:min(limit, p + (1 << 20))]).find(b"\n")
        if j < 0:
            raise IndexError
        return bytes(buf[p:p + j]), p + j + 1

    try:
        while pos < limit and len(out) < MAX_SKIM_GLOBALS:
            at, c = pos, chr(buf[pos])
            pos += 1
            if c in _FIXED:
                n = _FIXED[c]
                arg = bytes(buf[pos:pos + n])
                pos += n
                if c in "hj":
                    strs.append(memo.get(int.from_bytes(arg, "little")))
                elif c in "qr" and strs:
                    memo[int.from_bytes(arg, "little")] = strs[-1]
            elif c in _COUNTED:
                w = _COUNTED[c]
                n = int.from_bytes(bytes(buf[pos:pos + w]), "little", signed=(c == "\x8b"))
                if n < 0 or pos + w + n > limit:
                    break
                if c in _STRINGS and n <= 4096:
                    strs.append(bytes(buf[pos + w:pos + w + n]).decode("utf-8", "replace"))
                pos += w + n
            if c in "ci":
                module, pos = line(pos)
                name, pos = line(pos)
                out.append((at, module.decode("utf-8", "replace"), name.decode("utf-8", "replace")))
            elif c in "ILFPpg":
                arg, pos = line(pos)
                if c == "g":
                    strs.append(memo.get(arg.strip()))
                elif c == "p" and strs:
                    memo[arg.strip()] = strs[-1]
            elif c in "SV":
                arg, pos = line(pos)
                strs.append(arg[1:-1].decode("utf-8", "replace") if c == "S" else arg.decode("utf-8", "replace"))
            elif c == "\x94":
                if strs:
                    memo[len(memo)] = strs[-1]
            elif c == "\x93":
                if len(strs) >= 2 and isinstance(strs[-2], str) and isinstance(strs[-1], str):
                    out.append((at, strs[-2], strs[-1]))
                else:
                    out.append((at, "<unknown>", "<unknown>"))
            elif c in _FIXED or c in _COUNTED or c in _NOARG:
                continue
            else:
                break
    except IndexError:
        pass
    return out
