"""Containers around pickles: the torch zip archive, the legacy (non-zip) torch format, plain
pickles and nested ``_load_from_bytes`` payloads. ``scan(path)`` reads a file the way
``torch.load`` would, with ckptlab's data-only machine, and returns everything it saw: the root
object, the storages (bound to byte ranges of the file), every global and every anomaly.

Zip members are located through our own central-directory parser (what torch's reader trusts),
and every difference another reader could see (local names, duplicates, flags, prepended or
appended data, CRCs) is reported.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptlab.formats.pickle_vm import (
    CORRUPT,
    INFO,
    MALICIOUS,
    SUSPICIOUS,
    BytesRef,
    Call,
    Finding,
    Global,
    PickleVM,
    StorageRef,
    storage_type_of,
)
from ckptlab.remote import RemoteURL, as_path
from ckptlab.remote.reader import CACHE_BYTES, READAHEAD, RemoteBuffer

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_MEMBER = 512 * 1024 * 1024
MAX_TRAILING_PICKLES = 16
MAX_ZIP_ENTRIES = 200_000
KNOWN_MEMBERS = re.compile(r"(data/\d+|version|\.format_version|\.storage_alignment|byteorder|"
                           r"\.data/serialization_id|\.data/version)")
VERDICT_ORDER = (MALICIOUS, SUSPICIOUS, CORRUPT)
#: findings that mean part of what torch.load would run was not read (a resource limit, a nesting depth,
#: a container ckptlab does not unpack): such a file is never opened, whatever the verdict and options
UNVERIFIED_KINDS = frozenset({"resource_limit", "nested_depth", "legacy_tar", "archive_7z"})


@dataclass
class ZipEntry:
    name: str
    local_name: str
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    header_offset: int
    data_offset: int
    local_csize: int = -1  # sizes the local header declares (-1: deferred to a data descriptor)
    local_usize: int = -1


@dataclass
class Scan:
    """Everything one read of a pickle-based file produced."""

    path: Path
    container: str = "pickle"  # torch-zip | torch-legacy | pickle | torchscript
    root: Any = None
    complete: bool = False
    findings: list[Finding] = field(default_factory=list)
    globals: dict[str, str] = field(default_factory=dict)
    storages: list[StorageRef] = field(default_factory=list)
    zip_entries: dict[str, ZipEntry] = field(default_factory=dict)
    mm: Any = None

    @property
    def verdict(self) -> str:
        sev = {f.severity for f in self.findings}
        for v in VERDICT_ORDER:
            if v in sev:
                return v
        return "safe" if self.complete else CORRUPT

    @property
    def unverified(self) -> Finding | None:
        """The first finding that says part of the file was not read (see ``UNVERIFIED_KINDS``)."""
        return next((f for f in self.findings if f.kind in UNVERIFIED_KINDS), None)

    def add(self, kind: str, severity: str, detail: str, location: str = "") -> None:
        self.findings.append(Finding(kind, severity, detail, location))

    def absorb(self, vm: PickleVM) -> None:
        self.findings.extend(vm.findings)
        for k, v in vm.globals.items():
            self.globals.setdefault(k, v)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # tensors still view the map; it goes away with them
            self.mm = None


# ---------------------------------------------------------------------------------------------
# persistent ids and nested payloads

class _Resolver:
    """Turns ``('storage', type, key, location, numel[, view])`` ids into ``StorageRef``s, and reads
    nested ``_load_from_bytes`` payloads with this same reader."""

    #: whether the unpickler this stands for has a persistent_load (torch's do; plain pickle.load has none)
    pids = True

    def __init__(self, scan: Scan, pid_len: int, bind=None):
        self.scan = scan
        self.pid_len = pid_len
        self.bind = bind  # zip: bind immediately; legacy: after the key list is read
        self.by_key: dict[str, StorageRef] = {}

    def persistent_load(self, vm: PickleVM, pid, at: int):
        if not (type(pid) is tuple and len(pid) == self.pid_len and pid[:1] == ("storage",)):
            vm.note("bad_persistent_id", SUSPICIOUS, f"persistent id is not a torch storage reference: {_short(pid)}",
                    at)
            return None
        st = storage_type_of(pid[1])
        key, numel = pid[2], pid[4]
        if st is None or type(key) is not str or type(numel) is not int or numel < 0:
            vm.note("bad_persistent_id", SUSPICIOUS, f"malformed storage reference {_short(pid)}", at)
            return None
        if self.pid_len == 6 and pid[5] is not None:
            vm.note("legacy_view", CORRUPT, "legacy storage views are not supported", at)
            return None
        name, dtype = st
        ref = self.by_key.get(key)
        if ref is not None:
            if ref.storage_type != name or ref.numel != numel:
                vm.note("storage_conflict", SUSPICIOUS,
                        f"storage {key!r} referenced with different types or sizes", at)
            return ref
        ref = StorageRef(key, dtype, name, numel)
        if dtype is None:
            vm.note("unsupported_dtype", INFO, f"storage {key!r} of type {name} has no safetensors dtype", at)
        self.by_key[key] = ref
        self.scan.storages.append(ref)
        if self.bind is not None:
            self.bind(vm, ref, at)
        return ref

    def load_from_bytes(self, vm: PickleVM, payload, at: int):
        """``torch.storage._load_from_bytes(b)``: b is a whole legacy torch file; read it with this reader."""
        if isinstance(payload, BytesRef):
            buf, start, end = payload.buf, payload.start, payload.start + payload.length
        else:
            buf, start, end = memoryview(payload), 0, len(payload)
        loc = f"{vm.location}@{at}/_load_from_bytes"
        vm.note("nested_payload", INFO, "torch.storage._load_from_bytes payload read as a nested legacy file", at)
        if end - start >= 4 and bytes(buf[start:start + 4]) == b"PK\x03\x04":
            # torch.load(BytesIO(b)) reads a zip as a zip: scan it whole, keep nothing from it
            vm.note("nested_zip", SUSPICIOUS, "nested payload is a zip archive", at)
            inner = Scan(self.scan.path)
            _scan_zip(inner, bytes(buf[start:end]), end - start, vm.depth + 1)
            for f in inner.findings:
                self.scan.findings.append(Finding(f.kind, f.severity, f.detail, f"{loc}:{f.location}"))
            for k, v in inner.globals.items():
                self.scan.globals.setdefault(k, v)
            return None
        root = _read_legacy(self.scan, buf, start, end, loc, vm.depth + 1, nested=True)
        return root if isinstance(root, StorageRef) else None


class _NoPidResolver(_Resolver):
    """For pickles torch reads with plain ``pickle.load`` (no persistent_load): a persistent id breaks the
    stream there, but a ``_load_from_bytes`` payload still runs and is still read."""

    pids = False

    def __init__(self, scan: Scan):
        super().__init__(scan, -1)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 120 else r[:117] + "..."


# ---------------------------------------------------------------------------------------------
# zip

def _span(mm, start: int, end: int):
    """``mm[start:end]`` without a copy (a memoryview); fetched bytes for a ``RemoteBuffer``."""
    if type(mm) is RemoteBuffer:
        return memoryview(mm[start:end])
    return memoryview(mm)[start:end]


def _find_eocd(mm, size: int) -> int:
    lo = max(0, size - 22 - 65535)
    return mm.rfind(b"PK\x05\x06", lo, size)


def _read_central(scan: Scan, mm, size: int) -> list[ZipEntry] | None:
    eocd = _find_eocd(mm, size)
    if eocd < 0 or eocd + 22 > size:
        scan.add("zip_no_directory", CORRUPT, "zip has no end-of-central-directory record (truncated?)")
        return None
    (_, disk, cd_disk, n_disk, n_total, cd_size, cd_off, clen) = struct.unpack("<IHHHHIIH", mm[eocd:eocd + 22])
    if eocd + 22 + clen != size:
        scan.add("zip_trailing_data", SUSPICIOUS, f"{size - eocd - 22 - clen} bytes after the zip's end record")
    cd_end_expected = eocd
    loc = eocd - 20
    has_locator = loc >= 0 and mm[loc:loc + 4] == b"PK\x06\x07"
    if has_locator:
        (z64,) = struct.unpack("<Q", mm[loc + 8:loc + 16])
        if z64 + 56 > size or mm[z64:z64 + 4] != b"PK\x06\x06":
            scan.add("zip_bad_zip64", CORRUPT, "zip64 end record missing")
            return None
        z_total, z_size, z_off = struct.unpack("<QQQ", mm[z64 + 32:z64 + 56])
        if n_total == 0xFFFF:
            n_total = z_total
        if cd_size == 0xFFFFFFFF:
            cd_size = z_size
        if cd_off == 0xFFFFFFFF:
            cd_off = z_off
        cd_end_expected = z64
    elif 0xFFFFFFFF in (cd_size, cd_off) or n_total == 0xFFFF:
        scan.add("zip_bad_zip64", CORRUPT, "zip64 locator missing")
        return None
    if cd_off + cd_size != cd_end_expected:
        scan.add("zip_offset_shift", MALICIOUS,
                 "central directory is not where the end record says (data prepended: polyglot file)")
    if cd_off + cd_size > size or n_total * 46 > cd_size:
        scan.add("zip_bad_directory", CORRUPT, "central directory runs past the end of the file")
        return None
    if n_total > MAX_ZIP_ENTRIES:
        scan.add("resource_limit", SUSPICIOUS, f"zip has {n_total} members (limit {MAX_ZIP_ENTRIES})")
        return None
    lazy = type(mm) is RemoteBuffer
    if lazy:
        mm.rf.pread(cd_off, cd_size)  # one GET of the directory (none when the tail read held it)
    entries: list[ZipEntry] = []
    p = cd_off
    for _ in range(n_total):
        if p + 46 > size or mm[p:p + 4] != b"PK\x01\x02":
            scan.add("zip_bad_directory", CORRUPT, f"bad central directory entry at offset {p}")
            return None
        (flags, method, crc, csize, usize, nlen, elen, clen2, off) = struct.unpack(
            "<4x4xHH4xIIIHHH8xI", mm[p:p + 46])
        raw_name = bytes(mm[p + 46:p + 46 + nlen])
        extra = bytes(mm[p + 46 + nlen:p + 46 + nlen + elen])
        usize, csize, off = _zip64_extra(extra, usize, csize, off)
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        p += 46 + nlen + elen + clen2
        if lazy:  # local headers later, and only for the members read (a tensor record's when its data is)
            entries.append(ZipEntry(name, name, flags, method, crc, csize, usize, off, -1))
            continue
        if off + 30 > size or mm[off:off + 4] != b"PK\x03\x04":
            scan.add("zip_bad_local_header", CORRUPT, f"member {name}: no local header at offset {off}", name)
            continue
        (lflags, lcsize, lusize, lnlen, lelen) = struct.unpack("<H10xIIHH", mm[off + 6:off + 30])
        local_name = bytes(mm[off + 30:off + 30 + lnlen]).decode("utf-8", "replace")
        data_offset = off + 30 + lnlen + lelen
        if lflags & 0x8 or 0xFFFFFFFF in (lcsize, lusize):
            lcsize = lusize = -1  # sizes in a data descriptor or a zip64 extra: the directory's stand
        entries.append(ZipEntry(name, local_name, flags, method, crc, csize, usize, off, data_offset, lcsize, lusize))
    if lazy:
        return _remote_local_headers(scan, mm, size, entries)
    return entries


#: a remote torch zip: the last bytes read in one GET for the end record and (usually) the whole central directory
ZIP_TAIL = 256 * 1024
#: a local header's extra field is read along with the member in one GET when it is at most this long (torch pads
#: records to 64-byte alignment)
LOCAL_SLACK = 256
_TENSOR_RECORD = re.compile(r"(?:^|/)data/\d+$")


def _remote_local_headers(scan: Scan, mm, size: int, entries: list[ZipEntry]) -> list[ZipEntry]:
    """The local headers of a remote zip's members that the scan reads (pickles, small records, unknown members),
    each fetched with its member's bytes in one ranged GET; tensor records (``data/N``) keep ``data_offset`` -1
    until their data is read (``_raw_of``). The findings are those of the local pass, in the same order."""
    wanted = {}  # member index -> the range its local header and bytes are read in
    for i, e in enumerate(entries):
        if not (_TENSOR_RECORD.search(e.name) and e.csize > 0):
            off = e.header_offset
            if off + 30 <= size and e.csize <= MAX_PICKLE_MEMBER:
                wanted[i] = (off, min(size, off + 30 + len(e.name.encode()) + LOCAL_SLACK + e.csize))
    runs = _runs(sorted(wanted.values()))
    out = []
    done = None
    for i, e in enumerate(entries):
        if _TENSOR_RECORD.search(e.name) and e.csize > 0:
            out.append(e)
            continue
        off = e.header_offset
        if i in wanted:
            run = runs.get(wanted[i][0])
            if run is not None and run != done:  # members that touch (data.pkl, then the small records after
                mm.rf.pread(run[0], run[1] - run[0])  # it): one GET for them all
                done = run
            mm.rf.pread(off, wanted[i][1] - off)
        if not _resolve_local(mm, e, size):
            scan.add("zip_bad_local_header", CORRUPT, f"member {e.name}: no local header at offset {off}", e.name)
            continue
        out.append(e)
    return out


def _runs(ranges: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Sorted ``(start, end)`` ranges joined where they overlap or touch (no byte between them is fetched that no
    member's own read would fetch), each run at most half the file cache (so it stays cached for the members'
    reads): ``{range start: its run}`` for the runs of two ranges or more."""
    out: dict[int, tuple[int, int]] = {}
    group: list[tuple[int, int]] = []

    def close() -> None:
        if len(group) > 1:
            run = (group[0][0], group[-1][1])
            out.update((start, run) for start, _ in group)

    for a, b in ranges:
        if group and a <= group[-1][1] and max(b, group[-1][1]) - group[0][0] <= CACHE_BYTES // 2:
            group.append((a, max(b, group[-1][1])))  # the run's end so far
            continue
        close()
        group = [(a, b)]
    close()
    return out


