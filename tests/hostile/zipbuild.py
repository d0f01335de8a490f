"""A tiny zip writer for test fixtures that can also lie: wrong local names, bad CRCs, flags,
duplicates, prepended or appended data. Members are STORED unless ``method=8``."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass


@dataclass
class Member:
    name: str
    data: bytes
    local_name: str | None = None
    flags: int = 0x0800
    crc: int | None = None
    method: int = 0


def build_zip(members: list[Member], *, prefix: bytes = b"", suffix: bytes = b"", align: int = 64) -> bytes:
    """Offsets are relative to the start of the zip, as when a zip is appended with ``cat``."""
    out = bytearray(prefix)
    central = bytearray()
    for m in members:
        raw = m.data if m.method == 0 else zlib.compress(m.data)[2:-4]
        crc = zlib.crc32(m.data) & 0xFFFFFFFF if m.crc is None else m.crc
        lname = (m.local_name if m.local_name is not None else m.name).encode()
        cname = m.name.encode()
        offset = len(out)
        # pad the extra field so the data starts aligned (as torch does)
        pad = (-(offset + 30 + len(lname) + 4)) % align
        extra = struct.pack("<HH", 0xCAFE, pad) + b"\0" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, m.flags, m.method, 0, 0x21, crc, len(raw), len(m.data),
                           len(lname), len(extra)) + lname + extra + raw
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, m.flags, m.method, 0, 0x21, crc, len(raw),
                               len(m.data), len(cname), 0, 0, 0, 0, 0, offset - len(prefix)) + cname
    cd_off = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                       cd_off - len(prefix), 0)
    return bytes(out) + suffix


def torch_members(root: str, data_pkl: bytes, records: dict[str, bytes] | None = None,
                  extra: list[Member] | None = None) -> list[Member]:
    """The member list torch 2.x writes, with our own data.pkl and records."""
    ms = [Member(f"{root}/data.pkl", data_pkl), Member(f"{root}/.format_version", b"1"),
          Member(f"{root}/.storage_alignment", b"64"), Member(f"{root}/byteorder", b"little")]
    for k, v in (records or {}).items():
        ms.append(Member(f"{root}/data/{k}", v))
    ms += list(extra or [])
    ms += [Member(f"{root}/version", b"3\n"), Member(f"{root}/.data/serialization_id", b"0" * 40)]
    return ms
