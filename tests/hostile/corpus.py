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


def build_hostile(folder: Path, canary_dir: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    canary_dir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, technique: str, suffix: str, content: bytes, expect: str = "malicious",
            stream: bytes | None = None, shows: tuple[str, ...] = ()) -> None:
        p = folder / f"{name}{suffix}"
        p.write_bytes(content)
        cases.append(Case(name, technique, p, canary_dir / name, expect, stream, shows))

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
    return cases