def _resolve_local(mm, e: ZipEntry, size: int) -> bool:
    """Read ``e``'s local header: its name, sizes and data offset (False when there is none)."""
    off = e.header_offset
    if off + 30 > size or mm[off:off + 4] != b"PK\x03\x04":
        return False
    (lflags, lcsize, lusize, lnlen, lelen) = struct.unpack("<H10xIIHH", mm[off + 6:off + 30])
    e.local_name = bytes(mm[off + 30:off + 30 + lnlen]).decode("utf-8", "replace")
    e.data_offset = off + 30 + lnlen + lelen
    if lflags & 0x8 or 0xFFFFFFFF in (lcsize, lusize):
        lcsize = lusize = -1
    e.local_csize, e.local_usize = lcsize, lusize
    return True


def _raw_of(mm, e: ZipEntry):
    """The stored bytes of member ``e``; a remote tensor record's local header is read first, with its data in
    the same GET. Raises ``zlib.error`` when the record is not where the directory says."""
    if e.data_offset < 0:
        size = len(mm)
        if e.header_offset + 30 <= size:
            mm.rf.pread(e.header_offset, min(size - e.header_offset,
                                             30 + len(e.name.encode()) + LOCAL_SLACK + e.csize))
        if not _resolve_local(mm, e, size):
            raise zlib.error(f"member {e.name}: no local header at offset {e.header_offset}")
        if e.data_offset + e.csize > size:
            raise zlib.error(f"member {e.name} runs past the end of the file")
    return _span(mm, e.data_offset, e.data_offset + e.csize)


def _zip64_extra(extra: bytes, usize: int, csize: int, off: int) -> tuple[int, int, int]:
    i = 0
    while i + 4 <= len(extra):
        tag, ln = struct.unpack("<HH", extra[i:i + 4])
        body = extra[i + 4:i + 4 + ln]
        if tag == 1:
            vals = [struct.unpack("<Q", body[j:j + 8])[0] for j in range(0, len(body) - 7, 8)]
            if usize == 0xFFFFFFFF and vals:
                usize = vals.pop(0)
            if csize == 0xFFFFFFFF and vals:
                csize = vals.pop(0)
            if off == 0xFFFFFFFF and vals:
                off = vals.pop(0)
        i += 4 + ln
    return usize, csize, off


INFLATE_PIECE = 1 << 20
#: DEFLATE cannot expand more than ~1032:1 (258 bytes per 2-bit code); a header declaring more lies
MAX_DEFLATE_RATIO = 1032


def inflate_pieces(raw, expected: int, piece: int = INFLATE_PIECE):
    """The inflated bytes of the raw DEFLATE stream ``raw``, in pieces of at most ``piece`` bytes.
    Raises ``zlib.error`` when the stream is broken or truncated, or inflates to more or fewer bytes than
    ``expected`` (the size its headers declare): never more than ``expected + piece`` bytes are made."""
    d = zlib.decompressobj(-15)
    total, pos, n = 0, 0, len(raw)
    tail = b""
    while not d.eof:
        if not tail:
            if pos >= n:
                break
            tail = raw[pos:pos + piece]
            pos += len(tail)
        out = d.decompress(tail, piece)
        tail = d.unconsumed_tail
        if out:
            total += len(out)
            if total > expected:
                raise zlib.error(f"inflates to more than the {expected} bytes its header declares")
            yield out
    if not d.eof:
        raise zlib.error("compressed stream is truncated")
    if total != expected:
        raise zlib.error(f"inflates to {total} bytes but its header declares {expected}")


def inflate(raw, expected: int) -> bytearray:
    """``inflate_pieces`` gathered into one buffer of exactly ``expected`` bytes."""
    out = bytearray(expected)
    at = 0
    for part in inflate_pieces(raw, expected):
        out[at:at + len(part)] = part
        at += len(part)
    return out


def _size_problem(e: ZipEntry) -> str | None:
    """Why the sizes recorded for ``e`` cannot all be true, or None."""
    if e.local_csize >= 0 and (e.local_csize != e.csize or e.local_usize != e.usize):
        return (f"member {e.name}: the local header declares {e.local_csize}/{e.local_usize} bytes "
                f"(compressed/inflated), the central directory {e.csize}/{e.usize}")
    if e.method == 0 and e.csize != e.usize:
        return f"member {e.name} is stored but declares {e.csize} stored and {e.usize} inflated bytes"
    if e.method == 8 and e.usize > MAX_DEFLATE_RATIO * e.csize + 64:
        return f"member {e.name} declares {e.usize} inflated bytes from {e.csize} compressed (impossible ratio)"
    return None


def _member_bytes(scan: Scan, mm, e: ZipEntry, size: int, cap: int, *, ignore_flags: bool = False):
    """The member's content (memoryview for STORED, bytearray for DEFLATE), or None."""
    if e.flags & 0x1 and not ignore_flags:
        return None
    if e.data_offset + e.csize > size:
        scan.add("zip_truncated", CORRUPT, f"member {e.name} runs past the end of the file", e.name)
        return None
    if e.usize > cap:
        scan.add("resource_limit", SUSPICIOUS, f"member {e.name} is {e.usize} bytes, over the {cap}-byte limit", e.name)
        return None
    raw = _span(mm, e.data_offset, e.data_offset + e.csize)
    if e.method == 0:
        return raw
    if e.method == 8:
        try:
            return inflate(raw, e.usize)
        except zlib.error as err:
            scan.add("zip_bad_deflate", CORRUPT, f"member {e.name}: {err}", e.name)
            return None
    scan.add("zip_bad_method", SUSPICIOUS, f"member {e.name} uses compression method {e.method}", e.name)
    return None


def _scan_zip(scan: Scan, mm, size: int, depth: int = 0) -> None:
    scan.container = "torch-zip"
    entries = _read_central(scan, mm, size)
    if entries is None:
        return
    if not entries:
        scan.add("zip_empty", CORRUPT, "zip archive has no members")
        return
    # torch (PyTorchStreamReader) takes the archive root from the first directory entry and finds every
    # record with miniz's mz_zip_reader_locate_file(name, flags=0): a case-insensitive match
    first = entries[0].name
    root = first.split("/", 1)[0] if "/" in first else ""
    by_name: dict[str, ZipEntry] = {}
    for e in entries:
        key = e.name.lower()
        if e.name != e.local_name:
            scan.add("zip_name_mismatch", MALICIOUS,
                     f"local header names {e.local_name!r} but the directory names {e.name!r}", e.name)
        if key in by_name:
            sev = MALICIOUS if key.endswith(".pkl") else SUSPICIOUS
            scan.add("zip_duplicate", sev, f"duplicate member {e.name!r} (names compare without case in torch's "
                     "reader; which copy it reads is not defined)", e.name)
        by_name[key] = e  # last wins, as in zipfile
        if e.flags & 0x1:
            scan.add("zip_encrypted", SUSPICIOUS, f"member {e.name} has the encryption flag", e.name)
        if e.flags & ~0x0808 & 0xFFFF:
            scan.add("zip_flags", SUSPICIOUS, f"member {e.name} has unusual flag bits 0x{e.flags:04x}", e.name)
        if e.method not in (0,):
            scan.add("zip_compressed", SUSPICIOUS, f"member {e.name} is compressed (method {e.method}); torch writes "
                     "stored", e.name)
        problem = _size_problem(e)
        if problem:
            scan.add("zip_size_mismatch", SUSPICIOUS, problem, e.name)
        if not root or not key.startswith(root.lower() + "/"):
            scan.add("zip_second_root", SUSPICIOUS, f"member {e.name} is outside the archive root {root!r}/", e.name)
    scan.zip_entries = {e.name: e for e in by_name.values()}
    prefix = root.lower() + "/"
    rel = {n[len(prefix):]: e for n, e in by_name.items() if root and n.startswith(prefix)}
    if "constants.pkl" in rel:
        scan.container = "torchscript"
        scan.add("torchscript", SUSPICIOUS, "TorchScript archive (torch.jit.load runs its code)", root)
    byteorder = "little"
    if "byteorder" in rel:
        bo = _member_bytes(scan, mm, rel["byteorder"], size, 64)
        byteorder = bytes(bo).decode("ascii", "replace").strip() if bo is not None else "?"
        if byteorder not in ("little", "big"):
            scan.add("zip_byteorder", CORRUPT, f"unknown byteorder {byteorder!r}", rel["byteorder"].name)
    # every member that is not a known record is scanned as a pickle, whatever its first byte
    for rname, e in rel.items():
        if KNOWN_MEMBERS.fullmatch(rname) or rname == "data.pkl":
            continue
        if rname.startswith(("code/", "extra/", ".data/")) and scan.container == "torchscript" and not \
                rname.endswith(".pkl"):
            continue
        scan.add("zip_unknown_member", SUSPICIOUS, f"unexpected member {e.name}", e.name)
        content = _member_bytes(scan, mm, e, size, MAX_PICKLE_MEMBER)
        if content is not None and len(content):
            vm = PickleVM(content, location=e.name, depth=depth, resolver=_NoPidResolver(scan)).run()
            if rname.endswith(".pkl"):
                scan.absorb(vm)
            else:
                scan.findings.extend(f for f in vm.findings if f.severity in (MALICIOUS, SUSPICIOUS)
                                     and (f.kind.startswith("global") or f.kind in UNVERIFIED_KINDS))
                for k, v in vm.globals.items():
                    scan.globals.setdefault(k, v)
    for n, e in by_name.items():
        if not (root and n.startswith(prefix)) and n.endswith(".pkl"):
            content = _member_bytes(scan, mm, e, size, MAX_PICKLE_MEMBER)
            if content is not None:
                scan.absorb(PickleVM(content, location=e.name, depth=depth, resolver=_NoPidResolver(scan)).run())
    pkl = rel.get("data.pkl")
    if pkl is None:
        scan.add("zip_no_data_pkl", CORRUPT, f"archive has no {root}/data.pkl")
        return
    # pickles that torch might read instead, or a laxer reader might: duplicates (any case) and
    # "encrypted" members (the flag is only a flag; the bytes may be a plain pickle)
    for e in entries:
        if e.name.lower().endswith(".pkl") and (by_name.get(e.name.lower()) is not e or e.flags & 0x1):
            content = _member_bytes(scan, mm, e, size, MAX_PICKLE_MEMBER, ignore_flags=True)
            if content is not None and len(content):
                vm = PickleVM(content, location=f"{e.name}(duplicate or flagged)", depth=depth,
                              resolver=_NoPidResolver(scan)).run()
                scan.findings.extend(f for f in vm.findings if f.severity in (MALICIOUS, SUSPICIOUS))
                for k, v in vm.globals.items():
                    scan.globals.setdefault(k, v)
    content = _member_bytes(scan, mm, pkl, size, MAX_PICKLE_MEMBER)
    if content is None:
        if pkl.flags & 0x1:
            return
        scan.add("zip_unreadable", CORRUPT, f"{pkl.name} cannot be read")
        return
    if zlib.crc32(content) & 0xFFFFFFFF != pkl.crc:
        scan.add("zip_bad_crc", SUSPICIOUS, f"CRC mismatch in {pkl.name} (torch ignores CRCs)", pkl.name)

    def bind(vm: PickleVM, ref: StorageRef, at: int) -> None:
        rec = rel.get(f"data/{ref.key}".lower())
        if rec is None:
            vm.note("missing_record", CORRUPT, f"storage record data/{ref.key} is missing", at)
            ref.valid = False
            return
        _bind_record(vm, ref, rec.usize, at)
        if rec.flags & 0x1 or rec.method not in (0, 8) or rec.data_offset + rec.csize > size or _size_problem(rec):
            ref.valid = False
            return
        if rec.data_offset < 0:  # a remote record whose local header is read with its data
            ref.backing = ("deflate", rec)
        else:
            ref.backing = ("file", rec.data_offset, rec.crc) if rec.method == 0 else ("deflate", rec)
        ref.byteswap = byteorder == "big"

    vm = PickleVM(content, location=pkl.name, resolver=_Resolver(scan, 5, bind), depth=depth).run()
    scan.absorb(vm)
    scan.root = vm.result
    scan.complete = vm.complete
    if vm.complete and vm.end != len(content):
        scan.add("trailing_pickle_data", SUSPICIOUS, f"{len(content) - vm.end} bytes after STOP in {pkl.name}",
                 pkl.name)


def zip_record(mm, st: StorageRef, nbytes: int):
    """The bytes of a zip-backed storage (``backing`` "file": a memoryview into ``mm``; "deflate": the
    inflated bytes, made in bounded pieces) and the CRC-32 its record declares. Raises ``zlib.error`` on a
    broken deflate stream or one that inflates to another size than ``nbytes``."""
    if st.backing[0] == "file":
        off = st.backing[1]
        return _span(mm, off, off + nbytes), st.backing[2]
    e = st.backing[1]
    raw = _raw_of(mm, e)
    try:
        return (inflate(raw, nbytes) if e.method == 8 else bytes(raw)), e.crc
    finally:
        raw.release()


def zip_record_pieces(mm, st: StorageRef, nbytes: int, piece: int = INFLATE_PIECE):
    """``zip_record`` as a stream of pieces (``check --deep`` never holds a whole inflated record)."""
    if st.backing[0] == "file":
        off = st.backing[1]
        view = memoryview(mm) if type(mm) is not RemoteBuffer else None
        if view is None:  # remote: one ranged GET per piece
            for i in range(0, nbytes, piece):
                yield mm[off + i:off + min(nbytes, i + piece)]
            return
        try:
            for i in range(0, nbytes, piece):
                yield view[off + i:off + min(nbytes, i + piece)]
        finally:
            view.release()
        return
    e = st.backing[1]
    raw = _raw_of(mm, e)
    try:
        if e.method != 8:  # a remote stored record (its local header read with it)
            for i in range(0, nbytes, piece):
                yield raw[i:i + piece]
            return
        yield from inflate_pieces(raw, nbytes, piece)
    finally:
        raw.release()


def _bind_record(vm: PickleVM, ref: StorageRef, nbytes: int, at: int) -> None:
    from ckptlab.formats.dtypes import itemsize

    isz = itemsize(ref.dtype) if ref.dtype else None
    if isz is None:
        ref.valid = False
        return
    if nbytes != ref.numel * isz:
        vm.note("storage_size_lie", MALICIOUS,
                f"storage {ref.key!r} claims {ref.numel} x {isz} bytes but its record holds {nbytes} "
                "(out-of-bounds exploit pattern, CVE-2026-24747)", at)
        ref.valid = False


# ---------------------------------------------------------------------------------------------
# legacy format and plain pickles

def _read_legacy(scan: Scan, buf, start: int, end: int, location: str, depth: int, nested: bool = False):
    """Read ``buf[start:end]`` as torch would without a zip: first pickle (the magic) executes first."""
    vm = PickleVM(buf, start, location=location, resolver=_NoPidResolver(scan), depth=depth, end=end).run()
    scan.absorb(vm)
    if not vm.complete:
        return vm.result
    opaque = isinstance(vm.result, (Call, Global))
    if opaque:
        # torch compares the object with MAGIC_NUMBER (`magic != MAGIC_NUMBER`): an object built by a call
        # (mock.ANY, a numpy object array...) may compare equal, and torch then reads the other pickles
        scan.add("magic_uncertain", SUSPICIOUS, "the first pickle builds an object whose comparison with torch's "
                 "magic number is unknown; the file is also read as a legacy torch file", location)
    if not opaque and (vm.result != LEGACY_MAGIC or type(vm.result) is not int):
        if nested:
            scan.add("nested_not_torch", SUSPICIOUS, "nested payload is not a torch legacy file", location)
            return None
        # a plain pickle: this first object is what pickle.load/torch.load would have built
        _trailing(scan, buf, vm.end, end, location, depth)
        scan.container = "pickle"
        return vm.result
    pos = vm.end
    parts = []
    for i in (2, 3):
        v = PickleVM(buf, pos, location=f"{location}@pickle{i}", depth=depth, end=end,
                     resolver=_NoPidResolver(scan)).run()
        scan.absorb(v)
        if not v.complete:
            return None
        parts.append(v.result)
        pos = v.end
    if parts[0] != LEGACY_PROTOCOL:
        scan.add("legacy_protocol", CORRUPT, f"legacy protocol version {parts[0]!r} is not {LEGACY_PROTOCOL}", location)
    sys_info = parts[1] if isinstance(parts[1], dict) else {}
    little = sys_info.get("little_endian", True)
    resolver = _Resolver(scan, 6)
    obj = PickleVM(buf, pos, location=f"{location}@object", resolver=resolver, depth=depth, end=end).run()
    scan.absorb(obj)
    if not obj.complete:
        return obj.result
    keys_vm = PickleVM(buf, obj.end, location=f"{location}@keys", depth=depth, end=end,
                       resolver=_NoPidResolver(scan)).run()
    scan.absorb(keys_vm)
    if not keys_vm.complete:
        return None
    keys = keys_vm.result
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        scan.add("legacy_keys", CORRUPT, "legacy storage key list is malformed", location)
        return None
    pos = keys_vm.end
    from ckptlab.formats.dtypes import itemsize

    remote = type(buf) is RemoteBuffer
    window = (0, 0)  # remote: the span whose bytes the last prefetch fetched
    for i, key in enumerate(keys):
        ref = resolver.by_key.get(key)
        if ref is None:
            scan.add("legacy_keys", CORRUPT, f"storage key {key!r} listed but never referenced", location)
            return None
        isz = itemsize(ref.dtype) if ref.dtype else None
        if pos + 8 > end or isz is None:
            scan.add("legacy_truncated", CORRUPT, f"storage {key!r} record missing (file truncated?)", location)
            ref.valid = False
            return obj.result
        if remote and not window[0] <= pos <= window[1] - 8:
            window = _prefetch_lengths(buf, pos, keys, i, resolver.by_key, end)
        (count,) = struct.unpack("<q", _record_length(buf, pos))
        if count < 0 or pos + 8 + count * isz > end:
            scan.add("legacy_truncated", CORRUPT, f"storage {key!r} runs past the end of the data", location)
            ref.valid = False
            return obj.result
        if count != ref.numel:
            scan.add("storage_size_lie", MALICIOUS,
                     f"storage {key!r} claims {ref.numel} elements but its record holds {count}", location)
            ref.valid = False
        ref.backing = ("view", buf, pos + 8)
        ref.byteswap = not little
        pos += 8 + count * isz
    unlisted = set(resolver.by_key) - set(keys)
    if unlisted:
        scan.add("legacy_keys", CORRUPT, f"storages {sorted(unlisted)[:3]} have no data record", location)
    if pos != end:
        _trailing(scan, buf, pos, end, location, depth)
    return obj.result


def _prefetch_lengths(buf, pos: int, keys: list, first: int, by_key: dict, end: int) -> tuple[int, int]:
    """Remote: one exact GET from ``pos`` through the last storage length header that lies within ``READAHEAD``
    bytes of it, where the pickle's own numels say the next records start (small records between them: a run of
    biases costs one request, as a read-ahead block did, without the megabytes of a big record after it). Only a
    prefetch: every length is then read at its real position (a record whose length lies moves the walk out of
    this span and the next read fetches what it needs). Returns the span fetched."""
    from ckptlab.formats.dtypes import itemsize

    last = pos + 8
    p = pos
    for key in itertools.islice(keys, first, None):
        ref = by_key.get(key)
        isz = itemsize(ref.dtype) if ref is not None and ref.dtype else None
        if isz is None or not isinstance(ref.numel, int) or ref.numel < 0:
            break
        if p + 8 - pos > READAHEAD or p + 8 > end:
            break
        last = p + 8
        p += 8 + ref.numel * isz
    last = min(last, end)
    buf.rf.pread(pos, last - pos, exact=True)
    return pos, last


def _record_length(buf, pos: int) -> bytes:
    """The 8-byte element count before a legacy storage record. Over a URL an exact ranged read (or the cache):
    a read-ahead block here would fetch 64 KiB of tensor data per record and push the pickles' blocks out of the
    file's cache (a second pass over the same object, as ``read_file_facts`` makes, then fetched everything again)."""
    if type(buf) is RemoteBuffer:
        return buf.rf.pread(pos, 8, exact=True)
    return bytes(buf[pos:pos + 8])


def _trailing(scan: Scan, buf, pos: int, end: int, location: str, depth: int) -> None:
    """Bytes after the last pickle/record: a polyglot zip, more pickles, or junk."""
    if pos >= end:
        return
    tail = bytes(buf[max(pos, end - 65557):end])
    if b"PK\x05\x06" in tail or b"PK\x03\x04" in bytes(buf[pos:min(end, pos + 4096)]):
        scan.add("polyglot", MALICIOUS, f"a zip archive follows the pickle at offset {pos} (pickle/zip polyglot)",
                 location)
    else:
        scan.add("trailing_data", SUSPICIOUS, f"{end - pos} bytes after the last pickle", location)
    # scan what follows as more pickles: some loaders call pickle.load repeatedly
    for _ in range(MAX_TRAILING_PICKLES):
        if pos >= end:
            break
        vm = PickleVM(buf, pos, location=f"{location}@{pos}", depth=depth, end=end,
                      resolver=_NoPidResolver(scan)).run()
        scan.findings.extend(f for f in vm.findings if f.severity in (MALICIOUS, SUSPICIOUS))
        for k, v in vm.globals.items():
            scan.globals.setdefault(k, v)
        if not vm.complete:
            break
        pos = vm.end


#: bytes per element of every torch storage class (torch._utils._element_size), for walking tar records
_STORAGE_ELEMENT = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
                    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
                    "UntypedStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "QInt8Storage": 1,
                    "QInt32Storage": 4, "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1}


class _TarPid(_Resolver):
    """The tar format's persistent_load returns objects torch built earlier: nothing ckptlab keeps."""

    def __init__(self, scan: Scan):
        super().__init__(scan, -1)

    def persistent_load(self, vm, pid, at):
        return None


def _is_tar(path: Path) -> bool:
    """What torch's legacy loader tries first on a real file: ``tarfile.open(mode="r:")``. It needs one
    header block with a valid checksum; the ``ustar`` magic is optional (old V7 archives have none)."""
    import tarfile

    if not isinstance(path, Path):  # a RemoteBuffer: tarfile reads the first 512-byte block
        import io

        head = path[:512]
        if len(head) < 512:
            return False
        path = io.BytesIO(head + bytes(512))
        try:
            with tarfile.open(fileobj=path, mode="r:"):
                return True
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return False
    try:
        with tarfile.open(path, "r:"):
            return True
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False


def _tar_pickles(scan: Scan, buf, name: str, resolver, *, storages: bool = False, tensors: bool = False) -> None:
    """Scan the pickles of one tar member the way torch's legacy tar loader reads them: ``storages`` and
    ``tensors`` hold a count, then per item a pickle and a raw record; other members one pickle."""
    end = len(buf)

    def run(pos: int):
        vm = PickleVM(buf, pos, location=f"{name}@{pos}", resolver=resolver, end=end).run()
        scan.findings.extend(f for f in vm.findings if f.severity in (MALICIOUS, SUSPICIOUS))
        for k, v in vm.globals.items():
            scan.globals.setdefault(k, v)
        return vm if vm.complete else None

    vm = run(0)
    if vm is None or not (storages or tensors):
        return
    count, pos = vm.result, vm.end
    if type(count) not in (int, bool) or count < 0:
        return
    for _ in range(count):
        vm = run(pos)
        if vm is None or not (isinstance(vm.result, (tuple, list)) and len(vm.result) == 3):
            return
        pos = vm.end
        if storages:  # (key, location, storage_type), then int64 element count and the elements
            st = storage_type_of(vm.result[2])
            if st is None or pos + 8 > end:
                return  # torch fails on storage_type._dtype or the short read
            n = int.from_bytes(bytes(buf[pos:pos + 8]), "little", signed=True)
            pos += 8 + n * _STORAGE_ELEMENT[st[0]]
        else:  # (key, storage_id, type), then int32 ndim, 4 bytes, sizes, strides, offset
            if pos + 8 > end:
                return
            ndim = int.from_bytes(bytes(buf[pos:pos + 4]), "little", signed=True)
            pos += 8 + 16 * ndim + 8
        if n < 0 if storages else ndim < 0:
            return
        if pos > end:
            return
    if storages:
        run(pos)  # storage_views


def _scan_tar(scan: Scan, mm, path: Path) -> None:
    """A torch 0.1 tar file: every pickle torch's tar loader reads (``storages``, ``tensors``, ``pickle``, in
    that order), every other member as a pickle, and, because torch falls back to reading the file as a
    pickle when the tar loader fails, the file itself from byte 0. Its tensors are not read."""
    import tarfile

    scan.container = "torch-tar"
    scan.add("legacy_tar", SUSPICIOUS, "legacy torch tar format (torch 0.1): its pickles are scanned, its tensors "
             "are not read")
    members: dict[str, Any] = {}
    others = []
    try:
        with (tarfile.open(path, "r:") if type(mm) is mmap.mmap else tarfile.open(fileobj=mm.rf, mode="r:")) as tf:
            for i, m in enumerate(tf):
                if i >= MAX_ZIP_ENTRIES:
                    scan.add("resource_limit", SUSPICIOUS, f"tar has more than {MAX_ZIP_ENTRIES} members")
                    break
                if m.issym() or m.islnk():
                    scan.add("tar_link", SUSPICIOUS, f"tar member {m.name!r} is a link to {m.linkname!r}", m.name)
                if m.isfile() and not m.issparse():
                    if m.name in members:
                        others.append(members[m.name])
                    members[m.name] = m  # tarfile.getmember: the last one wins
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        scan.add("tar_unreadable", CORRUPT, f"tar archive cannot be read: {e}")
    size = len(mm)
    view = memoryview(mm) if type(mm) is mmap.mmap else mm
    for name, m in list(members.items()) + [(m.name, m) for m in others]:
        if m.offset_data + m.size > size:
            scan.add("tar_truncated", CORRUPT, f"tar member {name!r} runs past the end of the file", name)
            continue
        if m.size > MAX_PICKLE_MEMBER and name not in ("storages", "tensors"):
            scan.add("resource_limit", SUSPICIOUS, f"tar member {name!r} is over {MAX_PICKLE_MEMBER} bytes", name)
            continue
        buf = view[m.offset_data:m.offset_data + m.size]
        if members.get(name) is not m:
            _tar_pickles(scan, buf, f"{name}(shadowed)", _NoPidResolver(scan))
        elif name == "storages":
            _tar_pickles(scan, buf, name, _NoPidResolver(scan), storages=True)
        elif name == "tensors":
            _tar_pickles(scan, buf, name, _NoPidResolver(scan), tensors=True)
        elif name == "pickle":
            _tar_pickles(scan, buf, name, _TarPid(scan))
        else:
            _tar_pickles(scan, buf, name, _NoPidResolver(scan))
    # the fallback reading of the whole file as a legacy pickle
    other = Scan(path)
    _read_legacy(other, view, 0, size, f"{path.name}(as a pickle)", 0)
    scan.findings.extend(f for f in other.findings if f.severity in (MALICIOUS, SUSPICIOUS))
    for k, v in other.globals.items():
        scan.globals.setdefault(k, v)


# ---------------------------------------------------------------------------------------------

def scan(path: str | Path, *, writable: bool = True) -> Scan:
    """Read a pickle-based model file without executing anything; the file stays mapped in ``mm``.

    ``writable`` maps the file copy-on-write (tensors built on it are writable); a caller that only wants
    the verdict passes False for a read-only map, which also works for files larger than the memory the
    kernel will commit (a copy-on-write map of a 16 GB file can fail with ENOMEM)."""
    path = as_path(path)
    result = Scan(path)
    if type(path) is RemoteURL:
        return _scan_remote(result, path)
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        result.add("unreadable", CORRUPT, f"cannot open: {e.strerror or e}")
        return result
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            result.add("empty", CORRUPT, "file is empty")
            return result
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY if writable else mmap.ACCESS_READ)
    result.mm = mm
    return _scan_mapped(result, mm, size, path)


def _scan_remote(result: Scan, path) -> Scan:
    """``scan`` of a remote object through ranged reads: a torch zip costs its end record + central directory and
    its pickles' members; a legacy pickle is read from its start as far as the machine reads."""
    from ckptlab.errors import CkptlabError
    from ckptlab.remote.reader import RemoteBuffer, open_remote

    try:
        rf = open_remote(path)
        size = rf.size
    except CkptlabError as e:
        result.add("unreadable", CORRUPT, f"cannot open: {e.message}")
        return result
    if size == 0:
        result.add("empty", CORRUPT, "file is empty")
        return result
    mm = RemoteBuffer(rf)
    result.mm = mm
    if rf.pread(0, 4) == b"PK\x03\x04":
        rf.pread(max(0, size - ZIP_TAIL), min(size, ZIP_TAIL))  # end record + central directory: one GET
    return _scan_mapped(result, mm, size, path)


def _scan_mapped(result: Scan, mm, size: int, path) -> Scan:
    head = mm[:8]
    if head[:4] == b"PK\x03\x04":
        _scan_zip(result, mm, size)
        return result
    if head[:2] == b"7z" or head[:4] == b"\x37\x7a\xbc\xaf":
        result.add("archive_7z", SUSPICIOUS, "7z archive, not a model file (nullifAI-style wrapper)")
        return result
    if _is_tar(path if type(mm) is mmap.mmap else mm):
        _scan_tar(result, mm, path)
        return result
    if head[:4] == b"PK\x05\x06":
        result.add("zip_empty", CORRUPT, "empty zip archive")
        return result
    view = memoryview(mm) if type(mm) is mmap.mmap else mm
    result.container = "torch-legacy"
    root = _read_legacy(result, view, 0, size, path.name, 0)
    result.root = root
    result.complete = not any(f.severity == CORRUPT for f in result.findings) and root is not None
    return result
